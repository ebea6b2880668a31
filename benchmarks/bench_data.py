"""Data-side figures: corpus speed and learnability, dataset memory, preprocessing time with and without the cache.

usage: python benchmarks/bench_data.py [--out DIR] [--writers 10] [--images 120]

Prints a markdown table. What it measures:
  1. make_synthetic_dataset: 10 writers x (24 genuine + 24 forgeries), full size, seconds.
  2. Learnability of that corpus: the EER of two fixed distances over all
     within-writer pairs (276 genuine + 576 forgery pairs a writer), on the
     normalized, inverted scans resized to 64x64: pixel L2 and HOG L2.
     0 % would mean the task is trivial, 50 % that there is nothing to learn.
  3. Memory added by building SigDataset_CEDAR_Colab over the 34,080-pair
     CEDAR train file (55 writers; empty image files, since the constructor
     opens none): resident memory (VmRSS) and Python allocations (tracemalloc).
  4. Per-image time of dataset.load_image at 224: no cache, cache being filled
     (compute + write), cache warm; and what the cache saves in one epoch over
     the 34,080 CEDAR training pairs (two images a pair).
"""
from __future__ import annotations

import argparse
import gc
import itertools
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.feature import hog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from module.core.progress import progress_bar
from module.data.preprocess import normalize_image
from prepare_datasets import generate_cedar_pairs, make_synthetic_dataset
from sig_dataloader_colab import SigDataset_CEDAR_Colab
from training_utils import compute_metrics

CEDAR_TRAIN_PAIRS = 34080


def learnability(root: Path, writers: list[int], n_genuine: int, n_forged: int) -> dict[str, float]:
    def features(rel: str) -> tuple[np.ndarray, np.ndarray]:
        scan = np.asarray(Image.open(root / rel).convert("L"))
        normalized, _ = normalize_image(scan, scan.shape)
        small = np.asarray(Image.fromarray(255 - normalized).resize((64, 64), Image.BILINEAR), np.float32) / 255
        return small.ravel(), hog(small, orientations=8, pixels_per_cell=(8, 8), cells_per_block=(2, 2))

    distances = {"pixel L2": [], "HOG L2": []}
    labels = []
    for w in progress_bar(writers, desc="learnability", unit="writer"):
        genuine = [features(f"full_org/original_{w}_{n}.png") for n in range(1, n_genuine + 1)]
        forged = [features(f"full_forg/forgeries_{w}_{n}.png") for n in range(1, n_forged + 1)]
        pairs = [(a, b, 1) for a, b in itertools.combinations(genuine, 2)] + [(g, f, 0) for g in genuine for f in forged]
        for k, name in enumerate(distances):
            distances[name].extend(np.linalg.norm(a[k] - b[k]) for a, b, _ in pairs)
        labels.extend(label for _, _, label in pairs)
    return {name: compute_metrics(d, labels)["eer"] for name, d in distances.items()}


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def dataset_memory(root: Path) -> dict[str, float]:
    for folder in ("full_org", "full_forg"):
        (root / folder).mkdir(parents=True)
    for w in range(1, 56):
        for n in range(1, 25):
            (root / f"full_org/original_{w}_{n}.png").touch()
            (root / f"full_forg/forgeries_{w}_{n}.png").touch()
    generate_cedar_pairs(root)
    SigDataset_CEDAR_Colab(None, root, train=False, image_size=224)  # warm imports and caches first
    gc.collect()
    before = rss_bytes()
    ds = SigDataset_CEDAR_Colab(None, root, train=True, image_size=224)
    gc.collect()
    rss_added = rss_bytes() - before
    del ds
    gc.collect()
    tracemalloc.start()
    ds = SigDataset_CEDAR_Colab(None, root, train=True, image_size=224)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(ds) == CEDAR_TRAIN_PAIRS
    mb = 2**20
    return {"rss_added_mb": rss_added / mb, "python_held_mb": held / mb, "python_peak_mb": peak / mb}


def preprocessing_time(root: Path, cache_dir: Path, n_images: int) -> dict[str, float]:
    plain = SigDataset_CEDAR_Colab(None, root, train=True, image_size=224)
    cached = SigDataset_CEDAR_Colab(None, root, train=True, image_size=224, cache_dir=cache_dir)
    paths = plain.image_paths()[:n_images]

    def per_image(ds: SigDataset_CEDAR_Colab, desc: str) -> float:
        start = time.perf_counter()
        for path in progress_bar(paths, desc=desc, unit="image", leave=False):
            ds.load_image(path)
        return (time.perf_counter() - start) / len(paths)

    return {
        "no_cache_ms": 1000 * per_image(plain, "no cache"),
        "cache_fill_ms": 1000 * per_image(cached, "filling the cache"),
        "cache_warm_ms": 1000 * per_image(cached, "warm cache"),
        "mean_shape": np.mean([Image.open(p).size[::-1] for p in paths], axis=0).round().astype(int).tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="folder for the corpus (default: a temporary folder)")
    parser.add_argument("--writers", type=int, default=10)
    parser.add_argument("--images", type=int, default=120, help="images timed for the cache figures")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        corpus = out / "synthetic_cedar"
        start = time.perf_counter()
        info = make_synthetic_dataset(corpus, "cedar", n_writers=args.writers, seed=0)
        corpus_s = time.perf_counter() - start
        generate_cedar_pairs(corpus)
        eers = learnability(corpus, info["writers"], info["n_genuine"], info["n_forged"])
        memory = dataset_memory(Path(tmp) / "cedar55")
        timing = preprocessing_time(corpus, Path(tmp) / "cache", args.images)

    saved_s = (timing["no_cache_ms"] - timing["cache_warm_ms"]) / 1000 * 2 * CEDAR_TRAIN_PAIRS
    print(f"\n| measurement ({os.cpu_count()} CPUs) | value |\n|---|---|")
    scans = info["counts"]["files"]
    print(f"| synthetic corpus, {args.writers} writers x (24 + 24), full size | {corpus_s:.1f} s ({scans} scans) |")
    for name, value in eers.items():
        print(f"| learnability: EER of {name} on 64x64 normalized scans, all within-writer pairs | {100 * value:.1f} % |")
    print(f"| dataset over 34,080 pairs: resident memory added | {memory['rss_added_mb']:.1f} MB |")
    held, peak = memory["python_held_mb"], memory["python_peak_mb"]
    print(f"| dataset over 34,080 pairs: Python allocations held / peak | {held:.1f} / {peak:.1f} MB |")
    rows, cols = timing["mean_shape"]
    print(f"| load_image at 224, no cache (scans {rows}x{cols} on average) | {timing['no_cache_ms']:.2f} ms/image |")
    print(f"| load_image at 224, filling the cache | {timing['cache_fill_ms']:.2f} ms/image |")
    print(f"| load_image at 224, warm cache | {timing['cache_warm_ms']:.2f} ms/image |")
    print(f"| saved per epoch of 34,080 pairs (68,160 loads), one process | {saved_s:.0f} s |")


if __name__ == "__main__":
    main()
