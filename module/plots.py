"""Figures from metrics and training histories, as PNG files (matplotlib's Agg, no pyplot state)."""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from module.io import atomic_write
from module.metrics import ROC_KEYS

__all__ = ["plot_training_history", "plot_roc_curve", "plot_score_distribution"]


def _new_figure(width: float, height: float, columns: int = 1) -> tuple[Any, list[Any]]:
    # A bare Figure renders through Agg without pyplot, so no global backend is switched and nothing stays open.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    axes = [figure.add_subplot(1, columns, column + 1) for column in range(columns)]
    return figure, axes


def _save(figure: Any, path: str | Path) -> Path:
    """Write ``figure`` as a PNG, atomically (a plot cut off by a disconnect is never left behind).

    Rendered in memory first, so that a full disk is an ``OSError`` naming the file, whatever matplotlib does.
    """
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    png = buffer.getvalue()
    return atomic_write(path, lambda file: file.write(png))


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
    return _save(figure, path)


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
    return _save(figure, path)


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
    return _save(figure, path)

