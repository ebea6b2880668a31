"""Pair files: the format, reading, writing, sampling and validation (spec section 7).

A pair file holds one pair a line: `reference_path<sep>query_path<sep>label`,
paths relative to the dataset root, label 1 for genuine-genuine and 0 for
genuine-forgery. Reading accepts tabs or runs of spaces as separators (a line
with a tab is split on tabs only, so its paths may hold spaces), CRLF line
ends, a byte-order mark, blank lines, a missing final newline and Windows
backslashes between folders. Every file written here is tab-separated with LF
line ends, atomically, since GPDS file names can carry spaces.

The writer of a path is read from the file names of the three layouts
(`writer_of`), which is how validation finds writers shared between files;
whether a scan is a forgery too (`signature_of`), which gives each pair its
kind (`pair_kind`: genuine, skilled or random forgery).
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from module.io import atomic_write_text

__all__ = [
    "CEDAR_NAME",
    "BHSIG_NAME",
    "GPDS_NAME",
    "PAIR_FILES",
    "Pair",
    "PairFileError",
    "PairFileReport",
    "ParsedPairFile",
    "add_random_forgeries",
    "count_pairs",
    "existing_files",
    "pair_kind",
    "parse_pair_line",
    "random_forgery_pairs",
    "read_pair_file",
    "resolve_pair_file",
    "sample_pair_file",
    "sample_pairs",
    "signature_of",
    "validate_pair_file",
    "write_pair_file",
    "writer_of",
]

Pair = tuple[str, str, int]

PAIR_FILES = {"train": "gray_train.txt", "val": "gray_val.txt", "test": "gray_test.txt"}
IMAGE_EXTENSIONS = r"(?:png|jpe?g|tiff?|bmp)"
CEDAR_NAME = re.compile(rf"^(original|forgeries)_(\d+)_(\d+)\.{IMAGE_EXTENSIONS}$", re.IGNORECASE)
BHSIG_NAME = re.compile(rf"^([HB])-S-(\d+)-([GF])-(\d+)\.{IMAGE_EXTENSIONS}$", re.IGNORECASE)
# GPDS names may carry anything after the sample number, e.g. "c-032-11 (Copy).jpg".
GPDS_NAME = re.compile(rf"^(cf|c)-(\d+)-(\d+)[^/]*\.{IMAGE_EXTENSIONS}$", re.IGNORECASE)


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
    lines = [f"{a}\t{b}\t{int(label)}\n" for a, b, label in pairs]
    atomic_write_text(path, "".join(lines))
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


def signature_of(path: str) -> tuple[int, bool] | None:
    """``(writer, is_forgery)`` from a CEDAR, BHSig or GPDS file name, or None when the name follows none of them.

    A forgery's writer is the writer whose signature it imitates.
    """
    name = os.path.basename(path)
    for pattern, forgery_group, forgery_marks in ((CEDAR_NAME, 1, ("forgeries",)), (BHSIG_NAME, 3, ("f",)),
                                                  (GPDS_NAME, 1, ("cf",))):
        match = pattern.match(name)
        if match:
            return int(match.group(2)), match.group(forgery_group).lower() in forgery_marks
    return None


def pair_kind(reference: str, query: str) -> str | None:
    """The kind of a pair's query, read from the file names: ``"genuine"`` (the reference writer's own),
    ``"skilled"`` (a forgery of the reference writer) or ``"random"`` (another writer's genuine signature).

    None when a name follows no layout, the reference is a forgery, or the
    query is a forgery of another writer.
    """
    signed, questioned = signature_of(reference), signature_of(query)
    if signed is None or questioned is None or signed[1]:
        return None
    if questioned[1]:
        return "skilled" if questioned[0] == signed[0] else None
    return "genuine" if questioned[0] == signed[0] else "random"


def random_forgery_pairs(pairs: Sequence[Pair], per_writer: int, rng: np.random.Generator) -> list[Pair]:
    """``per_writer`` random-forgery pairs (label 0) for each writer of ``pairs``, drawn by ``rng``.

    Each has a genuine signature of the writer as reference and a genuine
    signature of another writer of ``pairs`` as query; none repeats a pair
    of ``pairs`` or another drawn one, in either order. A writer gets fewer
    when there are not that many.
    """
    if per_writer < 0:
        raise ValueError(f"the number of random forgeries a writer must be 0 or more, got {per_writer}")
    if per_writer == 0:
        return []
    genuine: dict[int, set[str]] = defaultdict(set)
    for path in {path for reference, query, _ in pairs for path in (reference, query)}:
        signature = signature_of(path)
        if signature is not None and not signature[1]:
            genuine[signature[0]].add(path)
    if len(genuine) < 2:
        raise ValueError(f"random forgeries need genuine signatures of two writers or more; the pairs have "
                         f"{len(genuine)} writer(s) with file names of a known layout")
    taken = {frozenset((reference, query)) for reference, query, _ in pairs}
    drawn: list[Pair] = []
    for writer in sorted(genuine):
        references = sorted(genuine[writer])
        others = sorted(path for other in genuine if other != writer for path in genuine[other])
        found = 0
        for index in rng.permutation(len(references) * len(others)):
            reference, query = references[index // len(others)], others[index % len(others)]
            if frozenset((reference, query)) in taken:
                continue
            taken.add(frozenset((reference, query)))
            drawn.append((reference, query, 0))
            found += 1
            if found == per_writer:
                break
    return drawn


def add_random_forgeries(pair_file: str | os.PathLike, per_writer: int, random_state: int = 42) -> int:
    """Append ``random_forgery_pairs`` (seeded with ``random_state``) to a pair file, atomically; returns how many."""
    parsed = read_pair_file(pair_file)
    parsed.raise_for_problems()
    drawn = random_forgery_pairs(parsed.pairs, per_writer, np.random.default_rng(random_state))
    write_pair_file(pair_file, parsed.pairs + drawn)
    return len(drawn)




# ---------------------------------------------------------------------------
# Sampling and validation


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


def count_pairs(pairs: list[Pair]) -> dict[str, int]:
    genuine = sum(label for _, _, label in pairs)
    return {"pairs": len(pairs), "genuine": genuine, "forgery": len(pairs) - genuine}


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
    return {"src": count_pairs(parsed.pairs), "dst": count_pairs(sampled)}


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


