"""The checkpoint schema: what a fine-tuning checkpoint holds, writing and reading it, exporting its model.

A checkpoint holds what trains (the trainable tensors, optimizer, schedule,
scaler, RNG states, history, config) and a fingerprint of the frozen weights
they apply to, not the frozen weights themselves. Everything is tensors and
plain data, so it loads with ``torch.load(weights_only=True)``
(``models.weights.read_torch_file``), and it is written with its SHA-256
beside it (``module.core.torch_files.save_torch_file``). This module knows nothing of
what the model is: it loads state dicts into whatever ``nn.Module`` it is
given. The run folder as a whole (lock, resume, best.pt, retention) is
``module/run/folder.py``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.weights import (
    CheckpointError,
    CheckpointMismatchError,
    load_state_dict_checked,
    missing_checksum,
    read_torch_file,
    recorded_checksum,
    weights_fingerprint,
)
from module.core.torch_files import save_torch_file
from module.run.rng import capture_rng_state, restore_rng_state

__all__ = [
    "BEST_CHECKPOINT",
    "apply_checkpoint",
    "epoch_checkpoint_path",
    "export_state_dict",
    "frozen_fingerprint",
    "load_checkpoint",
    "load_trained_state",
    "read_checkpoint",
    "save_checkpoint",
    "trained_state_keys",
]

CHECKPOINT_FORMAT = 2  # 1: the whole model's state dict in every checkpoint
BEST_CHECKPOINT = "best.pt"
_REQUIRED_KEYS = ("format", "epoch", "trained_state_dict", "frozen_fingerprint", "config", "history")


def epoch_checkpoint_path(directory: str | Path, epoch: int) -> Path:
    """Where the checkpoint written after ``epoch`` (1-based; 0: before training) lives: ``directory/epoch_0007.pt``."""
    return Path(directory) / f"epoch_{epoch:04d}.pt"


def trained_state_keys(model: nn.Module) -> list[str]:
    """The state-dict keys a checkpoint of ``model`` holds: trainable parameters, the buffers of their modules, and
    the keys an initialisation set from data (``model.keys_from_data``, see ``models/data_init.py``).

    Everything else is frozen (``requires_grad`` off, its module in eval
    mode, see ``models/fine_tune_utils``) and never changes while training.
    Head-only fine-tuning: ``head_str.weight`` and ``head_str.bias`` (and a
    fresh backbone's BatchNorm statistics and final norm, set from data).
    """
    names: set[str] = set(getattr(model, "keys_from_data", ()))
    for module_name, module in model.named_modules():
        parameters = list(module.named_parameters(recurse=False))
        if not any(parameter.requires_grad for _, parameter in parameters):
            continue
        prefix = f"{module_name}." if module_name else ""
        names.update(prefix + name for name, parameter in parameters if parameter.requires_grad)
        names.update(prefix + name for name, _ in module.named_buffers(recurse=False))
    return [key for key in model.state_dict() if key in names]


def frozen_fingerprint(model: nn.Module, trained_keys: Sequence[str]) -> str:
    """SHA-256 of ``model``'s state-dict entries other than ``trained_keys``: the weights a checkpoint applies to."""
    trained = set(trained_keys)
    return weights_fingerprint({key: value for key, value in model.state_dict().items() if key not in trained})


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
    fingerprint: str | None = None,
) -> Path:
    """Write a checkpoint of what trains, with its checksum, atomically (see ``save_torch_file``); returns its path.

    Everything is tensors and plain data, so it loads with
    ``torch.load(weights_only=True)``: ``trained_state_dict`` (the tensors
    of ``trained_state_keys``: 36,960 numbers for head-only training, a
    checkpoint under 0.5 MB) and ``frozen_fingerprint`` (``fingerprint``
    when given, else computed: the other weights, which the checkpoint does
    not hold), optimizer, scheduler and AMP scaler states, ``epoch`` (epochs
    completed), ``best_metric`` and ``best_epoch``, the ``history`` lists,
    the run's ``config`` (a dataclass or a mapping) as a dict, and every RNG
    state (torch, CUDA, NumPy, Python).
    """
    keys = trained_state_keys(model)
    state = model.state_dict()
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "epoch": int(epoch),
        "trained_state_dict": {key: state[key] for key in keys},
        "frozen_fingerprint": fingerprint if fingerprint is not None else frozen_fingerprint(model, keys),
        "optimizer_state_dict": optimizer.state_dict() if optimizer is not None else None,
        "scheduler_state_dict": scheduler.state_dict() if scheduler is not None else None,
        "scaler_state_dict": scaler.state_dict() if scaler is not None else None,
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config),
        "history": {key: list(values) for key, values in (history or {}).items()},
        "best_metric": None if best_metric is None else float(best_metric),
        "best_epoch": best_epoch,
        "rng_state": capture_rng_state(),
    }
    return save_torch_file(path, checkpoint)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A fine-tuning checkpoint of this project as a dict, verified against its checksum and checked for its keys.

    Raises:
        FileNotFoundError, CheckpointError: see ``read_torch_file``; also a
            file that is plain weights, another program's checkpoint, one of
            an earlier format, or one without its checksum file.
    """
    path = Path(path)
    checkpoint = read_torch_file(path, map_location)
    if isinstance(checkpoint, Mapping) and checkpoint.get("format") == 1 and "model_state_dict" in checkpoint:
        raise CheckpointError(f"{path} has checkpoint format 1 (an earlier version of this project); this code reads "
                              f"format {CHECKPOINT_FORMAT}. Its weights load with model_v3.load_pretrained.")
    missing = [key for key in _REQUIRED_KEYS if not isinstance(checkpoint, Mapping) or key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a fine-tuning checkpoint of this project: it lacks {missing}. "
                              "Plain weights load with model_v3.load_pretrained instead.")
    if checkpoint["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {checkpoint['format']}, this code reads {CHECKPOINT_FORMAT}")
    if recorded_checksum(path) is None:
        raise CheckpointError(f"{path} cannot be verified: {missing_checksum(path)}; copy the run folder whole")
    return checkpoint


def load_checkpoint(
    path: str | Path,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    restore_rng: bool = False,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Read a checkpoint (verified, ``weights_only=True``), load it into the given objects, and return it as a dict.

    ``model`` must already hold the frozen weights the checkpoint was
    trained on (its fingerprint is checked); the checkpoint's trained
    tensors replace its own. With ``restore_rng``, the torch, CUDA, NumPy and
    Python random states are restored, so training continues exactly.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: damaged, unreadable, unsafe, not a checkpoint of this
            project, or trained on other frozen weights than ``model`` holds.
        CheckpointMismatchError: the model's keys or shapes differ.
    """
    path = Path(path)
    checkpoint = read_checkpoint(path, map_location)
    apply_checkpoint(checkpoint, path, model, optimizer, scheduler, scaler, restore_rng)
    return checkpoint


def load_trained_state(model: nn.Module, checkpoint: Mapping[str, Any], source: str,
                       fingerprint: str | None = None) -> nn.Module:
    """Put a checkpoint's trained tensors into ``model`` after checking that ``model`` holds the frozen weights
    the checkpoint applies to (``fingerprint``: the model's, when already known).

    Raises:
        CheckpointError: the model's frozen weights differ from those the checkpoint was trained on.
        CheckpointMismatchError: a trained tensor has no place in the model, or another shape.
    """
    trained = checkpoint["trained_state_dict"]
    expected = model.state_dict()
    unexpected = sorted(set(trained) - set(expected))
    if unexpected:
        raise CheckpointMismatchError(f"{source} does not match {type(model).__name__}: unexpected keys {unexpected[:10]}")
    actual = fingerprint if fingerprint is not None else frozen_fingerprint(model, list(trained))
    if actual != checkpoint["frozen_fingerprint"]:
        raise CheckpointError(
            f"{source} was trained on other frozen weights than the model holds (fingerprint "
            f"{checkpoint['frozen_fingerprint'][:12]}..., the model's {actual[:12]}...): it holds only the "
            f"{len(trained)} trained tensors, which apply to the base weights they were trained with. Build the "
            "model with the run's pretrained weights (or its seed, for a fresh backbone), or start a new run."
        )
    return load_state_dict_checked(model, trained, strict=False, source=source)


def apply_checkpoint(checkpoint: Mapping[str, Any], path: Path, model: nn.Module | None,
                     optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                     scaler: torch.amp.GradScaler | None = None, restore_rng: bool = False,
                     fingerprint: str | None = None) -> None:
    """Load an already read checkpoint into the given objects (see ``load_checkpoint``; ``fingerprint``: the
    model's frozen-weights fingerprint, when already known)."""
    if model is not None:
        load_trained_state(model, checkpoint, str(path), fingerprint)
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
        restore_rng_state(checkpoint["rng_state"])


def export_state_dict(checkpoint_path: str | Path, out_path: str | Path, model: nn.Module | None = None) -> Path:
    """Write the whole model of a checkpoint as a plain state dict (with its checksum), which ``load_pretrained`` reads.

    ``model``: one holding the frozen weights the checkpoint applies to (it
    receives the trained tensors). Without it, only a checkpoint that holds
    every weight (nothing was frozen) can be exported.

    Raises:
        CheckpointError: the checkpoint holds only trained tensors and no ``model`` was given; see ``load_checkpoint``.
    """
    checkpoint = read_checkpoint(checkpoint_path)
    if model is not None:
        load_trained_state(model, checkpoint, str(checkpoint_path))
        state = model.state_dict()
    elif checkpoint["frozen_fingerprint"] == weights_fingerprint({}):
        state = checkpoint["trained_state_dict"]
    else:
        raise CheckpointError(f"{checkpoint_path} holds only the trained tensors; pass the model they apply to "
                              "(export_state_dict(path, out, model=...))")
    return save_torch_file(out_path, state)
