"""``prepare`` is one transaction over a dataset root's pair files and their record, and never loses a user's files."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

import module.data.prepare as prepare
from module.data.pair_files import PAIR_MANIFEST
from prepare_datasets import ensure_pair_files, make_synthetic_dataset

OLD = {"val_ratio": 0.2, "random_state": 1}
NEW = {"val_ratio": 0.4, "random_state": 3}


class Killed(BaseException):
    """A ``kill -9`` at that instant: nothing after it runs (not even ``finally`` blocks of the project's own)."""


class KillAt:
    """``real``, until its call number ``at`` (from 0), which is killed."""

    def __init__(self, real, at: int) -> None:
        self.real, self.at, self.calls = real, at, 0

    def __call__(self, *args, **kwargs):
        if self.calls == self.at:
            raise Killed
        self.calls += 1
        return self.real(*args, **kwargs)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cedar")
    make_synthetic_dataset(root, "cedar", n_writers=6, n_genuine=3, n_forged=2, seed=0, image_size=64, progress=False)
    return root


def folder_files(root: Path) -> dict[str, bytes]:
    """Every file directly in the root but the scans' folders: the pair files, the record, anything left behind."""
    return {path.name: path.read_bytes() for path in root.iterdir() if path.is_file()}


def fresh_copy(corpus: Path, where: Path, **options) -> Path:
    root = where / "root"
    shutil.copytree(corpus, root)
    if options:
        ensure_pair_files("cedar", root, **options)
    return root


def test_a_kill_at_any_step_ends_with_the_uninterrupted_files_and_record(corpus: Path, tmp_path: Path,
                                                                        monkeypatch) -> None:
    uninterrupted = fresh_copy(corpus, tmp_path / "reference", **OLD)
    with pytest.warns(UserWarning, match="replaced the pair files"):
        ensure_pair_files("cedar", uninterrupted, **NEW)
    expected = folder_files(uninterrupted)
    assert set(expected) == {"gray_train.txt", "gray_val.txt", "gray_test.txt", PAIR_MANIFEST}

    steps = {"os.replace": (os, "replace"), "the record": (prepare, "record_pair_files"),
             "the journal": (prepare, "atomic_write_text"), "the generator": (prepare, "generate")}
    for step, (owner, name) in steps.items():
        real = getattr(owner, name)
        for kill_at in range(4 if step == "os.replace" else 1):
            root = fresh_copy(corpus, tmp_path / f"{name}-{kill_at}", **OLD)
            before = folder_files(root)
            with monkeypatch.context() as patch:
                patch.setattr(owner, name, KillAt(real, kill_at))
                with pytest.raises(Killed):
                    ensure_pair_files("cedar", root, **NEW)
            committed = (root / prepare.JOURNAL).is_file()
            if not committed:  # killed before the commit: the old set and its record, as they were
                prepare.finish_interrupted_prepare(root)
                assert folder_files(root) == before, (step, kill_at)
            with pytest.warns(UserWarning) if not committed else contextlib.nullcontext():
                ensure_pair_files("cedar", root, **NEW)
            assert folder_files(root) == expected, (step, kill_at)
            assert not (root / prepare.STAGING).exists() and not list(root.glob(".*.tmp"))


def test_a_users_own_pair_files_are_moved_aside_not_replaced(corpus: Path, tmp_path: Path) -> None:
    root = fresh_copy(corpus, tmp_path)
    mine = {"gray_train.txt": "full_org/original_1_1.png\tfull_org/original_1_2.png\t1\nnot a pair line\n",
            "gray_test.txt": "full_org/original_2_1.png\tfull_org/original_2_2.png\t1\n"}
    for name, text in mine.items():
        (root / name).write_text(text)
    with pytest.warns(UserWarning, match=r"gray_train.txt, gray_test.txt in .* were not written by prepare .*: moved "
                                         r"to .*previous-pairs-"):
        ensure_pair_files("cedar", root, val_ratio=0.2)
    (aside,) = root.glob("previous-pairs-*")
    assert {path.name: path.read_text() for path in aside.iterdir()} == mine
    # Files prepare wrote are replaced the next time, with a warning and nothing moved aside.
    with pytest.warns(UserWarning, match="replaced the pair files"):
        ensure_pair_files("cedar", root, val_ratio=0.4)
    assert len(list(root.glob("previous-pairs-*"))) == 1
