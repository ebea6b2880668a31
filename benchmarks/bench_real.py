"""The ladder on real scans without anyone's checkpoint: a HOG baseline, then each way the project can train.

Run from the project root::

    python benchmarks/bench_real.py ../shared/data/cedar-dev --minutes 30 --out runs/ladder
    python benchmarks/bench_real.py DATA_ROOT --minutes 30 --out DIR --pretrained-file runs/pretrain/pretrained.pth

``DATA_ROOT`` is any CEDAR-layout folder (``full_org/``, ``full_forg/``); it
is only read: the scans are linked into ``DIR/data``, with its
``gray_train.txt``, ``gray_val.txt`` and ``gray_test.txt`` when it has them,
or a writer-disjoint split made by ``prepare`` otherwise. The rungs, all on
the same test pairs:

1. ``hog + cosine``: scikit-image's HOG of each preprocessed scan, cosine
   distance (no training);
2. ``ink grey difference``: how far apart the two scans' median ink grey is
   (``scan_statistics`` of the raw scans): no shape at all, a measure of what
   the pen and the scanner alone tell apart in this data;
3. ``fresh, head-only``: a freshly initialised backbone (its BatchNorm
   statistics and distance scale from training scans, ``models/data_init.py``),
   ``head_str`` trained on stored features;
4. ``fresh, whole model``: the same start, ``finetune all`` (augmented);
5. ``synthetic pre-training``: ``pretrain``'s whole model on procedural
   writers, tested as it is (zero-shot);
6. from it, ``+ head-only``, ``+ last:3`` (stage 4 on stored features) and
   ``+ whole model`` (``finetune all``, augmented).

``--minutes`` is the budget of the whole ladder, pre-training included (a
``--pretrained-file`` skips it, and the table says so). Each trained rung
gets a share of it: a probe of two training steps gives the seconds a pair,
one batch of embeddings the seconds its validation and tests will take, and
the rung's epochs take as many pairs as what is left of its share allows. Prints one
markdown table and writes ``DIR/ladder.json``: a list of ``{"name",
"test_eer", "test_auc", "writer_eer", "seconds"}`` (EERs as fractions;
``writer_eer`` with each writer's own threshold).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from module.core.threads import passive_threads

passive_threads()  # before torch loads

import numpy as np
import torch
from skimage.feature import hog

from module.data.images import imread_tool, load_signature
from module.data.pair_files import PAIR_FILES
from module.data.prepare import ensure_pair_files
from module.data.scan_statistics import scan_statistics
from module.evaluation.metrics import compute_metrics
from module.evaluation.validation import validate, writer_metrics_of
from module.features.cache import compute_features
from module.features.loaders import make_pair_loader
from module.features.store import LAST_BLOCK
from module.run.config import FinetuneConfig
from module.run.state import prepare_run
from module.run.trained import build_datasets, build_model
from training_utils import pretrain, train_and_report, train_one_epoch

# Shares of the budget; the whole-model rung from pre-training, last, gets what the others left (all of
# pre-training's when a file is given). The whole-model rungs get the most, since on real scans they are the ones
# that learn (a 30-minute ladder on cedar-dev: head-only rungs did not move off their start, last:3 by 4 points,
# the whole model by 6 in 500 s).
SHARES = {"fresh, head-only": 0.05, "fresh, whole model": 0.25, "pretrain": 0.2, "+ head-only": 0.04, "+ last:3": 0.08}
EPOCHS = 6


def link_data(data_root: Path, out: Path) -> Path:
    """``out/data`` with the scans of ``data_root`` linked in, and its pair files when it has all three."""
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name in ("full_org", "full_forg", *PAIR_FILES.values()):
        source, link = data_root.absolute() / name, data / name
        if source.exists() and not link.exists():
            link.symlink_to(source)
    if not all((data / name).exists() for name in PAIR_FILES.values()):
        ensure_pair_files("cedar", data, val_ratio=0.1, random_state=0)
    return data


def row(name: str, metrics: dict, seconds: float, note: str = "") -> dict:
    writer = metrics.get("writer_level") or {}
    return {"name": name, "test_eer": float(metrics["eer"]), "test_auc": float(metrics["auc"]),
            "writer_eer": writer.get("eer_user_thresholds"), "seconds": round(seconds, 1), "note": note}


def untrained_row(name: str, test_set, distances: np.ndarray, start: float) -> dict:
    """The table row of a rung without training: ``distances`` ``[P]`` of ``test_set``'s pairs, timed from ``start``."""
    labels = np.array([label for *_, label in test_set.pairs])
    metrics = compute_metrics(distances, labels)
    metrics["writer_level"] = writer_metrics_of(test_set, distances, labels)
    return row(name, metrics, time.perf_counter() - start)


def hog_rung(test_set, image_size: int) -> dict:
    start = time.perf_counter()
    features = {path: hog(load_signature(path, image_size)[0].numpy(), orientations=9, pixels_per_cell=(8, 8),
                          cells_per_block=(2, 2)) for path in test_set.image_paths()}
    ref = np.stack([features[a] for a, _, _ in test_set.pairs])
    query = np.stack([features[b] for _, b, _ in test_set.pairs])
    cosine = (ref * query).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(query, axis=1) + 1e-12)
    return untrained_row("hog + cosine", test_set, 1 - cosine, start)


def ink_rung(test_set) -> dict:
    """The absolute difference of the two scans' median ink grey (``scan_statistics``, raw scans): no training."""
    start = time.perf_counter()
    ink = {path: scan_statistics(imread_tool(path))["ink_grey"] for path in test_set.image_paths()}
    distances = np.array([abs(ink[a] - ink[b]) for a, b, _ in test_set.pairs])
    return untrained_row("ink grey difference", test_set, distances, start)


def seconds_a_pair(config: FinetuneConfig, train_set) -> float:
    """Training seconds a pair on ``config``'s path, from two steps of a throwaway run (the one-off embedding of
    the fast path apart: the store it fills is the rung's)."""
    probe = dataclasses.replace(config, ckpt_dir=config.ckpt_dir + "-probe")
    run = prepare_run(build_model(probe), probe, resume=False)
    data = compute_features(run.model, train_set, block=LAST_BLOCK - config.unfreeze_blocks,
                            feature_dir=config.feature_store_dir(), progress=False) if config.fast_head_only else train_set
    loader = make_pair_loader(data, config.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    batches = [batch for _, batch in zip(range(2), loader)]
    start = time.perf_counter()
    train_one_epoch(run.model, batches, run.optimizer, progress=False)
    return (time.perf_counter() - start) / sum(len(batch.labels if hasattr(batch, "labels") else batch[1])
                                               for batch in batches)


def seconds_an_image(config: FinetuneConfig, dataset) -> float:
    """Evaluation seconds an image (its embedding; comparing the pairs after it is ~1 % of that here), from one
    batch of ``dataset``'s scans through a fresh model."""
    model = build_model(dataclasses.replace(config, pretrained="", init_from="")).eval()
    paths = dataset.image_paths()[:config.eval_batch_size]
    images = torch.stack([load_signature(path, config.image_size) for path in paths]).to(config.resolved_device())
    with torch.no_grad():
        model.embed(images[:2])  # warm-up
        start = time.perf_counter()
        model.embed(images)
    return (time.perf_counter() - start) / len(paths)


def trained_rung(name: str, config: FinetuneConfig, datasets: dict, budget_s: float) -> dict:
    start = time.perf_counter()
    pair_seconds = seconds_a_pair(config, datasets["train"])
    # What the rung spends besides training: validation each epoch and the test before and after, an embedding
    # per image each time.
    evaluation_s = seconds_an_image(config, datasets["val"]) * (
        EPOCHS * len(datasets["val"].image_paths()) + 2 * len(datasets["test"].image_paths()))
    left = budget_s - (time.perf_counter() - start) - evaluation_s
    pairs = int(0.9 * left / EPOCHS / pair_seconds)
    pairs = max(config.batch_size, min(pairs, len(datasets["train"])))
    config = dataclasses.replace(config, epochs=EPOCHS, max_train_pairs_per_epoch=pairs)
    print(f"{name}: {pair_seconds * 1e3:.0f} ms a training pair, {evaluation_s:.0f} s of evaluation -> {EPOCHS} "
          f"epochs of {pairs} pairs", file=sys.stderr)
    result = train_and_report(config, datasets=datasets, progress=False)
    return row(name, result.metrics["test"], time.perf_counter() - start, f"{EPOCHS} x {pairs} pairs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_root", type=Path, help="a CEDAR-layout folder (only read)")
    parser.add_argument("--minutes", type=float, default=30, help="budget of the whole ladder (default 30)")
    parser.add_argument("--out", type=Path, required=True, help="folder of the runs, the links and ladder.json")
    parser.add_argument("--image-size", type=int, default=96, help="model input side, pixels (default 96)")
    parser.add_argument("--pretrained-file", type=Path, help="skip pre-training: use this pretrain output")
    parser.add_argument("--writers", type=int, default=200, help="synthetic pre-training writers (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:n]")
    parser.add_argument("--amp-dtype", choices=("none", "float16", "bfloat16"), default="none",
                        help="autocast the backbone on CUDA (default none)")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    budget = 60 * args.minutes
    data = link_data(args.data_root, args.out)
    base = FinetuneConfig(dataset="cedar", data_root=str(data), image_size=args.image_size, batch_size=16,
                          eval_batch_size=64, device=args.device, seed=args.seed, warmup_epochs=1, patience=EPOCHS,
                          lr=4e-3, lr_blocks=1e-4, feature_dir=str(args.out / "features"),
                          amp=args.amp_dtype != "none",
                          amp_dtype=args.amp_dtype if args.amp_dtype != "none" else "float16")
    datasets = build_datasets(base)
    rows = [hog_rung(datasets["test"], args.image_size), ink_rung(datasets["test"])]

    def run_config(name: str, **changes) -> FinetuneConfig:
        folder = name.strip("+ ").replace(" ", "-").replace(",", "").replace(":", "")
        return dataclasses.replace(base, ckpt_dir=str(args.out / folder), **changes)

    rows.append(trained_rung("fresh, head-only", run_config("fresh head-only"), datasets,
                             SHARES["fresh, head-only"] * budget))
    rows.append(trained_rung("fresh, whole model", run_config("fresh whole model", finetune="all",
                                                              fast_head_only=False), datasets,
                             SHARES["fresh, whole model"] * budget))
    pretrain_note = ""
    if args.pretrained_file is not None:
        weights, pretrain_seconds = args.pretrained_file.absolute(), 0.0
        pretrain_note = f"pre-training skipped: {weights} given"
    else:
        start = time.perf_counter()
        pre = dataclasses.replace(run_config("pretrain"), finetune="all", fast_head_only=False, lr=4e-4,
                                  data_root="", feature_dir="")
        pair_seconds = seconds_a_pair(run_config("whole-model probe", finetune="all", fast_head_only=False),
                                      datasets["train"])  # the synthetic pairs cost what real ones do
        pairs = max(16, int(0.7 * SHARES["pretrain"] * budget / EPOCHS / pair_seconds))
        pre = dataclasses.replace(pre, epochs=EPOCHS, max_train_pairs_per_epoch=pairs)
        weights = pretrain(pre, writers=args.writers, progress=False)
        pretrain_seconds = time.perf_counter() - start
    start = time.perf_counter()
    zero_shot = dataclasses.replace(base, pretrained=str(weights))
    metrics = validate(build_model(zero_shot), datasets["test"], progress=False)
    metrics["writer_level"] = writer_metrics_of(datasets["test"], metrics["distances"], metrics["labels"])
    rows.append(row("synthetic pre-training, zero-shot", metrics, pretrain_seconds + time.perf_counter() - start,
                    pretrain_note))
    rows.append(trained_rung("+ head-only", run_config("+ head-only", pretrained=str(weights)), datasets,
                             SHARES["+ head-only"] * budget))
    rows.append(trained_rung("+ last:3", run_config("+ last:3", pretrained=str(weights), finetune="last:3"),
                             datasets, SHARES["+ last:3"] * budget))
    rows.append(trained_rung("+ whole model", run_config("+ whole model", pretrained=str(weights), finetune="all",
                                                         fast_head_only=False), datasets,
                             budget - (time.perf_counter() - began)))

    (args.out / "ladder.json").write_text(json.dumps(rows, indent=1))
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"\n{args.data_root}: {len(datasets['train'])} training, {len(datasets['test'])} test pairs; "
          f"{args.image_size} px; budget {args.minutes:g} min, used {(time.perf_counter() - began) / 60:.1f} min; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (load average {load}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| rung | test EER | test AUC | EER, per-writer thresholds | seconds | note |")
    print("|---|---:|---:|---:|---:|---|")
    for entry in rows:
        writer = f"{100 * entry['writer_eer']:.1f} %" if entry["writer_eer"] is not None else "-"
        print(f"| {entry['name']} | {100 * entry['test_eer']:.1f} % | {entry['test_auc']:.3f} | {writer} | "
              f"{entry['seconds']:.0f} | {entry['note']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
