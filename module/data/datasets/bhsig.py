"""BHSig260: Bengali (100 writers) and Hindi (160), 24 genuine signatures and 30 skilled forgeries each.

One language folder holds one folder a writer, named by its number, with files
``{w}/H-S-{w}-G-{nn}.tif`` (genuine) and ``{w}/H-S-{w}-F-{nn}.tif`` (forgery); ``B-`` for Bengali.
Per writer: 276 genuine pairs and 24 x 30 = 720 forgery pairs. Split by writer: Hindi writers 1-60
test, Bengali 1-50 (or a given list of test writers).
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from models.errors import InputError
from module.core.wording import option, writer_list, writer_ranges
from module.data.datasets.record import DatasetLayout, Signature
from module.data.layouts import FoundScans, split_sizes, split_writers, usable_writers, write_splits, writer_pairs
from module.data.pair_files import IMAGE_EXTENSIONS

__all__ = ["BHSIG", "FILE_NAME", "LANGUAGES", "TEST_WRITERS", "generate_bhsig_pairs", "scan_bhsig"]

FILE_NAME = re.compile(rf"^([HB])-S-(\d+)-([GF])-(\d+)\.{IMAGE_EXTENSIONS}$", re.IGNORECASE)
# The file-name prefix of each language, and its default test writers.
LANGUAGES = {"hindi": "H", "bengali": "B"}
TEST_WRITERS = {"hindi": range(1, 61), "bengali": range(1, 51)}


def signature(file_name: str) -> Signature | None:
    match = FILE_NAME.match(file_name)
    if match is None:
        return None
    return Signature(int(match.group(2)), match.group(3).upper() == "F", int(match.group(4)))


def scan_bhsig(data_root: str | os.PathLike, language: str | None = None) -> tuple[str, FoundScans]:
    """Language and scans of a BHSig260 language folder: {w}/H-S-{w}-G-{nn}.tif, {w}/H-S-{w}-F-{nn}.tif (B- for Bengali)."""
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found: pass the BHSig260 language folder holding one folder a writer")
    if language is not None and language.lower() not in LANGUAGES:
        raise InputError(f"unknown language {language!r}: choose 'hindi' or 'bengali' ({option('language')})")
    found = FoundScans("{w}/H-S-{w}-G-{nn} / H-S-{w}-F-{nn}")
    prefixes = set()
    for folder in (e for e in os.scandir(root) if e.is_dir()):
        for entry in os.scandir(folder.path):
            match = FILE_NAME.match(entry.name)
            if match:
                prefixes.add(match.group(1).upper())
                found.add(match.group(2), match.group(3).upper() == "F", match.group(4), f"{folder.name}/{entry.name}")
            else:
                found.skip(f"{folder.name}/{entry.name}")
    if not found.files:
        languages = [e.name for e in os.scandir(root) if e.is_dir() and e.name.lower() in LANGUAGES]
        hint = f"; pass {root / languages[0]}" if languages else ""
        raise FileNotFoundError(f"no BHSig scans ({{w}}/H-S-{{w}}-G-{{nn}}.tif or B-S-...) in {root}{hint}")
    if len(prefixes) > 1:
        raise InputError(f"{root} mixes Hindi (H-) and Bengali (B-) scans: keep one language a folder")
    found_language = {v: k for k, v in LANGUAGES.items()}[prefixes.pop()]
    if language is not None and language.lower() != found_language:
        raise InputError(f"{root} holds {found_language} scans, not {language}: drop {option('language')} "
                         "or pass the other language's folder")
    return found_language, found


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
        dict: language, and ``layouts.write_splits``' files, writers, counts, notes.
    """
    root = Path(data_root)
    language, found = scan_bhsig(root, language)
    scans, notes = usable_writers(found)
    wanted = set(TEST_WRITERS[language] if test_writers is None else (int(w) for w in test_writers))
    test = sorted(set(scans) & wanted)
    rest = sorted(set(scans) - wanted)
    if not test or not rest:
        default = "" if test_writers is not None else f" (by default {writer_ranges(TEST_WRITERS[language])})"
        raise InputError(
            f"the test writers{default} leave {len(test)} test and {len(rest)} train writers among the {len(scans)} "
            f"usable writers ({writer_ranges(scans)}) in {root}: choose test writers that exist and leave some for "
            f"training, e.g. {option('test_writers', sorted(scans)[:max(1, len(scans) // 4)])}"
        )
    rng = np.random.default_rng(random_state)
    n_val = split_sizes(len(rest), 0.0, val_ratio)[1]
    inner = split_writers(rest, 0, n_val, rng)
    writers = {"train": inner["train"], "val": inner["val"], "test": test}
    split_pairs = {split: [p for w in ws for p in writer_pairs(scans[w])] for split, ws in writers.items()}
    return {"language": language, **write_splits(Path(out_dir) if out_dir else root, split_pairs, writers, notes)}


def synthetic_files(writers: list[int], n_genuine: int, n_forged: int, rng: np.random.Generator,
                    language: str = "hindi", **_: object) -> tuple[list[tuple[int, bool, int, str]], dict]:
    """Every scan of a synthetic BHSig corpus in ``language``: ``(writer, forged, sample, relative path)``."""
    if language not in LANGUAGES:
        raise InputError(f"unknown language {language!r}: choose 'hindi' or 'bengali'")
    prefix = LANGUAGES[language]
    plan = []
    for w in writers:
        plan += [(w, False, n, f"{w}/{prefix}-S-{w}-G-{n:02d}.tif") for n in range(1, n_genuine + 1)]
        plan += [(w, True, n, f"{w}/{prefix}-S-{w}-F-{n:02d}.tif") for n in range(1, n_forged + 1)]
    return plan, {"language": language}


BHSIG = DatasetLayout(
    name="bhsig",
    aliases=(),
    title="BHSig260",
    naming="{w}/H-S-{w}-G-{nn}.tif, {w}/H-S-{w}-F-{nn}.tif (B- for Bengali)",
    folders="one folder a writer",
    signature=signature,
    scan=scan_bhsig,
    generate=generate_bhsig_pairs,
    options={
        "language": ({"choices": tuple(LANGUAGES)}, "bhsig: the scans' language (default: from the file names)"),
        "test_writers": ({"type": writer_list}, "bhsig: test writers, e.g. 1-20,31 (default: Hindi 1-60, Bengali 1-50)"),
    },
    real_counts=(24, 30),
    synthetic_files=synthetic_files,
)
