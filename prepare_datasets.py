"""Pair files made from dataset folders (spec section 7), and the command line that makes and checks them.

The generators write `gray_train.txt` and `gray_test.txt` (and
`gray_val.txt` with a validation split) into the dataset root, where the
datasets in sig_dataloader_colab.py look for them. Splits are by writer, and
everything is deterministic for `random_state`. Whatever is odd in a folder
(a writer without forgeries, a forgery-only writer, a writer number spelled
two ways) is reported as a warning naming the writer and what was done
(module/layouts.py). `ensure_pair_files` writes them only when they are
missing, invalid or made with other arguments (for notebooks that are run
again after a disconnect); `ensure_test_pair_file` gives evaluation a test
file without touching a dataset's other files. The pair-file format, its
reading and its validation live in module/pair_files.py.

Command line: `python prepare_datasets.py {synthetic,cedar,bhsig,gpds,sample,validate} --help`.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from module.io import atomic_write_text
from module.layouts import (
    BHSIG_TEST_WRITERS,
    WriterScans,
    scan_bhsig,
    scan_cedar,
    scan_gpds,
    split_sizes,
    split_writers,
    usable_writers,
    writer_pairs,
)
from module.pair_files import (
    PAIR_FILES,
    PAIR_MANIFEST,
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
from module.pair_options import PAIR_OPTIONS, add_pair_options, pair_options_of
from module.wording import command_line, option, prepare_command, writer_ranges
from synthetic_signatures import ensure_synthetic_dataset, make_synthetic_dataset

__all__ = [
    "PAIR_FILES",
    "PAIR_OPTIONS",
    "PairFileError",
    "PairFileReport",
    "ensure_pair_files",
    "ensure_synthetic_dataset",
    "ensure_test_pair_file",
    "generate_bhsig_pairs",
    "generate_cedar_pairs",
    "generate_gdps_pairs",
    "make_synthetic_dataset",
    "pair_file_fix",
    "read_pair_file",
    "sample_pair_file",
    "validate_pair_file",
    "write_pair_file",
    "writer_of",
]

# The paper's CEDAR protocol: 50 train / 5 test writers, 276 forgery pairs a writer.
PAPER_TRAIN_RATIO = 50 / 55
PAPER_FORGERY_PAIRS = 276


def _write_splits(out_dir: Path, split_pairs: dict[str, list[Pair]], writers: dict[str, list[int]], notes: list[str]) -> dict:
    """Write one pair file a split (validation only when it has writers); the generators' return value.

    A gray_val.txt left by an earlier run with a validation split is removed:
    its writers may now be training writers. Each note is also a warning.
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


# ---------------------------------------------------------------------------
# The three layouts' generators


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
        dict: files {split: path}, writers {split: [ids]}, counts {split: {pairs, genuine, forgery}},
        notes (what was odd in the folder, also warned).
    """
    root = Path(data_root)
    scans, notes = usable_writers(scan_cedar(root))
    if paper_protocol:
        train_ratio, forgery_pairs_per_writer = PAPER_TRAIN_RATIO, PAPER_FORGERY_PAIRS
    if not 0 < train_ratio < 1:
        raise ValueError(f"{option('train_ratio')} must be in (0, 1), got {train_ratio}")
    rng = np.random.default_rng(random_state)
    n_test, n_val = split_sizes(len(scans), 1 - train_ratio, val_ratio, test_option="train_ratio")
    writers = split_writers(list(scans), n_test, n_val, rng)
    split_pairs = {
        split: [p for w in ws for p in writer_pairs(scans[w], forgery_pairs_per_writer, rng)]
        for split, ws in writers.items()
    }
    return _write_splits(Path(out_dir) if out_dir else root, split_pairs, writers, notes)


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
        dict: language, files, writers, counts, notes (as generate_cedar_pairs).
    """
    root = Path(data_root)
    language, found = scan_bhsig(root, language)
    scans, notes = usable_writers(found)
    wanted = set(BHSIG_TEST_WRITERS[language] if test_writers is None else (int(w) for w in test_writers))
    test = sorted(set(scans) & wanted)
    rest = sorted(set(scans) - wanted)
    if not test or not rest:
        default = "" if test_writers is not None else f" (by default {writer_ranges(BHSIG_TEST_WRITERS[language])})"
        raise ValueError(
            f"the test writers{default} leave {len(test)} test and {len(rest)} train writers among the {len(scans)} "
            f"usable writers ({writer_ranges(scans)}) in {root}: choose test writers that exist and leave some for "
            f"training, e.g. {option('test_writers', sorted(scans)[:max(1, len(scans) // 4)])}"
        )
    rng = np.random.default_rng(random_state)
    n_val = split_sizes(len(rest), 0.0, val_ratio)[1]
    inner = split_writers(rest, 0, n_val, rng)
    writers = {"train": inner["train"], "val": inner["val"], "test": test}
    split_pairs = {split: [p for w in ws for p in writer_pairs(scans[w])] for split, ws in writers.items()}
    return {"language": language, **_write_splits(Path(out_dir) if out_dir else root, split_pairs, writers, notes)}


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
            raise ValueError(f"{option('test_ratio')} sets the test share of a re-split: add {option('resplit')}, "
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
    return {"shared_writers": shared, **_write_splits(Path(out_dir) if out_dir else root, split_pairs, writers, notes)}


# ---------------------------------------------------------------------------
# Pair files that are made once: for notebooks run again, for training and for evaluation

GENERATORS = {"cedar": generate_cedar_pairs, "bhsig": generate_bhsig_pairs, "gpds": generate_gdps_pairs}


def _dataset_name(dataset: str) -> str:
    name = "gpds" if dataset.lower() == "gdps" else dataset.lower()
    if name not in GENERATORS:
        raise ValueError(f"unknown dataset {dataset!r}: choose one of {', '.join(GENERATORS)}")
    return name


def _arguments(name: str, val_ratio: float, random_state: int, options: dict[str, Any],
               random_forgeries: int = 0) -> dict[str, Any]:
    """Every argument of the layout's generator, the defaults filled in, as JSON reads them back (tuples as lists).

    ``random_forgeries`` is recorded only when asked for, so that pair files made before it existed stay valid.
    """
    unknown = [key for key in options if key not in PAIR_OPTIONS[name]]
    if unknown:
        others = ", ".join(option(key) for key in PAIR_OPTIONS[name])
        raise ValueError(f"{', '.join(option(key) for key in unknown)} is not an option of {name} (its options: {others})")
    defaults = {key: parameter.default for key, parameter in inspect.signature(GENERATORS[name]).parameters.items()
                if key in PAIR_OPTIONS[name]}
    given = {key: value for key, value in options.items() if value is not None}
    extra = {"random_forgeries": random_forgeries} if random_forgeries else {}
    values = {"dataset": name, "val_ratio": val_ratio, "random_state": random_state, **extra, **defaults, **given}
    return json.loads(json.dumps(values, default=list))


def _why_not_reusable(root: Path, files: dict[str, str]) -> str | None:
    """None when every pair file exists, parses, names only existing images and repeats no pair; else the reason."""
    for split, path in files.items():
        if not Path(path).is_file():
            return f"{Path(path).name} is missing"
        report = validate_pair_file(root, Path(path).absolute(), other_pair_files=[], check_images=False)
        if report.malformed or report.missing_files or report.duplicates:
            return report.summary(limit=2)
    return None


def _record(root: Path, arguments: dict[str, Any], files: dict[str, str]) -> None:
    # Recorded relative to the root, so the record holds wherever the root is reached from.
    relative = {split: os.path.relpath(path, root) for split, path in files.items()}
    atomic_write_text(root / PAIR_MANIFEST, json.dumps({"arguments": arguments, "files": relative}, indent=1))


def _generate(root: str | os.PathLike, arguments: dict[str, Any], out_dir: str | os.PathLike | None = None) -> dict:
    """The layout's generator run with ``_arguments``' values; then the random forgeries, when asked for."""
    values = {key: value for key, value in arguments.items() if key not in ("dataset", "random_forgeries")}
    result = GENERATORS[arguments["dataset"]](root, **values, out_dir=out_dir)
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
    them, and a warning says which files it replaced and why.

    Args:
        dataset: "cedar", "bhsig" or "gpds" ("gdps" too).
        random_forgeries: random-forgery pairs added to gray_test.txt for each
            test writer (label 0; see module.pair_files.random_forgery_pairs), seeded with random_state.
        options: the layout's options (PAIR_OPTIONS), passed to generate_cedar_pairs,
            generate_bhsig_pairs or generate_gdps_pairs (e.g. train_ratio, test_writers, resplit);
            None means the generator's default.
    """
    name = _dataset_name(dataset)
    root = Path(data_root)
    arguments = _arguments(name, val_ratio, random_state, options, random_forgeries)
    try:
        saved = json.loads((root / PAIR_MANIFEST).read_text())
    except (OSError, ValueError):
        saved = None
    if saved is not None and saved.get("arguments") == arguments:
        files = {split: str(root / path) for split, path in saved["files"].items()}
    elif saved is None:
        files = {s: str(root / PAIR_FILES[s]) for s in (("train", "val", "test") if val_ratio > 0 else ("train", "test"))}
    else:
        files = None
    reason = "made with other arguments" if files is None else _why_not_reusable(root, files)
    if reason is None and not rewrite:
        return files
    existed = [PAIR_FILES[s] for s in PAIR_FILES if (root / PAIR_FILES[s]).is_file()]
    result = _generate(root, arguments)
    _record(root, arguments, result["files"])
    if existed and not rewrite:
        warnings.warn(f"replaced the pair files {', '.join(existed)} in {root} ({reason})", stacklevel=2)
    return result["files"]


def ensure_test_pair_file(dataset: str, data_root: str | os.PathLike, random_state: int = 42, **options: Any) -> str:
    """The test pair file of a dataset root for evaluation: the one there, read as it is, or written when there is none.

    Only gray_test.txt is ever written (the generator's test split), so the
    root's other pair files, and a test file that exists, stay byte for byte
    as they are. Returns its path.
    """
    name = _dataset_name(dataset)
    root = Path(data_root)
    test_file = root / PAIR_FILES["test"]
    if test_file.is_file():
        return str(test_file)
    arguments = _arguments(name, 0.0, random_state, options)
    with tempfile.TemporaryDirectory(prefix="pairs-") as folder:
        result = GENERATORS[name](root, **{k: v for k, v in arguments.items() if k != "dataset"}, out_dir=folder)
        atomic_write_text(test_file, Path(result["files"]["test"]).read_text(encoding="utf-8"))
    return str(test_file)


def pair_file_fix(dataset: str, data_root: str | os.PathLike, missing: Sequence[str]) -> str:
    """How to make the missing pair files (splits) of a root, in the words of the interface in use.

    When pair_files.json records how the others were made, the same options
    are repeated, so the new files split the writers the same way; a missing
    validation file asks for a validation share.
    """
    name = _dataset_name(dataset)
    root = Path(data_root)
    try:
        recorded = json.loads((root / PAIR_MANIFEST).read_text())["arguments"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = {}
    defaults = _arguments(name, 0.0, 42, {})
    wanted = {key: value for key, value in recorded.items() if key != "dataset" and value != defaults.get(key)}
    if "val" in missing and not wanted.get("val_ratio"):
        wanted["val_ratio"] = 0.1
    val_ratio = wanted.pop("val_ratio", 0.0)
    return prepare_command(name, root, {"val_ratio": val_ratio, **wanted} if val_ratio else wanted)


# ---------------------------------------------------------------------------
# Command line

def _print_generated(result: dict) -> None:
    for split, path in result["files"].items():
        c = result["counts"][split]
        print(f"{split:5s} {path}: {c['pairs']} pairs ({c['genuine']} genuine, {c['forgery']} forgery), "
              f"{len(result['writers'][split])} writer(s)")


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

    helps = {"cedar": "gray_train.txt / gray_test.txt for a CEDAR root (full_org/, full_forg/)",
             "bhsig": "pair files for a BHSig260 language folder ({w}/H-S-{w}-G-{nn}.tif)",
             "gpds": "pair files for GPDS-style train/ and test/ folders"}
    for dataset, help_text in helps.items():
        p = sub.add_parser(dataset, aliases=["gdps"] if dataset == "gpds" else [], help=help_text)
        p.add_argument("root")
        add_pair_options(p, [dataset], val_ratio=0.1 if dataset == "gpds" else 0.0)
        p.add_argument("--out-dir", default=None, help="where to write (default: the root, with a record pair_files.json)")

    p = sub.add_parser("sample", help="draw COUNT pairs of a pair file, keeping the class ratio")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("count", type=int)
    p.add_argument("--seed", type=int, default=42)

    p = sub.add_parser("validate", help="check pair files: parse, images exist and decode, duplicates, writers shared "
                                        "between the files given")
    p.add_argument("root")
    p.add_argument("pair_files", nargs="+", help="relative to the root, or absolute")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, category, *location: f"warning: {message}\n"
    try:
        with command_line("prepare_datasets.py"):
            return _run(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "synthetic":
        info = make_synthetic_dataset(
            args.root, layout=args.layout, n_writers=args.writers, n_genuine=args.genuine,
            n_forged=args.forged, seed=args.seed, image_size=args.image_size, language=args.language,
        )
        print(f"{info['counts']['files']} scans of {len(info['writers'])} writers in {info['root']} "
              f"({info['layout']}, {info['seconds']} s)")
    elif args.command in GENERATORS or args.command == "gdps":
        name = _dataset_name(args.command)
        options = pair_options_of(args, [name])
        arguments = _arguments(name, args.val_ratio, args.random_state, options, args.random_forgeries)
        result = _generate(args.root, arguments, out_dir=args.out_dir)
        if args.out_dir is None:
            _record(Path(args.root), arguments, result["files"])
        _print_generated(result)
    elif args.command == "sample":
        counts = sample_pair_file(args.src, args.dst, args.count, random_state=args.seed)
        print(f"{args.dst}: {counts['dst']['pairs']} pairs ({counts['dst']['genuine']} genuine, "
              f"{counts['dst']['forgery']} forgery) of {counts['src']['pairs']}")
    else:
        reports = []
        for pair_file in args.pair_files:
            others = [other for other in args.pair_files if other != pair_file]
            reports.append(validate_pair_file(args.root, pair_file, other_pair_files=others, with_siblings=True))
        for report in reports:
            print(report.summary())
        return 0 if all(r.ok for r in reports) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
