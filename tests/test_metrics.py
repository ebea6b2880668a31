"""compute_metrics against scikit-learn and a brute-force sweep over every distinct threshold."""
from __future__ import annotations

import json
import math
import time
from fractions import Fraction

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from training_utils import compute_metrics, compute_writer_metrics, save_metrics_json


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


# --------------------------------------------------------------------------- writer-level figures

def brute_force_eer(distances: np.ndarray, genuine: np.ndarray) -> tuple[Fraction, float]:
    """(EER, threshold) by the definition: every distinct distance, smallest |FAR - FRR|, smallest threshold on a tie."""
    rows = []
    for threshold in np.unique(distances):
        accepted = distances <= threshold
        far = Fraction(int((accepted & ~genuine).sum()), int((~genuine).sum()))
        frr = Fraction(int((~accepted & genuine).sum()), int(genuine.sum()))
        rows.append((abs(far - frr), float(threshold), (far + frr) / 2))
    _, threshold, eer = min(rows)
    return eer, threshold


def brute_force_auc(genuine_distances: np.ndarray, skilled_distances: np.ndarray) -> Fraction:
    """Probability that a genuine pair is closer than a skilled one, ties counting one half."""
    wins = sum(Fraction(1) if g < s else Fraction(1, 2) if g == s else Fraction(0)
               for g in genuine_distances for s in skilled_distances)
    return wins / (len(genuine_distances) * len(skilled_distances))


def brute_force_writer_metrics(distances: np.ndarray, writers: np.ndarray, kinds: np.ndarray) -> dict:
    verified = kinds != "random"
    eer, threshold = brute_force_eer(distances[verified], kinds[verified] == "genuine")
    accepted = distances <= threshold
    rate = lambda mask: Fraction(int((accepted & mask).sum()), int(mask.sum()))  # noqa: E731
    per_writer, skipped = [], []
    rejected = forged_accepted = n_genuine = n_skilled = 0
    for writer in sorted(set(writers.tolist())):
        mine = writers == writer
        genuine, skilled = mine & (kinds == "genuine"), mine & (kinds == "skilled")
        if not genuine.any() or not skilled.any():
            skipped.append(writer)
            continue
        own_eer, own_threshold = brute_force_eer(distances[genuine | skilled], genuine[genuine | skilled])
        per_writer.append({"writer": writer, "eer": float(own_eer), "threshold": own_threshold,
                           "auc": float(brute_force_auc(distances[genuine], distances[skilled])),
                           "n_genuine": int(genuine.sum()), "n_skilled": int(skilled.sum()),
                           "n_random": int((mine & (kinds == "random")).sum())})
        rejected += int((distances[genuine] > own_threshold).sum())
        forged_accepted += int((distances[skilled] <= own_threshold).sum())
        n_genuine, n_skilled = n_genuine + int(genuine.sum()), n_skilled + int(skilled.sum())
    random = kinds == "random"
    return {
        "eer": float(eer), "threshold": threshold,
        "frr": float(1 - rate(kinds == "genuine")), "far_skilled": float(rate(kinds == "skilled")),
        "far_random": float(rate(random)) if random.any() else float("nan"),
        "eer_user_thresholds": float((Fraction(rejected, n_genuine) + Fraction(forged_accepted, n_skilled)) / 2),
        "mean_writer_auc": float(sum(Fraction(r["auc"]) for r in per_writer) / len(per_writer)),
        "per_writer": per_writer,
        "skipped_writers": skipped,
    }


def assert_same_writer_metrics(metrics: dict, expected: dict) -> None:
    assert set(metrics) == set(expected)
    for key in ("eer", "threshold", "frr", "far_skilled", "far_random", "eer_user_thresholds", "mean_writer_auc"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-12, nan_ok=True), key
    assert metrics["skipped_writers"] == expected["skipped_writers"]
    assert len(metrics["per_writer"]) == len(expected["per_writer"])
    for record, wanted in zip(metrics["per_writer"], expected["per_writer"]):
        assert set(record) == set(wanted)
        for key, value in wanted.items():
            assert record[key] == pytest.approx(value, abs=1e-12), (wanted["writer"], key)


@pytest.mark.parametrize("with_random", [True, False])
def test_writer_metrics_match_brute_force_with_ties_a_writer_without_forgeries(with_random: bool) -> None:
    rng = np.random.default_rng(11 if with_random else 12)
    kinds_drawn = ["genuine", "skilled", "random"] if with_random else ["genuine", "skilled"]
    for trial in range(15):
        n_writers = int(rng.integers(2, 7))
        writers = rng.integers(1, n_writers + 1, size=int(rng.integers(30, 150)))
        kinds = rng.choice(kinds_drawn, size=writers.size)
        kinds[writers == 1] = "genuine"  # writer 1 has no forgeries: skipped
        kinds[:2] = ["genuine", "skilled"]
        writers[:2] = n_writers + 1  # and one writer surely has both
        distances = np.round(rng.normal(np.where(kinds == "genuine", 0.4, 0.6), 0.2), 1)  # many ties
        metrics = compute_writer_metrics(distances, writers, kinds)
        assert 1 in metrics["skipped_writers"], trial
        assert_same_writer_metrics(metrics, brute_force_writer_metrics(distances, writers, kinds))
        if not with_random:
            assert math.isnan(metrics["far_random"])


def test_writer_metrics_agree_with_compute_metrics_and_take_string_writers() -> None:
    distances = np.array([0.1, 0.4, 0.3, 0.9, 0.2, 0.5, 0.35, 0.05])
    writers = ["ann", "ann", "ann", "ann", "bob", "bob", "bob", "bob"]
    kinds = ["genuine", "genuine", "skilled", "random", "genuine", "skilled", "skilled", "random"]
    metrics = compute_writer_metrics(torch.tensor(distances)[:, None], writers, kinds)
    pooled = compute_metrics(distances[[0, 1, 2, 4, 5, 6]], [1, 1, 0, 1, 0, 0])
    assert (metrics["eer"], metrics["threshold"], metrics["frr"], metrics["far_skilled"]) == (
        pooled["eer"], pooled["threshold"], pooled["frr"], pooled["far"])
    assert metrics["far_random"] == 0.5  # 0.05 <= threshold 0.2, 0.9 is not
    assert [record["writer"] for record in metrics["per_writer"]] == ["ann", "bob"]
    assert metrics["per_writer"][0]["n_random"] == 1 and metrics["skipped_writers"] == []
    json.dumps(metrics)  # plain Python values only


@pytest.mark.parametrize(
    ("kinds", "message"),
    [(["genuine", "forged"], "kinds must be"), (["genuine", "genuine"], "no forged"), (["genuine"], "differ in length")],
)
def test_writer_metrics_clear_errors(kinds: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_writer_metrics([0.1, 0.2], [1, 1], kinds)
