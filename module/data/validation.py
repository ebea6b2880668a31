"""Checking pair files against their dataset root and each other: lines, images, duplicates, shared writers."""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from module.core.progress import progress_bar
from module.data.datasets import writer_of
from module.data.pair_files import PairIndex, existing_files, read_pair_index, resolve_pair_file

__all__ = ["PairFileReport", "undecodable_images", "validate_pair_file"]


@dataclass
class PairFileReport:
    """What `validate_pair_file` found in one pair file.

    `lines` counts non-blank lines; `malformed` holds (line number, reason);
    `duplicates` holds (line number, line number of its first occurrence) for
    a pair already listed in either order; `missing_files` the distinct
    referenced paths that do not exist; `undecodable_files` (path, reason)
    for those that do not decode whole (a Git LFS pointer saved
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
            f"{len(self.writers)} writers"
            + (f" ({self.unknown_writer_paths} paths with no writer id)" if self.unknown_writer_paths else ""),
        ]
        if self.malformed:
            out.append(f"  {len(self.malformed)} malformed lines: " + "; ".join(f"line {n}: {m}" for n,
                                                                                m in self.malformed[:limit]))
        if self.missing_files:
            out.append(f"  {len(self.missing_files)} missing files: " + ", ".join(self.missing_files[:limit]))
        if self.undecodable_files:
            out.append(f"  {len(self.undecodable_files)} images that do not decode: "
                       + "; ".join(f"{path} ({reason})" for path, reason in self.undecodable_files[:limit]))
        if self.duplicates:
            out.append(f"  {len(self.duplicates)} duplicate pairs: " + ", ".join(f"line {n} repeats line {m}" for n,
                                                                                 m in self.duplicates[:limit]))
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
    """The writers named in ``paths`` and how many paths name none."""
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


GIT_LFS_POINTER = b"version https://git-lfs"


def undecodable_images(root: Path, relative_paths: Sequence[str]) -> list[tuple[str, str]]:
    """(path, reason) for each existing image that does not decode whole (a file cut short, a web page, a Git LFS
    pointer); about 2 ms a CEDAR-size PNG."""
    problems = []
    for relative in progress_bar(relative_paths, desc="decoding images", unit="image", leave=False,
                         disable=len(relative_paths) < 2000):
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
                with Image.open(file) as image:
                    image.load()  # the whole image: a file cut short decodes its header, not its pixels
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
        check_images: also check that every existing image decodes whole.

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
