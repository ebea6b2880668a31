"""CEDAR: 55 writers, 24 genuine signatures and 24 skilled forgeries each (spec section 7).

``full_org/original_{writer}_{n}.png`` and ``full_forg/forgeries_{writer}_{n}.png``. Per writer: 276
genuine-genuine pairs (all unordered pairs of the 24 genuines) and 24 x 24 = 576 genuine-forgery pairs.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from models.errors import InputError
from module.core.wording import option
from module.data.datasets.record import DatasetLayout, Signature
from module.data.layouts import FoundScans, split_sizes, split_writers, usable_writers, write_splits, writer_pairs
from module.data.pair_files import IMAGE_EXTENSIONS

__all__ = ["CEDAR", "FILE_NAME", "generate_cedar_pairs", "scan_cedar"]

FILE_NAME = re.compile(rf"^(original|forgeries)_(\d+)_(\d+)\.{IMAGE_EXTENSIONS}$", re.IGNORECASE)
# The paper's CEDAR protocol: 50 train / 5 test writers, 276 forgery pairs a writer.
PAPER_TRAIN_RATIO = 50 / 55
PAPER_FORGERY_PAIRS = 276


def signature(file_name: str) -> Signature | None:
    match = FILE_NAME.match(file_name)
    if match is None:
        return None
    return Signature(int(match.group(2)), match.group(1).lower() == "forgeries", int(match.group(3)))


def scan_cedar(data_root: str | os.PathLike) -> FoundScans:
    """A CEDAR root: full_org/original_{w}_{n}.png and full_forg/forgeries_{w}_{n}.png."""
    root = Path(data_root)
    if not (root / "full_org").is_dir():
        raise FileNotFoundError(
            f"{root / 'full_org'} not found: a CEDAR root holds full_org/original_{{w}}_{{n}}.png and "
            "full_forg/forgeries_{w}_{n}.png; pass the folder that contains full_org/"
        )
    found = FoundScans("original_{w}_{n} / forgeries_{w}_{n}")
    for folder in ("full_org", "full_forg"):
        if not (root / folder).is_dir():
            continue
        for entry in os.scandir(root / folder):
            match = FILE_NAME.match(entry.name)
            if match:
                found.add(match.group(2), match.group(1).lower() == "forgeries", match.group(3), f"{folder}/{entry.name}")
            else:
                found.skip(f"{folder}/{entry.name}")
    if not found.files:
        raise FileNotFoundError(f"no CEDAR scans (original_{{w}}_{{n}}.png) in {root / 'full_org'}")
    return found


def generate_cedar_pairs(
    data_root: str | os.PathLike,
    train_ratio: float = 0.73,
    random_state: int = 42,
    val_ratio: float = 0.0,
    forgery_pairs_per_writer: int | None = None,
    paper_protocol: bool = False,
    out_dir: str | os.PathLike | None = None,
) -> dict:
    """Writer-disjoint CEDAR pair files: gray_train.txt, gray_val.txt (with ``val_ratio`` > 0) and gray_test.txt.

    Per writer: all 276 unordered genuine-genuine pairs and the 24 x 24 = 576
    genuine-forgery pairs (or ``forgery_pairs_per_writer`` of them, drawn).
    With 55 writers and the defaults: 40 train writers (34,080 pairs) and
    15 test writers (12,780 pairs), the widely shared split.

    Args:
        train_ratio: share of writers for training (and validation); rounded.
        val_ratio: share of all writers moved from training into gray_val.txt.
        paper_protocol: the paper's 50 / 5 split with 276 forgery pairs a
            writer; overrides ``train_ratio`` and ``forgery_pairs_per_writer``.
        out_dir: where the files go; default the dataset root.

    Returns:
        ``layouts.write_splits``' dict: files, writers, counts, notes (what was odd in the folder, also warned).
    """
    root = Path(data_root)
    scans, notes = usable_writers(scan_cedar(root))
    if paper_protocol:
        train_ratio, forgery_pairs_per_writer = PAPER_TRAIN_RATIO, PAPER_FORGERY_PAIRS
    if not 0 < train_ratio < 1:
        raise InputError(f"{option('train_ratio')} must be in (0, 1), got {train_ratio}")
    rng = np.random.default_rng(random_state)
    n_test, n_val = split_sizes(len(scans), 1 - train_ratio, val_ratio, test_option="train_ratio")
    writers = split_writers(list(scans), n_test, n_val, rng)
    split_pairs = {
        split: [p for w in ws for p in writer_pairs(scans[w], forgery_pairs_per_writer, rng)]
        for split, ws in writers.items()
    }
    return write_splits(Path(out_dir) if out_dir else root, split_pairs, writers, notes)


def synthetic_files(writers: list[int], n_genuine: int, n_forged: int, rng: np.random.Generator, **_: object
                    ) -> tuple[list[tuple[int, bool, int, str]], dict]:
    """Every scan of a synthetic CEDAR corpus: ``(writer, forged, sample, relative path)``."""
    plan = []
    for w in writers:
        plan += [(w, False, n, f"full_org/original_{w}_{n}.png") for n in range(1, n_genuine + 1)]
        plan += [(w, True, n, f"full_forg/forgeries_{w}_{n}.png") for n in range(1, n_forged + 1)]
    return plan, {}


CEDAR = DatasetLayout(
    name="cedar",
    aliases=(),
    title="CEDAR",
    naming="full_org/original_{w}_{n}.png, full_forg/forgeries_{w}_{n}.png",
    folders="full_org/ and full_forg/",
    signature=signature,
    scan=scan_cedar,
    generate=generate_cedar_pairs,
    options={
        "train_ratio": ({"type": float}, "cedar: share of writers for training and validation (default 0.73)"),
        "forgery_pairs_per_writer": ({"type": int}, "cedar: forgery pairs a writer (default all 576)"),
        "paper_protocol": ({"action": "store_true", "default": None},
                           "cedar: the paper's protocol, 50/5 writers and 276 forgery pairs a writer"),
    },
    real_counts=(24, 24),
    synthetic_files=synthetic_files,
)
