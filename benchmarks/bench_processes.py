"""One process against two under torchrun (gloo, CPU): the epoch time of the fast path and of the per-pair path.

usage: python benchmarks/bench_processes.py [--writers 12] [--image-size 64] [--epochs 3] [--out DIR]
                                           [--paths fast-head-only per-pair]

On a CEDAR-layout synthetic corpus (24 genuine signatures and 24 forgeries a
writer: 852 pairs a writer, 70 % of the writers train), each path trains
``--epochs`` epochs three ways: ``python`` with one thread, ``python`` with
two threads (what a plain run on a 2-core machine does), and ``torchrun
--nproc_per_node=2`` with one thread a process. The figure is the mean
``seconds`` of the training epochs (training plus validation; the fast
path's embedding, before them, is not counted). "1 thread" is also about
what rank 0 alone would take for the head's step in a 2-process job: the
comparison behind the choice of DDP for it (README, "More than one GPU").
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def epoch_seconds(corpus: Path, out: Path, path: str, epochs: int, image_size: int, threads: int,
                  processes: int) -> float:
    from models.weights import read_torch_file

    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*launcher, str(ROOT / "finetune.py"), "train", "cedar", str(corpus), "--out", str(out),
               "--image-size", str(image_size), "--epochs", str(epochs), "--batch-size", "32", "--device", "cpu",
               "--num-workers", "0", "--patience", str(epochs), "--no-resume", path]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, cwd=ROOT, env=environment, check=True, capture_output=True)
    seconds = read_torch_file(out / f"epoch_{epochs:04d}.pt")["history"]["seconds"][1:]
    return sum(seconds) / len(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--paths", nargs="+", default=["fast-head-only", "per-pair"],
                        choices=["fast-head-only", "per-pair"])
    args = parser.parse_args()

    from prepare_datasets import ensure_pair_files, make_synthetic_dataset

    work = args.out or Path(tempfile.mkdtemp(prefix="bench_processes_"))
    corpus = work / "cedar"
    if not (corpus / "gray_train.txt").exists():
        make_synthetic_dataset(corpus, "cedar", n_writers=args.writers, n_genuine=24, n_forged=24, seed=0,
                               image_size=2 * args.image_size, progress=False)
        ensure_pair_files("cedar", corpus, val_ratio=0.1, random_state=0, train_ratio=0.7)
    train_pairs = sum(1 for _ in open(corpus / "gray_train.txt"))
    print(f"{args.writers} writers, {train_pairs} training pairs, {args.image_size} px, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n", flush=True)
    print("| path | python, 1 thread | python, 2 threads | torchrun, 2 processes x 1 thread |")
    print("|---|---|---|---|")
    for path in (f"--{name}" for name in args.paths):
        cells = [epoch_seconds(corpus, work / f"run{path}-{threads}-{processes}", path, args.epochs,
                               args.image_size, threads, processes)
                 for threads, processes in ((1, 1), (2, 1), (1, 2))]
        print(f"| `{path}` | " + " | ".join(f"{value:.2f} s" for value in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
