"""The run folder: one writer, one commit point an epoch, everything else derived from committed checkpoints.

A run folder holds::

    epoch_NNNN.pt   (+ .sha256)  the commit point of epoch N: what trains, optimizer, schedule, RNG, history, config
    best.pt         (+ .sha256)  a copy of the best epoch's checkpoint; rebuilt when missing, stale or damaged
    best_weights.pth (+ .sha256), history.json, history.png, {val,test}_{metrics.json,roc.png,scores.png}: the report
      (with {val,test}_{per_writer.csv,writer_eers.png} when the file names give writers, and {val,test}_manifest.json)
    calibration.json, test_tippett.png, test_ece.png  the likelihood ratios fitted on the validation split; report too
    test_before_*                the starting model on the test split, with test_before_manifest.json; kept on resume
    tensorboard/                 the training curves, one point an epoch (``module/evaluation/curves.py``)
    .lock                        the lock: one process writes the folder at a time (``module/run/lock.py``)

The rules that keep it consistent through a ``kill -9`` at any instant:

- every file is written atomically with its checksum first (``module/core/torch_files.save_torch_file``);
  renaming ``epoch_NNNN.pt`` into place commits the epoch, and nothing else is a commit;
- the best epoch's checkpoint is never pruned (the newest ``keep_last`` are kept besides it), so
  ``best.pt`` can always be made again from it (``sync_best_checkpoint``, after every commit and on resume);
- a resume takes the newest checkpoint that verifies and whose best epoch's checkpoint does too
  (``find_resume_point``), skipping damaged ones with a warning; when files are there but none can be
  used, it stops and says so, rather than start over on top of them;
- temporary files of interrupted writes and checksums without their file are removed when a run starts
  (``clean_run_folder``); the report is rewritten whenever a run ends;
- a report kept from one run to the next (``test_before``) is kept only when its manifest, written after its
  files, verifies (``module/evaluation/reports.report_is_whole``); otherwise it is written again.
"""
from __future__ import annotations

import re
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.weights import CHECKSUM_SUFFIX, CheckpointError, checksum_path, recorded_checksum
from module.core.io import remove_temporary_files
from module.core.torch_files import copy_checkpoint
from module.core.wording import format_metric, option
from module.run.checkpoint import BEST_CHECKPOINT, epoch_checkpoint_path, read_checkpoint

__all__ = [
    "BEST_WEIGHTS", "CALIBRATION", "MANIFEST_SUFFIX", "REPORT_FILES", "ResumePoint", "RunFolderError", "clean_run_folder",
    "find_latest_checkpoint", "find_resume_point", "prune_checkpoints", "run_status", "set_aside_run", "start_over",
    "sync_best_checkpoint", "TENSORBOARD_DIR",
]

BEST_WEIGHTS = "best_weights.pth"
# The map distance -> likelihood ratio fitted on the validation split (module/evaluation/calibration.py).
CALIBRATION = "calibration.json"
# NAME_manifest.json: the files of the report NAME with their SHA-256, written after them
# (module/evaluation/reports.py); a report whose manifest does not verify is partial or damaged.
MANIFEST_SUFFIX = "_manifest.json"
# What report_run writes; derived from best.pt, so it goes with the checkpoints when a run is set aside.
REPORT_FILES = (BEST_WEIGHTS, CALIBRATION, "history.json", "history.png", "test_tippett.png", "test_ece.png",
                *(f"{split}_{kind}" for split in ("val", "test")
                  for kind in ("metrics.json", "roc.png", "scores.png", "per_writer.csv", "writer_eers.png")),
                *(f"{split}{MANIFEST_SUFFIX}" for split in ("val", "test")))
# The training curves' event files; they go with the checkpoints when a run is set aside.
TENSORBOARD_DIR = "tensorboard"
_EPOCH_CHECKPOINT = re.compile(r"^epoch_(\d+)\.pt$")


class RunFolderError(CheckpointError):
    """The run folder cannot be continued as it is (the message says what was found and how to start over)."""


def start_over(problem: str) -> RunFolderError:
    """``problem`` plus how to start over, in the words of the interface in use."""
    return RunFolderError(f"{problem}. To start over, run again with {option('resume', False)} (the earlier files "
                          "are moved into a previous-<date> sub-folder, nothing is deleted).")


# --------------------------------------------------------------------------- what the folder holds

def _epoch_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of the per-epoch checkpoints in ``folder``, newest first."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _EPOCH_CHECKPOINT.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def clean_run_folder(folder: str | Path) -> list[Path]:
    """Delete what interrupted writes left: temporary files, and checksums whose file is missing; returns them.

    Call it only while holding the folder's lock (no write of this project is then in progress there).
    """
    folder = Path(folder)
    removed = remove_temporary_files(folder)
    if folder.is_dir():
        for record in folder.glob(f"*{CHECKSUM_SUFFIX}"):
            target = record.with_name(record.name.removesuffix(CHECKSUM_SUFFIX))
            if not target.exists():
                record.unlink(missing_ok=True)
                removed.append(record)
    return removed


@dataclass
class ResumePoint:
    """Where a run continues: a verified checkpoint, and a verified checkpoint of its best epoch.

    Attributes:
        path: the checkpoint to continue from (the newest usable ``epoch_NNNN.pt``, or ``best.pt``).
        checkpoint: its contents (``read_checkpoint``).
        best_source: ``epoch_BBBB.pt`` of its best epoch, or ``best.pt`` when that holds the best epoch.
    """

    path: Path
    checkpoint: dict[str, Any]
    best_source: Path


def find_resume_point(folder: str | Path) -> ResumePoint | None:
    """The newest checkpoint in ``folder`` that verifies and whose best epoch's checkpoint verifies too.

    Damaged or unreadable ones are skipped with a warning naming them, and
    the one before is used; ``best.pt`` is the last resort (a copy of an
    epoch checkpoint, so a run can continue from it).

    Returns:
        ``None`` when ``folder`` holds no checkpoint and no report: a new run.

    Raises:
        RunFolderError: checkpoints or a report are there, but none can be continued from.
    """
    folder = Path(folder)
    best = folder / BEST_CHECKPOINT
    candidates = [path for _, path in _epoch_checkpoints(folder)] + ([best] if best.is_file() else [])
    verified: dict[Path, dict[str, Any] | None] = {}
    problems: list[str] = []

    def verified_checkpoint(path: Path) -> dict[str, Any] | None:
        if path not in verified:
            try:
                verified[path] = read_checkpoint(path)
            except (CheckpointError, OSError) as error:
                verified[path] = None
                problems.append(f"{path.name}: {' '.join(str(error).split())}")
                warnings.warn(f"skipping checkpoint {path.name}: {error}", stacklevel=3)
        return verified[path]

    for path in candidates:
        checkpoint = verified_checkpoint(path)
        if checkpoint is None:
            continue
        best_epoch = checkpoint["best_epoch"]
        if best_epoch is None or best_epoch == checkpoint["epoch"]:
            return ResumePoint(path, checkpoint, path)
        for source in (epoch_checkpoint_path(folder, best_epoch), best):
            held = verified_checkpoint(source) if source.is_file() else None
            if held is not None and held["epoch"] == best_epoch:
                return ResumePoint(path, checkpoint, source)
        problem = f"the checkpoint of its best epoch {best_epoch} is missing or damaged"
        problems.append(f"{path.name}: {problem}")
        warnings.warn(f"skipping checkpoint {path.name}: {problem}", stacklevel=2)
    found = [path.name for path in candidates] + [BEST_WEIGHTS] * (folder / BEST_WEIGHTS).is_file()
    if not found:
        return None
    raise start_over(f"{folder} holds {', '.join(found)} but no checkpoint to continue from "
                      f"({'; '.join(problems) or 'no epoch checkpoint'})")


def find_latest_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint a run in ``directory`` would continue from (see ``find_resume_point``), or ``None``."""
    point = find_resume_point(directory)
    return point.path if point is not None else None


def run_status(ckpt_dir: str | Path) -> str:
    """One line on where the run in ``ckpt_dir`` stands: new, or the epoch it continues from and its best so far."""
    latest = find_latest_checkpoint(ckpt_dir)
    if latest is None:
        return f"new run: nothing to resume in {ckpt_dir}"
    checkpoint = read_checkpoint(latest)
    config = checkpoint["config"]
    return (f"{checkpoint['epoch']} of {config['epochs']} epochs done ({latest.name}); best validation "
            f"{format_metric(config['select_metric'], checkpoint['best_metric'])} at epoch {checkpoint['best_epoch']}")


def sync_best_checkpoint(folder: str | Path, best_source: str | Path) -> bool:
    """Make ``best.pt`` a verified copy of ``best_source`` (the best epoch's checkpoint); True when it was written.

    Nothing is written when ``best.pt`` already is one (same recorded checksum, and it verifies).
    """
    best, best_source = Path(folder) / BEST_CHECKPOINT, Path(best_source)
    if best_source == best:
        return False
    if best.is_file() and recorded_checksum(best) == recorded_checksum(best_source):
        try:
            read_checkpoint(best)
            return False
        except CheckpointError:
            pass
    copy_checkpoint(best_source, best)
    return True


def prune_checkpoints(directory: str | Path, keep_last: int, keep_epochs: Iterable[int] = (),
                      current_epoch: int | None = None) -> None:
    """Delete epoch checkpoints (and their checksums) but the newest ``keep_last`` and those of ``keep_epochs``.

    ``keep_epochs``: the best epoch, whose checkpoint ``best.pt`` is made
    from. ``current_epoch``: the run's; checkpoints after it are what a
    resume skipped (damaged, or an interrupted run's) and go too, and "newest"
    counts from it. Also deletes what interrupted writes left
    (``clean_run_folder``: call it between writes, holding the lock).
    """
    directory = Path(directory)
    found = _epoch_checkpoints(directory)
    up_to_now = [epoch for epoch, _ in found if current_epoch is None or epoch <= current_epoch]
    kept = set(keep_epochs) | set(up_to_now[:keep_last])
    for epoch, path in found:
        if epoch not in kept:
            path.unlink(missing_ok=True)
            checksum_path(path).unlink(missing_ok=True)
    clean_run_folder(directory)


def set_aside_run(directory: str | Path) -> Path | None:
    """Move a run folder's checkpoints, report and training curves into a new ``previous-<date>-<time>`` sub-folder; returns it
    (``None``: nothing to move).

    Starting over never overwrites or mixes in an earlier run's epochs.
    Other files (evaluations of other splits or datasets) stay.
    """
    directory = Path(directory)
    names = [path.name for _, path in sorted(_epoch_checkpoints(directory))] + [BEST_CHECKPOINT, *REPORT_FILES]
    old = [directory / name for name in names if (directory / name).is_file()]
    old += [record for record in map(checksum_path, old) if record.is_file()]
    old += [directory / TENSORBOARD_DIR] * (directory / TENSORBOARD_DIR).is_dir()
    if not old:
        return None
    archive = directory / time.strftime("previous-%Y%m%d-%H%M%S")
    suffix = 1
    while archive.exists():  # two restarts within a second
        archive = directory / f"{time.strftime('previous-%Y%m%d-%H%M%S')}-{suffix}"
        suffix += 1
    archive.mkdir()
    for path in old:
        path.rename(archive / path.name)
    return archive


