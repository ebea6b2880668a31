"""Pair files made from dataset folders (spec section 7), and the command line that makes and checks them.

The generators write `gray_train.txt` and `gray_test.txt` (and
`gray_val.txt` with a validation split) into the dataset root, where the
datasets in sig_dataloader_colab.py look for them. Splits are by writer, and
everything is deterministic for `random_state`. Whatever is odd in a folder
(a writer without forgeries, a forgery-only writer, a writer number spelled
two ways) is reported as a warning naming the writer and what was done.
`ensure_pair_files` writes them only when they are missing, invalid or made
with other arguments (for notebooks that are run again after a disconnect);
`ensure_test_pair_file` gives evaluation a test file without touching a
dataset's other files. Each layout is one module of `module/data/datasets/`;
the pair-file format is `module/data/pair_files.py`, making them
`module/data/prepare.py`. This file is the face users import and the
command line.

Command line: `python prepare_datasets.py {synthetic,cedar,bhsig,gpds,sample,validate} --help`.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from models.errors import InputError
from module.core.wording import command_line
from module.data.datasets import DATASETS, dataset_layout, writer_of
from module.data.datasets.bhsig import generate_bhsig_pairs
from module.data.datasets.cedar import generate_cedar_pairs
from module.data.datasets.gpds import generate_gdps_pairs
from module.data.pair_files import PAIR_FILES, PairFileError, read_pair_file, sample_pair_file, write_pair_file
from module.data.prepare import (
    add_pair_options,
    ensure_pair_files,
    ensure_test_pair_file,
    generate,
    generator_arguments,
    pair_file_fix,
    pair_options_of,
    write_pair_file_set,
)
from module.data.validation import PairFileReport, validate_pair_file
from synthetic_signatures import ensure_synthetic_dataset, make_synthetic_dataset

__all__ = [
    "PAIR_FILES",
    "PairFileError",
    "PairFileReport",
    "ensure_pair_files",
    "ensure_synthetic_dataset",
    "ensure_test_pair_file",
    "generate_bhsig_pairs",
    "generate_cedar_pairs",
    "generate_gdps_pairs",
    "make_synthetic_dataset",
    "pair_file_fix",
    "read_pair_file",
    "sample_pair_file",
    "validate_pair_file",
    "write_pair_file",
    "writer_of",
]


# ---------------------------------------------------------------------------
# Command line

def _print_generated(result: dict) -> None:
    for split, path in result["files"].items():
        c = result["counts"][split]
        print(f"{split:5s} {path}: {c['pairs']} pairs ({c['genuine']} genuine, {c['forgery']} forgery), "
              f"{len(result['writers'][split])} writer(s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Make and check signature pair files (tab-separated: reference, query, label 1 genuine / 0 forgery).",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synthetic", allow_abbrev=False, help="write a synthetic corpus in a real layout")
    p.add_argument("root", help="output folder")
    p.add_argument("--layout", choices=("cedar", "gpds", "bhsig"), default="cedar")
    p.add_argument("--writers", type=int, default=10)
    p.add_argument("--genuine", type=int, default=None, help="samples a writer (default: the real dataset's)")
    p.add_argument("--forged", type=int, default=None, help="forgeries a writer (default: the real dataset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=None, help="longest canvas side (default: full CEDAR-like size)")
    p.add_argument("--language", choices=("hindi", "bengali"), default="hindi", help="for --layout bhsig")

    for layout in DATASETS.values():
        p = sub.add_parser(layout.name, aliases=list(layout.aliases), allow_abbrev=False,
                           help=f"pair files for a {layout.title} root ({layout.naming})")
        p.add_argument("root")
        add_pair_options(p, [layout.name])
        p.add_argument("--out-dir", default=None, help="where to write (default: the root, with a record pair_files.json)")

    p = sub.add_parser("sample", allow_abbrev=False, help="draw COUNT pairs of a pair file, keeping the class ratio")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("count", type=int)
    p.add_argument("--seed", type=int, default=42)

    p = sub.add_parser("validate", allow_abbrev=False,
                       help="check pair files: parse, images exist and decode, duplicates, writers shared "
                                        "between the files given")
    p.add_argument("root")
    p.add_argument("pair_files", nargs="+", help="relative to the root, or absolute")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, category, *location: f"warning: {message}\n"
    try:
        with command_line("prepare_datasets.py"):
            return _run(args)
    except (InputError, OSError) as error:  # the user's input; anything else is a bug and keeps its traceback
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "synthetic":
        info = make_synthetic_dataset(
            args.root, layout=args.layout, n_writers=args.writers, n_genuine=args.genuine,
            n_forged=args.forged, seed=args.seed, image_size=args.image_size, language=args.language,
        )
        print(f"{info['counts']['files']} scans of {len(info['writers'])} writers in {info['root']} "
              f"({info['layout']}, {info['seconds']} s)")
    elif args.command not in ("sample", "validate"):
        name = dataset_layout(args.command).name
        options = pair_options_of(args, [name])
        arguments = generator_arguments(name, args.val_ratio, args.random_state, options, args.random_forgeries)
        if args.out_dir is None:  # the root's pair files, as one transaction with their record
            result = write_pair_file_set(Path(args.root), arguments)
        else:
            result = generate(args.root, arguments, out_dir=args.out_dir)
        _print_generated(result)
    elif args.command == "sample":
        counts = sample_pair_file(args.src, args.dst, args.count, random_state=args.seed)
        print(f"{args.dst}: {counts['dst']['pairs']} pairs ({counts['dst']['genuine']} genuine, "
              f"{counts['dst']['forgery']} forgery) of {counts['src']['pairs']}")
    else:
        reports = []
        for pair_file in args.pair_files:
            others = [other for other in args.pair_files if other != pair_file]
            reports.append(validate_pair_file(args.root, pair_file, other_pair_files=others, with_siblings=True))
        for report in reports:
            print(report.summary())
        return 0 if all(r.ok for r in reports) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
