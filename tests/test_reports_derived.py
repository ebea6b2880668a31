"""A run folder's reports are derived files: a kill while a report file is written, or a report file deleted or
damaged since, and the same command again end with the files of an uninterrupted run, byte for byte (but for the
wall times a new run's checkpoints and history hold).

The kills are in-process: ``os.replace`` (how ``module/core/io.atomic_write`` puts every file in place) raises
``Killed`` instead of renaming a given report file into place, and leaves its temporary file behind, half
written, as a ``kill -9`` would. Nothing of the run is done after it but the releases of ``finally`` blocks (the
lock); ``tools/fault_injection.py`` kills real processes. Small on purpose: 5 writers, 64 px, 2 epochs.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_equal_values, flip_middle_bytes, run_config

from models.weights import read_torch_file
from module.core.io import TEMPORARY_SUFFIX
from module.evaluation.reports import record_report, report_is_whole
from module.run.folder import MANIFEST_SUFFIX, REPORT_FILES
from training_utils import build_datasets, train_and_report

# Written by training, not by a report: what a trial copies from the reference instead of writing it again.
CHECKPOINT = re.compile(r"^(epoch_\d+\.pt|best\.pt)(\.sha256)?$")
RENAME = os.replace  # the real one, under every watch


class Killed(BaseException):
    """Stands in for ``kill -9``: no ``except Exception`` catches it, so nothing more of the run is done."""


@pytest.fixture(scope="module")
def corpus(cedar_corpus: Path) -> Path:
    """5 writers x (4 genuine + 4 forged): the file names give writers, so every report has its per-writer files."""
    return cedar_corpus


@pytest.fixture(scope="module")
def reference(reference_run: Path) -> Path:
    """An uninterrupted run (``run_config``, shared with tests/test_run_folder.py): what every interrupted or
    damaged one must end with."""
    return reference_run


@pytest.fixture(scope="module")
def datasets(corpus: Path) -> dict[str, Any]:
    return build_datasets(run_config(corpus, corpus))


def files_of(folder: Path) -> dict[str, bytes | None]:
    """The run folder's entries: a file's bytes, ``None`` for a folder (the feature store, the training curves)."""
    return {path.name: path.read_bytes() if path.is_file() else None for path in folder.iterdir()}


def report_files(folder: Path) -> list[str]:
    """The reports' files in ``folder`` (with the checksum beside ``best_weights.pth``), by name."""
    return sorted(name for name in files_of(folder)
                  if name.removesuffix(".sha256") in REPORT_FILES or name.startswith("test_before_"))


def assert_same_files(folder: Path, reference: Path) -> None:
    actual, expected = files_of(folder), files_of(reference)
    assert sorted(actual) == sorted(expected)
    assert [name for name in expected if actual[name] != expected[name]] == []


def flip_bits(path: Path) -> None:
    flip_middle_bytes(path, 8)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def trained_without_report(reference: Path, folder: Path, keep_starting_model: bool = False) -> Path:
    """``folder``: the reference's checkpoints, feature store and training curves, without its reports; with the
    starting model's (``test_before``) when ``keep_starting_model``: the state of a new run killed right after
    training. Without any, that of a run whose reports were lost, or which writes ``test_before`` again."""
    shutil.copytree(reference, folder)
    for name in report_files(folder):
        if not (keep_starting_model and name.startswith("test_before_")):
            (folder / name).unlink()
    return folder


class ReportWrites:
    """Watch the files put in place in a run folder (``os.replace``); raise ``Killed`` instead of putting ``killed_at``.

    The temporary file of the write cut short is left behind, half written, as a kill mid-write leaves it.
    ``written``: the report files put in place, in order.
    """

    def __init__(self, folder: Path, killed_at: str | None = None) -> None:
        self.folder, self.killed_at, self.written = folder.resolve(), killed_at, []

    def __call__(self, source: str | os.PathLike, destination: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        target = Path(destination).resolve()
        if target.parent == self.folder and not CHECKPOINT.match(target.name):
            if target.name == self.killed_at:
                half = Path(source).read_bytes()[: Path(source).stat().st_size // 2]
                Path(source).with_name(f".{target.name}.killed{TEMPORARY_SUFFIX}").write_bytes(half)
                raise Killed(target.name)
            self.written.append(target.name)
        RENAME(source, destination, *args, **kwargs)


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``writes(folder, killed_at=None)``: install a ``ReportWrites`` on ``os.replace``; returns it."""
    def install(folder: Path, killed_at: str | None = None) -> ReportWrites:
        watch = ReportWrites(folder, killed_at)
        monkeypatch.setattr(os, "replace", watch)
        return watch

    yield install


def report_again(corpus: Path, folder: Path, datasets: dict[str, Any], writes: Any,
                 killed_at: str | None = None) -> ReportWrites:
    """The same run again (``train_and_report``), watched; killed while writing the file ``killed_at`` when given."""
    watch = writes(folder, killed_at)
    config = run_config(corpus, folder)
    if killed_at is None:
        train_and_report(config, datasets=datasets, progress=False)
    else:
        with pytest.raises(Killed):
            train_and_report(config, datasets=datasets, progress=False)
    return watch


# --------------------------------------------------------------------------- what a re-run keeps and rebuilds

# What a kill can leave of a report: of the starting model's (test_before, kept when whole), some of its files but
# no manifest (killed at any file of it: the last stands for all), or all of them but the manifest; of the reports
# rewritten at every run's end, nothing (killed at the first file) or all but the last file (best_weights.pth, its
# checksum beside it already). Each file is written alike (module/core/io.atomic_write), the manifest last.
KILLED_WHILE_WRITING = ["test_before_writer_eers.png", "test_before_manifest.json", "val_metrics.json",
                        "best_weights.pth"]


def test_a_whole_report_kept_from_the_start_of_the_run_is_not_written_again(
        corpus: Path, reference: Path, datasets: dict[str, Any], writes: Any, tmp_path: Path) -> None:
    """``test_before`` is kept when it verifies; the others are rewritten, each file once, to the same bytes."""
    folder = tmp_path / "run"
    shutil.copytree(reference, folder)
    written = report_again(corpus, folder, datasets, writes).written
    assert sorted(written) == [name for name in report_files(reference) if not name.startswith("test_before_")]
    assert (written[0], written[-1]) == ("val_metrics.json", "best_weights.pth")  # as KILLED_WHILE_WRITING says
    assert_same_files(folder, reference)


@pytest.mark.parametrize("killed_at", KILLED_WHILE_WRITING)
def test_a_kill_while_a_report_file_is_written_and_the_same_command_again_give_the_uninterrupted_files(
        corpus: Path, reference: Path, datasets: dict[str, Any], writes: Any, tmp_path: Path, killed_at: str) -> None:
    """From a trained folder: a run killed while it writes its reports, then the same run again."""
    folder = trained_without_report(reference, tmp_path / "run", keep_starting_model=not killed_at.startswith("test_before"))
    report_again(corpus, folder, datasets, writes, killed_at=killed_at)
    assert (folder / f".{killed_at}.killed{TEMPORARY_SUFFIX}").is_file() and killed_at not in files_of(folder)
    report_again(corpus, folder, datasets, writes)
    assert_same_files(folder, reference)


def test_a_kill_in_the_starting_models_report_of_a_new_run(
        corpus: Path, reference: Path, datasets: dict[str, Any], writes: Any, tmp_path: Path) -> None:
    """Killed right after ``test_before_metrics.json``, before any checkpoint: the re-run trains and writes
    the whole ``test_before`` report, not only what was missing."""
    folder = tmp_path / "run"
    report_again(corpus, folder, datasets, writes, killed_at="test_before_roc.png")
    assert sorted(report_files(folder)) == ["test_before_metrics.json"] and not list(folder.glob("*.pt"))
    report_again(corpus, folder, datasets, writes)
    actual, expected = files_of(folder), files_of(reference)
    assert sorted(actual) == sorted(expected)
    for name in expected:  # the checkpoints and the history hold their epochs' wall times: those aside
        if name.endswith(".pt"):
            assert_equal_values(read_torch_file(folder / name), read_torch_file(reference / name), name)
        elif name == "history.json":
            assert_equal_values(json.loads(actual[name]), json.loads(expected[name]), name)
        elif not CHECKPOINT.match(name):
            assert actual[name] == expected[name], name


def test_damaged_and_missing_report_files_are_made_again(
        corpus: Path, reference: Path, datasets: dict[str, Any], writes: Any, tmp_path: Path) -> None:
    """Truncated, bits flipped (the size kept) and deleted: in the report kept when whole, and in the rewritten ones."""
    folder = tmp_path / "run"
    shutil.copytree(reference, folder)
    for damage, names in ((truncate, ["test_before_metrics.json", "best_weights.pth"]),
                          (flip_bits, ["test_before_scores.png", "test_per_writer.csv"]),
                          (Path.unlink, ["test_before_per_writer.csv", "val_metrics.json"])):
        for name in names:
            damage(folder / name)
    report_again(corpus, folder, datasets, writes)
    assert_same_files(folder, reference)


# --------------------------------------------------------------------------- the manifest

def test_a_report_is_whole_only_with_its_manifest_and_every_file_as_recorded(tmp_path: Path) -> None:
    files = [tmp_path / "x_metrics.json", tmp_path / "x_roc.png"]
    for path in files:
        path.write_bytes(os.urandom(64))
    assert not report_is_whole(tmp_path, "x"), "no manifest yet: a kill came before it"
    manifest = record_report(tmp_path, "x", files)
    assert manifest == tmp_path / f"x{MANIFEST_SUFFIX}" and report_is_whole(tmp_path, "x")
    original = files[1].read_bytes()
    for damage in (flip_bits, truncate, Path.unlink):
        damage(files[1])
        assert not report_is_whole(tmp_path, "x"), damage
        files[1].write_bytes(original)
    assert report_is_whole(tmp_path, "x")
    for damage in (truncate, flip_bits):
        record = manifest.read_bytes()
        damage(manifest)
        assert not report_is_whole(tmp_path, "x"), damage
        manifest.write_bytes(record)
