"""Verification metrics: distances (smaller = genuine) and labels in, figures out (spec section 8).

Every figure is exact over all distinct thresholds and takes O(N log N) time.
Rates are fractions in [0, 1].
"""
from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from module.core.io import atomic_write_text, write_json

__all__ = ["compute_metrics", "compute_writer_metrics", "rates_at_threshold", "save_metrics_json", "save_per_writer_csv",
           "ROC_KEYS", "AGGREGATES", "PAIR_KINDS", "PER_WRITER_COLUMNS"]

# The kinds of query a pair can hold: the reference writer's own genuine signature, a skilled forgery of it,
# or a genuine signature of another writer (a random forgery).
PAIR_KINDS = ("genuine", "skilled", "random")
# How a query's distances to several references of a writer combine into one.
AGGREGATES = ("mean", "min", "max")
# The fields of each record of compute_writer_metrics' "per_writer", in the order of per_writer.csv's columns.
PER_WRITER_COLUMNS = ("writer", "eer", "threshold", "auc", "n_genuine", "n_skilled", "n_random")
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


def compute_writer_metrics(distances: Any, writer_ids: Any, kinds: Any) -> dict[str, Any]:
    """Writer-level verification figures (the protocol of sigver), exact over every distinct threshold.

    A pair is accepted as genuine when ``distance <= threshold``.

    Args:
        distances: ``[N]`` or ``[N, 1]`` finite floats, one per pair.
        writer_ids: ``[N]``, the writer of each pair's reference (ints or strings).
        kinds: ``[N]``, each pair's query: ``"genuine"`` (the same writer's genuine
            signature), ``"skilled"`` (a skilled forgery of that writer) or
            ``"random"`` (a genuine signature of another writer).

    Returns:
        ``eer``, ``threshold``: ``compute_metrics`` over the genuine vs skilled
        pairs of all writers; ``frr``, ``far_skilled``, ``far_random`` at that
        threshold (``far_random`` NaN without random pairs);
        ``eer_user_thresholds``: each writer's own EER threshold over its
        genuine vs skilled pairs, the errors pooled over writers:
        ``(genuine rejected / genuine + skilled accepted / skilled) / 2``;
        ``mean_writer_auc``: the mean over writers of the AUC of genuine vs
        skilled; ``per_writer``: one dict a writer (``writer``, ``eer``,
        ``threshold``, ``auc``, ``n_genuine``, ``n_skilled``, ``n_random``),
        sorted by writer; ``skipped_writers``: the writers with no genuine or
        no skilled pair, left out of the writer-level figures (both NaN when
        every writer is). Rates are fractions in [0, 1].

    Raises:
        ValueError: lengths differ, an unknown kind, a non-finite distance, or
            no genuine or no skilled pair at all.
    """
    scores = _as_1d_array(distances, "distances").astype(np.float64)
    writers = _as_1d_array(writer_ids, "writer_ids")
    kind_values = _as_1d_array(kinds, "kinds").astype(str)
    if not scores.shape == writers.shape == kind_values.shape:
        raise ValueError(f"distances ({scores.size}), writer_ids ({writers.size}) and kinds ({kind_values.size}) "
                         "differ in length")
    unknown = sorted(set(np.unique(kind_values)) - set(PAIR_KINDS))
    if unknown:
        raise ValueError(f"kinds must be {', '.join(PAIR_KINDS)}; found {unknown[:5]}")
    genuine, skilled, random = (kind_values == kind for kind in PAIR_KINDS)
    verified = genuine | skilled
    overall = compute_metrics(scores[verified], genuine[verified].astype(np.int64))
    threshold = overall["threshold"]
    far_random = float(np.mean(scores[random] <= threshold)) if random.any() else float("nan")

    per_writer, skipped = [], []
    genuine_rejected = skilled_accepted = n_genuine = n_skilled = 0
    for writer in np.unique(writers):
        mine = writers == writer
        mine_genuine, mine_skilled = mine & genuine, mine & skilled
        counts = {"n_genuine": int(mine_genuine.sum()), "n_skilled": int(mine_skilled.sum()),
                  "n_random": int((mine & random).sum())}
        if not counts["n_genuine"] or not counts["n_skilled"]:
            skipped.append(writer.item())
            continue
        own = compute_metrics(scores[mine_genuine | mine_skilled], genuine[mine_genuine | mine_skilled].astype(np.int64))
        per_writer.append({"writer": writer.item(), "eer": own["eer"], "threshold": own["threshold"],
                           "auc": own["auc"], **counts})
        genuine_rejected += int((scores[mine_genuine] > own["threshold"]).sum())
        skilled_accepted += int((scores[mine_skilled] <= own["threshold"]).sum())
        n_genuine += counts["n_genuine"]
        n_skilled += counts["n_skilled"]

    return {
        "eer": overall["eer"],
        "threshold": threshold,
        "frr": overall["frr"],
        "far_skilled": overall["far"],
        "far_random": far_random,
        "eer_user_thresholds": (genuine_rejected / n_genuine + skilled_accepted / n_skilled) / 2
        if per_writer else float("nan"),
        "mean_writer_auc": float(np.mean([record["auc"] for record in per_writer])) if per_writer else float("nan"),
        "per_writer": per_writer,
        "skipped_writers": skipped,
    }


def rates_at_threshold(distances: Any, labels: Any, threshold: float, kinds: Any = None) -> dict[str, Any]:
    """The error rates of accepting a pair when ``distance <= threshold``, a threshold fixed beforehand.

    Args:
        distances, labels: ``[N]`` (1 genuine, 0 forged).
        kinds: ``[N]`` ``PAIR_KINDS``, or ``None`` when the file names do not say.

    Returns:
        ``frr``, ``far`` (every forged pair), ``far_skilled``, ``far_random`` (NaN without such pairs or
        without ``kinds``), ``accuracy``: fractions in [0, 1].
    """
    scores = _as_1d_array(distances, "distances").astype(np.float64)
    genuine = _as_1d_array(labels, "labels") == 1
    accepted = scores <= threshold
    kind_values = _as_1d_array(kinds, "kinds").astype(str) if kinds is not None else None

    def far_of(forged: np.ndarray) -> float:
        return float(accepted[forged].mean()) if forged.any() else float("nan")

    return {
        "frr": float((~accepted[genuine]).mean()) if genuine.any() else float("nan"),
        "far": far_of(~genuine),
        "far_skilled": far_of(kind_values == "skilled") if kind_values is not None else float("nan"),
        "far_random": far_of(kind_values == "random") if kind_values is not None else float("nan"),
        "accuracy": float((accepted == genuine).mean()),
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


def save_per_writer_csv(writer_metrics: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``compute_writer_metrics``' ``per_writer`` records as CSV (one row a writer, ``PER_WRITER_COLUMNS``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PER_WRITER_COLUMNS)
    writer.writerows([record[column] for column in PER_WRITER_COLUMNS] for record in writer_metrics["per_writer"])
    return atomic_write_text(path, buffer.getvalue())
