"""Memory and time at growing dataset size: GPDS-layout synthetic corpora of about 1k, 4k and 16k images.

usage: python benchmarks/bench_scale.py [--images 1000 4000 16000] [--image-size 64] [--epoch-pairs 20000] [--out DIR]

Each size runs in a fresh process (so that peak resident memory is its own),
on a corpus of GPDS's shape: 24 genuine signatures and 30 forgeries a writer
(996 pairs a writer), pair files from `generate_gdps_pairs(resplit=True)`
(70 / 10 / 20 % of the writers). Stages, each with its wall time and its
peak resident memory (VmHWM, reset before the stage through
/proc/self/clear_refs):

  1. datasets: the train and validation pair datasets built from their pair files;
  2. store: the feature store filled (every training and validation image
     through the frozen backbone, chunks committed to disk), then read back;
  3. store again: a second `compute_features` of both sets, which finds every
     image in the store (what a resumed run or a re-run pays);
  4. epoch: one fast-path training epoch over `--epoch-pairs` pairs drawn from
     all the training pairs (`max_train_pairs_per_epoch`), the loader built
     over the full pair arrays. Its time is also given per 10,000 pairs.

Printed: a markdown table per size, then the slope per 10,000 images of each
stage's time and peak memory (least squares over the sizes), and the
feature store's bytes per image. The machine's load average is printed too:
on shared cores the times are only indicative.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GENUINE, FORGED = 24, 30  # GPDS: 54 scans and 996 pairs a writer


def peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def memory_mib() -> dict[str, float]:
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmHWM", "VmRSS")):
                values[line.split(":")[0]] = int(line.split()[1]) / 1024
    return values


def measure(stage: str, results: dict, work) -> object:
    peak_reset()
    before = memory_mib()["VmRSS"]
    start = time.perf_counter()
    value = work()
    results[stage] = {"seconds": time.perf_counter() - start, "peak_mib": memory_mib()["VmHWM"], "before_mib": before}
    return value


def one_size(n_images: int, image_size: int, epoch_pairs: int, work: Path) -> dict:
    """Runs in its own process: corpus, pair files, then the measured stages."""
    import torch

    from model_v3 import ViT_for_OSV_DSNet
    from models.fine_tune_utils import build_optimizer_for_head_only
    from module.features.loaders import make_epoch_loader
    from prepare_datasets import generate_gdps_pairs, make_synthetic_dataset
    from sig_dataloader_colab import SigDataset_GDPS_Colab
    from training_utils import FinetuneConfig, compute_features, setup_head_only_finetune, train_one_epoch

    torch.set_num_threads(2)
    writers = max(3, round(n_images / (GENUINE + FORGED)))
    root = work / f"gpds{n_images}"
    start = time.perf_counter()
    make_synthetic_dataset(root, "gpds", n_writers=writers, n_genuine=GENUINE, n_forged=FORGED, seed=1,
                           image_size=48, progress=False)
    corpus_seconds = time.perf_counter() - start
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the synthetic corpus's shared writer, reported by the re-split
        split = generate_gdps_pairs(root, resplit=True, val_ratio=0.1, test_ratio=0.2)
    results: dict = {"images": writers * (GENUINE + FORGED), "writers": writers, "corpus_seconds": corpus_seconds,
                     "train_pairs": split["counts"]["train"]["pairs"], "val_pairs": split["counts"]["val"]["pairs"]}
    torch.manual_seed(0)
    model = setup_head_only_finetune(ViT_for_OSV_DSNet(FinetuneConfig()))
    store = work / f"store{n_images}"

    def datasets():
        return [SigDataset_GDPS_Colab(None, root, train=split_name == "train", image_size=image_size,
                                      pair_file=f"gray_{split_name}.txt") for split_name in ("train", "val")]

    train, val = measure("datasets", results, datasets)
    results["train_images"], results["val_images"] = len(train.image_paths()), len(val.image_paths())

    def features():
        return [compute_features(model, data, feature_dir=store, batch_size=64, progress=False) for data in (train, val)]

    train_cache, _ = measure("store", results, features)
    measure("store again", results, features)
    results["store_bytes"] = sum(path.stat().st_size for path in store.rglob("*") if path.is_file())

    optimizer = build_optimizer_for_head_only(model, 1e-4)

    def epoch():
        loader = make_epoch_loader(train_cache, 32, 42, max_pairs=epoch_pairs)
        pairs = sum(counted for _, counted, _ in loader.batch_sampler.shares())
        return train_one_epoch(model, loader, optimizer, progress=False), pairs

    _, results["epoch_pairs"] = measure("epoch", results, epoch)
    return results


def fit_slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares ``y = a + b x``; returns ``(a, b)``."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    b = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / max(sum((x - mean_x) ** 2 for x in xs), 1e-12)
    return mean_y - b * mean_x, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--image-size", type=int, default=64, help="model input side (default %(default)s)")
    parser.add_argument("--epoch-pairs", type=int, default=20000, help="pairs in the measured epoch (default %(default)s)")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: measure one size
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="bench_scale-"))
    if args.one is not None:
        print(json.dumps(one_size(args.one, args.image_size, args.epoch_pairs, work)))
        return

    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; work folder {work}")
    rows = []
    for n_images in args.images:
        done = subprocess.run([sys.executable, __file__, "--one", str(n_images), "--image-size", str(args.image_size),
                               "--epoch-pairs", str(args.epoch_pairs), "--out", str(work)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {rows[-1]['images']} images done", file=sys.stderr)
    stages = ("datasets", "store", "store again", "epoch")
    print(f"\nGPDS-layout synthetic corpora, model input {args.image_size} px, torch 2 threads; "
          f"load average after: {os.getloadavg()[0]:.2f}\n")
    print("| images | train / val pairs | " + " | ".join(f"{stage}: s, peak MiB" for stage in stages)
          + " | store on disk |")
    print("|---:|---:|" + "---:|" * len(stages) + "---:|")
    for row in rows:
        cells = [f"{row[stage]['seconds']:.1f} s, {row[stage]['peak_mib']:.0f}" for stage in stages]
        print(f"| {row['images']:,} | {row['train_pairs']:,} / {row['val_pairs']:,} | " + " | ".join(cells)
              + f" | {row['store_bytes'] / 2**20:.1f} MiB |")
    images = [row["images"] for row in rows]
    print("\nslope per 10,000 images (least squares over the sizes):")
    for stage in stages:
        _, seconds = fit_slope(images, [row[stage]["seconds"] for row in rows])
        _, peak = fit_slope(images, [row[stage]["peak_mib"] for row in rows])
        print(f"  {stage:12s} {1e4 * seconds:8.1f} s   {1e4 * peak:8.1f} MiB peak")
    per_pair = [row["epoch"]["seconds"] / row["epoch_pairs"] for row in rows]
    print(f"  epoch time per 10,000 training pairs: {1e4 * sum(per_pair) / len(per_pair):.1f} s "
          f"(mean over sizes; {args.epoch_pairs:,} pairs drawn an epoch)")
    stored = [row["train_images"] + row["val_images"] for row in rows]
    _, store_bytes = fit_slope(stored, [row["store_bytes"] for row in rows])
    print(f"  store on disk: {store_bytes:.0f} bytes a stored image at {args.image_size} px "
          f"(float32 tokens: {(args.image_size // 32) ** 2 * 384 * 4} bytes, plus its record)")
    print("\nbaseline resident memory (torch, the model) before the first stage: "
          + ", ".join(f"{row['datasets']['before_mib']:.0f} MiB" for row in rows))


if __name__ == "__main__":
    main()
