"""Pair files made once from a dataset folder and kept while valid: what ``prepare`` does, for both command lines.

``ensure_pair_files`` writes a dataset root's pair files only when they are
missing, invalid or made with other arguments (for notebooks run again after a
disconnect), recording how in ``pair_files.json``; ``ensure_test_pair_file``
gives evaluation a test file without touching a root's other files;
``pair_file_fix`` says how to make missing ones. The options of every layout's
generator (``module/data/datasets``) are defined once for both command lines
(``add_pair_options``).
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import shutil
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import InputError
from module.core.io import atomic_write_text, remove_temporary_files
from module.core.wording import flag, option, prepare_command
from module.data.datasets import DATASETS, dataset_layout, signature_of
from module.data.pair_files import PAIR_FILES, PAIR_MANIFEST, Pair, read_pair_file, write_pair_file
from module.data.validation import validate_pair_file

__all__ = ["COMMAND_LINE_VAL_RATIO", "add_pair_options", "add_random_forgeries", "ensure_pair_files",
           "ensure_test_pair_file", "pair_file_fix", "finish_interrupted_prepare", "generate", "generator_arguments",
           "pair_options_of", "random_forgery_pairs", "record_pair_files", "write_pair_file_set"]

# The command lines' validation share: training picks its best epoch, and verify its threshold, on that split.
COMMAND_LINE_VAL_RATIO = 0.1


def generator_arguments(name: str, val_ratio: float, random_state: int, options: dict[str, Any],
                        random_forgeries: int = 0) -> dict[str, Any]:
    """Every argument of the layout's generator, the defaults filled in, as JSON reads them back (tuples as lists).

    ``random_forgeries`` is recorded only when asked for, so that pair files made before it existed stay valid.
    """
    unknown = [key for key in options if key not in DATASETS[name].options]
    if unknown:
        others = ", ".join(option(key) for key in DATASETS[name].options)
        raise InputError(f"{', '.join(option(key) for key in unknown)} is not an option of {name} (its options: {others})")
    defaults = {key: parameter.default for key, parameter in inspect.signature(DATASETS[name].generate).parameters.items()
                if key in DATASETS[name].options}
    given = {key: value for key, value in options.items() if value is not None}
    extra = {"random_forgeries": random_forgeries} if random_forgeries else {}
    values = {"dataset": name, "val_ratio": val_ratio, "random_state": random_state, **extra, **defaults, **given}
    return json.loads(json.dumps(values, default=list))


def _why_not_reusable(root: Path, files: dict[str, str]) -> str | None:
    """None when every pair file exists, parses, names only existing images and repeats no pair; else the reason."""
    for path in files.values():
        if not Path(path).is_file():
            return f"{Path(path).name} is missing"
        report = validate_pair_file(root, Path(path).absolute(), other_pair_files=[], check_images=False)
        if report.malformed or report.missing_files or report.duplicates:
            return report.summary(limit=2)
    return None


def record_pair_files(root: Path, arguments: dict[str, Any], files: dict[str, str]) -> None:
    """Write ``pair_files.json``: the arguments the files were made with, and each file with its SHA-256 (so that a
    later ``prepare`` knows which files it wrote and which are the user's)."""
    # Recorded relative to the root, so the record holds wherever the root is reached from.
    relative = {split: os.path.relpath(path, root) for split, path in files.items()}
    digests = {name: _sha256(root / name) for name in relative.values()}
    atomic_write_text(root / PAIR_MANIFEST, json.dumps({"arguments": arguments, "files": relative, "sha256": digests},
                                                       indent=1))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _written_by_prepare(root: Path, name: str, record: dict | None) -> bool:
    """Whether pair file ``name`` in ``root`` is one ``prepare`` wrote and nobody changed since (its recorded
    SHA-256; records older than the checksums name the files alone)."""
    if record is None or name not in record.get("files", {}).values():
        return False
    digests = record.get("sha256")
    return digests is None or digests.get(name) == _sha256(root / name)


# A prepare writes its new set of pair files into STAGING, then JOURNAL (the commit point: whole or absent), then
# moves the user's own files aside, the new ones into place, and writes the record; a re-run after a kill finishes
# a committed journal, or removes an uncommitted staging folder.
STAGING = ".prepare-staging"
JOURNAL = ".prepare-journal.json"


def write_pair_file_set(root: Path, arguments: dict[str, Any], reason: str | None = None) -> dict:
    """Make a dataset root's pair files anew as one transaction: afterwards the root holds either the new set and
    its record, or (killed before the commit) the old ones; returns the generator's dict.

    Files this project wrote (recorded in ``pair_files.json`` with their checksums) are replaced; any other
    pair file in the way (your own) is moved into a ``previous-pairs-<date>`` folder first, and a warning says
    where. ``reason``: why the files are made again, for that warning.
    """
    finish_interrupted_prepare(root)
    staging = root / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    result = generate(root, arguments, out_dir=staging)
    record = _read_record(root)
    new = {split: Path(path).name for split, path in result["files"].items()}
    present = [name for name in PAIR_FILES.values() if (root / name).is_file()]
    users = [name for name in present if not _written_by_prepare(root, name, record)]
    reason = " ".join(reason.split()) if reason else None  # one line: a file's report spans several
    plan = {"arguments": arguments, "files": new, "remove": [name for name in present if name not in users],
            "move_aside": users, "aside": _aside_folder(root).name if users else None}
    atomic_write_text(root / JOURNAL, json.dumps(plan, indent=1))  # the commit
    _apply(root, plan)
    if users:
        warnings.warn(f"{', '.join(users)} in {root} were not written by prepare ({reason or 'replaced'}): moved to "
                      f"{root / plan['aside']}, nothing deleted", stacklevel=3)
    elif present and reason:
        warnings.warn(f"replaced the pair files {', '.join(present)} in {root} ({reason})", stacklevel=3)
    return {**result, "files": {split: str(root / name) for split, name in new.items()}}


def finish_interrupted_prepare(root: Path) -> None:
    """Finish a prepare whose journal was committed, or undo one that was killed before it; remove its temporary
    files. Nothing to do for a root no prepare was interrupted in."""
    journal, staging = root / JOURNAL, root / STAGING
    if journal.is_file():
        _apply(root, json.loads(journal.read_text(encoding="utf-8")))
    elif staging.exists():
        shutil.rmtree(staging)
    remove_temporary_files(root)


def _apply(root: Path, plan: dict) -> None:
    """Carry out a committed prepare: each step can run again after a kill (what was done is not found again)."""
    if plan["move_aside"]:
        aside = root / plan["aside"]
        aside.mkdir(exist_ok=True)
        for name in plan["move_aside"]:
            if (root / name).is_file():
                os.replace(root / name, aside / name)
    for name in plan["remove"]:
        if name not in plan["files"].values():
            (root / name).unlink(missing_ok=True)
    for name in plan["files"].values():
        if (root / STAGING / name).is_file():
            os.replace(root / STAGING / name, root / name)
    record_pair_files(root, plan["arguments"], {split: str(root / name) for split, name in plan["files"].items()})
    (root / JOURNAL).unlink()
    shutil.rmtree(root / STAGING, ignore_errors=True)


def _aside_folder(root: Path) -> Path:
    stamp = time.strftime("previous-pairs-%Y%m%d-%H%M%S")
    folder, number = root / stamp, 1
    while folder.exists():
        folder, number = root / f"{stamp}-{number}", number + 1
    return folder


def _read_record(root: Path) -> dict | None:
    try:
        return json.loads((root / PAIR_MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def generate(root: str | os.PathLike, arguments: dict[str, Any], out_dir: str | os.PathLike | None = None) -> dict:
    """The layout's generator run with ``_arguments``' values; then the random forgeries, when asked for."""
    values = {key: value for key, value in arguments.items() if key not in ("dataset", "random_forgeries")}
    result = DATASETS[arguments["dataset"]].generate(root, **values, out_dir=out_dir)
    if arguments.get("random_forgeries"):
        add_random_forgeries(result["files"]["test"], arguments["random_forgeries"], arguments["random_state"])
    return result


def ensure_pair_files(dataset: str, data_root: str | os.PathLike, val_ratio: float = 0.0, random_state: int = 42,
                      random_forgeries: int = 0, rewrite: bool = False, **options: Any) -> dict[str, str]:
    """The pair files of a dataset root, written only when needed; returns {split: path}.

    Files made by an earlier call (recorded in pair_files.json with their
    arguments) are kept when the arguments match and every file still
    validates; files found without that record (your own) are kept when
    gray_train.txt, gray_test.txt and, for val_ratio > 0, gray_val.txt exist
    and validate. Otherwise (or with `rewrite`) the dataset's generator writes
    them (``write_pair_file_set``: one transaction; files it did not write are moved aside, never deleted), and a
    warning says which files it replaced and why.

    Args:
        dataset: "cedar", "bhsig" or "gpds" ("gdps" too).
        random_forgeries: random-forgery pairs added to gray_test.txt for each
            test writer (label 0; see module.pair_files.random_forgery_pairs), seeded with random_state.
        options: the layout's options (its ``DatasetLayout.options``), passed to generate_cedar_pairs,
            generate_bhsig_pairs or generate_gdps_pairs (e.g. train_ratio, test_writers, resplit);
            None means the generator's default.
    """
    name = dataset_layout(dataset).name
    root = Path(data_root)
    arguments = generator_arguments(name, val_ratio, random_state, options, random_forgeries)
    finish_interrupted_prepare(root)
    saved = _read_record(root)
    if saved is not None and saved.get("arguments") == arguments:
        files = {split: str(root / path) for split, path in saved["files"].items()}
    elif saved is None:
        files = {s: str(root / PAIR_FILES[s]) for s in (("train", "val", "test") if val_ratio > 0 else ("train", "test"))}
    else:
        files = None
    reason = "made with other arguments" if files is None else _why_not_reusable(root, files)
    if reason is None and not rewrite:
        return files
    return write_pair_file_set(root, arguments, None if rewrite else reason)["files"]


def ensure_test_pair_file(dataset: str, data_root: str | os.PathLike, random_state: int = 42, **options: Any) -> str:
    """The test pair file of a dataset root for evaluation: the one there, read as it is, or written when there is none.

    Only gray_test.txt is ever written (the generator's test split), so the
    root's other pair files, and a test file that exists, stay byte for byte
    as they are. Returns its path.
    """
    name = dataset_layout(dataset).name
    root = Path(data_root)
    test_file = root / PAIR_FILES["test"]
    if test_file.is_file():
        return str(test_file)
    arguments = generator_arguments(name, 0.0, random_state, options)
    with tempfile.TemporaryDirectory(prefix="pairs-") as folder:
        result = DATASETS[name].generate(root, **{k: v for k, v in arguments.items() if k != "dataset"}, out_dir=folder)
        atomic_write_text(test_file, Path(result["files"]["test"]).read_text(encoding="utf-8"))
    return str(test_file)


def pair_file_fix(dataset: str, data_root: str | os.PathLike, missing: Sequence[str]) -> str:
    """How to make the missing pair files (splits) of a root, in the words of the interface in use.

    When pair_files.json records how the others were made, the same options
    are repeated, so the new files split the writers the same way; a missing
    validation file asks for a validation share.
    """
    name = dataset_layout(dataset).name
    root = Path(data_root)
    try:
        recorded = json.loads((root / PAIR_MANIFEST).read_text())["arguments"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = {}
    defaults = generator_arguments(name, 0.0, 42, {})
    wanted = {key: value for key, value in recorded.items() if key != "dataset" and value != defaults.get(key)}
    if "val" in missing and not wanted.get("val_ratio"):
        wanted["val_ratio"] = 0.1
    val_ratio = wanted.pop("val_ratio", 0.0)
    return prepare_command(name, root, {"val_ratio": val_ratio, **wanted} if val_ratio else wanted)


def random_forgery_pairs(pairs: Sequence[Pair], per_writer: int, rng: np.random.Generator) -> list[Pair]:
    """``per_writer`` random-forgery pairs (label 0) for each writer of ``pairs``, drawn by ``rng``.

    Each has a genuine signature of the writer as reference and a genuine
    signature of another writer of ``pairs`` as query; none repeats a pair
    of ``pairs`` or another drawn one, in either order. A writer gets fewer
    when there are not that many.
    """
    if per_writer < 0:
        raise InputError(f"the number of random forgeries a writer must be 0 or more, got {per_writer}")
    if per_writer == 0:
        return []
    genuine: dict[int, set[str]] = defaultdict(set)
    for path in {path for reference, query, _ in pairs for path in (reference, query)}:
        signature = signature_of(path)
        if signature is not None and not signature.forged:
            genuine[signature.writer].add(path)
    if len(genuine) < 2:
        raise InputError(f"random forgeries need genuine signatures of two writers or more; the pairs have "
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


def add_pair_options(parser: argparse.ArgumentParser, datasets: Sequence[str]) -> None:
    """The pair-file options of ``datasets`` (each layout's ``options``), --val-ratio, --seed and
    --random-forgeries: one definition, with one default each, for both command lines."""
    parser.add_argument("--val-ratio", type=float, default=COMMAND_LINE_VAL_RATIO,
                        help="share of writers for gray_val.txt, which picks the best epoch (default %(default)s)")
    parser.add_argument("--seed", dest="random_state", metavar="SEED", type=int, default=42,
                        help="the split's seed (default %(default)s)")
    parser.add_argument("--random-forgeries", type=int, default=0, metavar="N",
                        help="add N random-forgery test pairs a test writer: another writer's genuine signature as "
                             "the query, label 0 (default %(default)s)")
    for dataset in datasets:
        for name, (settings, help_text) in DATASETS[dataset].options.items():
            if "action" not in settings and "choices" not in settings:
                settings = {**settings, "metavar": flag(name)[2:].upper().replace("-", "_")}
            parser.add_argument(flag(name), dest=name, help=help_text, **{"default": None, **settings})


def pair_options_of(args: argparse.Namespace, datasets: Sequence[str]) -> dict[str, Any]:
    """The layout options given on the command line (those left out take the generators' defaults)."""
    return {name: getattr(args, name) for dataset in datasets for name in DATASETS[dataset].options
            if getattr(args, name, None) is not None}
