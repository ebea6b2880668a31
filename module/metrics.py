"""Verification metrics: distances (smaller = genuine) and labels in, figures out (spec section 8).

Every figure is exact over all distinct thresholds and takes O(N log N) time.
Rates are fractions in [0, 1].
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from module.io import write_json

__all__ = ["compute_metrics", "save_metrics_json", "ROC_KEYS"]

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



def save_metrics_json(metrics: Mapping[str, Any], path: str | Path, include_arrays: bool = False) -> Path:
    """Write ``metrics`` as plain JSON (atomically) and return the path.

    Arrays (the ROC, raw distances and labels) are left out unless
    ``include_arrays``; NaN and infinity become ``null``.
    """
    kept = {
        key: value for key, value in metrics.items()
        if include_arrays or not isinstance(value, (np.ndarray, torch.Tensor))
    }
    return write_json(path, kept)
