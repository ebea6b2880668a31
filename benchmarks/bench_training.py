"""Fast path against per-pair path, and exact metrics against the authors' threshold sweep.

Run from the project root::

    python benchmarks/bench_training.py                  # CEDAR-shaped, 224 px, a few minutes on 2 cores
    python benchmarks/bench_training.py --image-size 64 --writers 2 --per-pair-sample 64   # quick look

On a synthetic CEDAR-layout corpus (24 genuine + 24 forged scans a writer,
all 276 + 576 pairs of each writer) it measures, in one run:

* training pairs per second, head-only: the fast path (each distinct image
  embedded once, then ``compare`` per pair; first epoch with the embedding,
  later epochs without, and a whole run of ``--run-epochs``) against the
  per-pair path (two backbone passes per pair, as the seed trains);
* evaluation pairs per second, both ways;
* ``compute_metrics`` on 100,000 scores against a threshold sweep at the
  authors' 5e-5 step.

The per-pair path runs on a random sample of the same pairs (its cost per
pair does not depend on which pairs), so the run stays short. Prints a
markdown table.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_v3 import ViT_for_OSV_DSNet
from prepare_datasets import generate_cedar_pairs, make_synthetic_dataset
from sig_dataloader_colab import SigDataset_CEDAR_Colab
from training_utils import (
    build_optimizer_for_head_only,
    compute_features,
    compute_metrics,
    make_pair_loader,
    setup_head_only_finetune,
    train_one_epoch,
    validate,
)

AUTHORS_THRESHOLD_STEP = 5e-5


def threshold_sweep(distances: np.ndarray, labels: np.ndarray, step: float = AUTHORS_THRESHOLD_STEP) -> float:
    """The authors' EER: FAR and FRR at every threshold of a ``step`` grid, one threshold at a time (O(N x T))."""
    genuine = labels == 1
    n_genuine, n_forged = genuine.sum(), (~genuine).sum()
    best_gap, eer = np.inf, np.nan
    for threshold in np.arange(distances.min(), distances.max() + step, step):
        accepted = distances <= threshold
        far = (accepted & ~genuine).sum() / n_forged
        frr = (~accepted & genuine).sum() / n_genuine
        if abs(far - frr) < best_gap:
            best_gap, eer = abs(far - frr), (far + frr) / 2
    return float(eer)


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", type=int, default=3, help="synthetic writers (default 3: 2 train, 1 test)")
    parser.add_argument("--image-size", type=int, default=224, help="model input side, pixels (default 224)")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per training batch (default 32)")
    parser.add_argument("--per-pair-sample", type=int, default=128,
                        help="pairs timed on the per-pair path (default 128)")
    parser.add_argument("--run-epochs", type=int, default=10,
                        help="epochs of the whole-run row: the fast path embeds once, then trains them all (default 10)")
    parser.add_argument("--scores", type=int, default=100_000, help="scores for the metrics timing (default 100,000)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads (default 2)")
    parser.add_argument("--data", type=Path, default=None, help="corpus folder (default: a temporary one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    with tempfile.TemporaryDirectory() as scratch:
        root = args.data or Path(scratch) / "cedar"
        print(f"synthetic CEDAR corpus: {args.writers} writers x (24 genuine + 24 forged) in {root}", file=sys.stderr)
        make_synthetic_dataset(root, "cedar", n_writers=args.writers, seed=0, progress=False)
        generate_cedar_pairs(root, train_ratio=0.73)
        train_set = SigDataset_CEDAR_Colab(None, str(root), train=True, image_size=args.image_size, augment=False)
        test_set = SigDataset_CEDAR_Colab(None, str(root), train=False, image_size=args.image_size)
        model = setup_head_only_finetune(ViT_for_OSV_DSNet())
        optimizer = build_optimizer_for_head_only(model)
        sample = rng.choice(len(train_set), size=min(args.per_pair_sample, len(train_set)), replace=False)
        eval_sample = rng.choice(len(test_set), size=min(args.per_pair_sample, len(test_set)), replace=False)

        print("training, fast path ...", file=sys.stderr)
        cache, embed_seconds = timed(compute_features, model, train_set, batch_size=32)
        fast_loader = make_pair_loader(cache, args.batch_size, shuffle=True)
        _, epoch_seconds = timed(train_one_epoch, model, fast_loader, optimizer, epoch=1)
        print("training, per-pair path ...", file=sys.stderr)
        per_pair_loader = make_pair_loader(Subset(train_set, sample.tolist()), args.batch_size, shuffle=True)
        _, per_pair_seconds = timed(train_one_epoch, model, per_pair_loader, optimizer, epoch=1)

        print("evaluation, both ways ...", file=sys.stderr)
        (_, fast_metrics), eval_seconds = timed(validate, model, test_set, batch_size=32)
        eval_loader = make_pair_loader(Subset(test_set, eval_sample.tolist()), 32, shuffle=False)
        _, eval_per_pair_seconds = timed(validate, model, eval_loader)

    print("metrics ...", file=sys.stderr)
    labels = (rng.random(args.scores) < 0.3).astype(np.int64)
    distances = np.clip(rng.normal(np.where(labels == 1, 0.5, 0.8), 0.12), 0, None)
    metrics, metrics_seconds = timed(compute_metrics, distances, labels)
    sweep_eer, sweep_seconds = timed(threshold_sweep, distances, labels)

    n_train, n_test = len(train_set), len(test_set)
    fast_first = n_train / (embed_seconds + epoch_seconds)
    fast_later = n_train / epoch_seconds
    per_pair = len(sample) / per_pair_seconds
    fast_run = args.run_epochs * n_train / (embed_seconds + args.run_epochs * epoch_seconds)
    fast_eval = n_test / eval_seconds
    per_pair_eval = len(eval_sample) / eval_per_pair_seconds
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (load average {load}), "
          f"torch {torch.__version__} with "
          f"{args.threads} threads; image {args.image_size} px; training {n_train} pairs of "
          f"{len(cache.paths)} images, test {n_test} pairs of {len(test_set.image_paths())} images; "
          f"per-pair path timed on {len(sample)} / {len(eval_sample)} of them; batch {args.batch_size}.")
    print()
    print("| measurement | per-pair path | fast path | fast / per-pair |")
    print("|---|---:|---:|---:|")
    print(f"| training, pairs/s, first epoch (fast path embeds each image once) | {per_pair:,.1f} | "
          f"{fast_first:,.1f} | {fast_first / per_pair:,.1f}x |")
    print(f"| training, pairs/s, later epochs (features cached) | {per_pair:,.1f} | {fast_later:,.1f} | "
          f"{fast_later / per_pair:,.1f}x |")
    print(f"| training, pairs/s over a {args.run_epochs}-epoch run | {per_pair:,.1f} | {fast_run:,.1f} | "
          f"{fast_run / per_pair:,.1f}x |")
    print(f"| evaluation, pairs/s | {per_pair_eval:,.1f} | {fast_eval:,.1f} | {fast_eval / per_pair_eval:,.1f}x |")
    print()
    print("| EER on 100,000 scores | seconds | EER |")
    print("|---|---:|---:|")
    print(f"| threshold sweep, step 5e-5 (authors) | {sweep_seconds:.2f} | {100 * sweep_eer:.4f}% |")
    print(f"| compute_metrics, every distinct score | {metrics_seconds:.3f} | {100 * metrics['eer']:.4f}% |")
    print()
    print(f"(fast-path test EER of this untrained head: {100 * fast_metrics['eer']:.2f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
