"""GPDS-style folders (the layout the seed project uses): ``train/`` flat, ``test/`` one folder a subject.

``train/genuine/c-{w}-{nn}.jpg``, ``train/forge/cf-{w}-{nn}.jpg``, ``test/{w}/genuine/``,
``test/{w}/forge/``; names can carry spaces (``c-032-11 (Copy).jpg``); the writer is the number after
``c-`` / ``cf-``. Pairs are made within a writer, as for CEDAR. The folder split is not guaranteed
writer-disjoint: it is checked, and ``resplit`` splits the pooled writers afresh.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from models.errors import InputError
from module.core.wording import option, writer_ranges
from module.data.datasets.record import DatasetLayout, Signature
from module.data.layouts import (
    FoundScans,
    WriterScans,
    split_sizes,
    split_writers,
    usable_writers,
    write_splits,
    writer_pairs,
)
from module.data.pair_files import IMAGE_EXTENSIONS, sample_pairs

__all__ = ["FILE_NAME", "GPDS", "generate_gdps_pairs", "scan_gpds"]

# GPDS names may carry anything after the sample number, e.g. "c-032-11 (Copy).jpg".
FILE_NAME = re.compile(rf"^(cf|c)-(\d+)-(\d+)[^/]*\.{IMAGE_EXTENSIONS}$", re.IGNORECASE)


def signature(file_name: str) -> Signature | None:
    match = FILE_NAME.match(file_name)
    if match is None:
        return None
    return Signature(int(match.group(2)), match.group(1).lower() == "cf", int(match.group(3)))


def scan_gpds(data_root: str | os.PathLike) -> dict[str, FoundScans]:
    """The scans of each folder split of a GPDS-style root: train/{genuine,forge}/ and test/{subject}/{genuine,forge}/."""
    root = Path(data_root)
    folders = {"train": [root / "train"], "test": sorted(p for p in (root / "test").glob("*") if p.is_dir())}
    if not (root / "train").is_dir() and not folders["test"]:
        raise FileNotFoundError(
            f"neither {root / 'train'} nor {root / 'test'} found: a GPDS-style root holds train/genuine/, "
            "train/forge/ and test/{subject}/genuine/, test/{subject}/forge/"
        )
    splits = {}
    for split, bases in folders.items():
        found = FoundScans("c-{w}-{nn} / cf-{w}-{nn}")
        for base in bases:
            for kind in ("genuine", "forge"):
                if not (base / kind).is_dir():
                    continue
                for entry in os.scandir(base / kind):
                    relative = Path(entry.path).relative_to(root).as_posix()
                    match = FILE_NAME.match(entry.name)
                    if match:
                        found.add(match.group(2), kind == "forge", match.group(3), relative)
                    else:
                        found.skip(relative)
        splits[split] = found
    return splits


def generate_gdps_pairs(
    data_root: str | os.PathLike,
    resplit: bool = False,
    val_ratio: float = 0.1,
    test_ratio: float = 0.2,
    max_train_pairs: int | None = None,
    max_val_pairs: int | None = None,
    max_test_pairs: int | None = None,
    random_state: int = 42,
    out_dir: str | os.PathLike | None = None,
) -> dict:
    """Pair files for GPDS-style folders; pairs are made within a writer, as for CEDAR.

    The folder split (train/, test/) is not guaranteed writer-disjoint: every
    writer found in both is reported (returned and warned about). Without
    `resplit`, test/ is the test split and `val_ratio` of the writers found
    only in train/ become the validation split. With `resplit`, the scans of
    both folders are pooled and the writers split afresh into train /
    validation / test (`val_ratio`, `test_ratio` of the writers, seeded),
    writer-disjoint by construction. The `max_*_pairs` caps draw that many
    pairs from a split, keeping its genuine/forgery ratio.

    Returns:
        dict: files, writers, counts, notes (as generate_cedar_pairs), and
        shared_writers (writers in both folder splits).
    """
    root = Path(data_root)
    folder_splits = scan_gpds(root)
    shared = sorted(set(folder_splits["train"].files) & set(folder_splits["test"].files))
    notes = []
    if shared:
        done = "pooled by the re-split" if resplit else \
            f"the folder split is not writer-disjoint; {option('resplit')} pools the folders and splits by writer"
        notes.append(f"{len(shared)} writer(s) appear in both {root / 'train'} and {root / 'test'} "
                     f"(ids {writer_ranges(shared[:20])}{', ...' if len(shared) > 20 else ''}): {done}")
    rng = np.random.default_rng(random_state)
    if resplit:
        pooled, pooled_notes = usable_writers(folder_splits["train"].merged(folder_splits["test"]))
        notes += pooled_notes
        n_test, n_val = split_sizes(len(pooled), test_ratio, val_ratio)
        writers = split_writers(list(pooled), n_test, n_val, rng)
        split_pairs = {s: [p for w in ws for p in writer_pairs(pooled[w])] for s, ws in writers.items()}
    else:
        if test_ratio != 0.2:
            raise InputError(f"{option('test_ratio')} sets the test share of a re-split: add {option('resplit')}, "
                             "or leave it out to test on the test/ folder")
        scans: dict[str, dict[int, WriterScans]] = {}
        for split, found in folder_splits.items():
            scans[split], split_notes = usable_writers(found, where=f"in {split}/: ")
            notes += split_notes
        only_train = sorted(set(scans["train"]) - set(scans["test"]))
        n_val = split_sizes(len(only_train), 0.0, val_ratio)[1] if val_ratio else 0
        validation = split_writers(only_train, 0, n_val, rng)["val"]
        writers = {"train": sorted(set(scans["train"]) - set(validation)), "val": validation,
                   "test": sorted(scans["test"])}
        split_pairs = {split: [p for w in writers[split] for p in writer_pairs(scans["test" if split == "test" else "train"][w])]
                       for split in ("train", "val", "test")}
    caps = {"train": max_train_pairs, "val": max_val_pairs, "test": max_test_pairs}
    for split, cap in caps.items():
        if cap is not None:
            split_pairs[split] = sample_pairs(split_pairs[split], cap, rng)
    return {"shared_writers": shared, **write_splits(Path(out_dir) if out_dir else root, split_pairs, writers, notes)}


def synthetic_files(writers: list[int], n_genuine: int, n_forged: int, rng: np.random.Generator, **_: object
                    ) -> tuple[list[tuple[int, bool, int, str]], dict]:
    """Every scan of a synthetic GPDS-style corpus: ``(writer, forged, sample, relative path)``, and its splits."""
    plan = []
    facts: dict = {}
    # Writers split about 70/30 into the train/ and test/ folders; as in the
    # wild, one train writer's later samples also sit in test/ (the split is
    # not writer-disjoint), and two files carry " (Copy)" in their names.
    order = [int(w) for w in rng.permutation(writers)]
    n_test = max(1, round(0.3 * len(writers))) if len(writers) > 1 else 0
    test, train = sorted(order[:n_test]), sorted(order[n_test:])
    shared = train[:1] if len(writers) >= 3 else []
    copies = set()
    if train:
        copies.add((train[-1], False, min(11, n_genuine)))
    if test:
        copies.add((test[-1], True, min(3, n_forged)))

    def name(w: int, forged: bool, n: int) -> str:
        stem = f"{'cf' if forged else 'c'}-{w:03d}-{n:02d}"
        return stem + (" (Copy)" if (w, forged, n) in copies else "") + ".jpg"

    for w in writers:
        for forged, count in ((False, n_genuine), (True, n_forged)):
            kind = "forge" if forged else "genuine"
            for n in range(1, count + 1):
                in_test = w in test or (w in shared and n > (2 * count) // 3)
                folder = f"test/{w:03d}/{kind}" if in_test else f"train/{kind}"
                plan.append((w, forged, n, f"{folder}/{name(w, forged, n)}"))
    facts.update(splits={"train": train, "test": sorted(test + shared)}, shared_writers=shared)
    facts["files_with_spaces"] = sorted(p for *_, p in plan if " " in p)
    return plan, facts


GPDS = DatasetLayout(
    name="gpds",
    aliases=("gdps",),
    title="GPDS",
    naming="c-{w}-{nn}.jpg / cf-{w}-{nn}.jpg",
    folders="train/genuine/, train/forge/, test/{w}/genuine/, test/{w}/forge/",
    signature=signature,
    scan=scan_gpds,
    generate=generate_gdps_pairs,
    options={
        "resplit": ({"action": "store_true", "default": None},
                    "gpds: pool train/ and test/ and split by writer into train/val/test"),
        "test_ratio": ({"type": float}, "gpds, with resplit: share of writers for testing (default 0.2)"),
        "max_train_pairs": ({"type": int}, "gpds: draw at most this many training pairs, keeping the class ratio"),
        "max_val_pairs": ({"type": int}, "gpds: at most this many validation pairs"),
        "max_test_pairs": ({"type": int}, "gpds: at most this many test pairs"),
    },
    real_counts=(24, 30),
    synthetic_files=synthetic_files,
)
