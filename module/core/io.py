"""Files that are either whole or absent: the one atomic-write helper, and JSON of plain values.

Checkpoints, metrics JSON, pair files, manifests and the preprocessing cache
are all written through ``atomic_write``: a temporary file in the target's
folder, flushed and fsynced, then renamed over the target. A crash, a
``kill -9`` or a full disk mid-write leaves the previous file intact, and
the temporary file carries a name (``.NAME.*.tmp``) that ``remove_temporary_files``
recognises.
"""
from __future__ import annotations

import errno
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["atomic_write", "atomic_write_text", "write_json", "json_value", "remove_temporary_files", "TEMPORARY_SUFFIX",
           "naming_path"]

TEMPORARY_SUFFIX = ".tmp"


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable; not every file system lets a folder be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through ``write(file)`` (a binary file object) so that it is either complete or unchanged.

    Returns ``path``. An ``OSError`` (a full disk, a read-only folder) is
    raised again with the path in its message, since the operating system's
    own message (``[Errno 28] No space left on device``) does not name it.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    except OSError as error:
        raise _naming(error, path) from error
    try:
        os.chmod(temp_name, 0o666 & ~_current_umask())  # mkstemp's 0600 would make the file private to this user
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException as error:
        Path(temp_name).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _naming(error, path) from error
        raise
    _fsync_folder(path.parent)
    return path


def _naming(error: OSError, path: Path) -> OSError:
    """``error`` with ``path`` in its message; the error number and type stay."""
    if str(path) in str(error):
        return error
    reason = error.strerror or str(error)
    hint = " (free some space, or write elsewhere)" if error.errno == errno.ENOSPC else ""
    return type(error)(error.errno, f"cannot write {path}: {reason}{hint}")


@contextmanager
def naming_path(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an ``OSError`` of the block (a full disk) with ``path`` in its message: for writes that are not atomic."""
    try:
        yield
    except OSError as error:
        raise _naming(error, Path(path)) from error


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8 with ``atomic_write``; line ends are written as given."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda file: file.write(data))


def json_value(value: Any) -> Any:
    """``value`` as plain JSON data: arrays and tensors become lists, NumPy scalars Python numbers, paths strings.

    NaN and infinity become ``None`` (JSON has neither; ``null`` says "no value" to every reader).
    """
    if isinstance(value, Mapping):
        return {str(key): json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(item) for item in value]
    torch = sys.modules.get("torch")  # a tensor can exist only once torch is imported; this module does not need it
    if isinstance(value, np.ndarray) or (torch is not None and isinstance(value, torch.Tensor)):
        return json_value(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | os.PathLike, value: Any) -> Path:
    """Write ``json_value(value)`` as indented JSON, atomically; returns the path."""
    return atomic_write_text(path, json.dumps(json_value(value), indent=2, allow_nan=False) + "\n")


def remove_temporary_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that an interrupted ``atomic_write`` left in ``folder``; returns them.

    Call it only while no other process writes there (the run folder's lock guarantees that).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = [path for path in folder.glob(f".*{TEMPORARY_SUFFIX}") if path.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed
