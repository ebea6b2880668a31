"""One checkpoint file: reading PyTorch files safely, checksums, what a checkpoint holds, RNG states, export.

Everything written is tensors and plain data, so every file loads with
``torch.load(weights_only=True)``; files that would need pickled code are
refused. Each file this project writes has a SHA-256 beside it
(``NAME.sha256``, the ``sha256sum`` format), written first, so that a file
on disk is either verified whole or known damaged. A checkpoint holds what
trains (the trainable tensors, optimizer, schedule, scaler, RNG states,
history, config) and a fingerprint of the frozen weights they apply to, not
the frozen weights themselves. This module knows nothing of what the model
is: it loads state dicts into whatever ``nn.Module`` it is given. The run
folder as a whole (lock, resume, best.pt, retention) is ``module/run_folder.py``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
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

from models.fine_tune_utils import weights_fingerprint
from module.io import atomic_write, atomic_write_text

__all__ = [
    "BEST_CHECKPOINT",
    "CHECKSUM_SUFFIX",
    "CheckpointError",
    "CheckpointMismatchError",
    "apply_checkpoint",
    "capture_rng_state",
    "checksum_path",
    "copy_checkpoint",
    "epoch_checkpoint_path",
    "export_state_dict",
    "frozen_fingerprint",
    "load_checkpoint",
    "load_trained_state",
    "load_state_dict_checked",
    "read_checkpoint",
    "read_torch_file",
    "recorded_checksum",
    "restore_rng_state",
    "save_checkpoint",
    "save_torch_file",
    "seed_everything",
    "trained_state_keys",
]

CHECKPOINT_FORMAT = 2  # 1: the whole model's state dict in every checkpoint
BEST_CHECKPOINT = "best.pt"
CHECKSUM_SUFFIX = ".sha256"
_REQUIRED_KEYS = ("format", "epoch", "trained_state_dict", "frozen_fingerprint", "config", "history")
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: truncated, corrupt, unsafe, not one of ours, or not for this model.

    ``str(error)`` names the fix in Python's words (``resume=False``);
    ``command_line_message`` in the command line's (``--no-resume``), where they differ.
    """

    def __init__(self, message: str, command_line_message: str | None = None) -> None:
        super().__init__(message)
        self.command_line_message = command_line_message or message


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not match the model."""


# --------------------------------------------------------------------------- reading any PyTorch file

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


def _verified_bytes(path: Path, expected: str) -> bytes:
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


def copy_checkpoint(source: str | Path, target: str | Path) -> Path:
    """Copy a file written by ``save_torch_file`` and its checksum, verifying it on the way; returns ``target``.

    Raises:
        CheckpointError: ``source`` has no checksum, or does not match it.
    """
    source, target = Path(source), Path(target)
    expected = recorded_checksum(source)
    if expected is None:
        raise CheckpointError(f"{source} has no checksum file {checksum_path(source).name} beside it")
    data = _verified_bytes(source, expected)
    atomic_write_text(checksum_path(target), f"{expected}  {target.name}\n")
    return atomic_write(target, lambda file: file.write(data))


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
    source: Path | io.BytesIO = path if expected is None else io.BytesIO(_verified_bytes(path, expected))
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
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


# --------------------------------------------------------------------------- checkpoints of what trains

def epoch_checkpoint_path(directory: str | Path, epoch: int) -> Path:
    """Where the checkpoint written after ``epoch`` (1-based; 0: before training) lives: ``directory/epoch_0007.pt``."""
    return Path(directory) / f"epoch_{epoch:04d}.pt"


def trained_state_keys(model: nn.Module) -> list[str]:
    """The state-dict keys a checkpoint of ``model`` holds: trainable parameters, and the buffers of their modules.

    Everything else is frozen (``requires_grad`` off, its module in eval
    mode, see ``models/fine_tune_utils``) and never changes while training.
    Head-only fine-tuning: ``head_str.weight`` and ``head_str.bias``.
    """
    names: set[str] = set()
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
    data_generator: torch.Generator | None = None,
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
    state (torch, CUDA, NumPy, Python, and ``data_generator``, the data order).
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
        "rng_state": capture_rng_state(data_generator),
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
        raise CheckpointError(f"{path} has no checksum file {checksum_path(path).name} beside it, so it cannot be "
                              "verified: copy the run folder whole")
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
    """Read a checkpoint (verified, ``weights_only=True``), load it into the given objects, and return it as a dict.

    ``model`` must already hold the frozen weights the checkpoint was
    trained on (its fingerprint is checked); the checkpoint's trained
    tensors replace its own. With ``restore_rng``, the torch, CUDA, NumPy and
    Python random states and the data order (into ``data_generator``) are
    restored, so training continues exactly.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: damaged, unreadable, unsafe, not a checkpoint of this
            project, or trained on other frozen weights than ``model`` holds.
        CheckpointMismatchError: the model's keys or shapes differ.
    """
    path = Path(path)
    checkpoint = read_checkpoint(path, map_location)
    apply_checkpoint(checkpoint, path, model, optimizer, scheduler, scaler, data_generator, restore_rng)
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
                     scaler: torch.amp.GradScaler | None = None, data_generator: torch.Generator | None = None,
                     restore_rng: bool = False, fingerprint: str | None = None) -> None:
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
        restore_rng_state(checkpoint["rng_state"], data_generator)


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
