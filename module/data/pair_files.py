"""Pair files: the format, reading, writing and sampling (spec section 7).

A pair file holds one pair a line: `reference_path<sep>query_path<sep>label`,
paths relative to the dataset root, label 1 for genuine-genuine and 0 for
genuine-forgery. Reading accepts tabs or runs of spaces as separators (a line
with a tab is split on tabs only, so its paths may hold spaces), CRLF line
ends, a byte-order mark, blank lines, a missing final newline and Windows
backslashes between folders. Every file written here is tab-separated with LF
line ends, atomically, since GPDS file names can carry spaces. This module
knows no dataset: the writers and kinds of a pair come from the layouts' file
names (``module/data/datasets``), the checks of a whole file are
``module/data/validation.py``.
"""
from __future__ import annotations

import os
import re
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.errors import InputError
from module.core.io import atomic_write_text

__all__ = [
    "IMAGE_EXTENSIONS",
    "PAIR_FILES",
    "PAIR_MANIFEST",
    "Pair",
    "PairIndex",
    "PairFileError",
    "ParsedPairFile",
    "count_pairs",
    "existing_files",
    "parse_pair_line",
    "read_pair_file",
    "read_pair_index",
    "resolve_pair_file",
    "sample_pair_file",
    "sample_pairs",
    "write_pair_file",
]

Pair = tuple[str, str, int]

PAIR_FILES = {"train": "gray_train.txt", "val": "gray_val.txt", "test": "gray_test.txt"}
# Written beside the pair files by prepare_datasets: the arguments they were made with.
PAIR_MANIFEST = "pair_files.json"
# The image files a layout's names may end in.
IMAGE_EXTENSIONS = r"(?:png|jpe?g|tiff?|bmp)"


_NOT_UTF8 = re.compile("[\udc80-\udcff]")


class PairFileError(InputError):
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


def _parsed_lines(path: str | os.PathLike) -> Iterator[tuple[int, Pair | None, str | None]]:
    """``(line number, pair, None)`` or ``(line number, None, why it cannot be used)`` for each non-blank line."""
    # surrogateescape keeps each byte that is not UTF-8 as one character in U+DC80..U+DCFF, so its line can be named.
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            not_utf8 = _NOT_UTF8.search(line)
            if not_utf8:
                yield number, None, (f"byte 0x{ord(not_utf8.group()) - 0xDC00:02x} (column {not_utf8.start() + 1}) is "
                                     "not UTF-8: save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
                continue
            try:
                yield number, parse_pair_line(line), None
            except ValueError as e:
                yield number, None, str(e)


def read_pair_file(path: str | os.PathLike) -> ParsedPairFile:
    """Parse a pair file; bad lines (also bytes that are not UTF-8) are collected with their (1-based) numbers, not raised."""
    pairs, line_numbers, problems = [], [], []
    n_lines = 0
    for number, pair, problem in _parsed_lines(path):
        n_lines += 1
        if pair is None:
            problems.append((number, problem))
        else:
            pairs.append(pair)
            line_numbers.append(number)
    return ParsedPairFile(str(path), pairs, line_numbers, problems, n_lines)


@dataclass
class PairIndex:
    """A pair file as arrays (what a dataset keeps: 4 M pairs take 40 MB instead of 300 MB of tuples).

    Attributes:
        images: the ``M`` distinct paths named, as written (relative to the root), sorted.
        rows: ``[P, 2]`` int32, each pair's (reference, query) as rows into ``images``.
        labels: ``[P]`` uint8, 1 genuine-genuine, 0 genuine-forgery.
        line_numbers: ``[P]`` int32, each pair's (1-based) line.
        problems, n_lines: as ``ParsedPairFile``.
    """

    path: str
    images: list[str]
    rows: np.ndarray
    labels: np.ndarray
    line_numbers: np.ndarray
    problems: list[tuple[int, str]]
    n_lines: int

    def raise_for_problems(self, limit: int = 5) -> None:
        ParsedPairFile(self.path, [], [], self.problems, self.n_lines).raise_for_problems(limit)


def read_pair_index(path: str | os.PathLike) -> PairIndex:
    """Parse a pair file line by line into a ``PairIndex`` (no list of tuples; bad lines collected, not raised)."""
    row_of: dict[str, int] = {}
    rows, labels, line_numbers = array("i"), bytearray(), array("i")
    problems = []
    n_lines = 0
    for number, pair, problem in _parsed_lines(path):
        n_lines += 1
        if pair is None:
            problems.append((number, problem))
            continue
        reference, query, label = pair
        rows.append(row_of.setdefault(reference, len(row_of)))
        rows.append(row_of.setdefault(query, len(row_of)))
        labels.append(label)
        line_numbers.append(number)
    images = sorted(row_of)
    # Rows were numbered in order of appearance; renumber them in sorted order.
    new_row = np.empty(len(row_of), dtype=np.int32)
    new_row[[row_of[image] for image in images]] = np.arange(len(images), dtype=np.int32)
    pair_rows = new_row[np.frombuffer(rows, dtype=np.int32).reshape(-1, 2)] if rows else np.zeros((0, 2), np.int32)
    return PairIndex(str(path), images, pair_rows, np.frombuffer(bytes(labels), dtype=np.uint8).copy(),
                     np.frombuffer(line_numbers, dtype=np.int32).copy(), problems, n_lines)


def write_pair_file(path: str | os.PathLike, pairs: Iterable[Pair]) -> int:
    """Write pairs tab-separated with LF line ends (atomically: a temp file, then a rename); returns the count."""
    lines = [f"{a}\t{b}\t{int(label)}\n" for a, b, label in pairs]
    atomic_write_text(path, "".join(lines))
    return len(lines)


def resolve_pair_file(data_root: str | os.PathLike, pair_file: str | os.PathLike) -> Path:
    """A pair file's path: as given when absolute, else relative to the dataset root."""
    return Path(data_root) / pair_file


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
        raise InputError(f"target_count must be at least 1, got {target_count}")
    sampled = sample_pairs(parsed.pairs, target_count, np.random.default_rng(random_state))
    write_pair_file(dst, sampled)
    return {"src": count_pairs(parsed.pairs), "dst": count_pairs(sampled)}


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
