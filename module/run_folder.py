"""The run folder: one writer, one commit point an epoch, everything else derived from committed checkpoints.

A run folder holds::

    epoch_NNNN.pt   (+ .sha256)  the commit point of epoch N: what trains, optimizer, schedule, RNG, history, config
    best.pt         (+ .sha256)  a copy of the best epoch's checkpoint; rebuilt when missing, stale or damaged
    best_weights.pth (+ .sha256), history.json, history.png, {val,test}_{metrics.json,roc.png,scores.png}: the report
    .lock                        the lock: one process writes the folder at a time

The rules that keep it consistent through a ``kill -9`` at any instant:

- every file is written atomically with its checksum first (``module/checkpoint.save_torch_file``);
  renaming ``epoch_NNNN.pt`` into place commits the epoch, and nothing else is a commit;
- the best epoch's checkpoint is never pruned (the newest ``keep_last`` are kept besides it), so
  ``best.pt`` can always be made again from it (``sync_best_checkpoint``, after every commit and on resume);
- a resume takes the newest checkpoint that verifies and whose best epoch's checkpoint does too
  (``find_resume_point``), skipping damaged ones with a warning; when files are there but none can be
  used, it stops and says so, rather than start over on top of them;
- temporary files of interrupted writes and checksums without their file are removed when a run starts
  (``clean_run_folder``); the report is rewritten whenever a run ends.
"""
from __future__ import annotations

import errno
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from module.checkpoint import (
    BEST_CHECKPOINT,
    CHECKSUM_SUFFIX,
    CheckpointError,
    CheckpointMismatchError,
    apply_checkpoint,
    checksum_path,
    copy_checkpoint,
    epoch_checkpoint_path,
    frozen_fingerprint,
    load_trained_state,
    read_checkpoint,
    recorded_checksum,
)
from module.distributed import current_group
from module.io import remove_temporary_files
from module.metrics import format_metric

try:
    import fcntl
except ImportError:  # not on Linux or macOS: the claim file below stands in for the lock
    fcntl = None

__all__ = [
    "BEST_WEIGHTS", "LOCK_FILE", "REPORT_FILES", "ResumePoint", "RunFolderError", "RunFolderInUse",
    "clean_run_folder", "commit_epoch", "continue_run", "find_latest_checkpoint", "find_resume_point",
    "lock_run_folder", "prune_checkpoints", "read_run_checkpoint", "rebuild_trained_model",
    "reload_after_interruption", "run_status", "set_aside_run", "sync_best_checkpoint",
]

LOCK_FILE = ".lock"
# Used instead of LOCK_FILE's lock where the file system has no file locks (some NFS or SMB mounts).
CLAIM_FILE = ".lock.claim"
BEST_WEIGHTS = "best_weights.pth"
# What report_run writes; derived from best.pt, so it goes with the checkpoints when a run is set aside.
REPORT_FILES = (BEST_WEIGHTS, "history.json", "history.png",
                *(f"{split}_{kind}" for split in ("val", "test") for kind in ("metrics.json", "roc.png", "scores.png")))
_EPOCH_CHECKPOINT = re.compile(r"^epoch_(\d+)\.pt$")
_NO_FILE_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


class RunFolderError(CheckpointError):
    """The run folder cannot be continued as it is (the message says what was found and how to start over)."""


class RunFolderInUse(RunFolderError):
    """Another process holds the run folder's lock."""


def _start_over(problem: str) -> RunFolderError:
    """``problem`` plus how to start over, in Python's words and in the command line's."""
    moved = "the earlier files are moved into a previous-<date> sub-folder, nothing is deleted"
    return RunFolderError(f"{problem}. To start over, pass resume=False (the notebook's RESUME = False; {moved}).",
                          f"{problem}. To start over, run the command again with --no-resume ({moved}).")


# --------------------------------------------------------------------------- the lock

_held: dict[Path, list[Any]] = {}  # folder -> [file descriptor, claim file or None, depth]: locks this process holds
_held_guard = threading.Lock()


def _holder_text() -> str:
    return f"{os.getpid()} {socket.gethostname()}\n"


def _read_holder(path: Path) -> tuple[str, str]:
    """``(pid, host)`` written in a lock or claim file ("?" when unreadable: it is being written)."""
    try:
        fields = path.read_text().split()
    except OSError:
        fields = []
    return (fields[0] if fields else "?", fields[1] if len(fields) > 1 else "?")


def _in_use(folder: Path, pid: str, detail: str = "") -> RunFolderInUse:
    return RunFolderInUse(f"{folder} is in use by process {pid}{detail}: one process at a time writes a run folder; "
                          "wait for it to end, stop it, or use another run folder")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _claim_without_file_locks(folder: Path) -> Path:
    """Claim ``folder`` by creating ``CLAIM_FILE`` exclusively (atomic on NFS and SMB too); returns the claim file.

    A claim left by a dead process of this machine is taken over; one from
    another machine cannot be checked and is refused with how to remove it.
    """
    claim = folder / CLAIM_FILE
    for _ in range(2):
        try:
            descriptor = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            pid, host = _read_holder(claim)
            if host != socket.gethostname():
                raise _in_use(folder, pid, f" on {host} (this file system has no file locks, so a process killed on "
                                           f"another machine leaves its claim: delete {claim} if no run uses the folder)"
                              ) from None
            if pid.isdigit() and _process_alive(int(pid)):
                raise _in_use(folder, pid) from None
            warnings.warn(f"{folder}: process {pid}, which claimed the folder, is gone; taking it over", stacklevel=2)
            claim.unlink(missing_ok=True)
            continue
        with os.fdopen(descriptor, "w") as file:
            file.write(_holder_text())
        return claim
    raise _in_use(folder, _read_holder(claim)[0])


@contextmanager
def lock_run_folder(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder`` (created when missing) for this process: a second process gets ``RunFolderInUse`` at once.

    An OS file lock (``flock``) on ``folder/.lock``: the operating system
    releases it when the process ends, however it ends, so a ``kill -9``
    leaves nothing to clean up. It also works on Google Drive's mount in
    Colab (the kernel keeps the lock), but only between processes of one
    machine: two Colab runtimes writing one Drive folder cannot see each
    other. Where the file system has no file locks (some NFS or SMB mounts),
    an exclusively created claim file ``.lock.claim`` (process id and host)
    stands in: a claim of a dead process on this machine is taken over, a
    claim from another machine is refused with how to remove it.

    Re-entrant within a process (``train_and_report`` holds it while
    ``prepare_run``, ``fit`` and ``report_run`` take it again). Under
    torchrun rank 0 holds it for the job. Yields the folder.

    Raises:
        RunFolderInUse: ``{folder} is in use by process {pid}``.
        NotADirectoryError: ``folder`` is a file.
    """
    folder = Path(folder).absolute()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder: give the run a folder (created when missing)")
    if not current_group().is_main:  # under torchrun rank 0 holds the lock and writes; the others only read
        yield folder
        return
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    with _held_guard:
        if key in _held:
            _held[key][2] += 1
        else:
            _held[key] = [*_acquire(folder), 1]
    try:
        yield folder
    finally:
        with _held_guard:
            _held[key][2] -= 1
            if _held[key][2] == 0:
                descriptor, claim, _ = _held.pop(key)
                _release(descriptor, claim)


def _acquire(folder: Path) -> tuple[int | None, Path | None]:
    """``(descriptor of the locked .lock, None)``, or ``(None, claim file)`` where file locks are not supported."""
    lock_path = folder / LOCK_FILE
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is None:
            raise OSError(errno.ENOSYS, "no fcntl")
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise _in_use(folder, _read_holder(lock_path)[0]) from None
    except OSError as error:
        os.close(descriptor)
        if error.errno not in _NO_FILE_LOCKS:
            raise
        return None, _claim_without_file_locks(folder)
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, _holder_text().encode(), 0)
    return descriptor, None


def _release(descriptor: int | None, claim: Path | None) -> None:
    if claim is not None:
        claim.unlink(missing_ok=True)
    if descriptor is not None:
        os.ftruncate(descriptor, 0)
        os.close(descriptor)  # closing releases the flock


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
    raise _start_over(f"{folder} holds {', '.join(found)} but no checkpoint to continue from "
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
    """Move a run folder's checkpoints and report into a new ``previous-<date>-<time>`` sub-folder; returns it
    (``None``: nothing to move).

    Starting over never overwrites or mixes in an earlier run's epochs.
    Other files (evaluations of other splits or datasets) stay.
    """
    directory = Path(directory)
    names = [path.name for _, path in sorted(_epoch_checkpoints(directory))] + [BEST_CHECKPOINT, *REPORT_FILES]
    old = [directory / name for name in names if (directory / name).is_file()]
    old += [record for record in map(checksum_path, old) if record.is_file()]
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


# --------------------------------------------------------------------------- a run's state and its checkpoints

def continue_run(run: Any, point: ResumePoint, must_match: Sequence[str]) -> None:
    """Load ``point`` into a ``training_utils.TrainingRun`` and put ``best.pt`` in step with it.

    Raises:
        RunFolderError: a setting of ``must_match`` differs from the checkpoint's, or the model's frozen
            weights are not those the checkpoint was trained on.
    """
    checkpoint, current = point.checkpoint, run.config.to_dict()
    differences = [f"{key}: checkpoint {checkpoint['config'].get(key)!r}, now {current[key]!r}"
                   for key in must_match if checkpoint["config"].get(key) != current[key]]
    if differences:
        problem = (f"{point.path} was written with other settings, so it cannot continue under these:\n  "
                   + "\n  ".join(differences) + "\nUse the checkpoint's settings to resume, or start a new run")
        raise RunFolderError(f"{problem} (another ckpt_dir, or start over with resume=False: the notebook's "
                             "RESUME = False).",
                             f"{problem} (another --out folder, or start over with --no-resume).")
    try:
        apply_checkpoint(checkpoint, point.path, run.model, run.optimizer, run.scheduler, run.scaler,
                         fingerprint=run.frozen_fingerprint or None)
    except CheckpointError as error:
        pretrained = checkpoint["config"].get("pretrained") or "none (a fresh backbone, seeded with the run's seed)"
        raise RunFolderError(f"{error} The run's pretrained weights: {pretrained}.",
                             f"{error} The run's --pretrained: {pretrained}.") from error
    run.epoch = checkpoint["epoch"]
    run.history = {key: list(values) for key, values in checkpoint["history"].items()}
    run.best_metric, run.best_epoch = checkpoint["best_metric"], checkpoint["best_epoch"]
    run.best_source, run.resumed_from = point.best_source, point.path
    run.pending_rng_state = checkpoint["rng_state"]
    run.uncommitted_epoch = None
    if not current_group().is_main:
        return
    if sync_best_checkpoint(run.ckpt_dir, point.best_source):
        tqdm.write(f"{run.ckpt_dir / BEST_CHECKPOINT} made again from {point.best_source.name} "
                   "(it was missing, stale or damaged)")
    prune_checkpoints(run.ckpt_dir, run.config.keep_last, [run.best_epoch], current_epoch=run.epoch)


def reload_after_interruption(run: Any, must_match: Sequence[str]) -> None:
    """After an interrupted epoch, put back the last checkpoint's state, so the lost part leaves no trace.

    Raises:
        RunFolderError: training had begun and there is no checkpoint to go back to.
    """
    interrupted, run.uncommitted_epoch = run.uncommitted_epoch, None
    point = find_resume_point(run.ckpt_dir)
    if point is not None:
        tqdm.write(f"epoch {interrupted} was interrupted: continuing from the last checkpoint, {point.path.name}, "
                   "not from the model in memory")
        continue_run(run, point, must_match)
    elif interrupted == 0:  # only the untrained model's validation was lost: nothing has trained yet
        run.history = {key: [] for key in run.history}
        run.best_metric = run.best_epoch = None
    else:
        run.uncommitted_epoch = interrupted
        raise RunFolderError(f"epoch {interrupted} was interrupted and {run.ckpt_dir} holds no checkpoint to continue "
                             "from: the model in memory is half-trained. Build the model again and call prepare_run.")


def commit_epoch(run: Any, improved: bool) -> Path:
    """Write the epoch's checkpoint (the commit), then make ``best.pt`` and the retention follow it; returns its path.

    Under torchrun only rank 0 writes; the others keep the same account of the run.
    """
    path = epoch_checkpoint_path(run.ckpt_dir, run.epoch)
    if current_group().is_main:
        run.save(path)
    run.uncommitted_epoch = None
    if improved or run.best_source is None:
        run.best_source = path if improved else epoch_checkpoint_path(run.ckpt_dir, run.best_epoch)
    if current_group().is_main:
        sync_best_checkpoint(run.ckpt_dir, run.best_source)
        prune_checkpoints(run.ckpt_dir, run.config.keep_last, [run.best_epoch], current_epoch=run.epoch)
    return path


# --------------------------------------------------------------------------- a trained run's model, elsewhere

def read_run_checkpoint(path: str | Path) -> dict[str, Any]:
    """``read_checkpoint`` for evaluation; a damaged ``best.pt`` is refused with how to make it again."""
    path = Path(path)
    try:
        return read_checkpoint(path)
    except CheckpointError as error:
        if path.name != BEST_CHECKPOINT or recorded_checksum(path) is None or "damaged" not in str(error):
            raise
        fix = "it makes best.pt again from the best epoch's checkpoint, and trains nothing when the run is finished"
        raise CheckpointError(f"{error}. Fix: call train_and_report with the run's settings again ({fix}).",
                              f"{error}. Fix: run the same train command again ({fix}).") from error


def rebuild_trained_model(checkpoint: dict[str, Any], source: str | Path,
                          base_weights: Sequence[tuple[str, Callable[[], nn.Module]]]) -> nn.Module:
    """A model holding a checkpoint's trained tensors on top of the frozen weights it was trained on.

    A checkpoint holds only what trains; the rest comes from the first of
    ``base_weights`` (``(description, build)`` pairs, tried in order) whose
    frozen weights have the checkpoint's fingerprint.

    Raises:
        RunFolderError: none has them; the message says what was tried and why each failed.
    """
    trained = list(checkpoint["trained_state_dict"])
    tried = []
    for description, build in base_weights:
        try:
            model = build()
        except (OSError, CheckpointError, CheckpointMismatchError) as error:
            tried.append(f"{description}: {' '.join(str(error).split())[:200]}")
            continue
        fingerprint = frozen_fingerprint(model, trained)
        if fingerprint == checkpoint["frozen_fingerprint"]:
            return load_trained_state(model, checkpoint, str(source), fingerprint)
        tried.append(f"{description}: other weights")
    raise RunFolderError(
        f"cannot rebuild the model of {source}: it holds only the {len(trained)} trained tensors, and the frozen "
        f"weights they apply to were not found ({'; '.join(tried)}). Fix: keep {BEST_WEIGHTS} in the run folder "
        "(it holds the whole model), or put the run's pretrained weights back where they were."
    )
