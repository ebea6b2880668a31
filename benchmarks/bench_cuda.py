"""The CUDA path, measured once on a GPU: embedding in float32, float16 and bfloat16, the per-pair step, the fast
path's epoch on a CEDAR-shaped set, and what the Sinkhorn's convergence check costs.

usage: python benchmarks/bench_cuda.py [--device cuda] [--image-size 224] [--writers 55] [--out DIR]

Prints a markdown table for the README ("More than one GPU"), headed by the
GPU's name. Stages:

  1. embed: images/s of ``model.embed`` (a fresh backbone, batch 64) in
     float32 and under autocast in float16 and bfloat16 (bfloat16 only where
     the GPU has it);
  2. Sinkhorn: ms and host syncs per batch of 64 pairs of ``sinkhorn_emd`` on
     tokens of synthetic images, at the training and the evaluation epsilon:
     checking convergence every iteration, at the model's interval (every 8th
     in training, float32; every 2nd in evaluation) and the padded float64
     implementation it replaced; the first two distances must be equal;
  3. training: ``finetune.py train`` on a CEDAR-shaped synthetic corpus
     (``--writers`` writers, 24 genuine and 24 forged each): the per-pair path
     (``--amp``: float16 autocast, an epoch of 2,000 pairs) in pairs/s, and the fast
     path's epoch time (the head's step and validation) and the whole
     command's (embedding the images once, 3 epochs, the test set before and
     after, the report).

Runs on a CPU too (``--device cpu --image-size 64 --writers 6``), to check
the script itself; its numbers then say nothing about a GPU.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(work, device: torch.device, repeats: int) -> float:
    """Seconds per call of ``work()``, after two warm-up calls."""
    for _ in range(2):
        work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def images_of(corpus: Path, image_size: int, count: int, device: torch.device) -> torch.Tensor:
    """``[count, 1, S, S]`` preprocessed images of the corpus's genuine scans."""
    from sig_dataloader_colab import SigDataset_CEDAR_Colab

    dataset = SigDataset_CEDAR_Colab(None, corpus, train=True, image_size=image_size, augment=False)
    pairs = [dataset[index][0] for index in range(0, len(dataset), max(1, len(dataset) // count))][:count]
    return torch.cat([pair[:1] for pair in pairs] * (count // len(pairs) + 1))[:count, None].to(device)


def run_training(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


def training_figures(corpus: Path, work: Path, device: torch.device, image_size: int) -> dict[str, float]:
    from models.weights import read_torch_file

    figures = {}
    common = [sys.executable, str(ROOT / "finetune.py"), "train", "cedar", str(corpus), "--image-size", str(image_size),
              "--device", str(device), "--batch-size", "32", "--amp", "--no-resume", "--warmup-epochs", "0"]
    run_training([*common, "--out", str(work / "per_pair"), "--per-pair", "--epochs", "1",
                  "--max-train-pairs-per-epoch", "2000"])
    pairs = min(2000, sum(1 for _ in open(corpus / "gray_train.txt")))
    history = read_torch_file(work / "per_pair" / "epoch_0001.pt")["history"]
    figures["per-pair path, training pairs/s (--amp, an epoch of 2,000 pairs with validation)"] = \
        pairs / history["seconds"][-1]
    start = time.perf_counter()
    run_training([*common, "--out", str(work / "fast"), "--fast-head-only", "--epochs", "3", "--patience", "3"])
    figures["fast path, whole command s (embedding, 3 epochs, test before and after, report)"] = \
        time.perf_counter() - start
    seconds = read_torch_file(work / "fast" / "epoch_0003.pt")["history"]["seconds"][1:]
    figures["fast path, s a training epoch (head step and validation)"] = sum(seconds) / len(seconds)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--writers", type=int, default=55, help="CEDAR has 55")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()

    from bench_sinkhorn import counted_syncs

    from model_v3 import SINKHORN_CHECK_EVERY_TRAIN, SINKHORN_EPS_EVAL, SINKHORN_EPS_TRAIN, ViT_for_OSV_DSNet
    from models.emd import pairwise_cost, sinkhorn_emd
    from module.core.precision import AMP_DTYPES
    from prepare_datasets import ensure_pair_files, make_synthetic_dataset
    from tests.test_emd_fast import padded_sinkhorn_emd

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    work = args.out or Path(tempfile.mkdtemp(prefix="bench_cuda_"))
    corpus = work / "cedar"
    if not (corpus / "gray_train.txt").exists():
        make_synthetic_dataset(corpus, "cedar", n_writers=args.writers, n_genuine=24, n_forged=24, seed=0,
                               image_size=args.image_size, progress=False)
        ensure_pair_files("cedar", corpus, val_ratio=0.1, random_state=0, train_ratio=0.7)

    model = ViT_for_OSV_DSNet().to(device).eval()
    images = images_of(corpus, args.image_size, 64, device)
    rows = []
    with torch.no_grad():
        for dtype_name, dtype in [("float32", None), *AMP_DTYPES.items()]:
            if device.type != "cuda" and dtype is not None:
                continue
            if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
                rows.append((f"embed, images/s, {dtype_name}", "not on this GPU"))
                continue
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                seconds = timed(lambda: model.embed(images), device, repeats=5)
            rows.append((f"embed, images/s, {dtype_name}", f"{len(images) / seconds:,.0f}"))

        features = model.embed(images)
        reference, query = model.head_str(features.tokens.float()), model.head_str(features.tokens.float().roll(1, 0))
        cost = pairwise_cost(query, reference, model.dis_type)
        for eps_name, eps in (("training", SINKHORN_EPS_TRAIN), ("evaluation", SINKHORN_EPS_EVAL)):
            distances = {}
            # The model's settings (float32 and every 8th iteration in training), every iteration, and the padded
            # float64 implementation this replaced (tests/test_emd_fast.py).
            training = eps == SINKHORN_EPS_TRAIN
            variants = {f"check every {every}": partial(sinkhorn_emd, check_every=every, dtype=torch.float32
                                                       if training else torch.float64)
                        for every in ((1, SINKHORN_CHECK_EVERY_TRAIN) if training else (1, 2))}
            variants["padded float64"] = padded_sinkhorn_emd
            for variant, function in variants.items():
                def emd(function=function, eps: float = eps) -> torch.Tensor:
                    return function(cost, features.kept.roll(1, 0), features.kept, eps=eps)
                with counted_syncs() as syncs:
                    distances[variant] = emd()
                seconds = timed(emd, device, repeats=20)
                rows.append((f"Sinkhorn, ms a batch of 64 pairs, {eps_name} eps, {variant}", f"{1000 * seconds:.2f}"))
                rows.append((f"Sinkhorn, host syncs a batch, {eps_name} eps, {variant}", str(sum(syncs.values()))))
            first, second = list(distances.values())[:2]
            assert torch.equal(first, second), "checking less often changed a distance"

    rows += [(label, f"{value:,.1f}") for label, value in training_figures(corpus, work, device, args.image_size).items()]
    print(f"{name}, torch {torch.__version__}, {args.image_size} px, {args.writers} writers\n")
    print("| measurement | value |\n|---|---:|")
    for label, value in rows:
        print(f"| {label} | {value} |")


if __name__ == "__main__":
    main()
