"""Fine-tuning DetailSemNet: configuration, the training loop, the feature cache, checkpoints, metrics, plots.

The notebook and the command line call the same functions here::

    config = FinetuneConfig(dataset="cedar", data_root=..., ckpt_dir=..., epochs=10)
    data = build_datasets(config)                  # {"train", "val", "test"} from gray_{split}.txt
    model = build_model(config, "weights.pth")     # seeded, pretrained weights, on config's device
    run = prepare_run(model, config)               # freeze, optimizer, schedule; resume when ckpt_dir has a checkpoint
    run = fit(run, data["train"], data["val"])     # the one loop; writes epoch_NNNN.pt and best.pt
    load_checkpoint(run.best_checkpoint, model)
    metrics = evaluate_and_report(model, data["test"], config.ckpt_dir, "test", config)

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
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from model_v3 import TokenFeatures, ViT_for_OSV_DSNet, load_pretrained
from models.fine_tune_utils import (
    build_optimizer_for_head_only,
    print_trainable_params,
    setup_head_only_finetune,
    unfreeze_last_blocks,
)
from module.scheduler import GradualWarmupScheduler
from prepare_datasets import PAIR_FILES
from sig_dataloader_colab import SigDataset_BHSig_Colab, SigDataset_CEDAR_Colab, SigDataset_GDPS_Colab

__all__ = [
    "FinetuneConfig",
    "TrainingRun",
    "prepare_run",
    "fit",
    "train_one_epoch",
    "validate",
    "compute_features",
    "FeatureCache",
    "CachedPairBatch",
    "make_pair_loader",
    "NonFiniteLossError",
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
    "epoch_checkpoint_path",
    "export_state_dict",
    "CheckpointError",
    "HISTORY_KEYS",
    "build_model",
    "build_datasets",
    "evaluate_and_report",
    # re-exported so that the notebook and the command line import from one place
    "setup_head_only_finetune",
    "print_trainable_params",
    "build_optimizer_for_head_only",
    "unfreeze_last_blocks",
]


# --------------------------------------------------------------------------- configuration

@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run, saved as plain data inside each checkpoint.

    Passed as ``opt`` to ``ViT_for_OSV_DSNet``, which reads the model options
    (``emd``, ``dis_type``, ``mar_type``, ``gol_dis``, ``temp``).

    Learning rate (per epoch): ``lr`` is where the warm-up starts; it rises
    linearly to ``lr * warmup_multiplier`` over ``warmup_epochs`` epochs, then
    follows a cosine over the remaining epochs (it would reach 0 one epoch
    after the last). With ``warmup_multiplier == 1`` the warm-up starts from
    0, as in the authors' scheduler, so the first epoch would not train.
    """

    # data (read by build_datasets and build_model)
    dataset: str = "cedar"  # cedar | gpds | bhsig
    data_root: str = ""  # folder holding the scans and the gray_{train,val,test}.txt pair files
    pretrained: str = ""  # weights file for build_model; empty: a fresh backbone
    ckpt_dir: str = "checkpoints"  # epoch_NNNN.pt and best.pt; put it on Google Drive in Colab
    image_size: int = 224  # model input side, pixels, a multiple of 32 (224 for the authors' weights)
    num_workers: int = 0  # image-loading processes; 2 helps on a GPU machine
    # what trains
    fast_head_only: bool = True  # cached backbone features, no augmentation; False: per-pair path, augmented
    unfreeze_blocks: int = 0  # also train the backbone's last n blocks (per-pair path only)
    # optimisation (AdamW; learning rates per epoch, see the class docstring)
    epochs: int = 10
    batch_size: int = 32  # pairs
    lr: float = 1e-4  # head_str, at the start of the warm-up
    lr_blocks: float = 1e-5  # the unfrozen backbone blocks
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    warmup_multiplier: float = 4.0
    amp: bool = False  # float16 autocast for the backbone on CUDA; the EMD stays float64
    # model selection and early stopping, on the validation set
    select_metric: str = "eer"  # eer | loss, lower is better
    patience: int = 5  # epochs without improvement before stopping
    min_improvement: float = 0.01  # relative: a new best must be below best * (1 - min_improvement)
    # feature cache (fast path and evaluation)
    feature_dtype: str = "float32"  # float32 | float16 (half the memory, distances within ~1e-2)
    feature_dir: str = ""  # empty: features in RAM; a folder: memory-mapped files there
    eval_batch_size: int = 64  # images per backbone pass and pairs per evaluation batch
    # checkpoints and reproducibility
    keep_last: int = 2  # per-epoch checkpoints kept, besides best.pt
    seed: int = 42
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda[:n]
    # model options, read by ViT_for_OSV_DSNet (spec section 1)
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

    @classmethod
    def from_parameters(cls, namespace: Mapping[str, Any], **overrides: Any) -> "FinetuneConfig":
        """A config from notebook parameters: each UPPER_CASE name whose lower case is a setting
        (``EPOCHS`` -> ``epochs``, ``BATCH_SIZE`` -> ``batch_size``); ``overrides`` win; other names are ignored.

        Typical: ``FinetuneConfig.from_parameters(globals(), data_root=..., ckpt_dir=...)``.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown FinetuneConfig settings: {', '.join(unknown)}")
        values = {name.lower(): value for name, value in namespace.items()
                  if isinstance(name, str) and name.isupper() and name.lower() in known}
        values.update(overrides)
        return cls(**values)

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
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(temp_name, 0o666 & ~umask)  # mkstemp's 0600 would make the file private to this user
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
    path = Path(path)
    checkpoint = _read_checkpoint(path, map_location)
    _apply_checkpoint(checkpoint, path, model, optimizer, scheduler, scaler, data_generator, restore_rng)
    return checkpoint


def _apply_checkpoint(checkpoint: Mapping[str, Any], path: Path, model: nn.Module | None,
                      optimizer: torch.optim.Optimizer | None, scheduler: Any, scaler: torch.amp.GradScaler | None,
                      data_generator: torch.Generator | None, restore_rng: bool) -> None:
    if model is not None:
        load_pretrained(model, checkpoint["model_state_dict"], strict=True)
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
            _read_checkpoint(path)
        except CheckpointError as error:
            warnings.warn(f"skipping checkpoint {path.name}: {error}", stacklevel=2)
            continue
        return path
    return None


def _prune_checkpoints(directory: Path, keep_last: int) -> None:
    """Delete per-epoch checkpoints beyond the newest ``keep_last`` (``best.pt`` is a separate file).

    Also deletes temporary files that a killed process left mid-write (called between writes, never during one).
    """
    for _, path in _epoch_checkpoints(directory)[keep_last:]:
        path.unlink(missing_ok=True)
    for path in directory.glob(".*.pt.*.tmp"):
        path.unlink(missing_ok=True)


def export_state_dict(checkpoint_path: str | Path, out_path: str | Path) -> Path:
    """Write a checkpoint's model weights as a plain state dict (atomically), which ``load_pretrained`` reads."""
    state = _read_checkpoint(Path(checkpoint_path))["model_state_dict"]
    out_path = Path(out_path)
    _atomic_write_bytes(out_path, lambda file: torch.save(state, file))
    return out_path


# --------------------------------------------------------------------------- the feature cache (fast path)

class CachedPairBatch(NamedTuple):
    """Pairs as cached backbone features.

    Attributes:
        ref: reference images' ``TokenFeatures`` (``tokens [B, N, 384]``, ``kept [B, N]``).
        query: query images' ``TokenFeatures``, same shapes.
        labels: ``[B, 1]`` float32, 1 genuine-genuine, 0 genuine-forged.
    """

    ref: TokenFeatures
    query: TokenFeatures
    labels: torch.Tensor


class _ImageFiles(Dataset):
    """The distinct images of a pair dataset, one ``[1, S, S]`` tensor an item, without augmentation."""

    def __init__(self, dataset: Any, paths: Sequence[str]) -> None:
        self.dataset = dataset
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.dataset.load_image(self.paths[index])


class FeatureCache(Dataset):
    """Backbone features of every distinct image of a pair dataset, and its pairs as rows into them.

    Built by ``compute_features``. As a dataset it has one item per pair
    (item ``i`` is ``i``); ``collate`` turns a list of pair indices into a
    ``CachedPairBatch``, so ``make_pair_loader(cache, ...)`` is the fast
    path's loader.

    Attributes:
        paths: the ``M`` distinct image paths, sorted.
        tokens: ``[M, N, 384]`` float32 or float16 stage-4 tokens (a tensor in
            RAM, or a read-only NumPy memory map on disk).
        kept: ``[M, N]`` bool ink masks.
        pair_rows: ``[P, 2]`` int64 rows of (reference, query) for each pair.
        labels: ``[P, 1]`` float32.
    """

    def __init__(self, paths: list[str], tokens: torch.Tensor | np.ndarray, kept: torch.Tensor,
                 pair_rows: torch.Tensor, labels: torch.Tensor) -> None:
        self.paths = paths
        self.tokens = tokens
        self.kept = kept
        self.pair_rows = pair_rows
        self.labels = labels

    def __len__(self) -> int:
        return len(self.pair_rows)

    def __getitem__(self, index: int) -> int:
        return index

    def features(self, rows: torch.Tensor) -> TokenFeatures:
        """The cached features of image ``rows`` (``[B]`` int64), on the CPU."""
        if isinstance(self.tokens, torch.Tensor):
            tokens = self.tokens[rows]
        else:
            tokens = torch.from_numpy(np.ascontiguousarray(self.tokens[rows.numpy()]))
        return TokenFeatures(tokens, self.kept[rows])

    def collate(self, pair_indices: Sequence[int]) -> CachedPairBatch:
        """The batch of pairs ``pair_indices`` (``collate_fn`` of the fast path's ``DataLoader``)."""
        index = torch.as_tensor(pair_indices, dtype=torch.int64)
        rows = self.pair_rows[index]
        return CachedPairBatch(self.features(rows[:, 0]), self.features(rows[:, 1]), self.labels[index])

    def __repr__(self) -> str:
        storage = "RAM" if isinstance(self.tokens, torch.Tensor) else f"disk ({getattr(self.tokens, 'filename', '?')})"
        return (f"FeatureCache({len(self.paths)} images, {len(self)} pairs, tokens {list(self.tokens.shape)} "
                f"{self.tokens.dtype} in {storage})")


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    resolved = {"float32": torch.float32, "float16": torch.float16}.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if resolved not in (torch.float32, torch.float16):
        raise ValueError(f"feature dtype must be float32 or float16, got {dtype!r}")
    return resolved


def _amp_enabled(amp: bool, device: torch.device) -> bool:
    # Mixed precision is for CUDA; on the CPU it would only slow the backbone down.
    return amp and device.type == "cuda"


def compute_features(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    dtype: str | torch.dtype = "float32",
    feature_dir: str | Path = "",
    amp: bool = False,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "embedding images",
) -> FeatureCache:
    """Embed each distinct image of ``dataset`` once (batched, eval mode, no augmentation) into a ``FeatureCache``.

    Args:
        model: ``ViT_for_OSV_DSNet``; its ``embed`` gives ``[B, N, 384]`` tokens and ``[B, N]`` masks.
        dataset: a pair dataset (``pairs``, ``image_paths()``, ``load_image(path) -> [1, S, S]``).
        batch_size: images per backbone pass.
        device: where the backbone runs; default the model's.
        dtype: ``"float32"`` (distances equal the per-pair path's to 1e-5) or
            ``"float16"`` (half the memory).
        feature_dir: empty: keep the tokens in RAM; a folder: keep them in a
            memory-mapped file in a temporary sub-folder there (deleted with
            the cache), for sets larger than RAM.
        amp: run the backbone under float16 autocast (CUDA only).
        num_workers: image-loading worker processes.

    Size: ``M * N * 384 * (4 or 2)`` bytes; ``N = (S / 32)^2`` (49 at 224
    pixels: 75 KB an image in float32).
    """
    paths = list(dataset.image_paths())
    if not paths or not len(dataset.pairs):
        raise ValueError(f"{type(dataset).__name__} has no pairs to embed")
    row_of = {path: row for row, path in enumerate(paths)}
    try:
        pair_rows = torch.tensor([[row_of[ref], row_of[query]] for ref, query, _ in dataset.pairs], dtype=torch.int64)
    except KeyError as error:
        raise ValueError(f"a pair names the image {error.args[0]}, which dataset.image_paths() does not list") from None
    labels = torch.tensor([[float(label)] for _, _, label in dataset.pairs], dtype=torch.float32)
    storage_dtype = _torch_dtype(dtype)
    device = torch.device(device) if device is not None else _model_device(model)
    loader = DataLoader(
        _ImageFiles(dataset, paths), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # keeps the loader from drawing its seed from the global RNG
    )
    tokens: torch.Tensor | np.ndarray | None = None
    kept = None
    folder = None
    written = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=_amp_enabled(amp, device)):
            for images in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
                features = model.embed(images.to(device, non_blocking=True))
                batch_tokens = features.tokens.to("cpu", storage_dtype)
                if tokens is None:
                    shape = (len(paths), *batch_tokens.shape[1:])
                    kept = torch.zeros(shape[:2], dtype=torch.bool)
                    if feature_dir:
                        Path(feature_dir).mkdir(parents=True, exist_ok=True)
                        folder = Path(tempfile.mkdtemp(prefix="features-", dir=feature_dir))
                        tokens = np.lib.format.open_memmap(folder / "tokens.npy", mode="w+",
                                                           dtype=np.dtype(str(storage_dtype).removeprefix("torch.")),
                                                           shape=shape)
                    else:
                        tokens = torch.empty(shape, dtype=storage_dtype)
                end = written + len(batch_tokens)
                tokens[written:end] = batch_tokens if isinstance(tokens, torch.Tensor) else batch_tokens.numpy()
                kept[written:end] = features.kept.cpu()
                written = end
    finally:
        model.train(was_training)
    if folder is not None:
        tokens.flush()
        del tokens
        tokens = np.load(folder / "tokens.npy", mmap_mode="r")
    cache = FeatureCache(paths, tokens, kept, pair_rows, labels)
    if folder is not None:
        weakref.finalize(cache, shutil.rmtree, folder, ignore_errors=True)
    return cache


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; NumPy and random are derived from it so that
    # augmentation drawing from either differs between workers and epochs and repeats on resume.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_pair_loader(
    data: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A ``DataLoader`` of pairs: over a ``FeatureCache`` (fast path) or a pair dataset (per-pair path).

    ``generator`` orders the pairs and seeds the workers; its state is saved
    in checkpoints. Batches are ``CachedPairBatch`` (fast path) or
    ``(pairs [B, 2, S, S], labels [B, 1, 1])`` (per-pair path).
    """
    generator = generator if generator is not None else torch.Generator()
    if isinstance(data, FeatureCache):
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=data.collate)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers,
                      worker_init_fn=_seed_worker, pin_memory=pin_memory)


# --------------------------------------------------------------------------- one epoch, validation

class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; no weights were updated with it."""


def _pair_distances(model: nn.Module, batch: Any, device: torch.device, amp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(distance [B, 1], labels [B, 1])`` of a batch from either path.

    The per-pair path computes what ``model.forward`` does: two backbone
    passes, then ``compare``; ``compare`` runs outside autocast, and the EMD in float64.
    """
    if isinstance(batch, CachedPairBatch):
        distance = model.compare(batch.ref.to(device), batch.query.to(device))
        return distance, batch.labels.to(device)
    pairs, labels = batch
    pairs = pairs.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.float16, enabled=_amp_enabled(amp, device)):
        ref, query = model.embed(pairs[:, 0:1]), model.embed(pairs[:, 1:2])
    distance = model.compare(ref, query)
    return distance, labels.reshape(-1, 1).to(device, torch.float32)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device | str | None = None,
    scaler: torch.amp.GradScaler | None = None,
    amp: bool = False,
    epoch: int | None = None,
    progress: bool = True,
) -> float:
    """One pass over ``loader`` (either path, see ``make_pair_loader``) in training mode; returns the mean loss per pair.

    The Sinkhorn runs with its training epsilon (``model.training``). A
    non-finite loss raises ``NonFiniteLossError`` before the optimizer step,
    so the weights never take it in. ``scaler`` (a ``GradScaler``) goes with
    ``amp`` on CUDA.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    model.train()
    total_loss, total_pairs = 0.0, 0
    description = f"epoch {epoch} training" if epoch is not None else "training"
    bar = tqdm(loader, desc=description, unit="batch", leave=False, disable=not progress)
    for batch_number, batch in enumerate(bar, start=1):
        distance, labels = _pair_distances(model, batch, device, amp)
        loss = model.loss_fn(distance, labels)
        batch_loss = loss.item()
        if not math.isfinite(batch_loss):
            raise NonFiniteLossError(f"training loss is {batch_loss} at batch {batch_number} of {len(bar)}"
                                     + (f" in epoch {epoch}" if epoch is not None else ""))
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total_loss += batch_loss * len(labels)
        total_pairs += len(labels)
        bar.set_postfix(loss=f"{total_loss / total_pairs:.4f}")
    if total_pairs == 0:
        raise ValueError("the training loader yielded no pairs")
    return total_loss / total_pairs


def validate(
    model: nn.Module,
    data: Any,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 64,
    amp: bool = False,
    feature_dtype: str | torch.dtype = "float32",
    feature_dir: str | Path = "",
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "validation",
) -> tuple[float, dict[str, Any]]:
    """Loss and metrics of ``model`` (eval mode, Sinkhorn eval epsilon) on a set of pairs.

    Args:
        data: a pair dataset (each distinct image is embedded once, then the
            pairs are compared), a ``FeatureCache`` of one, or a ``DataLoader``
            of image pairs (the per-pair path: two backbone passes per pair).

    Returns:
        ``(loss, metrics)``: the mean loss per pair, and ``compute_metrics``'
        dict plus ``loss``, ``distances`` ``[P]`` float64 and ``labels`` ``[P]`` int64.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    if isinstance(data, DataLoader):
        loader = data
    else:
        cache = data if isinstance(data, FeatureCache) else compute_features(
            model, data, batch_size=batch_size, device=device, dtype=feature_dtype, feature_dir=feature_dir,
            amp=amp, num_workers=num_workers, progress=progress, desc=f"{desc}: embedding images")
        loader = make_pair_loader(cache, batch_size, shuffle=False)
    distances, labels = [], []
    total_loss = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
                distance, label = _pair_distances(model, batch, device, amp)
                total_loss += model.loss_fn(distance, label).item() * len(label)
                distances.append(distance.detach().double().cpu().reshape(-1))
                labels.append(label.cpu().reshape(-1))
    finally:
        model.train(was_training)
    if not distances:
        raise ValueError("validation got no pairs")
    all_distances = torch.cat(distances).numpy()
    all_labels = torch.cat(labels).numpy().astype(np.int64)
    loss = total_loss / len(all_labels)
    if not math.isfinite(loss):
        bad = int((~np.isfinite(all_distances)).sum())
        raise NonFiniteLossError(f"{desc} loss is {loss}: {bad} of {len(all_distances)} distances are NaN or infinite")
    metrics = compute_metrics(all_distances, all_labels)
    metrics.update(loss=loss, distances=all_distances, labels=all_labels)
    return loss, metrics


# --------------------------------------------------------------------------- the run and its one loop

HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "val_eer", "val_auc", "val_accuracy", "lr", "seconds")
# Settings that shape the optimisation: a checkpoint resumes only under the same values.
RESUME_MUST_MATCH = (
    "dataset", "image_size", "fast_head_only", "unfreeze_blocks", "epochs", "batch_size", "lr", "lr_blocks",
    "weight_decay", "warmup_epochs", "warmup_multiplier", "amp", "select_metric", "feature_dtype", "seed",
    "emd", "dis_type", "mar_type", "gol_dis", "temp",
)


def _format_metric(name: str, value: float) -> str:
    return f"EER {100 * value:.2f}%" if name == "eer" else f"loss {value:.4f}"


def _log(message: str) -> None:
    # tqdm.write prints above running progress bars instead of through them.
    tqdm.write(message)


@dataclass
class TrainingRun:
    """What a run holds between epochs; ``prepare_run`` builds it, ``fit`` advances it.

    Attributes:
        epoch: epochs completed (0 before training).
        history: lists per ``HISTORY_KEYS``, one entry per epoch; entry 0 is
            the model before fine-tuning (``None`` for ``train_loss``, ``lr``).
            EER and accuracy are fractions; ``seconds`` is wall time.
        best_metric: the lowest validation ``config.select_metric`` so far (EER fraction or loss).
        best_epoch: the epoch it came from (0: the model before fine-tuning).
        resumed_from: the checkpoint this run continued from, if any.
        pending_rng_state: RNG states ``fit`` restores before the next epoch (set on resume).
    """

    config: FinetuneConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: GradualWarmupScheduler
    scaler: torch.amp.GradScaler
    data_generator: torch.Generator
    device: torch.device
    epoch: int = 0
    history: dict[str, list[Any]] = field(default_factory=lambda: {key: [] for key in HISTORY_KEYS})
    best_metric: float | None = None
    best_epoch: int | None = None
    resumed_from: Path | None = None
    pending_rng_state: dict[str, Any] | None = None

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.config.ckpt_dir)

    @property
    def best_checkpoint(self) -> Path:
        """``ckpt_dir/best.pt``: a full checkpoint of the epoch with the best validation metric."""
        return self.ckpt_dir / BEST_CHECKPOINT

    def stop_reason(self) -> str | None:
        """Why training is over (all epochs done, or early stop), or ``None`` while it is not."""
        config = self.config
        if self.epoch >= config.epochs:
            return f"all {config.epochs} epochs done"
        if self.best_epoch is not None and self.epoch - self.best_epoch >= config.patience:
            return (f"early stop: validation {config.select_metric} has not improved by {config.min_improvement:.1%} "
                    f"(relative) for {config.patience} epochs; best at epoch {self.best_epoch}")
        return None

    def save(self, path: Path) -> Path:
        """Write this run's state as a checkpoint at ``path`` (see ``save_checkpoint``)."""
        return save_checkpoint(
            path, model=self.model, epoch=self.epoch, config=self.config, history=self.history,
            optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
            best_metric=self.best_metric, best_epoch=self.best_epoch, data_generator=self.data_generator,
        )


def prepare_run(model: nn.Module, config: FinetuneConfig, resume: bool = True) -> TrainingRun:
    """Freeze, build the optimizer, schedule and AMP scaler, and resume from ``config.ckpt_dir`` when it holds a checkpoint.

    The model is moved to ``config.resolved_device()``; ``head_str`` trains
    (AdamW, ``config.lr``), plus the last ``config.unfreeze_blocks`` backbone
    blocks (``config.lr_blocks``); the frozen part stays in eval mode. The
    schedule is ``GradualWarmupScheduler`` then ``CosineAnnealingLR`` (see
    ``FinetuneConfig``). With ``resume`` and a readable checkpoint (corrupt ones
    are skipped with a warning), weights, optimizer, schedule, history, best
    metric and RNG states continue from it.

    Raises:
        ValueError: the checkpoint was written under different settings (see ``RESUME_MUST_MATCH``).
    """
    device = config.resolved_device()
    model.to(device)
    setup_head_only_finetune(model)
    block_groups = unfreeze_last_blocks(model, config.unfreeze_blocks, config.lr_blocks) if config.unfreeze_blocks else []
    optimizer = build_optimizer_for_head_only(model, config.lr, config.weight_decay, param_groups=block_groups)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs - config.warmup_epochs)
    scheduler = GradualWarmupScheduler(optimizer, config.warmup_multiplier, config.warmup_epochs, after_scheduler=cosine)
    scaler = torch.amp.GradScaler(device.type, enabled=_amp_enabled(config.amp, device))
    run = TrainingRun(config, model, optimizer, scheduler, scaler, torch.Generator().manual_seed(config.seed), device)

    latest = find_latest_checkpoint(config.ckpt_dir) if resume else None
    if latest is None:
        _log(f"new run: checkpoints go to {run.ckpt_dir}")
        return run
    checkpoint = _read_checkpoint(latest)
    current = config.to_dict()
    differences = [f"{key}: checkpoint {checkpoint['config'].get(key)!r}, now {current[key]!r}"
                   for key in RESUME_MUST_MATCH if checkpoint["config"].get(key) != current[key]]
    if differences:
        raise ValueError(
            f"{latest} was written with other settings, so it cannot continue under these:\n  "
            + "\n  ".join(differences)
            + "\nUse the checkpoint's settings to resume, or start a new run (another ckpt_dir, or resume=False)."
        )
    _apply_checkpoint(checkpoint, latest, model, optimizer, scheduler, scaler, None, restore_rng=False)
    run.epoch = checkpoint["epoch"]
    run.history = {key: list(values) for key, values in checkpoint["history"].items()}
    run.best_metric = checkpoint["best_metric"]
    run.best_epoch = checkpoint["best_epoch"]
    run.resumed_from = latest
    run.pending_rng_state = checkpoint["rng_state"]
    _log(f"resumed from {latest} after epoch {run.epoch} of {config.epochs} "
         f"(best validation {_format_metric(config.select_metric, run.best_metric)} at epoch {run.best_epoch})")
    return run


def _copy_atomically(source: Path, target: Path) -> None:
    def write(file: Any) -> None:
        with open(source, "rb") as original:
            shutil.copyfileobj(original, file, length=16 * 2**20)

    _atomic_write_bytes(target, write)


def _record(run: TrainingRun, epoch: int, train_loss: float | None, lr: float | None,
            metrics: Mapping[str, Any], seconds: float) -> bool:
    """Append an epoch to the history and update the best; True when this epoch is the new best."""
    values = {"epoch": epoch, "train_loss": train_loss, "val_loss": metrics["loss"], "val_eer": metrics["eer"],
              "val_auc": metrics["auc"], "val_accuracy": metrics["accuracy"], "lr": lr, "seconds": seconds}
    for key in HISTORY_KEYS:
        run.history.setdefault(key, []).append(values[key])
    score = metrics["eer"] if run.config.select_metric == "eer" else metrics["loss"]
    improved = run.best_metric is None or score < run.best_metric * (1 - run.config.min_improvement)
    if improved:
        run.best_metric, run.best_epoch = float(score), epoch
    return improved


def fit(
    run: TrainingRun,
    train_set: Any,
    val_set: Any,
    *,
    progress: bool = True,
    on_epoch_end: Callable[[TrainingRun, dict[str, Any]], None] | None = None,
) -> TrainingRun:
    """The training loop: from ``run.epoch + 1`` to ``config.epochs``, or until early stopping.

    Each epoch: train (fast path on cached features, or per-pair path with
    the dataset's augmentation), validate (each distinct validation image
    embedded once), step the schedule, record the history, write
    ``epoch_NNNN.pt`` (the newest ``keep_last`` are kept) and, on a new best
    validation metric, ``best.pt``. Before the first epoch of a new run the
    untrained model is validated (history entry 0, also a candidate for
    ``best.pt``) and saved as ``epoch_0000.pt``. Interrupting loses at most
    the current epoch; calling ``prepare_run`` and ``fit`` again continues
    exactly where the last checkpoint left off.

    Args:
        run: from ``prepare_run``.
        train_set, val_set: pair datasets (``sig_dataloader_colab`` interface).
        on_epoch_end: called as ``on_epoch_end(run, val_metrics)`` after each epoch's checkpoint is written.

    Raises:
        NonFiniteLossError: a NaN or infinite loss; the message names the last good checkpoint.
    """
    config, model, device = run.config, run.model, run.device
    done = run.stop_reason()
    if done is not None:
        _log(f"nothing to train: {done}")
        return run
    backbone_frozen = not any(parameter.requires_grad for parameter in model.model.parameters())
    if config.fast_head_only and not backbone_frozen:
        raise ValueError("fast_head_only needs a frozen backbone; build the run with prepare_run(model, config)")
    feature_options = dict(batch_size=config.eval_batch_size, device=device, dtype=config.feature_dtype,
                           feature_dir=config.feature_dir, amp=config.amp, num_workers=config.num_workers,
                           progress=progress)
    if config.fast_head_only:
        if getattr(train_set, "augment", False):
            _log("fast path: training on cached features of the un-augmented images "
                 "(fast_head_only=False trains with augmentation)")
        train_data = compute_features(model, train_set, desc="training set: embedding images", **feature_options)
    else:
        train_data = train_set
    train_loader = make_pair_loader(train_data, config.batch_size, shuffle=True, generator=run.data_generator,
                                    num_workers=config.num_workers, pin_memory=device.type == "cuda")
    # A frozen backbone gives the same validation features every epoch: embed them once.
    val_cache = compute_features(model, val_set, desc="validation set: embedding images", **feature_options) \
        if backbone_frozen else None

    def run_validation() -> dict[str, Any]:
        data = val_cache if val_cache is not None else val_set
        return validate(model, data, device=device, batch_size=config.eval_batch_size, amp=config.amp,
                        feature_dtype=config.feature_dtype, feature_dir=config.feature_dir,
                        num_workers=config.num_workers, progress=progress)[1]

    run.ckpt_dir.mkdir(parents=True, exist_ok=True)
    if run.epoch == 0 and not run.history.get("epoch"):
        start = time.perf_counter()
        metrics = run_validation()
        _record(run, 0, None, None, metrics, time.perf_counter() - start)
        # Seeded before epoch 0 is saved, so that resuming from it repeats this run exactly; the file also
        # pins the starting weights, whatever happens to the model object in memory afterwards.
        seed_everything(config.seed)
        run.data_generator.manual_seed(config.seed)
        _copy_atomically(run.save(epoch_checkpoint_path(run.ckpt_dir, 0)), run.best_checkpoint)
        _log(f"before fine-tuning: val loss {metrics['loss']:.4f}  {_format_metric('eer', metrics['eer'])}  "
             f"AUC {metrics['auc']:.4f}")
    elif run.pending_rng_state is not None:
        restore_rng_state(run.pending_rng_state, run.data_generator)
        run.pending_rng_state = None

    epoch = run.epoch + 1
    try:
        while run.stop_reason() is None:
            epoch = run.epoch + 1
            start = time.perf_counter()
            lr = run.optimizer.param_groups[0]["lr"]
            try:
                train_loss = train_one_epoch(model, train_loader, run.optimizer, device=device, scaler=run.scaler,
                                             amp=config.amp, epoch=epoch, progress=progress)
                metrics = run_validation()
            except NonFiniteLossError as error:
                raise NonFiniteLossError(
                    f"{error}. Training stopped; the last good checkpoint is "
                    f"{epoch_checkpoint_path(run.ckpt_dir, run.epoch)} (epoch {run.epoch}). "
                    f"Lower the learning rate (lr={config.lr}), or check the data for blank or broken images."
                ) from error
            run.scheduler.step()
            run.epoch = epoch
            improved = _record(run, epoch, train_loss, lr, metrics, time.perf_counter() - start)
            path = run.save(epoch_checkpoint_path(run.ckpt_dir, epoch))
            if improved:
                _copy_atomically(path, run.best_checkpoint)
            _prune_checkpoints(run.ckpt_dir, config.keep_last)
            _log(f"epoch {epoch:>3}/{config.epochs}  train loss {train_loss:.4f}  val loss {metrics['loss']:.4f}  "
                 f"{_format_metric('eer', metrics['eer'])}  AUC {metrics['auc']:.4f}  lr {lr:.2e}  "
                 f"{run.history['seconds'][-1]:6.1f} s" + ("  * best" if improved else ""))
            if on_epoch_end is not None:
                on_epoch_end(run, metrics)
    except KeyboardInterrupt:
        _log(f"interrupted during epoch {epoch}; the last checkpoint holds epoch {run.epoch}: "
             "run prepare_run and fit again to continue from it")
        raise
    _log(f"{run.stop_reason()}; best validation {_format_metric(config.select_metric, run.best_metric)} "
         f"at epoch {run.best_epoch} ({run.best_checkpoint})")
    return run


# --------------------------------------------------------------------------- building blocks for the notebook and the command line

DATASET_CLASSES = {
    "cedar": SigDataset_CEDAR_Colab,
    "gpds": SigDataset_GDPS_Colab,
    "gdps": SigDataset_GDPS_Colab,  # the seed's spelling
    "bhsig": SigDataset_BHSig_Colab,
}


def build_model(config: FinetuneConfig, pretrained: str | Path | None = None) -> ViT_for_OSV_DSNet:
    """``ViT_for_OSV_DSNet(config)`` seeded with ``config.seed``, with pretrained weights, on ``config``'s device.

    ``pretrained``: a weights file (``load_pretrained``, ``strict=True``);
    ``None`` takes ``config.pretrained``; empty means a fresh backbone.
    """
    seed_everything(config.seed)
    model = ViT_for_OSV_DSNet(config)
    source = pretrained if pretrained is not None else config.pretrained
    if source:
        load_pretrained(model, source, strict=True)
    return model.to(config.resolved_device())


def build_datasets(config: FinetuneConfig, splits: Sequence[str] = ("train", "val", "test")) -> dict[str, Any]:
    """The pair datasets of ``config.dataset`` under ``config.data_root``, one per split.

    Split ``s`` reads ``gray_{s}.txt`` (``prepare_datasets.PAIR_FILES``); only
    ``train`` augments (which the fast path ignores). A missing pair file or
    image raises the dataset's error, which names the command that makes it.
    """
    dataset_class = DATASET_CLASSES.get(config.dataset.lower())
    if dataset_class is None:
        raise ValueError(f"unknown dataset {config.dataset!r}: choose one of cedar, gpds, bhsig")
    unknown = [split for split in splits if split not in PAIR_FILES]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}: choose from {', '.join(PAIR_FILES)}")
    return {
        split: dataset_class(None, config.data_root, train=split == "train", image_size=config.image_size,
                             pair_file=PAIR_FILES[split], augment=split == "train")
        for split in splits
    }


def evaluate_and_report(model: nn.Module, data: Any, out_dir: str | Path, name: str,
                        config: FinetuneConfig, progress: bool = True) -> dict[str, Any]:
    """Validate ``model`` on ``data`` (a pair dataset or a ``FeatureCache``) and write its report into ``out_dir``.

    Files: ``{name}_metrics.json`` (no arrays), ``{name}_roc.png``,
    ``{name}_scores.png``. Returns ``validate``'s metrics (with ``threshold``,
    ``distances`` and ``labels``). Runs on the model's device.
    """
    out_dir = Path(out_dir)
    _, metrics = validate(model, data, batch_size=config.eval_batch_size, amp=config.amp,
                          feature_dtype=config.feature_dtype, feature_dir=config.feature_dir,
                          num_workers=config.num_workers, progress=progress, desc=name)
    save_metrics_json(metrics, out_dir / f"{name}_metrics.json")
    plot_roc_curve(metrics, out_dir / f"{name}_roc.png", title=f"ROC curve: {name}")
    plot_score_distribution(metrics, out_dir / f"{name}_scores.png", title=f"Distance distribution: {name}")
    return metrics
