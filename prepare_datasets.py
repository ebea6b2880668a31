"""Dataset folder layouts, writers, pair files and their validation (spec section 7).

Pair files hold one pair a line: `reference_path<sep>query_path<sep>label`,
paths relative to the dataset root, label 1 for genuine-genuine and 0 for
genuine-forgery. Reading accepts tabs or runs of spaces as separators (a line
with a tab is split on tabs only, so its paths may hold spaces), CRLF line
ends, a byte-order mark, blank lines, a missing final newline and Windows
backslashes between folders. Every file
written here is tab-separated with LF line ends, since GPDS file names can
carry spaces.

The generators write `gray_train.txt` and `gray_test.txt` (and
`gray_val.txt` with a validation split) into the dataset root, where the
datasets in sig_dataloader_colab.py look for them. Splits are by writer, and
everything is deterministic for `random_state`. `ensure_pair_files` writes
them only when they are missing, invalid or made with other arguments (for
notebooks that are run again after a disconnect).

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

from synthetic_signatures import ensure_synthetic_dataset, make_synthetic_dataset

__all__ = [
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

Pair = tuple[str, str, int]

PAIR_FILES = {"train": "gray_train.txt", "val": "gray_val.txt", "test": "gray_test.txt"}
# Written beside the pair files by ensure_pair_files: how they were made.
PAIR_MANIFEST = "pair_files.json"
IMAGE_EXTENSIONS = r"(?:png|jpe?g|tiff?|bmp)"
CEDAR_NAME = re.compile(rf"^(original|forgeries)_(\d+)_(\d+)\.{IMAGE_EXTENSIONS}$", re.IGNORECASE)
BHSIG_NAME = re.compile(rf"^([HB])-S-(\d+)-([GF])-(\d+)\.{IMAGE_EXTENSIONS}$", re.IGNORECASE)
# GPDS names may carry anything after the sample number, e.g. "c-032-11 (Copy).jpg".
GPDS_NAME = re.compile(rf"^(cf|c)-(\d+)-(\d+)[^/]*\.{IMAGE_EXTENSIONS}$", re.IGNORECASE)
BHSIG_LANGUAGES = {"hindi": "H", "bengali": "B"}
BHSIG_TEST_WRITERS = {"hindi": range(1, 61), "bengali": range(1, 51)}
# The paper's CEDAR protocol: 50 train / 5 test writers, 276 forgery pairs a writer.
PAPER_TRAIN_RATIO = 50 / 55
PAPER_FORGERY_PAIRS = 276


class PairFileError(ValueError):
    """A pair file that cannot be used: lines that do not parse, or bad labels."""


# ---------------------------------------------------------------------------
# Reading and writing pair files


def parse_pair_line(line: str) -> Pair:
    """One pair from one line; raises ValueError with the reason when it does not parse."""
    if "\t" in line:
        fields = [f.strip() for f in line.split("\t") if f.strip()]
        separator = "tabs"
    else:
        fields = line.split()
        separator = "spaces"
    if len(fields) != 3:
        hint = ""
        if separator == "spaces" and len(fields) > 3:
            hint = "; paths with spaces need tab separators"
        raise ValueError(f"expected 3 fields (reference, query, label) separated by {separator}, found {len(fields)}{hint}")
    reference, query, label = fields
    if label not in ("0", "1"):
        raise ValueError(f"label {label!r} is not 0 or 1")
    # Files written on Windows may separate folders with backslashes.
    return reference.replace("\\", "/"), query.replace("\\", "/"), int(label)


@dataclass
class ParsedPairFile:
    """What `read_pair_file` found: the pairs, their line numbers, and the lines that did not parse."""

    path: str
    pairs: list[Pair]
    line_numbers: list[int]
    problems: list[tuple[int, str]]
    n_lines: int

    def raise_for_problems(self, limit: int = 5) -> None:
        """Raise PairFileError listing the first `limit` bad lines, if any."""
        if not self.problems:
            return
        shown = "\n".join(f"  line {n}: {msg}" for n, msg in self.problems[:limit])
        more = f"\n  ... and {len(self.problems) - limit} more" if len(self.problems) > limit else ""
        raise PairFileError(
            f"{self.path}: {len(self.problems)} of {self.n_lines} lines cannot be used:\n{shown}{more}\n"
            "Each line must read `reference_path<TAB>query_path<TAB>label` (or single spaces when paths "
            "have none) with label 0 or 1; fix or remove those lines, or regenerate the file."
        )


def read_pair_file(path: str | os.PathLike) -> ParsedPairFile:
    """Parse a pair file; bad lines are collected with their (1-based) numbers, not raised."""
    text = Path(path).read_text(encoding="utf-8-sig")
    pairs, line_numbers, problems = [], [], []
    n_lines = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        n_lines += 1
        try:
            pairs.append(parse_pair_line(line))
            line_numbers.append(number)
        except ValueError as e:
            problems.append((number, str(e)))
    return ParsedPairFile(str(path), pairs, line_numbers, problems, n_lines)


def write_pair_file(path: str | os.PathLike, pairs: Iterable[Pair]) -> int:
    """Write pairs tab-separated with LF line ends (atomically: a temp file, then a rename); returns the count."""
    path = Path(path)
    lines = [f"{a}\t{b}\t{int(label)}\n" for a, b, label in pairs]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)
    os.replace(tmp, path)
    return len(lines)


def resolve_pair_file(data_root: str | os.PathLike, pair_file: str | os.PathLike) -> Path:
    """A pair file's path: as given when absolute, else relative to the dataset root."""
    return Path(data_root) / pair_file


# ---------------------------------------------------------------------------
# Writers and pairs


def writer_of(path: str) -> int | None:
    """The writer id in a CEDAR, BHSig or GPDS file name, or None when the name follows none of them."""
    name = os.path.basename(path)
    for pattern, group in ((CEDAR_NAME, 2), (BHSIG_NAME, 2), (GPDS_NAME, 2)):
        match = pattern.match(name)
        if match:
            return int(match.group(group))
    return None


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


def sample_pairs(pairs: list[Pair], target_count: int, rng: np.random.Generator) -> list[Pair]:
    """`target_count` pairs drawn without replacement, keeping the genuine/forgery ratio and the order."""
    if target_count >= len(pairs):
        return list(pairs)
    genuine = [i for i, p in enumerate(pairs) if p[2] == 1]
    forged = [i for i, p in enumerate(pairs) if p[2] == 0]
    n_genuine = round(target_count * len(genuine) / len(pairs))
    keep = np.concatenate([
        rng.choice(genuine, n_genuine, replace=False),
        rng.choice(forged, target_count - n_genuine, replace=False),
    ]).astype(int)
    return [pairs[i] for i in np.sort(keep)]


def _count(pairs: list[Pair]) -> dict[str, int]:
    genuine = sum(label for _, _, label in pairs)
    return {"pairs": len(pairs), "genuine": genuine, "forgery": len(pairs) - genuine}


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
        counts[split] = _count(pairs)
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


def sample_pair_file(src: str | os.PathLike, dst: str | os.PathLike, target_count: int, random_state: int = 42) -> dict:
    """Write `target_count` pairs of `src` to `dst`, keeping the genuine/forgery ratio and the line order.

    Returns {"src": counts, "dst": counts} with counts {pairs, genuine, forgery}.
    """
    parsed = read_pair_file(src)
    parsed.raise_for_problems()
    if target_count < 1:
        raise ValueError(f"target_count must be at least 1, got {target_count}")
    sampled = sample_pairs(parsed.pairs, target_count, np.random.default_rng(random_state))
    write_pair_file(dst, sampled)
    return {"src": _count(parsed.pairs), "dst": _count(sampled)}


@dataclass
class PairFileReport:
    """What `validate_pair_file` found in one pair file.

    `lines` counts non-blank lines; `malformed` holds (line number, reason);
    `duplicates` holds (line number, line number of its first occurrence) for
    a pair already listed in either order; `missing_files` the distinct
    referenced paths that do not exist; `shared_writers` maps another split's
    pair file to the writers it shares with this one.
    """

    pair_file: str
    lines: int
    genuine: int
    forgery: int
    writers: list[int]
    unknown_writer_paths: int
    missing_files: list[str]
    malformed: list[tuple[int, str]]
    duplicates: list[tuple[int, int]]
    shared_writers: dict[str, list[int]]

    @property
    def ok(self) -> bool:
        """True when nothing is wrong: every line parses, every file exists, no duplicate, no shared writer."""
        return not (self.missing_files or self.malformed or self.duplicates or any(self.shared_writers.values()))

    def summary(self, limit: int = 5) -> str:
        """A few lines a person can read."""
        out = [
            f"{self.pair_file}: {self.lines} lines, {self.genuine} genuine + {self.forgery} forgery pairs, "
            f"{len(self.writers)} writers" + (f" ({self.unknown_writer_paths} paths with no writer id)" if self.unknown_writer_paths else ""),
        ]
        if self.malformed:
            out.append(f"  {len(self.malformed)} malformed lines: " + "; ".join(f"line {n}: {m}" for n, m in self.malformed[:limit]))
        if self.missing_files:
            out.append(f"  {len(self.missing_files)} missing files: " + ", ".join(self.missing_files[:limit]))
        if self.duplicates:
            out.append(f"  {len(self.duplicates)} duplicate pairs: " + ", ".join(f"line {n} repeats line {m}" for n, m in self.duplicates[:limit]))
        for other, ws in self.shared_writers.items():
            if ws:
                out.append(f"  {len(ws)} writer(s) also in {other}: {ws[:limit * 2]}")
        out.append("  OK" if self.ok else "  PROBLEMS FOUND")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.summary()


def _writers_in(pairs: Iterable[Pair]) -> tuple[set[int], int]:
    writers, unknown = set(), 0
    for path in {p for a, b, _ in pairs for p in (a, b)}:
        w = writer_of(path)
        if w is None:
            unknown += 1
        else:
            writers.add(w)
    return writers, unknown


def _sibling_pair_files(pair_file: Path) -> list[Path]:
    """The other splits' files beside `pair_file` (gray_train.txt -> gray_val.txt, gray_test.txt)."""
    match = re.match(r"^(.*)(train|val|test)(\.txt)$", pair_file.name)
    if not match:
        return []
    prefix, split, suffix = match.groups()
    others = (pair_file.with_name(f"{prefix}{s}{suffix}") for s in ("train", "val", "test") if s != split)
    return [p for p in others if p.is_file()]


def existing_files(root: Path, relative_paths: Iterable[str]) -> set[str]:
    """Which of the paths exist, listing each folder once (far fewer calls than one stat a file on network drives)."""
    listing: dict[Path, set[str]] = {}
    found = set()
    for rel in relative_paths:
        full = root / rel
        parent = full.parent
        if parent not in listing:
            listing[parent] = set(os.listdir(parent)) if parent.is_dir() else set()
        if full.name in listing[parent]:
            found.add(rel)
    return found


def validate_pair_file(
    data_root: str | os.PathLike,
    pair_file: str | os.PathLike,
    other_pair_files: Sequence[str | os.PathLike] | None = None,
) -> PairFileReport:
    """Check a pair file against its dataset root and the other splits.

    Args:
        data_root: the dataset root the file's paths are relative to.
        pair_file: the file; a relative path is taken relative to `data_root`.
        other_pair_files: the other splits to check writer-disjointness
            against; None takes the siblings that exist (for gray_train.txt:
            gray_val.txt and gray_test.txt); [] checks none.

    Raises:
        FileNotFoundError: the pair file does not exist.
    """
    root = Path(data_root)
    path = resolve_pair_file(root, pair_file)
    if not path.is_file():
        raise FileNotFoundError(f"pair file {path} not found")
    parsed = read_pair_file(path)
    seen: dict[frozenset, int] = {}
    duplicates = []
    for (a, b, _), number in zip(parsed.pairs, parsed.line_numbers):
        key = frozenset((a, b))
        if key in seen:
            duplicates.append((number, seen[key]))
        else:
            seen[key] = number
    paths = sorted({p for a, b, _ in parsed.pairs for p in (a, b)})
    present = existing_files(root, paths)
    writers, unknown = _writers_in(parsed.pairs)
    others = _sibling_pair_files(path) if other_pair_files is None else [resolve_pair_file(root, p) for p in other_pair_files]
    shared = {}
    for other in others:
        other_writers, _ = _writers_in(read_pair_file(other).pairs)
        shared[str(other)] = sorted(writers & other_writers)
    genuine = sum(label for _, _, label in parsed.pairs)
    return PairFileReport(
        pair_file=str(path),
        lines=parsed.n_lines,
        genuine=genuine,
        forgery=len(parsed.pairs) - genuine,
        writers=sorted(writers),
        unknown_writer_paths=unknown,
        missing_files=[p for p in paths if p not in present],
        malformed=parsed.problems,
        duplicates=duplicates,
        shared_writers=shared,
    )


def _why_not_reusable(root: Path, files: dict[str, str]) -> str | None:
    """None when every pair file exists, parses, names only existing images and repeats no pair; else the reason."""
    for split, path in files.items():
        if not Path(path).is_file():
            return f"{Path(path).name} is missing"
        report = validate_pair_file(root, Path(path).absolute(), other_pair_files=[])
        if report.malformed or report.missing_files or report.duplicates:
            return report.summary(limit=2)
    return None


def ensure_pair_files(dataset: str, data_root: str | os.PathLike, val_ratio: float = 0.0, random_state: int = 42, **options) -> dict[str, str]:
    """The pair files of a dataset root, written only when needed; returns {split: path}.

    Files made by an earlier call (recorded in pair_files.json with their
    arguments) are kept when the arguments match and every file still
    validates; files found without that record (your own) are kept when
    gray_train.txt, gray_test.txt and, for val_ratio > 0, gray_val.txt exist
    and validate. Otherwise the files are written (with a warning when
    others are replaced) by the dataset's generator.

    Args:
        dataset: "cedar", "bhsig" or "gpds" ("gdps" too).
        options: passed to generate_cedar_pairs, generate_bhsig_pairs or
            generate_gdps_pairs (e.g. train_ratio, test_writers, resplit).
    """
    generators = {"cedar": generate_cedar_pairs, "bhsig": generate_bhsig_pairs, "gpds": generate_gdps_pairs}
    name = "gpds" if dataset.lower() == "gdps" else dataset.lower()
    if name not in generators:
        raise ValueError(f"unknown dataset {dataset!r}: choose one of {', '.join(generators)}")
    root = Path(data_root)
    # Arguments as JSON would read them back (tuples and ranges become lists).
    arguments = json.loads(json.dumps({"dataset": name, "val_ratio": val_ratio, "random_state": random_state, **options}, default=list))
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
    relative = {split: os.path.relpath(path, root) for split, path in result["files"].items()}
    manifest.write_text(json.dumps({"arguments": arguments, "files": relative}, indent=1))
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
