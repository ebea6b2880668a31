"""How close the procedural corpus is to real scans: the same statistics measured on both.

Run from the project root::

    python benchmarks/bench_realism.py ../shared/data/cedar-dev --out runs/realism
    python benchmarks/bench_realism.py REAL_ROOT --synthetic OTHER_ROOT --out DIR

``REAL_ROOT`` is any CEDAR-layout folder (only read). Without ``--synthetic``,
a procedural CEDAR corpus of as many writers and samples a writer (at most
``--samples``) is written into ``DIR/synthetic`` with ``--seed``, as
``pretrain`` writes its corpus. Every scan is measured by
``module.data.scan_statistics`` (paper and ink grey, stroke width, pen lifts,
slant, size, outline roughness; at a longer side of 400 px) and every writer
by its within-writer variation and how its forgeries differ from its
genuines. Prints one markdown table (medians, with the real scans'
interquartile range, and the gap in those ranges) and writes
``DIR/realism.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from module.core.threads import passive_threads

passive_threads()

from module.data.scan_statistics import SCAN_STATISTICS, WRITER_STATISTICS, corpus_statistics, summary
from synthetic_signatures import make_synthetic_dataset


def table(real: dict, synthetic: dict) -> list[dict]:
    """One entry a statistic and group: real and synthetic medians, the real interquartile range, the gap in it."""
    entries = []
    groups = [("genuine", name) for name in SCAN_STATISTICS] + [("forged", name) for name in SCAN_STATISTICS]
    groups += [("writers", name) for name in WRITER_STATISTICS]
    for group, name in groups:
        real_median, q1, q3 = summary(real[group], name)
        synthetic_median = summary(synthetic[group], name)[0]
        spread = max(q3 - q1, 1e-9 + 0.05 * abs(real_median))  # a constant statistic still gets a scale
        entries.append({"group": group, "statistic": name, "real": real_median, "real_q1": q1, "real_q3": q3,
                        "synthetic": synthetic_median, "gap": (synthetic_median - real_median) / spread})
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("real_root", type=Path, help="a CEDAR-layout folder of real scans (only read)")
    parser.add_argument("--out", type=Path, required=True, help="folder of the synthetic corpus and realism.json")
    parser.add_argument("--synthetic", type=Path, help="compare with this CEDAR-layout folder instead of a new corpus")
    parser.add_argument("--samples", type=int, default=12, help="genuine and forged scans a writer measured (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the procedural corpus (default 0)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    real = corpus_statistics(args.real_root, args.samples)
    if not real["writers"]:
        parser.error(f"{args.real_root}: no writer with 2 or more genuine scans to measure")
    synthetic_root = args.synthetic
    if synthetic_root is None:
        synthetic_root = args.out / "synthetic"
        make_synthetic_dataset(synthetic_root, "cedar", n_writers=len(real["writers"]), n_genuine=args.samples,
                               n_forged=args.samples, seed=args.seed, progress=False)
    synthetic = corpus_statistics(synthetic_root, args.samples)
    entries = table(real, synthetic)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "realism.json").write_text(json.dumps(entries, indent=1))
    print(f"\n{args.real_root} ({len(real['writers'])} writers, {len(real['genuine'])} genuine, "
          f"{len(real['forged'])} forged) vs {synthetic_root} ({len(synthetic['writers'])} writers); "
          f"{time.perf_counter() - start:.0f} s\n")
    print("| scans | statistic | real median [IQR] | synthetic median | gap (real IQRs) |")
    print("|---|---|---:|---:|---:|")
    for entry in entries:
        print(f"| {entry['group']} | {entry['statistic']} | {entry['real']:.3g} [{entry['real_q1']:.3g}, "
              f"{entry['real_q3']:.3g}] | {entry['synthetic']:.3g} | {entry['gap']:+.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
