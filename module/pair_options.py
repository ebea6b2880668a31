"""The options of the pair-file generators, defined once for both command lines (prepare_datasets.py, finetune.py prepare).

Imports nothing heavy, so that ``--help`` answers at once.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from module.wording import flag

__all__ = ["PAIR_OPTIONS", "add_pair_options", "pair_options_of", "writer_list"]

# Each layout's own options (besides val_ratio and random_state): arguments of its generator in prepare_datasets.
PAIR_OPTIONS = {
    "cedar": ("train_ratio", "forgery_pairs_per_writer", "paper_protocol"),
    "bhsig": ("language", "test_writers"),
    "gpds": ("resplit", "test_ratio", "max_train_pairs", "max_val_pairs", "max_test_pairs"),
}


def writer_list(text: str) -> list[int]:
    """'1-60' or '1,3,5-9' -> writer ids."""
    writers = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        writers += list(range(int(low), int(high or low) + 1))
    return writers


_OPTION_HELP: dict[str, tuple[dict[str, Any], str]] = {
    "train_ratio": ({"type": float}, "cedar: share of writers for training and validation (default 0.73)"),
    "forgery_pairs_per_writer": ({"type": int}, "cedar: forgery pairs a writer (default all 576)"),
    "paper_protocol": ({"action": "store_true", "default": None},
                       "cedar: the paper's protocol, 50/5 writers and 276 forgery pairs a writer"),
    "language": ({"choices": ("hindi", "bengali")}, "bhsig: the scans' language (default: from the file names)"),
    "test_writers": ({"type": writer_list}, "bhsig: test writers, e.g. 1-20,31 (default: Hindi 1-60, Bengali 1-50)"),
    "resplit": ({"action": "store_true", "default": None},
                "gpds: pool train/ and test/ and split by writer into train/val/test"),
    "test_ratio": ({"type": float}, "gpds --resplit: share of writers for testing (default 0.2)"),
    "max_train_pairs": ({"type": int}, "gpds: draw at most this many training pairs, keeping the class ratio"),
    "max_val_pairs": ({"type": int}, "gpds: at most this many validation pairs"),
    "max_test_pairs": ({"type": int}, "gpds: at most this many test pairs"),
}


def add_pair_options(parser: argparse.ArgumentParser, datasets: Sequence[str], val_ratio: float) -> None:
    """The pair-file options of `datasets` (PAIR_OPTIONS), --val-ratio, --seed and --random-forgeries: one definition
    for both command lines."""
    parser.add_argument("--val-ratio", type=float, default=val_ratio,
                        help="share of writers for gray_val.txt, which picks the best epoch (default %(default)s)")
    parser.add_argument("--seed", dest="random_state", metavar="SEED", type=int, default=42,
                        help="the split's seed (default %(default)s)")
    parser.add_argument("--random-forgeries", type=int, default=0, metavar="N",
                        help="add N random-forgery test pairs a test writer: another writer's genuine signature as "
                             "the query, label 0 (default %(default)s)")
    for dataset in datasets:
        for name in PAIR_OPTIONS[dataset]:
            settings, help_text = _OPTION_HELP[name]
            if "action" not in settings and "choices" not in settings:
                settings = {**settings, "metavar": flag(name)[2:].upper().replace("-", "_")}
            parser.add_argument(flag(name), dest=name, help=help_text, **{"default": None, **settings})


def pair_options_of(args: argparse.Namespace, datasets: Sequence[str]) -> dict[str, Any]:
    """The layout options given on the command line (those left out take the generators' defaults)."""
    return {name: getattr(args, name) for dataset in datasets for name in PAIR_OPTIONS[dataset]
            if getattr(args, name, None) is not None}


