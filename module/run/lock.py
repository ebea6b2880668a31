"""The run folder's lock: one process writes a run folder at a time, however the others end.

An OS file lock (``flock``) on ``folder/.lock``, released by the operating
system when the process ends; where the file system has none (some NFS or
SMB mounts), an exclusively created ``.lock.claim`` stands in.
"""
from __future__ import annotations

import errno
import os
import socket
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from models.errors import InputError
from module.core.distributed import ProcessGroup, broadcast_from_main, current_group, end_this_worker_quietly

try:
    import fcntl
except ImportError:  # not on Linux or macOS: the claim file below stands in for the lock
    fcntl = None

__all__ = ["CLAIM_FILE", "LOCK_FILE", "RunFolderInUse", "lock_run_folder"]

LOCK_FILE = ".lock"
# Used instead of LOCK_FILE's lock where the file system has no file locks (some NFS or SMB mounts).
CLAIM_FILE = ".lock.claim"
_NO_FILE_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


class RunFolderInUse(InputError):
    """Another process holds the run folder's lock."""


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
def lock_run_folder(folder: str | Path, group: ProcessGroup | None = None) -> Iterator[Path]:
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

    ``group``: the job's processes (``join_process_group``), given when every one of them calls this at once
    (``train_and_report`` does, first thing). Rank 0 then tells the others whether it took the lock; when it did
    not, they end there and then, silently (``end_this_worker_quietly``), and the job's one message is rank 0's.

    Raises:
        RunFolderInUse: ``{folder} is in use by process {pid}``.
        NotADirectoryError: ``folder`` is a file.
    """
    folder = Path(folder).absolute()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder: give the run a folder (created when missing)")
    if not current_group().is_main:  # under torchrun rank 0 holds the lock and writes; the others only read
        if group is not None and broadcast_from_main(False, group):  # rank 0's answer: refused
            end_this_worker_quietly()
        yield folder
        return
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    try:
        _hold(folder, key)
    except BaseException:
        if group is not None:
            broadcast_from_main(True, group)
        raise
    try:
        if group is not None:
            broadcast_from_main(False, group)
        yield folder
    finally:
        with _held_guard:
            _held[key][2] -= 1
            if _held[key][2] == 0:
                descriptor, claim, _ = _held.pop(key)
                _release(descriptor, claim)
                if created:
                    _remove_if_only_the_lock(folder)


def _hold(folder: Path, key: Path) -> None:
    """Take ``folder``'s lock for this process, or count one more holding of it when this process has it."""
    with _held_guard:
        if key in _held:
            _held[key][2] += 1
        else:
            _held[key] = [*_acquire(folder), 1]


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


def _remove_if_only_the_lock(folder: Path) -> None:
    """Remove a folder this lock created when nothing but the lock file is in it (a run that failed at its start)."""
    try:
        if {path.name for path in folder.iterdir()} <= {LOCK_FILE}:
            (folder / LOCK_FILE).unlink(missing_ok=True)
            folder.rmdir()
    except OSError:  # another process came in meanwhile: the folder is its now
        pass


def _release(descriptor: int | None, claim: Path | None) -> None:
    if claim is not None:
        claim.unlink(missing_ok=True)
    if descriptor is not None:
        os.ftruncate(descriptor, 0)
        os.close(descriptor)  # closing releases the flock
