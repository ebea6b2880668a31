"""PyTorch files written so that they are whole or absent and verifiable: the file, with its SHA-256 beside it.

``save_torch_file`` writes ``NAME.sha256`` first (the ``sha256sum`` format),
then the file, each with ``atomic_write``; ``models.weights.read_torch_file``
verifies a file against it before loading. ``copy_checkpoint`` copies such a
file, verifying it on the way.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch

from models.weights import CheckpointError, checksum_path, missing_checksum, recorded_checksum, verified_bytes
from module.core.io import atomic_write, atomic_write_text

__all__ = ["copy_checkpoint", "save_torch_file"]


def save_torch_file(path: str | Path, value: Any) -> Path:
    """``torch.save(value)`` to ``path`` with its SHA-256 beside it, both atomic; returns ``path``.

    The checksum is written first, then the file is renamed into place: a
    file on disk is either whole and verifiable, or detected as damaged. The
    bytes are made in memory first, so a full disk is an ``OSError`` that
    names the file (``torch.save`` into a file reports it as a ``RuntimeError``).
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(value, buffer)
    data = buffer.getvalue()
    atomic_write_text(checksum_path(path), f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")
    return atomic_write(path, lambda file: file.write(data))


def copy_checkpoint(source: str | Path, target: str | Path) -> Path:
    """Copy a file written by ``save_torch_file`` and its checksum, verifying it on the way; returns ``target``.

    Raises:
        CheckpointError: ``source`` has no checksum, or does not match it.
    """
    source, target = Path(source), Path(target)
    expected = recorded_checksum(source)
    if expected is None:
        raise CheckpointError(f"{source} cannot be verified: {missing_checksum(source)}")
    data = verified_bytes(source, expected)
    atomic_write_text(checksum_path(target), f"{expected}  {target.name}\n")
    return atomic_write(target, lambda file: file.write(data))
