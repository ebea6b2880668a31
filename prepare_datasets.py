"""Dataset folder layouts, writers and the pair files made from them (spec section 7).

The generators write `gray_train.txt` and `gray_test.txt` (and
`gray_val.txt` with a validation split) into the dataset root, where the
datasets in sig_dataloader_colab.py look for them. Splits are by writer, and
everything is deterministic for `random_state`. `ensure_pair_files` writes
them only when they are missing, invalid or made with other arguments (for
notebooks that are run again after a disconnect). The pair-file format, its
reading and its validation live in module/pair_files.py.

Command line: `python prepare_datasets.py {synthetic,cedar,bhsig,gpds,sample,validate} --help`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from module.io import atomic_write_text
from module.pair_files import (
    BHSIG_NAME,
    CEDAR_NAME,
    GPDS_NAME,
    PAIR_FILES,
    Pair,
    PairFileError,
    PairFileReport,
    add_random_forgeries,
    count_pairs,
    read_pair_file,
    sample_pair_file,
    sample_pairs,
    validate_pair_file,
    write_pair_file,
    writer_of,
)
from synthetic_signatures import ensure_synthetic_dataset, make_synthetic_dataset

__all__ = [
    "PAIR_FILES",
    "PairFileError",
    "PairFileReport",
    "ensure_pair_files",
    "ensure_synthetic_dataset",
    "generate_bhsig_pairs",
    "generate_cedar_pairs",
    "generate_gdps_pairs",
    "make_synthetic_dataset",
    "read_pair_file",
    "sample_pair_file",
    "validate_pair_file",
    "write_pair_file",
    "writer_of",
]

# Written beside the pair files by ensure_pair_files: how they were made.
PAIR_MANIFEST = "pair_files.json"
BHSIG_LANGUAGES = {"hindi": "H", "bengali": "B"}
BHSIG_TEST_WRITERS = {"hindi": range(1, 61), "bengali": range(1, 51)}
# The paper's CEDAR protocol: 50 train / 5 test writers, 276 forgery pairs a writer.
PAPER_TRAIN_RATIO = 50 / 55
PAPER_FORGERY_PAIRS = 276


@dataclass
class WriterScans:
    """One writer's scans, paths relative to the dataset root, in sample order."""

    genuine: list[str] = field(default_factory=list)
    forged: list[str] = field(default_factory=list)


def writer_pairs(scans: WriterScans, n_forgery_pairs: int | None = None, rng: np.random.Generator | None = None) -> list[Pair]:
    """All genuine-genuine pairs (unordered) and genuine-forgery pairs of one writer.

    With `n_forgery_pairs`, that many genuine-forgery pairs drawn without
    replacement by `rng` (kept in their natural order).
    """
    pairs = [(a, b, 1) for a, b in itertools.combinations(scans.genuine, 2)]
    forgeries = [(g, f, 0) for g in scans.genuine for f in scans.forged]
    if n_forgery_pairs is not None and n_forgery_pairs < len(forgeries):
        keep = np.sort(rng.choice(len(forgeries), n_forgery_pairs, replace=False))
        forgeries = [forgeries[i] for i in keep]
    return pairs + forgeries


def split_writers(writers: Sequence[int], n_test: int, n_val: int, rng: np.random.Generator) -> dict[str, list[int]]:
    """Writers shuffled by `rng` into test, validation and train (each list sorted)."""
    order = [int(w) for w in rng.permutation(sorted(writers))]
    return {
        "train": sorted(order[n_test + n_val:]),
        "val": sorted(order[n_test:n_test + n_val]),
        "test": sorted(order[:n_test]),
    }


def _write_splits(out_dir: Path, split_pairs: dict[str, list[Pair]], writers: dict[str, list[int]]) -> dict:
    """Write one pair file a split (validation only when it has writers); the generators' return value.

    A gray_val.txt left by an earlier run with a validation split is removed:
    its writers may now be training writers.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    files, counts = {}, {}
    for split, pairs in split_pairs.items():
        if split == "val" and not writers.get("val"):
            (out_dir / PAIR_FILES["val"]).unlink(missing_ok=True)
            continue
        files[split] = str(out_dir / PAIR_FILES[split])
        write_pair_file(files[split], pairs)
        counts[split] = count_pairs(pairs)
    return {"files": files, "writers": {s: writers[s] for s in files}, "counts": counts}


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _natural_key(path: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path))


def _split_sizes(n_writers: int, test_ratio: float, val_ratio: float) -> tuple[int, int]:
    """Numbers of test and validation writers (at least one for a positive ratio), leaving one or more for training."""
    for name, ratio in (("test ratio", test_ratio), ("val_ratio", val_ratio)):
        if not 0 <= ratio < 1:
            raise ValueError(f"{name} must be in [0, 1), got {ratio}")
    n_test = max(round(n_writers * test_ratio), 1) if test_ratio > 0 else 0
    n_val = max(round(n_writers * val_ratio), 1) if val_ratio > 0 else 0
    if n_test + n_val >= n_writers:
        raise ValueError(
            f"{n_writers} writers are too few for {n_test} test and {n_val} validation writers and one for training"
        )
    return n_test, n_val


# ---------------------------------------------------------------------------
# CEDAR


def scan_cedar(data_root: str | os.PathLike) -> dict[int, WriterScans]:
    """Writers of a CEDAR root: full_org/original_{w}_{n}.png and full_forg/forgeries_{w}_{n}.png."""
    root = Path(data_root)
    if not (root / "full_org").is_dir():
        raise FileNotFoundError(
            f"{root / 'full_org'} not found: a CEDAR root holds full_org/original_{{w}}_{{n}}.png and "
            "full_forg/forgeries_{w}_{n}.png; pass the folder that contains full_org/"
        )
    found: dict[int, dict[str, list[tuple[int, str]]]] = defaultdict(lambda: {"original": [], "forgeries": []})
    for folder in ("full_org", "full_forg"):
        if not (root / folder).is_dir():
            continue
        for entry in os.scandir(root / folder):
            match = CEDAR_NAME.match(entry.name)
            if match:
                kind, writer, number = match.group(1).lower(), int(match.group(2)), int(match.group(3))
                found[writer][kind].append((number, f"{folder}/{entry.name}"))
    if not found:
        raise FileNotFoundError(f"no CEDAR scans (original_{{w}}_{{n}}.png) in {root / 'full_org'}")
    return {
        w: WriterScans([p for _, p in sorted(f["original"])], [p for _, p in sorted(f["forgeries"])])
        for w, f in sorted(found.items())
    }


def generate_cedar_pairs(
    data_root: str | os.PathLike,
    train_ratio: float = 0.73,
    random_state: int = 42,
    val_ratio: float = 0.0,
    forgery_pairs_per_writer: int | None = None,
    paper_protocol: bool = False,
    out_dir: str | os.PathLike | None = None,
) -> dict:
    """Writer-disjoint CEDAR pair files: gray_train.txt, gray_test.txt (and gray_val.txt).

    Per writer: all 276 unordered genuine-genuine pairs and the 24 x 24 = 576
    genuine-forgery pairs (or `forgery_pairs_per_writer` of them, drawn).
    With 55 writers and the defaults: 40 train writers (34,080 pairs) and
    15 test writers (12,780 pairs), the widely shared split.

    Args:
        train_ratio: share of writers for training (and validation); rounded.
        val_ratio: share of all writers moved from training into gray_val.txt.
        paper_protocol: the paper's 50 / 5 split with 276 forgery pairs a
            writer; overrides `train_ratio` and `forgery_pairs_per_writer`.
        out_dir: where the files go; default the dataset root.

    Returns:
        dict: files {split: path}, writers {split: [ids]}, counts {split: {pairs, genuine, forgery}}.
    """
    root = Path(data_root)
    scans = scan_cedar(root)
    if paper_protocol:
        train_ratio, forgery_pairs_per_writer = PAPER_TRAIN_RATIO, PAPER_FORGERY_PAIRS
    if not 0 < train_ratio < 1:
        raise ValueError(f"train_ratio must be in (0, 1), got {train_ratio}")
    rng = np.random.default_rng(random_state)
    n_test, n_val = _split_sizes(len(scans), 1 - train_ratio, val_ratio)
    writers = split_writers(list(scans), n_test, n_val, rng)
    split_pairs = {
        split: [p for w in ws for p in writer_pairs(scans[w], forgery_pairs_per_writer, rng)]
        for split, ws in writers.items()
    }
    return _write_splits(Path(out_dir) if out_dir else root, split_pairs, writers)


# ---------------------------------------------------------------------------
# BHSig260


def scan_bhsig(data_root: str | os.PathLike, language: str | None = None) -> tuple[str, dict[int, WriterScans]]:
    """Language and writers of a BHSig260 language folder: {w}/H-S-{w}-G-{nn}.tif, {w}/H-S-{w}-F-{nn}.tif (B- for Bengali)."""
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found: pass the BHSig260 language folder holding one folder a writer")
    if language is not None and language.lower() not in BHSIG_LANGUAGES:
        raise ValueError(f"unknown language {language!r}: choose 'hindi' or 'bengali'")
    found: dict[int, dict[str, list[tuple[int, str]]]] = defaultdict(lambda: {"G": [], "F": []})
    prefixes = set()
    for folder in (e for e in os.scandir(root) if e.is_dir()):
        for entry in os.scandir(folder.path):
            match = BHSIG_NAME.match(entry.name)
            if match:
                prefixes.add(match.group(1).upper())
                writer, kind, number = int(match.group(2)), match.group(3).upper(), int(match.group(4))
                found[writer][kind].append((number, f"{folder.name}/{entry.name}"))
    if not found:
        languages = [e.name for e in os.scandir(root) if e.is_dir() and e.name.lower() in BHSIG_LANGUAGES]
        hint = f"; pass {root / languages[0]}" if languages else ""
        raise FileNotFoundError(f"no BHSig scans ({{w}}/H-S-{{w}}-G-{{nn}}.tif or B-S-...) in {root}{hint}")
    if len(prefixes) > 1:
        raise ValueError(f"{root} mixes Hindi (H-) and Bengali (B-) scans: keep one language a folder")
    found_language = {v: k for k, v in BHSIG_LANGUAGES.items()}[prefixes.pop()]
    if language is not None and language.lower() != found_language:
        raise ValueError(f"{root} holds {found_language} scans, not {language}")
    return found_language, {
        w: WriterScans([p for _, p in sorted(f["G"])], [p for _, p in sorted(f["F"])]) for w, f in sorted(found.items())
    }


def generate_bhsig_pairs(
    data_root: str | os.PathLike,
    language: str | None = None,
    test_writers: Iterable[int] | None = None,
    random_state: int = 42,
    val_ratio: float = 0.0,
    out_dir: str | os.PathLike | None = None,
) -> dict:
    """Writer-disjoint BHSig260 pair files: gray_train.txt, gray_test.txt (and gray_val.txt).

    Per writer: 276 genuine-genuine pairs and 24 x 30 = 720 genuine-forgery pairs.

    Args:
        data_root: the language folder (e.g. BHSig260/Hindi) holding one folder a writer.
        language: "hindi" or "bengali"; None reads it from the file names.
        test_writers: writer ids for the test split; None: Hindi 1-60, Bengali 1-50.
        val_ratio: share of the non-test writers moved into gray_val.txt.

    Returns:
        dict: language, files, writers, counts (as generate_cedar_pairs).
    """
    root = Path(data_root)
    language, scans = scan_bhsig(root, language)
    wanted = set(BHSIG_TEST_WRITERS[language] if test_writers is None else (int(w) for w in test_writers))
    test = sorted(set(scans) & wanted)
    rest = sorted(set(scans) - wanted)
    if not test or not rest:
        raise ValueError(
            f"the test writers leave {len(test)} test and {len(rest)} train writers among the {len(scans)} in {root}: "
            "pass test_writers= (ids of writers that exist)"
        )
    rng = np.random.default_rng(random_state)
    n_val = _split_sizes(len(rest), 0.0, val_ratio)[1]
    inner = split_writers(rest, 0, n_val, rng)
    writers = {"train": inner["train"], "val": inner["val"], "test": test}
    split_pairs = {split: [p for w in ws for p in writer_pairs(scans[w])] for split, ws in writers.items()}
    return {"language": language, **_write_splits(Path(out_dir) if out_dir else root, split_pairs, writers)}


# ---------------------------------------------------------------------------
# GPDS-style folders


def scan_gpds(data_root: str | os.PathLike) -> dict[str, dict[int, WriterScans]]:
    """Writers of each folder split: train/{genuine,forge}/ and test/{subject}/{genuine,forge}/."""
    root = Path(data_root)
    folders = {"train": [root / "train"], "test": sorted(p for p in (root / "test").glob("*") if p.is_dir())}
    if not (root / "train").is_dir() and not folders["test"]:
        raise FileNotFoundError(
            f"neither {root / 'train'} nor {root / 'test'} found: a GPDS-style root holds train/genuine/, "
            "train/forge/ and test/{subject}/genuine/, test/{subject}/forge/"
        )
    splits: dict[str, dict[int, WriterScans]] = {}
    for split, bases in folders.items():
        found: dict[int, WriterScans] = defaultdict(WriterScans)
        for base in bases:
            for kind, attr in (("genuine", "genuine"), ("forge", "forged")):
                if not (base / kind).is_dir():
                    continue
                for entry in os.scandir(base / kind):
                    match = GPDS_NAME.match(entry.name)
                    if match:
                        getattr(found[int(match.group(2))], attr).append(_rel(root, Path(entry.path)))
        for scans in found.values():
            scans.genuine.sort(key=_natural_key)
            scans.forged.sort(key=_natural_key)
        splits[split] = dict(sorted(found.items()))
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
    writer found in both is reported (returned and warned about). With
    `resplit`, the scans of both folders are pooled and the writers split
    afresh into train / validation / test (`val_ratio`, `test_ratio` of the
    writers, seeded), writer-disjoint by construction. The `max_*_pairs` caps
    draw that many pairs from a split, keeping its genuine/forgery ratio.

    Returns:
        dict: files, writers, counts (as generate_cedar_pairs), and
        shared_writers (writers in both folder splits).
    """
    root = Path(data_root)
    folder_splits = scan_gpds(root)
    shared = sorted(set(folder_splits["train"]) & set(folder_splits["test"]))
    if shared and not resplit:
        warnings.warn(
            f"{len(shared)} writer(s) appear in both {root / 'train'} and {root / 'test'} "
            f"(first: {shared[:5]}); the folder split is not writer-disjoint, use resplit=True (--resplit)",
            stacklevel=2,
        )
    rng = np.random.default_rng(random_state)
    if resplit:
        pooled: dict[int, WriterScans] = defaultdict(WriterScans)
        for split in ("train", "test"):
            for w, scans in folder_splits[split].items():
                pooled[w].genuine += scans.genuine
                pooled[w].forged += scans.forged
        n_test, n_val = _split_sizes(len(pooled), test_ratio, val_ratio)
        writers = split_writers(list(pooled), n_test, n_val, rng)
        split_pairs = {s: [p for w in ws for p in writer_pairs(pooled[w])] for s, ws in writers.items()}
    else:
        writers = {"train": list(folder_splits["train"]), "val": [], "test": list(folder_splits["test"])}
        split_pairs = {"val": []}
        for split in ("train", "test"):
            split_pairs[split] = [p for w in writers[split] for p in writer_pairs(folder_splits[split][w])]
    caps = {"train": max_train_pairs, "val": max_val_pairs, "test": max_test_pairs}
    for split, cap in caps.items():
        if cap is not None:
            split_pairs[split] = sample_pairs(split_pairs[split], cap, rng)
    return {"shared_writers": shared, **_write_splits(Path(out_dir) if out_dir else root, split_pairs, writers)}


# ---------------------------------------------------------------------------
# Sampling and validation


def _why_not_reusable(root: Path, files: dict[str, str]) -> str | None:
    """None when every pair file exists, parses, names only existing images and repeats no pair; else the reason."""
    for split, path in files.items():
        if not Path(path).is_file():
            return f"{Path(path).name} is missing"
        report = validate_pair_file(root, Path(path).absolute(), other_pair_files=[])
        if report.malformed or report.missing_files or report.duplicates:
            return report.summary(limit=2)
    return None


def ensure_pair_files(dataset: str, data_root: str | os.PathLike, val_ratio: float = 0.0, random_state: int = 42,
                      random_forgeries: int = 0, **options) -> dict[str, str]:
    """The pair files of a dataset root, written only when needed; returns {split: path}.

    Files made by an earlier call (recorded in pair_files.json with their
    arguments) are kept when the arguments match and every file still
    validates; files found without that record (your own) are kept when
    gray_train.txt, gray_test.txt and, for val_ratio > 0, gray_val.txt exist
    and validate. Otherwise the files are written (with a warning when
    others are replaced) by the dataset's generator.

    Args:
        dataset: "cedar", "bhsig" or "gpds" ("gdps" too).
        random_forgeries: random-forgery pairs added to gray_test.txt for each
            test writer (label 0; see module.pair_files.random_forgery_pairs), seeded with random_state.
        options: passed to generate_cedar_pairs, generate_bhsig_pairs or
            generate_gdps_pairs (e.g. train_ratio, test_writers, resplit).
    """
    generators = {"cedar": generate_cedar_pairs, "bhsig": generate_bhsig_pairs, "gpds": generate_gdps_pairs}
    name = "gpds" if dataset.lower() == "gdps" else dataset.lower()
    if name not in generators:
        raise ValueError(f"unknown dataset {dataset!r}: choose one of {', '.join(generators)}")
    root = Path(data_root)
    # Arguments as JSON would read them back (tuples and ranges become lists).
    extra = {"random_forgeries": random_forgeries} if random_forgeries else {}
    arguments = json.loads(json.dumps({"dataset": name, "val_ratio": val_ratio, "random_state": random_state, **extra,
                                       **options}, default=list))
    manifest = root / PAIR_MANIFEST
    try:
        saved = json.loads(manifest.read_text())
    except (OSError, ValueError):
        saved = None
    if saved is not None and saved.get("arguments") == arguments:
        # Recorded relative to the root, so the record holds wherever the root is reached from.
        files = {split: str(root / name) for split, name in saved["files"].items()}
    elif saved is None:
        files = {s: str(root / PAIR_FILES[s]) for s in (("train", "val", "test") if val_ratio > 0 else ("train", "test"))}
    else:
        files = None
    reason = "made with other arguments" if files is None else _why_not_reusable(root, files)
    if reason is None:
        return files
    if any((root / f).is_file() for f in PAIR_FILES.values()):
        warnings.warn(f"rewriting the pair files in {root} ({reason})", stacklevel=2)
    result = generators[name](root, val_ratio=val_ratio, random_state=random_state, **options)
    if random_forgeries:
        add_random_forgeries(result["files"]["test"], random_forgeries, random_state)
    relative = {split: os.path.relpath(path, root) for split, path in result["files"].items()}
    atomic_write_text(manifest, json.dumps({"arguments": arguments, "files": relative}, indent=1))
    return result["files"]


# ---------------------------------------------------------------------------
# Command line


def _writer_list(text: str) -> list[int]:
    """'1-60' or '1,3,5-9' -> writer ids."""
    writers = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        writers += list(range(int(low), int(high or low) + 1))
    return writers


def _print_generated(result: dict, resplit: bool = False) -> None:
    for split, path in result["files"].items():
        c = result["counts"][split]
        print(f"{split:5s} {path}: {c['pairs']} pairs ({c['genuine']} genuine, {c['forgery']} forgery), "
              f"{len(result['writers'][split])} writer(s)")
    if result.get("shared_writers"):
        action = "pooled by the re-split" if resplit else "the split is not writer-disjoint: use --resplit"
        print(f"writers in both the train/ and test/ folders: {result['shared_writers']} ({action})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Make and check signature pair files (tab-separated: reference, query, label 1 genuine / 0 forgery).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synthetic", help="write a synthetic corpus in a real layout")
    p.add_argument("root", help="output folder")
    p.add_argument("--layout", choices=("cedar", "gpds", "bhsig"), default="cedar")
    p.add_argument("--writers", type=int, default=10)
    p.add_argument("--genuine", type=int, default=None, help="samples a writer (default: the real dataset's)")
    p.add_argument("--forged", type=int, default=None, help="forgeries a writer (default: the real dataset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=None, help="longest canvas side (default: full CEDAR-like size)")
    p.add_argument("--language", choices=("hindi", "bengali"), default="hindi", help="for --layout bhsig")

    p = sub.add_parser("cedar", help="gray_train.txt / gray_test.txt for a CEDAR root (full_org/, full_forg/)")
    p.add_argument("root")
    p.add_argument("--train-ratio", type=float, default=0.73)
    p.add_argument("--val-ratio", type=float, default=0.0, help="share of writers for gray_val.txt")
    p.add_argument("--forgery-pairs", type=int, default=None, help="forgery pairs a writer (default all 576)")
    p.add_argument("--paper", action="store_true", help="the paper's protocol: 50/5 writers, 276 forgery pairs a writer")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out-dir", default=None, help="where to write (default: the root)")

    p = sub.add_parser("bhsig", help="pair files for a BHSig260 language folder ({w}/H-S-{w}-G-{nn}.tif)")
    p.add_argument("root")
    p.add_argument("--language", choices=("hindi", "bengali"), default=None, help="default: from the file names")
    p.add_argument("--test-writers", type=_writer_list, default=None, help="e.g. 1-60 (default: Hindi 1-60, Bengali 1-50)")
    p.add_argument("--val-ratio", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out-dir", default=None)

    p = sub.add_parser("gpds", aliases=["gdps"], help="pair files for GPDS-style train/ and test/ folders")
    p.add_argument("root")
    p.add_argument("--resplit", action="store_true", help="writer-disjoint train/val/test re-split")
    p.add_argument("--val-ratio", type=float, default=0.1)
    p.add_argument("--test-ratio", type=float, default=0.2)
    p.add_argument("--max-train-pairs", type=int, default=None)
    p.add_argument("--max-val-pairs", type=int, default=None)
    p.add_argument("--max-test-pairs", type=int, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out-dir", default=None)

    p = sub.add_parser("sample", help="draw COUNT pairs of a pair file, keeping the class ratio")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("count", type=int)
    p.add_argument("--seed", type=int, default=42)

    p = sub.add_parser("validate", help="check pair files: parse, files exist, duplicates, writers shared between splits")
    p.add_argument("root")
    p.add_argument("pair_files", nargs="+", help="relative to the root, or absolute")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "synthetic":
            info = make_synthetic_dataset(
                args.root, layout=args.layout, n_writers=args.writers, n_genuine=args.genuine,
                n_forged=args.forged, seed=args.seed, image_size=args.image_size, language=args.language,
            )
            print(f"{info['counts']['files']} scans of {len(info['writers'])} writers in {info['root']} "
                  f"({info['layout']}, {info['seconds']} s)")
        elif args.command == "cedar":
            _print_generated(generate_cedar_pairs(
                args.root, train_ratio=args.train_ratio, random_state=args.seed, val_ratio=args.val_ratio,
                forgery_pairs_per_writer=args.forgery_pairs, paper_protocol=args.paper, out_dir=args.out_dir,
            ))
        elif args.command == "bhsig":
            _print_generated(generate_bhsig_pairs(
                args.root, language=args.language, test_writers=args.test_writers, random_state=args.seed,
                val_ratio=args.val_ratio, out_dir=args.out_dir,
            ))
        elif args.command in ("gpds", "gdps"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # _print_generated reports shared writers itself
                result = generate_gdps_pairs(
                    args.root, resplit=args.resplit, val_ratio=args.val_ratio, test_ratio=args.test_ratio,
                    max_train_pairs=args.max_train_pairs, max_val_pairs=args.max_val_pairs,
                    max_test_pairs=args.max_test_pairs, random_state=args.seed, out_dir=args.out_dir,
                )
            _print_generated(result, resplit=args.resplit)
        elif args.command == "sample":
            counts = sample_pair_file(args.src, args.dst, args.count, random_state=args.seed)
            print(f"{args.dst}: {counts['dst']['pairs']} pairs ({counts['dst']['genuine']} genuine, "
                  f"{counts['dst']['forgery']} forgery) of {counts['src']['pairs']}")
        else:
            reports = [validate_pair_file(args.root, f) for f in args.pair_files]
            for report in reports:
                print(report.summary())
            return 0 if all(r.ok for r in reports) else 1
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
