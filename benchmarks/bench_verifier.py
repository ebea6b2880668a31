"""How long Verifier.verify takes: one query against enrolled references, at 224x224, on the CPU.

usage: python benchmarks/bench_verifier.py [--threads 2] [--references 3] [--repeats 20] [--image-size 224]

A synthetic CEDAR-layout corpus (full-size scans) and the model with its
initial weights (the time does not depend on the weights). Prints a markdown
table: the median, fastest and slowest of --repeats calls, after two warm-up
calls, for
  1. verify(query, writer=...) against --references enrolled references
     (what the issue's goal is about: the query read, preprocessed and
     embedded once, then compared with the kept reference features);
  2. verify(query, references=[...]): the references read and embedded too
     (what `finetune.py verify` does, without the imports and model loading);
  3. the parts of 1: reading and preprocessing the query scan, its backbone
     pass, and the comparisons (global distance + Sinkhorn EMD) with the references;
  4. enroll(writer, references): the references' reading and backbone pass, once.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_v3 import TokenFeatures, ViT_for_OSV_DSNet
from prepare_datasets import make_synthetic_dataset
from sig_dataloader_colab import load_signature
from training_utils import Verifier


def timed(call: Callable[[], object], repeats: int) -> list[float]:
    for _ in range(2):
        call()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    parser.add_argument("--references", type=int, default=3, help="enrolled references (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls (default %(default)s)")
    parser.add_argument("--image-size", type=int, default=224, help="model input side (default %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        make_synthetic_dataset(root, "cedar", n_writers=1, n_genuine=args.references + 1, n_forged=1, seed=0,
                               progress=False)
        references = [str(root / f"full_org/original_1_{n}.png") for n in range(1, args.references + 1)]
        query = str(root / "full_forg/forgeries_1_1.png")
        torch.manual_seed(0)
        verifier = Verifier(ViT_for_OSV_DSNet(), threshold=0.5, image_size=args.image_size)
        model = verifier.model
        verifier.enroll("w", references)

        rows = {
            f"verify against {args.references} enrolled references": timed(
                lambda: verifier.verify(query, writer="w"), args.repeats),
            f"verify with {args.references} reference scans (all embedded)": timed(
                lambda: verifier.verify(query, references=references), args.repeats),
            "  read and preprocess the query": timed(lambda: load_signature(query, args.image_size), args.repeats),
        }
        image = load_signature(query, args.image_size)[None]
        with torch.no_grad():
            rows["  the query's backbone pass"] = timed(lambda: model.embed(image), args.repeats)
            query_features = model.embed(image)
            enrolled = verifier._enrolled["w"].features
            repeated = TokenFeatures(query_features.tokens.expand(args.references, -1, -1),
                                     query_features.kept.expand(args.references, -1))
            rows[f"  compare with {args.references} references"] = timed(
                lambda: model.compare(enrolled, repeated), args.repeats)
        rows[f"enroll {args.references} references (once)"] = timed(lambda: verifier.enroll("w", references),
                                                                     max(3, args.repeats // 4))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.image_size}x{args.image_size}, "
          f"{args.repeats} calls after 2 warm-up calls\n")
    print("| measurement | median ms | fastest ms | slowest ms |")
    print("|---|---:|---:|---:|")
    for name, seconds in rows.items():
        print(f"| {name} | {1000 * statistics.median(seconds):.1f} | {1000 * min(seconds):.1f} | "
              f"{1000 * max(seconds):.1f} |")


if __name__ == "__main__":
    main()
