"""Likelihood ratios: Cllr and Cllr_min by hand, the calibration's fit, bounds and JSON, the verbal scale, the
operating point at a threshold fixed beforehand, and the evidence plots."""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from module.core import wording
from module.evaluation.calibration import (
    Calibration,
    cllr,
    cllr_min,
    empirical_cross_entropy,
    evidence_figures,
    fit_calibration,
    load_calibration,
    lr_bounds,
    missing_calibration_note,
    pav_likelihood_ratios,
    save_calibration,
    verbal_equivalent,
)
from module.evaluation.evidence_plots import plot_ece, plot_tippett
from module.evaluation.metrics import rates_at_threshold
from module.evaluation.reports import OperatingBasis, evidence_summary
from module.run.folder import CALIBRATION
from module.verifier import Decision


def overlapping(seed: int = 0, n_genuine: int = 60, n_forged: int = 140) -> tuple[np.ndarray, np.ndarray]:
    """Distances of genuine pairs (smaller) and forged ones (larger) that overlap, and their labels."""
    rng = np.random.default_rng(seed)
    distances = np.concatenate([rng.normal(0.45, 0.08, n_genuine), rng.normal(0.6, 0.08, n_forged)])
    return distances, np.r_[np.ones(n_genuine, dtype=int), np.zeros(n_forged, dtype=int)]


def test_cllr_of_hand_computed_lrs() -> None:
    # Genuine LRs 1 and 3: log2(2) = 1 and log2(4/3); forged 1/3 and 1: log2(4/3) and 1.
    assert cllr([1, 3, 1 / 3, 1], [1, 1, 0, 0]) == pytest.approx((1 + math.log2(4 / 3)) / 2, rel=1e-12)
    # Right and sure: close to 0; wrong and sure: far above 1.
    assert cllr([1e6, 1e-6], [1, 0]) == pytest.approx(math.log2(1 + 1e-6), rel=1e-9)
    assert cllr([1e-6, 1e6], [1, 0]) == pytest.approx(math.log2(1 + 1e6), rel=1e-9)
    # LRs beyond the float range of LR itself are scored from their logarithms: no overflow.
    assert math.isfinite(cllr([1e300, 1e-300], [0, 1]))
    with pytest.raises(ValueError, match="finite and > 0"):
        cllr([0.0, 2.0], [1, 0])
    with pytest.raises(ValueError, match="one kind"):
        cllr([2.0, 3.0], [1, 1])


def test_lrs_that_always_say_1_cost_one_bit() -> None:
    labels = np.r_[np.ones(7), np.zeros(13)]
    assert cllr(np.ones(20), labels) == pytest.approx(1.0, rel=1e-12)
    # All tied: PAV pools them into one block, whose LR is the set's prior taken off its posterior: 1.
    assert cllr_min(np.ones(20), labels, (1e-3, 1e3)) == pytest.approx(1.0, rel=1e-12)
    assert empirical_cross_entropy(np.ones(20), labels, [0.0])[0] == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_cllr_min_is_at_most_cllr_for_any_lrs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    labels = rng.permutation(np.r_[1, 0, rng.integers(0, 2, n - 2)])
    lrs = np.exp(rng.normal(0, rng.uniform(0.1, 6), n) + rng.normal(0, 2) * labels)
    if seed % 3 == 0:  # many ties
        lrs = np.round(lrs, 1) + 0.1
    assert cllr_min(lrs, labels) <= cllr(lrs, labels) + 1e-12
    # Within bounds that hold the LRs, the bounded optimum is still no worse than they are.
    bounds = (float(lrs.min()) / 10, float(lrs.max()) * 10)
    assert cllr_min(lrs, labels, bounds) <= cllr(lrs, labels) + 1e-12
    # And it is the optimum over monotone recalibrations: a random monotone map of the LRs does no better.
    remapped = np.exp(np.clip(rng.uniform(0.2, 3) * np.log(lrs) + rng.normal(0, 1), *np.log(bounds)))
    assert cllr_min(lrs, labels, bounds) <= cllr(remapped, labels) + 1e-12


def test_a_perfectly_separated_set() -> None:
    lrs, labels = [20.0, 50.0, 100.0, 0.5, 0.1, 0.01], [1, 1, 1, 0, 0, 0]
    # Within the LRs' own range, PAV puts every genuine pair at the top and every forged one at the bottom.
    assert np.allclose(pav_likelihood_ratios(lrs, labels), [100, 100, 100, 0.01, 0.01, 0.01])
    assert cllr_min(lrs, labels) == pytest.approx(math.log2(1 + 1 / 100), rel=1e-12)
    assert cllr_min(lrs, labels, (1e-9, 1e9)) == pytest.approx(math.log2(1 + 1e-9), rel=1e-6)

    # A calibration fitted on separated distances stays finite (no convergence warning) and reaches its bounds.
    distances = np.r_[np.linspace(0.1, 0.3, 30), np.linspace(0.5, 0.9, 50)]
    separated = np.r_[np.ones(30), np.zeros(50)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibration = fit_calibration(distances, separated)
    assert calibration.bounds == lr_bounds(30, 50) == (1 / 31, 51.0)
    for method in ("logistic", "pav"):
        lrs = dataclasses.replace(calibration, method=method).likelihood_ratios(distances)
        assert lrs[0] == pytest.approx(51.0) and lrs[-1] == pytest.approx(1 / 31)


def test_ties_in_the_scores_get_one_lr() -> None:
    # Scores 1 | 2, 2 | 3: the tied pair (one genuine, one forged) is one block, LR 1 at the set's even prior.
    lrs, labels = [1.0, 2.0, 2.0, 3.0], [0, 1, 0, 1]
    assert np.allclose(pav_likelihood_ratios(lrs, labels), [1.0, 1.0, 1.0, 3.0])
    wide = pav_likelihood_ratios(lrs, labels, (1e-12, 1e12))
    assert np.allclose(wide, [1e-12, 1.0, 1.0, 1e12])
    assert cllr_min(lrs, labels, (1e-12, 1e12)) == pytest.approx(0.5, abs=1e-9)  # each tied pair costs 1 bit
    # Equal distances get equal LRs from either fit.
    distances, fitted_labels = overlapping()
    distances[:5] = distances[-5:] = 0.5
    calibration = fit_calibration(distances, fitted_labels)
    for method in ("logistic", "pav"):
        tied = dataclasses.replace(calibration, method=method).likelihood_ratios(distances[[0, 1, 2, -1, -2]])
        assert np.all(tied == tied[0])


def test_lrs_are_finite_and_positive_far_outside_the_fitted_range() -> None:
    calibration = fit_calibration(*overlapping())
    far = [-1e300, -1e6, 0.0, 0.5, 10.0, 1e300]
    for method in ("logistic", "pav"):
        lrs = dataclasses.replace(calibration, method=method).likelihood_ratios(far)
        assert np.all(np.isfinite(lrs)) and np.all(lrs > 0)
        assert lrs.min() >= calibration.lr_min * (1 - 1e-12) and lrs.max() <= calibration.lr_max * (1 + 1e-12)
        assert lrs[0] == pytest.approx(calibration.lr_max) and lrs[-1] == pytest.approx(calibration.lr_min)
        assert np.all(np.diff(lrs) <= 0)  # a larger distance never supports the same writer more
    with pytest.raises(ValueError, match="finite"):
        calibration.likelihood_ratios([math.inf])


def test_the_prior_of_the_fitting_set_is_removed() -> None:
    """Twice the forged pairs (the same distances) halve the posterior odds, not the LR."""
    distances, labels = overlapping(n_genuine=80, n_forged=80)
    forged = labels == 0
    doubled = np.r_[distances, distances[forged]], np.r_[labels, labels[forged]]
    once, twice = fit_calibration(distances, labels, method="pav"), fit_calibration(*doubled, method="pav")
    probe = np.linspace(0.35, 0.7, 15)  # inside both sets' bounds
    inside = (once.likelihood_ratios(probe) > once.lr_min) & (once.likelihood_ratios(probe) < once.lr_max)
    assert inside.sum() > 5
    assert np.allclose(once.likelihood_ratios(probe)[inside], twice.likelihood_ratios(probe)[inside], rtol=1e-9)
    # The logistic fit's slope moves a little with the class weights (a line fits a sample only so well), but its
    # LRs stay far closer than the factor 2 that a prior left in would make.
    logistic_once = dataclasses.replace(once, method="logistic").likelihood_ratios(probe)
    logistic_twice = dataclasses.replace(twice, method="logistic").likelihood_ratios(probe)
    assert np.all(np.abs(np.log2(logistic_once / logistic_twice)) < 0.15)


def test_the_calibration_round_trips_through_json(tmp_path: Path) -> None:
    calibration = fit_calibration(*overlapping(), n_writers=3)
    path = save_calibration(calibration, tmp_path / CALIBRATION)
    data = json.loads(path.read_text())  # plain data: numbers, lists, strings
    assert data["version"] == 1 and data["method"] == "logistic" and data["fitted_on"]["n_writers"] == 3
    again = load_calibration(tmp_path)
    assert again == calibration
    probe = np.linspace(-1, 2, 301)
    for method in ("logistic", "pav"):
        assert np.array_equal(dataclasses.replace(again, method=method).likelihood_ratios(probe),
                              dataclasses.replace(calibration, method=method).likelihood_ratios(probe))
    assert load_calibration(tmp_path / "best.pt") == calibration  # a checkpoint file: the folder it is in
    (tmp_path / "elsewhere").mkdir()
    assert load_calibration(tmp_path / "elsewhere") is None
    with pytest.raises(ValueError, match="version"):
        Calibration.from_dict({**data, "version": 99})


def test_the_isotonic_fit_applies_as_scikit_learn_predicts() -> None:
    from sklearn.isotonic import IsotonicRegression

    distances, labels = overlapping()
    calibration = fit_calibration(distances, labels, method="pav")
    probe = np.linspace(0.0, 1.0, 401)
    posteriors = IsotonicRegression(increasing=False, out_of_bounds="clip").fit(distances, labels).predict(probe)
    with np.errstate(divide="ignore"):  # a posterior of 1 has infinite odds, which the bounds clip
        expected = np.clip(posteriors / (1 - posteriors) / math.exp(calibration.prior_log_odds), *calibration.bounds)
    assert np.allclose(calibration.likelihood_ratios(probe), expected, rtol=1e-9)


def test_evidence_figures_for_each_kind_of_forgery() -> None:
    distances, labels = overlapping(n_genuine=40, n_forged=60)
    calibration = fit_calibration(distances, labels)
    rng = np.random.default_rng(5)
    test = np.r_[rng.normal(0.45, 0.08, 30), rng.normal(0.6, 0.08, 40), rng.normal(0.9, 0.05, 20)]
    test_labels = np.r_[np.ones(30), np.zeros(60)]
    kinds = ["genuine"] * 30 + ["skilled"] * 40 + ["random"] * 20
    figures = evidence_figures(calibration, test, test_labels, kinds)
    lrs = calibration.likelihood_ratios(test)
    skilled = slice(0, 70)
    assert figures["skilled"]["cllr"] == pytest.approx(cllr(lrs[skilled], test_labels[skilled]))
    assert figures["skilled"]["cllr_min"] == pytest.approx(cllr_min(lrs[skilled], test_labels[skilled],
                                                                    calibration.bounds))
    for kind in ("skilled", "random"):
        entry = figures[kind]
        assert entry["cllr_cal"] == pytest.approx(entry["cllr"] - entry["cllr_min"]) and entry["cllr_cal"] >= 0
    assert (figures["skilled"]["n_forged"], figures["random"]["n_forged"]) == (40, 20)
    assert figures["random"]["cllr"] < figures["skilled"]["cllr"]  # random forgeries lie farther away
    assert evidence_figures(calibration, test[:70], test_labels[:70], kinds[:70])["random"] is None
    assert set(evidence_figures(calibration, test, test_labels)) == {"method", "lr_bounds", "fitted_on", "all"}
    # The ECE at even odds is the Cllr.
    assert empirical_cross_entropy(lrs[skilled], test_labels[skilled], [0.0])[0] == pytest.approx(
        figures["skilled"]["cllr"])


def test_the_enfsi_verbal_scale_both_ways() -> None:
    expected = {1.0: "no support for either proposition", 1.5: "weak support for the same-writer proposition",
                10: "moderate support for the same-writer proposition",
                150: "moderately strong support for the same-writer proposition",
                1000: "strong support for the same-writer proposition",
                5e4: "very strong support for the same-writer proposition",
                1e6: "extremely strong support for the same-writer proposition",
                1 / 1.5: "weak support for the different-writer proposition",
                1 / 150: "moderately strong support for the different-writer proposition",
                1e-7: "extremely strong support for the different-writer proposition"}
    for lr, words in expected.items():
        assert verbal_equivalent(lr) == words, lr
    with pytest.raises(ValueError):
        verbal_equivalent(0.0)


def test_the_operating_point_at_a_threshold_fixed_beforehand() -> None:
    distances = [0.1, 0.3, 0.6, 0.2, 0.5, 0.9, 0.4]
    labels = [1, 1, 1, 0, 0, 0, 0]
    kinds = ["genuine"] * 3 + ["skilled", "skilled", "random", "random"]
    rates = rates_at_threshold(distances, labels, 0.45, kinds)
    assert rates == pytest.approx({"frr": 1 / 3, "far": 2 / 4, "far_skilled": 1 / 2, "far_random": 1 / 2,
                                   "accuracy": 4 / 7})
    assert math.isnan(rates_at_threshold(distances, labels, 0.45)["far_skilled"])

    few = OperatingBasis(0.45, "EER threshold of val_metrics.json", 2, 84)
    point = few.operating_point(distances, labels, kinds)
    assert (point["threshold"], point["n_val_writers"], point["n_val_pairs"]) == (0.45, 2, 84)
    assert "2 writers (fewer than 5)" in point["warning"] and "84 pairs (fewer than 500)" in point["warning"]
    assert OperatingBasis(0.45, "given", 40, 5000).warning() is None
    assert "1 writer (" in OperatingBasis(0.45, "given", 1, 5000).warning()
    lines = evidence_summary({"operating_point": point})
    assert lines[0].startswith("at the threshold verify uses, 0.45 (EER threshold of val_metrics.json; 2 writers, "
                               "84 pairs): FRR 33.33 %, FAR skilled 50.00 %, FAR random 50.00 %")
    assert lines[1].startswith("warning: the threshold rests on 2 writers")


def test_evidence_plots_are_written(tmp_path: Path) -> None:
    distances, labels = overlapping()
    calibration = fit_calibration(distances, labels)
    lrs = calibration.likelihood_ratios(distances)
    genuine = labels == 1
    tippett = plot_tippett({"genuine": lrs[genuine], "skilled": lrs[~genuine]}, tmp_path / "tippett.png")
    ece = plot_ece({"skilled": (lrs, labels), "random": (lrs, labels)}, calibration.bounds, tmp_path / "ece.png")
    for path in (tippett, ece):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_a_run_without_a_calibration_is_told_how_to_add_one(tmp_path: Path) -> None:
    call = f"calibrate_run({str(tmp_path)!r})"
    expected = {"command line": f"python finetune.py calibrate --run {tmp_path}",
                "notebook": f"from training_utils import calibrate_run; {call} in a cell", "python": call}
    for interface, words in expected.items():
        if interface == "command line":
            with wording.command_line("finetune.py"):
                note = missing_calibration_note(tmp_path)
        else:
            wording.use_interface(interface)
            try:
                note = missing_calibration_note(tmp_path)
            finally:
                wording.use_interface("python")
        assert words in note and CALIBRATION in note, (interface, note)


def test_a_decision_keeps_its_first_fields() -> None:
    """Users' code that builds or unpacks the four fields of before keeps working; the evidence comes after."""
    distances, distance, threshold, genuine, *evidence = Decision([0.4], 0.4, 0.5, True)
    assert (distances, distance, threshold, genuine) == ([0.4], 0.4, 0.5, True) and evidence == [None, None, None]
    assert Decision._fields[:4] == ("distances", "distance", "threshold", "genuine")
