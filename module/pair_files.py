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
from array import array
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from module.io import atomic_write_text

__all__ = [
    "CEDAR_NAME",
    "BHSIG_NAME",
    "GPDS_NAME",
    "PAIR_FILES",
    "PAIR_MANIFEST",
    "Pair",
    "PairIndex",
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
    "read_pair_index",
    "resolve_pair_file",
    "undecodable_images",
    "sample_pair_file",
    "sample_pairs",
    "signature_of",
    "validate_pair_file",
    "write_pair_file",
    "writer_of",
]

Pair = tuple[str, str, int]

PAIR_FILES = {"train": "gray_train.txt", "val": "gray_val.txt", "test": "gray_test.txt"}
# Written beside the pair files by prepare_datasets: the arguments they were made with.
PAIR_MANIFEST = "pair_files.json"
IMAGE_EXTENSIONS = r"(?:png|jpe?g|tiff?|bmp)"
CEDAR_NAME = re.compile(rf"^(original|forgeries)_(\d+)_(\d+)\.{IMAGE_EXTENSIONS}$", re.IGNORECASE)
BHSIG_NAME = re.compile(rf"^([HB])-S-(\d+)-([GF])-(\d+)\.{IMAGE_EXTENSIONS}$", re.IGNORECASE)
# GPDS names may carry anything after the sample number, e.g. "c-032-11 (Copy).jpg".
GPDS_NAME = re.compile(rf"^(cf|c)-(\d+)-(\d+)[^/]*\.{IMAGE_EXTENSIONS}$", re.IGNORECASE)


_NOT_UTF8 = re.compile("[\udc80-\udcff]")


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
    referenced paths that do not exist; `undecodable_files` (path, reason)
    for those whose image header does not decode (a Git LFS pointer saved
    under an image's name, an HTML page, an empty file); `shared_writers`
    maps another pair file to the writers it shares with this one.
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
    undecodable_files: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is wrong: every line parses, every image exists and decodes, no duplicate, no shared writer."""
        return not (self.missing_files or self.undecodable_files or self.malformed or self.duplicates
                    or any(self.shared_writers.values()))

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
        if self.undecodable_files:
            out.append(f"  {len(self.undecodable_files)} images that do not decode: "
                       + "; ".join(f"{path} ({reason})" for path, reason in self.undecodable_files[:limit]))
        if self.duplicates:
            out.append(f"  {len(self.duplicates)} duplicate pairs: " + ", ".join(f"line {n} repeats line {m}" for n, m in self.duplicates[:limit]))
        for other, ws in self.shared_writers.items():
            if ws:
                out.append(f"  {len(ws)} writer(s) also in {other}: {ws[:limit * 2]}")
        out.append("  OK" if self.ok else "  PROBLEMS FOUND")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.summary()


def _duplicates(index: PairIndex) -> list[tuple[int, int]]:
    """(line number, line number of its first occurrence) of each pair listed before, in either order."""
    low, high = np.minimum(index.rows[:, 0], index.rows[:, 1]), np.maximum(index.rows[:, 0], index.rows[:, 1])
    keys = low.astype(np.int64) * len(index.images) + high
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    repeated = np.flatnonzero(first[inverse.reshape(-1)] != np.arange(len(keys)))
    return [(int(index.line_numbers[i]), int(index.line_numbers[first[inverse.reshape(-1)[i]]])) for i in repeated]


def _writers_in(paths: Iterable[str]) -> tuple[set[int], int]:
    writers, unknown = set(), 0
    for path in paths:
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


GIT_LFS_POINTER = b"version https://git-lfs"


def undecodable_images(root: Path, relative_paths: Sequence[str]) -> list[tuple[str, str]]:
    """(path, reason) for each existing image whose header does not decode; PIL reads only the header (fast)."""
    problems = []
    for relative in tqdm(relative_paths, desc="checking image headers", unit="image", leave=False,
                         disable=len(relative_paths) < 5000):
        try:
            with open(root / relative, "rb") as file:
                start = file.read(len(GIT_LFS_POINTER))
                if not start:
                    problems.append((relative, "an empty file"))
                    continue
                if start == GIT_LFS_POINTER:
                    problems.append((relative, "a Git LFS pointer, not the image: fetch it with `git lfs pull`"))
                    continue
                file.seek(0)
                with Image.open(file):
                    pass
        except UnidentifiedImageError:
            problems.append((relative, "not an image format PIL reads (a web page or text saved under an image's name?)"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            problems.append((relative, f"not a readable image: {error}"))
    return problems


def validate_pair_file(
    data_root: str | os.PathLike,
    pair_file: str | os.PathLike,
    other_pair_files: Sequence[str | os.PathLike] | None = None,
    *,
    with_siblings: bool = False,
    check_images: bool = True,
) -> PairFileReport:
    """Check a pair file against its dataset root and other pair files.

    Args:
        data_root: the dataset root the file's paths are relative to.
        pair_file: the file; a relative path is taken relative to `data_root`.
        other_pair_files: pair files (of any name) that must share no writer
            with this one; None takes the siblings that exist (for
            gray_train.txt: gray_val.txt and gray_test.txt); [] checks none.
        with_siblings: check the siblings as well as `other_pair_files`.
        check_images: also check that every existing image's header decodes.

    Raises:
        FileNotFoundError: the pair file does not exist.
    """
    root = Path(data_root)
    path = resolve_pair_file(root, pair_file)
    if not path.is_file():
        raise FileNotFoundError(f"pair file {path} not found")
    index = read_pair_index(path)  # arrays: a GPDS file of 4 M pairs is checked in bounded memory
    paths = index.images
    present = existing_files(root, paths)
    writers, unknown = _writers_in(paths)
    others = [] if other_pair_files is None else [resolve_pair_file(root, p) for p in other_pair_files]
    if other_pair_files is None or with_siblings:
        others += [sibling for sibling in _sibling_pair_files(path) if sibling not in others]
    shared = {}
    for other in others:
        other_writers, _ = _writers_in(read_pair_index(other).images)
        shared[str(other)] = sorted(writers & other_writers)
    genuine = int(index.labels.sum(dtype=np.int64))
    return PairFileReport(
        pair_file=str(path),
        lines=index.n_lines,
        genuine=genuine,
        forgery=len(index.labels) - genuine,
        writers=sorted(writers),
        unknown_writer_paths=unknown,
        missing_files=[p for p in paths if p not in present],
        malformed=index.problems,
        duplicates=_duplicates(index),
        shared_writers=shared,
        undecodable_files=undecodable_images(root, sorted(present)) if check_images else [],
    )


