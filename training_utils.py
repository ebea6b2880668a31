"""Fine-tuning DetailSemNet: configuration, the training loop, the feature cache, checkpoints, metrics, plots.

The notebook and the command line call the same functions here::

    config = FinetuneConfig(data_root=..., ckpt_dir=..., epochs=10)
    seed_everything(config.seed)
    model = ViT_for_OSV_DSNet(config)              # then load_pretrained(model, ...)
    run = prepare_run(model, config)               # freeze, optimizer, schedule, resume
    run = fit(run, train_set, val_set)             # the one loop
    loss, metrics = validate(run.model, test_set)  # each distinct image embedded once

Two paths feed pairs to the model:

* the fast path (``config.fast_head_only``): with the backbone frozen and no
  augmentation, ``model.embed`` of an image never changes, so every distinct
  image is embedded once (``compute_features``) and each epoch runs only
  ``model.compare`` (``head_str``, the global distance and the EMD) on cached
  features;
* the per-pair path: a ``DataLoader`` of image pairs, two backbone passes per
  pair, with the dataset's augmentation.

Evaluation always embeds each distinct image once.

Datasets follow the interface of ``sig_dataloader_colab``: ``pairs``
(``[(ref_path, query_path, label)]``), ``image_paths()``, ``load_image(path) ->
[1, S, S]``, ``augment``, ``image_size``; an item is ``(pair [2, S, S], label
[1, 1])``. Labels: 1 genuine-genuine, 0 genuine-forged. Distances: smaller =
more likely genuine.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

__all__ = [
    "FinetuneConfig",
    "compute_metrics",
    "save_metrics_json",
    "plot_training_history",
    "plot_roc_curve",
    "plot_score_distribution",
    "seed_everything",
    "capture_rng_state",
    "restore_rng_state",
    "save_checkpoint",
    "load_checkpoint",
    "find_latest_checkpoint",
    "export_state_dict",
    "epoch_checkpoint_path",
    "CheckpointError",
]


# --------------------------------------------------------------------------- configuration

@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run, saved as plain data inside each checkpoint.

    Passed as ``opt`` to ``ViT_for_OSV_DSNet``, which reads the model options
    (``emd``, ``dis_type``, ``mar_type``, ``gol_dis``, ``temp``).

    Learning rate: ``lr`` is where the warm-up starts; it rises linearly to
    ``lr * warmup_multiplier`` over ``warmup_epochs`` epochs, then follows a
    cosine down to 0 at ``epochs``. (With ``warmup_multiplier == 1`` the
    warm-up starts from 0, as in the authors' scheduler.)
    """

    # data (read by the notebook and the command line)
    dataset: str = "cedar"
    data_root: str = ""
    pretrained: str = ""
    ckpt_dir: str = "checkpoints"
    image_size: int = 224
    num_workers: int = 0
    # what trains
    fast_head_only: bool = True
    unfreeze_blocks: int = 0
    # optimisation
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4
    lr_blocks: float = 1e-5
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    warmup_multiplier: float = 4.0
    amp: bool = False
    # model selection and stopping
    select_metric: str = "eer"
    patience: int = 5
    min_improvement: float = 0.01
    # feature cache (fast path and evaluation)
    feature_dtype: str = "float32"
    feature_dir: str = ""
    eval_batch_size: int = 64
    # checkpoints and reproducibility
    keep_last: int = 2
    seed: int = 42
    device: str = "auto"
    # model options
    emd: bool = True
    dis_type: str = "cos"
    mar_type: str = "uniform"
    gol_dis: str = "l2"
    temp: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            problems.append(f"batch sizes must be >= 1, got {self.batch_size} and {self.eval_batch_size}")
        if not 0 <= self.warmup_epochs < self.epochs:
            problems.append(f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        if self.warmup_multiplier < 1:
            problems.append(f"warmup_multiplier must be >= 1, got {self.warmup_multiplier}")
        if self.lr <= 0 or self.lr_blocks <= 0:
            problems.append(f"learning rates must be > 0, got lr={self.lr}, lr_blocks={self.lr_blocks}")
        if self.select_metric not in ("eer", "loss"):
            problems.append(f"select_metric must be 'eer' or 'loss', got {self.select_metric!r}")
        if self.patience < 1:
            problems.append(f"patience must be >= 1, got {self.patience}")
        if not 0 <= self.min_improvement < 1:
            problems.append(f"min_improvement is relative and must be in [0, 1), got {self.min_improvement}")
        if self.feature_dtype not in ("float32", "float16"):
            problems.append(f"feature_dtype must be 'float32' or 'float16', got {self.feature_dtype!r}")
        if self.keep_last < 1:
            problems.append(f"keep_last must be >= 1, got {self.keep_last}")
        if self.unfreeze_blocks < 0:
            problems.append(f"unfreeze_blocks must be >= 0, got {self.unfreeze_blocks}")
        if self.fast_head_only and self.unfreeze_blocks:
            problems.append(
                "fast_head_only caches backbone features, so the backbone must stay frozen: "
                "set unfreeze_blocks=0, or fast_head_only=False to train the last blocks on the per-pair path"
            )
        if self.image_size % 32:
            problems.append(f"image_size must be a multiple of 32, got {self.image_size}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            problems.append(f"device must be 'auto', 'cpu' or 'cuda[:n]', got {self.device!r}")
        if problems:
            raise ValueError("invalid FinetuneConfig:\n  " + "\n  ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (str, int, float, bool values)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "FinetuneConfig":
        """Rebuild from ``to_dict()`` output; an unknown key is an error (a typo would be silently ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown FinetuneConfig settings: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**dict(values))

    def resolved_device(self) -> torch.device:
        """``device`` with ``auto`` resolved to CUDA when available, else CPU."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {self.device!r} requested but CUDA is not available; use device='auto' or 'cpu'")
        return torch.device(self.device)


# --------------------------------------------------------------------------- metrics

# Entries of a metrics dict that are arrays (ROC curve, raw scores); save_metrics_json leaves them out by default.
ROC_KEYS = ("roc_fpr", "roc_tpr", "roc_thresholds")


def _as_1d_array(values: Any, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ValueError(f"{name} must be one score per pair, shape [N] or [N, 1]; got shape {list(array.shape)}")
    return array


def compute_metrics(distances: Any, labels: Any) -> dict[str, Any]:
    """Verification metrics of distances (smaller = genuine), exact over every distinct threshold, O(N log N).

    A pair is accepted as genuine when ``distance <= threshold``. FAR =
    forgeries accepted / forgeries, FRR = genuines rejected / genuines. The
    candidate thresholds are the distinct distances.

    Args:
        distances: ``[N]`` or ``[N, 1]`` finite floats (tensor, array or list).
        labels: ``[N]`` or ``[N, 1]``, 1 genuine-genuine, 0 genuine-forged.

    Returns:
        ``eer``: ``(FAR + FRR) / 2`` at the threshold minimising ``|FAR - FRR|``
        (the smallest such threshold on a tie), that ``threshold`` and its
        ``far``, ``frr``, ``accuracy`` (the paper's Acc); ``best_accuracy`` over
        all thresholds with its ``best_threshold`` (smallest on a tie),
        ``best_far``, ``best_frr``; ``auc`` (genuine positive, score
        ``-distance``: equals ``sklearn.metrics.roc_auc_score(labels, -distances)``);
        ``n_genuine``, ``n_forged``; the ROC as arrays over the ascending
        distinct thresholds, ``roc_thresholds``, ``roc_fpr`` (= FAR),
        ``roc_tpr`` (= 1 - FRR), ending at (1, 1). Rates are fractions in [0, 1].

    Raises:
        ValueError: empty input, lengths differ, a non-finite distance, a label
            other than 0/1, or only one class present.
    """
    scores = _as_1d_array(distances, "distances").astype(np.float64)
    label_values = _as_1d_array(labels, "labels")
    if scores.size == 0:
        raise ValueError("compute_metrics got no scores: the evaluation set is empty")
    if scores.shape != label_values.shape:
        raise ValueError(f"distances ({scores.size}) and labels ({label_values.size}) differ in length")
    non_finite = ~np.isfinite(scores)
    if non_finite.any():
        raise ValueError(
            f"{int(non_finite.sum())} of {scores.size} distances are NaN or infinite "
            f"(first at index {int(np.flatnonzero(non_finite)[0])}); the model produced invalid distances"
        )
    if not np.isin(label_values, (0, 1)).all():
        bad = np.unique(label_values[~np.isin(label_values, (0, 1))])[:5]
        raise ValueError(f"labels must be 0 (forged) or 1 (genuine); found {bad.tolist()}")
    genuine = label_values.astype(bool)
    n_genuine = int(genuine.sum())
    n_forged = int(genuine.size - n_genuine)
    if n_genuine == 0 or n_forged == 0:
        missing = "genuine (label 1)" if n_genuine == 0 else "forged (label 0)"
        raise ValueError(f"metrics need both classes, but there is no {missing} pair among {genuine.size}")

    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    sorted_genuine = genuine[order]
    # A threshold accepts every pair up to the last of its run of equal distances.
    run_end = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    thresholds = sorted_scores[run_end]
    genuine_accepted = np.cumsum(sorted_genuine, dtype=np.int64)[run_end]
    forged_accepted = np.cumsum(~sorted_genuine, dtype=np.int64)[run_end]
    genuine_rejected = n_genuine - genuine_accepted

    # |FAR - FRR| compared in integers (scaled by n_genuine * n_forged), so that ties are exact ties.
    gap = np.abs(forged_accepted * n_genuine - genuine_rejected * n_forged)
    eer_index = int(np.argmin(gap))  # argmin takes the first: the smallest threshold
    correct = genuine_accepted + (n_forged - forged_accepted)
    best_index = int(np.argmax(correct))

    far = forged_accepted / n_forged
    frr = genuine_rejected / n_genuine
    tpr = genuine_accepted / n_genuine
    # Trapezoids between consecutive ROC points, starting at (0, 0): ties give the diagonal step sklearn uses.
    fpr_from_origin = np.concatenate(([0.0], far))
    tpr_from_origin = np.concatenate(([0.0], tpr))
    auc = float(np.sum(np.diff(fpr_from_origin) * (tpr_from_origin[1:] + tpr_from_origin[:-1])) / 2)

    return {
        "eer": float((far[eer_index] + frr[eer_index]) / 2),
        "threshold": float(thresholds[eer_index]),
        "far": float(far[eer_index]),
        "frr": float(frr[eer_index]),
        "accuracy": float(correct[eer_index] / scores.size),
        "best_accuracy": float(correct[best_index] / scores.size),
        "best_threshold": float(thresholds[best_index]),
        "best_far": float(far[best_index]),
        "best_frr": float(frr[best_index]),
        "auc": auc,
        "n_genuine": n_genuine,
        "n_forged": n_forged,
        "roc_thresholds": thresholds,
        "roc_fpr": far,
        "roc_tpr": tpr,
    }


def _json_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return _json_value(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        # JSON has no NaN or infinity; null says "no value" to every reader.
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def _atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    """Write via ``write(file)`` to a temporary file in ``path``'s folder, fsync it, then rename over ``path``.

    A crash or a disconnect mid-write leaves the previous ``path`` intact.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable; not every file system lets a folder be opened
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(folder)
    except OSError:
        pass
    finally:
        os.close(folder)


def save_metrics_json(metrics: Mapping[str, Any], path: str | Path, include_arrays: bool = False) -> Path:
    """Write ``metrics`` as plain JSON (atomically) and return the path.

    Arrays (the ROC, raw distances and labels) are left out unless
    ``include_arrays``; NaN and infinity become ``null``.
    """
    path = Path(path)
    kept = {
        key: value for key, value in metrics.items()
        if include_arrays or not isinstance(value, (np.ndarray, torch.Tensor))
    }
    text = json.dumps(_json_value(kept), indent=2, allow_nan=False) + "\n"
    _atomic_write_bytes(path, lambda file: file.write(text.encode("utf-8")))
    return path


# --------------------------------------------------------------------------- plots

def _new_figure(width: float, height: float, columns: int = 1) -> tuple[Any, list[Any]]:
    # A bare Figure renders through Agg without pyplot, so no global backend is switched and nothing stays open.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    axes = [figure.add_subplot(1, columns, column + 1) for column in range(columns)]
    return figure, axes


def _history_column(history: Mapping[str, Sequence[Any]], key: str) -> np.ndarray:
    return np.array([np.nan if value is None else value for value in history.get(key, [])], dtype=np.float64)


def plot_training_history(history: Mapping[str, Sequence[Any]], path: str | Path, title: str = "Fine-tuning history") -> Path:
    """Loss, validation EER and learning rate per epoch, as a PNG; returns the path.

    ``history`` is ``fit``'s: lists ``epoch``, ``train_loss``, ``val_loss``,
    ``val_eer`` (fraction), ``lr``; epoch 0 is the model before training
    (``None`` for the training entries).
    """
    epochs = _history_column(history, "epoch")
    if epochs.size == 0:
        raise ValueError("the history is empty: nothing was trained or validated yet")
    figure, (loss_axes, eer_axes, lr_axes) = _new_figure(15, 4.5, columns=3)
    figure.suptitle(title)

    loss_axes.plot(epochs, _history_column(history, "train_loss"), "o-", label="training")
    loss_axes.plot(epochs, _history_column(history, "val_loss"), "s-", label="validation")
    loss_axes.set(title="Contrastive loss", xlabel="epoch", ylabel="loss (mean per pair)")
    loss_axes.legend()

    eer = 100 * _history_column(history, "val_eer")
    eer_axes.plot(epochs, eer, "s-", color="tab:orange", label="validation EER")
    if np.isfinite(eer).any():
        best = int(np.nanargmin(eer))
        eer_axes.plot(epochs[best], eer[best], "*", color="tab:red", markersize=16,
                      label=f"lowest: {eer[best]:.2f}% (epoch {int(epochs[best])})")
        if epochs[0] == 0 and np.isfinite(eer[0]):
            eer_axes.axhline(eer[0], color="gray", linestyle=":", label=f"before fine-tuning: {eer[0]:.2f}%")
    eer_axes.set(title="Validation equal error rate", xlabel="epoch", ylabel="EER (%)")
    eer_axes.legend()

    lr_axes.plot(epochs, _history_column(history, "lr"), "o-", color="tab:green", label="head_str (first parameter group)")
    lr_axes.set(title="Learning rate (warm-up, then cosine)", xlabel="epoch", ylabel="learning rate")
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    lr_axes.legend()

    for axes in (loss_axes, eer_axes, lr_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def plot_roc_curve(metrics: Mapping[str, Any], path: str | Path, title: str = "ROC curve") -> Path:
    """ROC (FAR against genuine acceptance rate) with the EER point marked, as a PNG; returns the path.

    ``metrics`` is ``compute_metrics``' (or ``validate``'s) output.
    """
    missing = [key for key in ROC_KEYS + ("eer", "threshold", "auc") if key not in metrics]
    if missing:
        raise ValueError(f"metrics lack {missing}: pass the dict returned by compute_metrics or validate")
    fpr = np.concatenate(([0.0], np.asarray(metrics["roc_fpr"], dtype=np.float64)))
    tpr = np.concatenate(([0.0], np.asarray(metrics["roc_tpr"], dtype=np.float64)))
    figure, (axes,) = _new_figure(6, 6)
    axes.plot(fpr, tpr, color="tab:blue", linewidth=2, label=f"ROC (AUC = {metrics['auc']:.4f})")
    axes.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="chance")
    axes.plot([0, 1], [1, 0], color="gray", linestyle=":", linewidth=1, label="FAR = FRR")
    axes.plot(metrics["far"], 1 - metrics["frr"], "o", color="tab:red", markersize=9,
              label=f"EER {100 * metrics['eer']:.2f}% at distance <= {metrics['threshold']:.4g}")
    axes.set(title=title, xlabel="false acceptance rate (forgeries accepted)",
             ylabel="genuine acceptance rate (1 - FRR)", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def plot_score_distribution(metrics: Mapping[str, Any], path: str | Path, title: str = "Distance distribution") -> Path:
    """Histograms of genuine and forged pair distances with the EER threshold, as a PNG; returns the path.

    ``metrics`` is ``validate``'s output (it holds ``distances``, ``labels`` and ``threshold``).
    """
    missing = [key for key in ("distances", "labels", "threshold", "eer") if key not in metrics]
    if missing:
        raise ValueError(f"metrics lack {missing}: pass the dict returned by validate")
    distances = np.asarray(metrics["distances"], dtype=np.float64).ravel()
    genuine = np.asarray(metrics["labels"]).ravel() == 1
    bins = np.histogram_bin_edges(distances, bins=min(60, max(10, distances.size // 20)))
    figure, (axes,) = _new_figure(8, 4.5)
    axes.hist(distances[genuine], bins=bins, density=True, alpha=0.6, color="tab:green",
              label=f"genuine pairs ({int(genuine.sum())})")
    axes.hist(distances[~genuine], bins=bins, density=True, alpha=0.6, color="tab:red",
              label=f"forged pairs ({int((~genuine).sum())})")
    axes.axvline(metrics["threshold"], color="black", linestyle="--",
                 label=f"EER threshold {metrics['threshold']:.4g} (EER {100 * metrics['eer']:.2f}%)")
    axes.set(title=title, xlabel="distance (smaller = more likely genuine)", ylabel="density")
    axes.grid(alpha=0.3)
    axes.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


# --------------------------------------------------------------------------- RNG state and checkpoints

CHECKPOINT_FORMAT = 1
BEST_CHECKPOINT = "best.pt"
_EPOCH_CHECKPOINT = re.compile(r"^epoch_(\d+)\.pt$")
_REQUIRED_KEYS = ("format", "epoch", "model_state_dict", "config", "history")


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: truncated, corrupt, unsafe or not one of ours."""


def epoch_checkpoint_path(directory: str | Path, epoch: int) -> Path:
    """Where the checkpoint written after ``epoch`` (1-based) lives: ``directory/epoch_0007.pt``."""
    return Path(directory) / f"epoch_{epoch:04d}.pt"


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
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        saved = list(state["cuda"])
        if len(saved) != torch.cuda.device_count():
            warnings.warn(
                f"the checkpoint holds CUDA random states for {len(saved)} devices, this machine has "
                f"{torch.cuda.device_count()}; restoring the first {min(len(saved), torch.cuda.device_count())}",
                stacklevel=2,
            )
        for device_index, device_state in enumerate(saved[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device_index)
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["algorithm"],
        numpy_state["keys"].numpy().astype(np.uint32),
        numpy_state["position"],
        numpy_state["has_gauss"],
        numpy_state["cached_gaussian"],
    ))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"].tolist()), python_state["gauss_next"]))
    if data_generator is not None:
        if state.get("data_order") is None:
            raise CheckpointError("the checkpoint holds no data-order state to restore")
        data_generator.set_state(state["data_order"])


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    epoch: int,
    config: FinetuneConfig | Mapping[str, Any],
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
    ``history`` lists, the run's ``config`` as a dict, and every RNG state
    (torch, CUDA, NumPy, Python, and ``data_generator``, the data order).
    """
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "epoch": int(epoch),
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict() if optimizer is not None else None,
        "scheduler_state_dict": scheduler.state_dict() if scheduler is not None else None,
        "scaler_state_dict": scaler.state_dict() if scaler is not None else None,
        "config": config.to_dict() if isinstance(config, FinetuneConfig) else dict(config),
        "history": {key: list(values) for key, values in (history or {}).items()},
        "best_metric": None if best_metric is None else float(best_metric),
        "best_epoch": best_epoch,
        "rng_state": capture_rng_state(data_generator),
    }
    path = Path(path)
    _atomic_write_bytes(path, lambda file: torch.save(checkpoint, file))
    return path


def _read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for a damaged zip; all mean the same here
        first_line = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise CheckpointError(f"{path} cannot be read with torch.load(weights_only=True) "
                              f"(truncated, corrupt or not a checkpoint?): {first_line}") from error
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
        model_v3.CheckpointMismatchError: the model's keys or shapes differ.
    """
    from model_v3 import load_pretrained

    path = Path(path)
    checkpoint = _read_checkpoint(path, map_location)
    if model is not None:
        load_pretrained(model, checkpoint["model_state_dict"], strict=True)
    for target, key in ((optimizer, "optimizer_state_dict"), (scheduler, "scheduler_state_dict"),
                        (scaler, "scaler_state_dict")):
        if target is None:
            continue
        if checkpoint.get(key) is None:
            raise CheckpointError(f"{path} holds no {key.removesuffix('_state_dict')} state to load")
        target.load_state_dict(checkpoint[key])
    if restore_rng:
        restore_rng_state(checkpoint["rng_state"], data_generator)
    return checkpoint


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
            _read_checkpoint(path)
        except CheckpointError as error:
            warnings.warn(f"skipping checkpoint {path.name}: {error}", stacklevel=2)
            continue
        return path
    return None


def _prune_checkpoints(directory: Path, keep_last: int) -> None:
    """Delete per-epoch checkpoints beyond the newest ``keep_last`` (``best.pt`` is a separate file)."""
    for _, path in _epoch_checkpoints(directory)[keep_last:]:
        path.unlink(missing_ok=True)


def export_state_dict(checkpoint_path: str | Path, out_path: str | Path) -> Path:
    """Write a checkpoint's model weights as a plain state dict (atomically), which ``load_pretrained`` reads."""
    state = _read_checkpoint(Path(checkpoint_path))["model_state_dict"]
    out_path = Path(out_path)
    _atomic_write_bytes(out_path, lambda file: torch.save(state, file))
    return out_path
