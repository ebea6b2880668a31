"""The run folder's files: reading PyTorch files safely, checkpoints, RNG states, retention, export.

Everything written is tensors and plain data, so every file loads with
``torch.load(weights_only=True)``; files that would need pickled code are
refused. This module knows nothing of what the model is: it loads state
dicts into whatever ``nn.Module`` it is given.
"""
from __future__ import annotations

import dataclasses
import pickle
import random
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from module.io import atomic_write, remove_temporary_files

__all__ = [
    "BEST_CHECKPOINT",
    "CheckpointError",
    "CheckpointMismatchError",
    "capture_rng_state",
    "epoch_checkpoint_path",
    "export_state_dict",
    "find_latest_checkpoint",
    "load_checkpoint",
    "load_state_dict_checked",
    "prune_checkpoints",
    "read_checkpoint",
    "read_torch_file",
    "restore_rng_state",
    "save_checkpoint",
    "seed_everything",
    "set_aside_run",
]

CHECKPOINT_FORMAT = 1
BEST_CHECKPOINT = "best.pt"
_EPOCH_CHECKPOINT = re.compile(r"^epoch_(\d+)\.pt$")
_REQUIRED_KEYS = ("format", "epoch", "model_state_dict", "config", "history")
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: truncated, corrupt, unsafe or not one of ours."""


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not match the model."""


# --------------------------------------------------------------------------- reading any PyTorch file

def read_torch_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``, with errors that name the file and say what to do.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file needs pickled code to load (refused: loading
            it would run that code), or it is truncated or not a PyTorch file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = _UNSUPPORTED_GLOBAL.search(str(error))
        if found is None:  # a damaged legacy (non-zip) file also fails in the unpickler
            raise _unreadable(path, error) from error
        raise CheckpointError(
            f"{path} cannot be loaded with torch.load(weights_only=True): it holds pickled Python objects besides "
            f"tensors ({found.group(1)}), and loading them would run code stored in the file. If you trust its source, re-save only its weights: "
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


# --------------------------------------------------------------------------- random states

def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state(data_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every random state a run draws from, as tensors and plain data (``weights_only``-loadable).

    ``data_generator`` is the ``torch.Generator`` that orders the training
    pairs (and seeds the loader workers).
    """
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {
            "algorithm": numpy_state[0],
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "position": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "python": {
            "version": python_state[0],
            "internal": torch.tensor(python_state[1], dtype=torch.int64),
            "gauss_next": python_state[2],
        },
        "data_order": data_generator.get_state() if data_generator is not None else None,
    }


def restore_rng_state(state: Mapping[str, Any], data_generator: torch.Generator | None = None) -> None:
    """Put back what ``capture_rng_state`` recorded (the data order into ``data_generator``)."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        saved = list(state["cuda"])
        if len(saved) != torch.cuda.device_count():
            warnings.warn(
                f"the checkpoint holds CUDA random states for {len(saved)} devices, this machine has "
                f"{torch.cuda.device_count()}; restoring the first {min(len(saved), torch.cuda.device_count())}",
                stacklevel=2,
            )
        for device_index, device_state in enumerate(saved[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state.cpu(), device_index)
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["algorithm"],
        numpy_state["keys"].cpu().numpy().astype(np.uint32),
        numpy_state["position"],
        numpy_state["has_gauss"],
        numpy_state["cached_gaussian"],
    ))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"].tolist()), python_state["gauss_next"]))
    if data_generator is not None:
        if state.get("data_order") is None:
            raise CheckpointError("the checkpoint holds no data-order state to restore")
        data_generator.set_state(state["data_order"].cpu())


# --------------------------------------------------------------------------- checkpoints

def epoch_checkpoint_path(directory: str | Path, epoch: int) -> Path:
    """Where the checkpoint written after ``epoch`` (1-based) lives: ``directory/epoch_0007.pt``."""
    return Path(directory) / f"epoch_{epoch:04d}.pt"


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    epoch: int,
    config: Any,
    history: Mapping[str, Sequence[Any]] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    best_metric: float | None = None,
    best_epoch: int | None = None,
    data_generator: torch.Generator | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary file, flush, fsync, rename) and return its path.

    Everything is tensors and plain data, so it loads with
    ``torch.load(weights_only=True)``: the full model state dict (the file
    alone rebuilds the model), optimizer, scheduler and AMP scaler states,
    ``epoch`` (epochs completed), ``best_metric`` and ``best_epoch``, the
    ``history`` lists, the run's ``config`` (a dataclass or a mapping) as a
    dict, and every RNG state (torch, CUDA, NumPy, Python, and
    ``data_generator``, the data order).
    """
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "epoch": int(epoch),
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict() if optimizer is not None else None,
        "scheduler_state_dict": scheduler.state_dict() if scheduler is not None else None,
        "scaler_state_dict": scaler.state_dict() if scaler is not None else None,
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config),
        "history": {key: list(values) for key, values in (history or {}).items()},
        "best_metric": None if best_metric is None else float(best_metric),
        "best_epoch": best_epoch,
        "rng_state": capture_rng_state(data_generator),
    }
    return atomic_write(path, lambda file: torch.save(checkpoint, file))


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A fine-tuning checkpoint of this project as a dict, checked for its keys and format.

    Raises:
        FileNotFoundError, CheckpointError: see ``read_torch_file``; also a
            file that is plain weights or another program's checkpoint.
    """
    path = Path(path)
    checkpoint = read_torch_file(path, map_location)
    missing = [key for key in _REQUIRED_KEYS if not isinstance(checkpoint, Mapping) or key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a fine-tuning checkpoint of this project: it lacks {missing}. "
                              "Plain weights load with model_v3.load_pretrained instead.")
    if checkpoint["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {checkpoint['format']}, this code reads {CHECKPOINT_FORMAT}")
    return checkpoint


def load_checkpoint(
    path: str | Path,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    data_generator: torch.Generator | None = None,
    restore_rng: bool = False,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Read a checkpoint (``weights_only=True``), load it into the given objects, and return it as a dict.

    ``model`` loads with ``strict=True``. With ``restore_rng``, the torch,
    CUDA, NumPy and Python random states and the data order (into
    ``data_generator``) are restored, so training continues exactly.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable, unsafe, or not a checkpoint of this project.
        CheckpointMismatchError: the model's keys or shapes differ.
    """
    path = Path(path)
    checkpoint = read_checkpoint(path, map_location)
    apply_checkpoint(checkpoint, path, model, optimizer, scheduler, scaler, data_generator, restore_rng)
    return checkpoint


def apply_checkpoint(checkpoint: Mapping[str, Any], path: Path, model: nn.Module | None,
                     optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                     scaler: torch.amp.GradScaler | None = None, data_generator: torch.Generator | None = None,
                     restore_rng: bool = False) -> None:
    """Load an already read checkpoint into the given objects (see ``load_checkpoint``)."""
    if model is not None:
        load_state_dict_checked(model, checkpoint["model_state_dict"], strict=True, source=str(path))
    for target, key in ((optimizer, "optimizer_state_dict"), (scheduler, "scheduler_state_dict")):
        if target is None:
            continue
        if checkpoint.get(key) is None:
            raise CheckpointError(f"{path} holds no {key.removesuffix('_state_dict')} state to load")
        target.load_state_dict(checkpoint[key])
    # A scaler saved disabled (CPU, or amp off) has an empty state: the loading scaler keeps its defaults.
    if scaler is not None and checkpoint.get("scaler_state_dict"):
        scaler.load_state_dict(checkpoint["scaler_state_dict"])
    if restore_rng:
        restore_rng_state(checkpoint["rng_state"], data_generator)


def _epoch_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of the per-epoch checkpoints in ``directory``, newest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _EPOCH_CHECKPOINT.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def find_latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest per-epoch checkpoint in ``directory`` that loads, or ``None`` when there is none.

    A truncated or corrupt file (a disconnect mid-write on a synced drive) is
    skipped with a warning naming it, and the one before it is used.
    """
    for _, path in _epoch_checkpoints(Path(directory)):
        try:
            read_checkpoint(path)
        except CheckpointError as error:
            warnings.warn(f"skipping checkpoint {path.name}: {error}", stacklevel=2)
            continue
        return path
    return None


def prune_checkpoints(directory: str | Path, keep_last: int) -> None:
    """Delete per-epoch checkpoints beyond the newest ``keep_last`` (``best.pt`` is a separate file).

    Also deletes temporary files that a killed process left mid-write (called between writes, never during one).
    """
    directory = Path(directory)
    for _, path in _epoch_checkpoints(directory)[keep_last:]:
        path.unlink(missing_ok=True)
    remove_temporary_files(directory)


def export_state_dict(checkpoint_path: str | Path, out_path: str | Path) -> Path:
    """Write a checkpoint's model weights as a plain state dict (atomically), which ``load_pretrained`` reads."""
    state = read_checkpoint(checkpoint_path)["model_state_dict"]
    return atomic_write(out_path, lambda file: torch.save(state, file))


def set_aside_run(directory: str | Path) -> Path | None:
    """Move a run folder's checkpoints into a new ``previous-<date>-<time>`` sub-folder; returns it (``None``: nothing to move).

    Starting over never overwrites or mixes in an earlier run's epochs.
    """
    directory = Path(directory)
    old = [path for _, path in sorted(_epoch_checkpoints(directory))]
    old += [path for path in [directory / BEST_CHECKPOINT] if path.is_file()]
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
