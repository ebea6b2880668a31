"""Evaluation: a model's distances, loss and metrics on a set of pairs, and the reports written from them.

``validate`` runs the model in eval mode (the Sinkhorn's evaluation
epsilon) over a pair dataset, a ``FeatureCache`` or a ``DataLoader`` of
image pairs; ``evaluate_and_report`` also writes the metrics JSON and the
ROC and distance plots.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from module.checkpoint import BEST_CHECKPOINT, read_checkpoint
from module.config import FinetuneConfig
from module.features import FeatureCache, compute_features, make_pair_loader, model_device, pair_distances
from module.loss import NonFiniteLossError
from module.metrics import compute_metrics, save_metrics_json
from module.plots import plot_roc_curve, plot_score_distribution
from module.wording import option

__all__ = ["validate", "evaluate_and_report", "starting_model_note"]


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
    device = torch.device(device) if device is not None else model_device(model)
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
                distance, label = pair_distances(model, batch, device, amp)
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


def evaluate_and_report(model: nn.Module, data: Any, out_dir: str | Path, name: str,
                        config: FinetuneConfig, progress: bool = True) -> dict[str, Any]:
    """Validate ``model`` on ``data`` (a pair dataset or a ``FeatureCache``) and write its report into ``out_dir``.

    A dataset's features come from, and go to, the feature store of
    ``config`` (``config.feature_store_dir()``). Files: ``{name}_metrics.json`` (no arrays), ``{name}_roc.png``,
    ``{name}_scores.png``. Returns ``validate``'s metrics (with ``threshold``,
    ``distances`` and ``labels``). Runs on the model's device.
    """
    out_dir = Path(out_dir)
    _, metrics = validate(model, data, batch_size=config.eval_batch_size, amp=config.amp,
                          feature_dtype=config.feature_dtype, feature_dir=config.feature_store_dir(),
                          num_workers=config.num_workers, progress=progress, desc=name)
    save_metrics_json(metrics, out_dir / f"{name}_metrics.json")
    plot_roc_curve(metrics, out_dir / f"{name}_roc.png", title=f"ROC curve: {name}")
    plot_score_distribution(metrics, out_dir / f"{name}_scores.png", title=f"Distance distribution: {name}")
    return metrics


def starting_model_note(run: str | Path) -> str | None:
    """A warning for a run whose best model is its starting model (epoch 0), or whose backbone is fresh; None otherwise.

    ``run``: a run folder (its ``best.pt`` is read) or a checkpoint file. The
    test EER before and after fine-tuning is quoted when the run folder holds it.
    """
    checkpoint_file = Path(run) / BEST_CHECKPOINT if Path(run).is_dir() else Path(run)
    checkpoint = read_checkpoint(checkpoint_file)
    folder = checkpoint_file.parent
    notes = []
    if checkpoint.get("best_epoch") == 0:
        notes.append("fine-tuning did not improve on the starting model: the best validation figure is epoch 0's, "
                     "so this run's model is the one it started from")
    if not checkpoint["config"].get("pretrained"):
        notes.append(f"its backbone is fresh (trained without {option('pretrained')} weights), so its distances say "
                     "little about a writer")
    if not notes:
        return None
    eers = {name: json.loads((folder / f"{name}_metrics.json").read_text())["eer"]
            for name in ("test_before", "test") if (folder / f"{name}_metrics.json").is_file()}
    quoted = ", ".join(f"{'before fine-tuning' if name == 'test_before' else 'after'} {100 * eer:.1f} %"
                       for name, eer in eers.items())
    return "; ".join(notes) + (f" (test EER {quoted})" if quoted else "")
