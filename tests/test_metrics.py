"""compute_metrics against scikit-learn and a brute-force sweep over every distinct threshold."""
from __future__ import annotations

import json
import time
from fractions import Fraction

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from training_utils import compute_metrics, save_metrics_json


def brute_force(distances: np.ndarray, labels: np.ndarray) -> dict:
    """The definition, one threshold at a time, in exact fractions."""
    genuine = labels == 1
    n_genuine, n_forged = int(genuine.sum()), int((~genuine).sum())
    rows = []
    for threshold in np.unique(distances):
        accepted = distances <= threshold
        far = Fraction(int((accepted & ~genuine).sum()), n_forged)
        frr = Fraction(int((~accepted & genuine).sum()), n_genuine)
        correct = int((accepted & genuine).sum() + (~accepted & ~genuine).sum())
        rows.append((float(threshold), far, frr, correct))
    eer_row = min(rows, key=lambda row: (abs(row[1] - row[2]), row[0]))
    best_row = min(rows, key=lambda row: (-row[3], row[0]))
    return {
        "eer": float((eer_row[1] + eer_row[2]) / 2),
        "threshold": eer_row[0],
        "far": float(eer_row[1]),
        "frr": float(eer_row[2]),
        "accuracy": eer_row[3] / distances.size,
        "best_accuracy": best_row[3] / distances.size,
        "best_threshold": best_row[0],
        "best_far": float(best_row[1]),
        "best_frr": float(best_row[2]),
    }


def random_scores(rng: np.random.Generator, n: int, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    labels = (rng.random(n) < rng.uniform(0.2, 0.8)).astype(np.int64)
    distances = rng.normal(loc=np.where(labels == 1, 0.4, 0.7), scale=rng.uniform(0.05, 0.4))
    if ties:  # coarse rounding: many pairs share a distance, across classes too
        distances = np.round(distances, 1)
    return distances, labels


@pytest.mark.parametrize("ties", [False, True])
def test_matches_brute_force_and_sklearn_on_random_data(ties: bool) -> None:
    rng = np.random.default_rng(0 if ties else 1)
    for trial in range(40):
        n = int(rng.integers(2, 300))
        distances, labels = random_scores(rng, n, ties)
        if labels.min() == labels.max():
            labels[0] = 1 - labels[0]
        metrics = compute_metrics(distances, labels)
        expected = brute_force(distances, labels)
        for key, value in expected.items():
            assert metrics[key] == pytest.approx(value, abs=1e-12), (trial, key)
        assert metrics["auc"] == pytest.approx(roc_auc_score(labels, -distances), abs=1e-12)


def test_roc_arrays_and_inputs_as_tensors() -> None:
    rng = np.random.default_rng(3)
    distances, labels = random_scores(rng, 500, ties=True)
    metrics = compute_metrics(torch.tensor(distances, dtype=torch.float64)[:, None], torch.tensor(labels)[:, None].float())
    assert np.array_equal(metrics["roc_thresholds"], np.unique(distances))
    assert metrics["roc_fpr"][-1] == 1.0 and metrics["roc_tpr"][-1] == 1.0
    assert np.all(np.diff(metrics["roc_fpr"]) >= 0) and np.all(np.diff(metrics["roc_tpr"]) >= 0)
    assert metrics["n_genuine"] == int(labels.sum()) and metrics["n_forged"] == int((1 - labels).sum())


def test_tie_goes_to_the_smallest_threshold() -> None:
    # |FAR - FRR| is 1/2 at 0.1 (FAR 0, FRR 1/2) and at 0.2 (FAR 1/2, FRR 0), and larger at 0.3.
    distances = np.array([0.1, 0.2, 0.2, 0.3])
    labels = np.array([1, 0, 1, 0])
    metrics = compute_metrics(distances, labels)
    assert metrics["threshold"] == 0.1
    assert (metrics["far"], metrics["frr"], metrics["eer"]) == (0.0, 0.5, 0.25)
    assert metrics["threshold"] == brute_force(distances, labels)["threshold"]


def test_perfect_separation() -> None:
    metrics = compute_metrics([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0])
    assert metrics["eer"] == 0.0 and metrics["accuracy"] == 1.0 and metrics["auc"] == 1.0
    assert metrics["threshold"] == 0.2 and metrics["best_threshold"] == 0.2


@pytest.mark.parametrize(
    ("distances", "labels", "message"),
    [
        ([], [], "no scores"),
        ([0.1, 0.2], [1, 1], "no forged"),
        ([0.1, 0.2], [0, 0], "no genuine"),
        ([0.1, float("nan")], [1, 0], "NaN or infinite"),
        ([0.1, float("inf")], [1, 0], "NaN or infinite"),
        ([0.1, 0.2], [1, 2], "0 \\(forged\\) or 1"),
        ([0.1, 0.2, 0.3], [1, 0], "differ in length"),
        ([[0.1, 0.2]], [[1, 0]], "shape"),
    ],
)
def test_clear_errors(distances: list, labels: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_metrics(distances, labels)


def test_100k_scores_in_well_under_a_second() -> None:
    rng = np.random.default_rng(5)
    distances, labels = random_scores(rng, 100_000, ties=False)
    compute_metrics(distances, labels)
    start = time.perf_counter()
    metrics = compute_metrics(distances, labels)
    assert time.perf_counter() - start < 1.0
    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, -distances), abs=1e-12)


def test_save_metrics_json_plain_and_with_arrays(tmp_path) -> None:
    metrics = compute_metrics([0.1, 0.5, 0.3, 0.9], [1, 0, 1, 0])
    metrics["note"] = float("nan")
    path = save_metrics_json(metrics, tmp_path / "sub" / "metrics.json")
    saved = json.loads(path.read_text())
    assert saved["eer"] == metrics["eer"] and saved["note"] is None
    assert "roc_fpr" not in saved
    saved = json.loads(save_metrics_json(metrics, tmp_path / "all.json", include_arrays=True).read_text())
    assert saved["roc_fpr"] == metrics["roc_fpr"].tolist()
    assert not list(tmp_path.glob("**/*.tmp"))
