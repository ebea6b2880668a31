"""What every dataset layout shares: the scans a folder holds, by writer, what was odd about them, splits and pairs.

Each layout's scan (``module/data/datasets``) reads its folders into
``FoundScans`` (every file that follows the layout's names, with the way its
writer number is spelled); ``usable_writers`` then keeps the writers a pair
can be made for and returns one note per oddity: a writer without
forgeries, a forgery-only writer, a writer number spelled two ways
(``original_03_2.jpg`` beside ``original_3_1.jpg``), a sample with two
files, image files that follow no name of the layout. A note says which
writer, what is missing and what was done; nothing is merged or dropped
silently. Writers are split here too (``split_writers``, ``split_sizes``),
pairs made (``writer_pairs``) and written (``write_splits``).
"""
from __future__ import annotations

import itertools
import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.errors import InputError
from module.core.wording import option
from module.data.pair_files import IMAGE_EXTENSIONS, PAIR_FILES, Pair, count_pairs, write_pair_file

__all__ = ["FoundScans", "WriterScans", "split_sizes", "split_writers", "usable_writers", "write_splits",
           "writer_pairs"]

_IMAGE_FILE = re.compile(rf"\.{IMAGE_EXTENSIONS}$", re.IGNORECASE)
LISTED = 8  # writers or files named in one note before "and N more"


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


def _natural_key(path: str) -> tuple:
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", path))


@dataclass
class FoundScans:
    """Every scan of a layout's folders that follows its names, before writers are judged usable.

    Attributes:
        naming: the layout's file names, for notes (``original_{w}_{n}.png / forgeries_{w}_{n}.png``).
        files: writer -> ``"genuine"`` / ``"forged"`` -> ``[(sample number, relative path)]``.
        spellings: writer -> {its number as a file name writes it: the first such file}.
        unmatched: image files in the layout's folders that follow none of its names.
    """

    naming: str
    files: dict[int, dict[str, list[tuple[int, str]]]] = field(
        default_factory=lambda: defaultdict(lambda: {"genuine": [], "forged": []}))
    spellings: dict[int, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))
    unmatched: list[str] = field(default_factory=list)

    def add(self, writer: str, forged: bool, sample: str, path: str) -> None:
        self.files[int(writer)]["forged" if forged else "genuine"].append((int(sample), path))
        self.spellings[int(writer)].setdefault(writer, path)

    def skip(self, path: str) -> None:
        """A file that follows none of the layout's names: noted when it is an image."""
        if _IMAGE_FILE.search(path):
            self.unmatched.append(path)

    def merged(self, other: FoundScans) -> FoundScans:
        """Both folders' scans as one (GPDS's train/ and test/ pooled)."""
        pooled = FoundScans(self.naming, unmatched=self.unmatched + other.unmatched)
        for found in (self, other):
            for writer, kinds in found.files.items():
                for kind, items in kinds.items():
                    pooled.files[writer][kind] += items
            for writer, spelled in found.spellings.items():
                for spelling, path in spelled.items():
                    pooled.spellings[writer].setdefault(spelling, path)
        return pooled


def _listing(items: list, limit: int = LISTED) -> str:
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _writer_note(writers: list[int], what: str, done: str) -> str:
    who = f"writer {writers[0]}" if len(writers) == 1 else f"{len(writers)} writers ({_listing(writers)})"
    return f"{who}: {what}: {done}"


def usable_writers(found: FoundScans, where: str = "") -> tuple[dict[int, WriterScans], list[str]]:
    """The writers a pair can be made for, each one's scans in sample order, and a note per oddity.

    A pair needs a genuine reference: a writer with no genuine scan, or with
    one genuine scan and no forgery, is left out (and named). ``where``
    prefixes the notes (``"in test/: "``).
    """
    writers: dict[int, WriterScans] = {}
    notes: list[str] = []
    kinds_missing: dict[tuple[str, str], list[int]] = defaultdict(list)
    for writer in sorted(found.files):
        kinds = found.files[writer]
        spelled = found.spellings[writer]
        if len(spelled) > 1:
            examples = ", ".join(os.path.basename(path) for path in spelled.values())
            notes.append(f"{where}writer {writer}: its number is written {' and '.join(sorted(spelled))} "
                         f"({examples}): taken as one writer")
        for kind, items in kinds.items():
            by_sample = defaultdict(list)
            for sample, path in items:
                by_sample[sample].append(os.path.basename(path))
            for sample, names in sorted(by_sample.items()):
                if len(names) > 1:
                    label = "genuine signature" if kind == "genuine" else "forgery"
                    notes.append(f"{where}writer {writer}: {label} {sample} has {len(names)} files "
                                 f"({_listing(sorted(names))}): all kept")
        genuine = [path for _, path in sorted(kinds["genuine"], key=lambda item: (item[0], _natural_key(item[1])))]
        forged = [path for _, path in sorted(kinds["forged"], key=lambda item: (item[0], _natural_key(item[1])))]
        if not genuine:
            kinds_missing[("forgeries only, no genuine signature",
                           "left out (every pair needs a genuine reference)")].append(writer)
            continue
        if len(genuine) == 1 and not forged:
            kinds_missing[("one genuine signature and no forgery", "left out (no pair can be made)")].append(writer)
            continue
        if not forged:
            kinds_missing[("no forgeries", "only genuine-genuine pairs are made")].append(writer)
        elif len(genuine) == 1:
            kinds_missing[("one genuine signature", "no genuine-genuine pairs, only genuine-forgery pairs")].append(writer)
        writers[writer] = WriterScans(genuine, forged)
    for (what, done), listed in kinds_missing.items():
        notes.append(where + _writer_note(listed, what, done))
    if found.unmatched:
        notes.append(f"{where}{len(found.unmatched)} image file(s) follow no {found.naming} name and are ignored: "
                     f"{_listing(sorted(found.unmatched), 5)}")
    return writers, notes


# ---------------------------------------------------------------------------
# Splitting writers


def split_writers(writers: list[int], n_test: int, n_val: int, rng: np.random.Generator) -> dict[str, list[int]]:
    """Writers shuffled by `rng` into test, validation and train (each list sorted)."""
    order = [int(w) for w in rng.permutation(sorted(writers))]
    return {
        "train": sorted(order[n_test + n_val:]),
        "val": sorted(order[n_test:n_test + n_val]),
        "test": sorted(order[:n_test]),
    }


def split_sizes(n_writers: int, test_ratio: float, val_ratio: float, test_option: str = "test_ratio") -> tuple[int, int]:
    """Numbers of test and validation writers (at least one for a positive ratio), leaving one or more for training.

    ``test_option`` names the option that sets the test share in messages (CEDAR's is ``train_ratio``).
    """
    for name, ratio in ((test_option, test_ratio), ("val_ratio", val_ratio)):
        if not 0 <= ratio < 1:
            raise InputError(f"{option(name)} must be in [0, 1), got {ratio}")
    n_test = max(round(n_writers * test_ratio), 1) if test_ratio > 0 else 0
    n_val = max(round(n_writers * val_ratio), 1) if val_ratio > 0 else 0
    minimum = 1 + (test_ratio > 0) + (val_ratio > 0)  # one writer each for training, testing, validation
    if n_writers < minimum:
        raise InputError(
            f"{n_writers} usable writer(s) found: splitting by writer into training"
            + (", test" if test_ratio > 0 else "") + (" and validation" if val_ratio > 0 else "")
            + f" needs at least {minimum} writers (one each, since no writer may be in two splits). Fix: add the scans "
            f"of more writers" + (f", or set {option('val_ratio', 0.0)}" if val_ratio > 0 and n_writers >= minimum - 1
                                  else ""))
    if n_test + n_val >= n_writers:
        raise InputError(
            f"{n_writers} usable writers are too few for {n_test} test and {n_val} validation writers and one "
            f"for training: lower {option('val_ratio')}"
            + (f" or {'raise' if test_option == 'train_ratio' else 'lower'} {option(test_option)}" if n_test else "")
        )
    return n_test, n_val


def write_splits(out_dir: Path, split_pairs: dict[str, list[Pair]], writers: dict[str, list[int]],
                 notes: list[str]) -> dict:
    """Write one pair file a split (validation only when it has writers); a generator's return value.

    A gray_val.txt left by an earlier run with a validation split is removed:
    its writers may now be training writers. Each note is also a warning.

    Returns:
        dict: files {split: path}, writers {split: [ids]}, counts {split: {pairs, genuine, forgery}},
        notes (what was odd in the folder).
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
    for note in notes:
        warnings.warn(note, stacklevel=3)
    return {"files": files, "writers": {s: writers[s] for s in files}, "counts": counts, "notes": notes}
