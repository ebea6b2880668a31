"""Weight files, read safely: ``torch.load(weights_only=True)``, checksums, state dicts checked key by key, fingerprints.

Like timm's ``timm/models/_helpers.py``, this is the model's own loader: it
knows nothing of runs or training. A file with a ``NAME.sha256`` beside it
(the ``sha256sum`` format, which this project writes beside every file it
saves) is verified against it before it is read; a file that would need
pickled code to load is refused, since loading it would run that code.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.errors import InputError

__all__ = [
    "CHECKSUM_SUFFIX",
    "CheckpointError",
    "CheckpointMismatchError",
    "checksum_path",
    "missing_checksum",
    "load_state_dict_checked",
    "read_torch_file",
    "recorded_checksum",
    "verified_bytes",
    "weights_fingerprint",
]

CHECKSUM_SUFFIX = ".sha256"
# How torch.load(weights_only=True) names what it refused: "Unsupported global: GLOBAL x.y", or (a blocked module such
# as os) "Trying to load unsupported GLOBAL posix.system whose module posix is blocked".
_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_REFUSED = re.compile(r"WeightsUnpickler error: ([^\n]*)")


class CheckpointError(InputError):
    """A checkpoint file cannot be used: truncated, corrupt, unsafe, not one of ours, or not for this model."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's keys or shapes do not match the model."""


def checksum_path(path: str | Path) -> Path:
    """Where the SHA-256 of ``path`` is kept: ``NAME.sha256`` beside it."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def recorded_checksum(path: str | Path) -> str | None:
    """The SHA-256 (hex) recorded beside ``path``, or ``None`` when there is no readable record."""
    try:
        fields = checksum_path(path).read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return None
    return fields[0].lower() if fields and re.fullmatch(r"[0-9a-fA-F]{64}", fields[0]) else None


def missing_checksum(path: str | Path) -> str:
    """Why ``path`` cannot be verified: its checksum file is missing, or is there but holds no SHA-256 (damaged)."""
    record = checksum_path(path)
    if record.exists():
        return f"its checksum file {record.name} is damaged (it holds no SHA-256)"
    return f"it has no checksum file {record.name} beside it"


def verified_bytes(path: Path, expected: str) -> bytes:
    """The bytes of ``path``, checked against the SHA-256 ``expected`` (hex).

    Raises:
        CheckpointError: they do not match (the file is damaged).
    """
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        # A reader can come between a writer's new checksum and its rename (save_torch_file): look once more.
        time.sleep(0.2)
        expected = recorded_checksum(path) or expected
        data = path.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise CheckpointError(
            f"{path} is damaged (truncated or corrupt): its SHA-256 is {actual[:16]}..., "
            f"{checksum_path(path).name} records {expected[:16]}... (a write cut off, or a disk or sync error)"
        )
    return data


def read_torch_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``, with errors that name the file and say what to do.

    When a checksum file (``NAME.sha256``) is beside it, the file is verified against it first.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file does not match its checksum, needs pickled
            code to load (refused: loading it would run that code), or is
            truncated or not a PyTorch file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    expected = recorded_checksum(path)
    if expected is None and checksum_path(path).exists():
        raise CheckpointError(f"{path} cannot be verified: {missing_checksum(path)}")
    source: Path | io.BytesIO = path if expected is None else io.BytesIO(verified_bytes(path, expected))
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = _UNSUPPORTED_GLOBAL.search(str(error)) or _REFUSED.search(str(error))
        if found is None:  # a damaged legacy (non-zip) file also fails in the unpickler
            raise _unreadable(path, error) from error
        raise CheckpointError(
            f"{path} cannot be loaded with torch.load(weights_only=True): it holds pickled Python objects besides "
            f"tensors ({found.group(1).strip() or 'refused by the safe loader'}), and loading them would run code "
            "stored in the file. If you trust its source, re-save only its weights: "
            "torch.save(torch.load(path, weights_only=False)['model_state_dict'], 'weights.pth')"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:  # torch raises several types for a damaged zip
        raise _unreadable(path, error) from error


def _unreadable(path: Path, error: BaseException) -> CheckpointError:
    first_line = (str(error).splitlines() or [type(error).__name__])[0][:160]
    return CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {first_line}")


def load_state_dict_checked(model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True,
                            source: str = "the given checkpoint") -> nn.Module:
    """``model.load_state_dict(state)`` that lists every missing, unexpected and wrongly shaped key on a mismatch.

    With ``strict=False`` missing and unexpected keys are skipped; wrong shapes always fail.

    Raises:
        CheckpointMismatchError: keys or shapes differ (the message lists them, up to 10 a kind).
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{key}: checkpoint {list(state[key].shape)}, model {list(expected[key].shape)}"
        for key in set(expected) & set(state)
        if tuple(state[key].shape) != tuple(expected[key].shape)
    )
    if wrong_shape or (strict and (missing or unexpected)):
        def listing(title: str, items: list[str]) -> str:
            shown = "\n    ".join(items[:10])
            more = f"\n    ... and {len(items) - 10} more" if len(items) > 10 else ""
            return f"\n  {title} ({len(items)}):\n    {shown}{more}" if items else ""

        hint = ""
        if any(key.startswith("head_str") for key in missing + unexpected):
            hint = "\n  head_str differs: build the model with the same 'emd' option as the checkpoint."
        raise CheckpointMismatchError(
            f"{source} does not match {type(model).__name__}:"
            + listing("missing keys", missing)
            + listing("unexpected keys", unexpected)
            + listing("wrong shapes", wrong_shape)
            + hint
        )
    model.load_state_dict({key: value for key, value in state.items() if key in expected}, strict=strict)
    return model



def weights_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of named tensors: names, dtypes, shapes and bytes, in name order.

    Equal fingerprints mean bit-identical weights, whatever device they sit
    on. Used to tie trained heads and cached features to the frozen
    backbone they were computed with.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
