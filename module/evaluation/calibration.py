"""Likelihood ratios from distances: a calibration fitted on the validation split, and the figures that score it.

An examiner reports the strength of the evidence as a likelihood ratio,

    LR = P(distance | same writer) / P(distance | different writers),

with a verbal equivalent (``verbal_equivalent``: the ENFSI guideline's scale). ``fit_calibration`` learns the
map distance -> LR from the validation split's pairs after training, with scikit-learn: a logistic regression on
the distance (the default), or pool-adjacent-violators (``sklearn.isotonic.IsotonicRegression``) as the
alternative. Both give posterior odds at the fitting set's prior; dividing by its prior odds (genuine pairs /
forged pairs) leaves the LR, which says what the distance says and nothing of how many pairs of each kind were
at hand. A ``Calibration`` is plain data (``calibration.json``) and applies with NumPy alone, so a verification
never imports scikit-learn (nor the SciPy under it).

Bounds: no LR is 0 or infinite. Every LR is clipped to ``[1 / (n_genuine + 1), n_forged + 1]`` of the fitting
set: an LR above ``n_forged + 1`` would say that a forgery reaches that distance less often than once in
``n_forged + 1`` forged pairs, which ``n_forged`` forged pairs cannot show (likewise below for the genuine
pairs). A distance far outside the fitted range gets the bound, and a calibration fitted on few pairs cannot
claim strong evidence.

Scoring: the log-likelihood-ratio cost of Brummer and du Preez (2006), with which SigComp2011 scored its LRs,

    Cllr = 1/2 * (mean over same-writer pairs of log2(1 + 1/LR) + mean over different-writer pairs of log2(1 + LR)),

in bits: 0 for certain and right LRs, 1 for LRs that always say 1, above 1 for misleading ones. ``cllr_min`` is
the Cllr of the same LRs after the best monotone recalibration of that very set (PAV, within the same bounds):
what is left is the lack of discrimination; ``cllr_cal = cllr - cllr_min`` is what the calibration loses.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from module.core.io import write_json
from module.core.wording import step
from module.run.folder import CALIBRATION

__all__ = ["CALIBRATION_VERSION", "Calibration", "METHODS", "VERBAL_SCALE", "VERBAL_SCALE_SOURCE", "cllr",
           "cllr_min", "empirical_cross_entropy", "evidence_figures", "fit_calibration", "load_calibration",
           "lr_bounds", "missing_calibration_note", "pav_likelihood_ratios", "save_calibration", "verbal_equivalent"]

CALIBRATION_VERSION = 1
# How a distance becomes an LR: a logistic regression on the distance, or pool-adjacent-violators (isotonic).
METHODS = ("logistic", "pav")
# The inverse strength of the L2 penalty on the slope of the standardized distance. It keeps the fit finite when
# the validation pairs are perfectly separated, and moves a fit of overlapping pairs by far less than its error.
LOGISTIC_C = 100.0
# The ENFSI guideline's verbal equivalents: an LR (or 1 / LR) at or above the bound, the strongest bound first;
# between 1 and 10, "weak".
VERBAL_SCALE = ((1e6, "extremely strong"), (1e4, "very strong"), (1e3, "strong"), (1e2, "moderately strong"),
                (1e1, "moderate"), (1.0, "weak"))
VERBAL_SCALE_SOURCE = "ENFSI Guideline for Evaluative Reporting in Forensic Science (2015), verbal equivalents"


def _scores_and_labels(scores: Any, labels: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``([N] float64, [N] bool genuine)``; both classes present, every score finite."""
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    label_values = np.asarray(labels).reshape(-1)
    if values.shape != label_values.shape:
        raise ValueError(f"{values.size} {what} but {label_values.size} labels")
    if not np.isfinite(values).all():
        raise ValueError(f"{int((~np.isfinite(values)).sum())} of the {what} are NaN or infinite")
    if not np.isin(label_values, (0, 1)).all():
        raise ValueError("labels must be 1 (same writer) or 0 (different writers)")
    genuine = label_values == 1
    if genuine.all() or not genuine.any():
        raise ValueError(f"likelihood ratios need same-writer and different-writer pairs; got {genuine.size} pairs of "
                         "one kind")
    return values, genuine


def _log_lrs_of(lrs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(natural log of each LR [N], genuine [N])``; every LR finite and > 0."""
    values = np.asarray(lrs, dtype=np.float64).reshape(-1)
    if not (np.isfinite(values) & (values > 0)).all():
        raise ValueError("likelihood ratios must be finite and > 0")
    return _scores_and_labels(np.log(values), labels, "likelihood ratios")


def lr_bounds(n_genuine: int, n_forged: int) -> tuple[float, float]:
    """``(smallest, largest)`` LR that ``n_genuine`` same-writer and ``n_forged`` different-writer pairs support."""
    return 1.0 / (n_genuine + 1), float(n_forged + 1)


def _posterior_log_odds(posteriors: np.ndarray) -> np.ndarray:
    """``ln(p / (1 - p))``; p = 1 and p = 0 give +-infinity, which the bounds then clip."""
    with np.errstate(divide="ignore"):
        return np.log(posteriors) - np.log1p(-posteriors)


@dataclass(frozen=True)
class Calibration:
    """The map distance -> likelihood ratio, fitted on a set of pairs; plain data (``to_dict``, ``from_dict``).

    Attributes:
        method: ``"logistic"`` or ``"pav"``: which fit ``log_lrs`` applies (both are kept).
        lr_min, lr_max: the bounds of every LR (``lr_bounds`` of the fitting set).
        prior_log_odds: ``ln(n_genuine / n_forged)`` of the fitting set, taken off the posterior log odds.
        logistic: ``center``, ``scale`` (distance units), ``coef``, ``intercept``: posterior log odds
            ``intercept + coef * (distance - center) / scale``.
        pav_distances, pav_posteriors: the isotonic fit's points (ascending distances, posteriors at the
            fitting prior), linearly interpolated between and constant beyond, as ``IsotonicRegression.predict``.
        fitted_on: what it was fitted on: ``split``, ``n_genuine``, ``n_forged``, ``n_writers`` (``None`` when
            the file names do not say).
    """

    method: str
    lr_min: float
    lr_max: float
    prior_log_odds: float
    logistic: Mapping[str, float]
    pav_distances: tuple[float, ...]
    pav_posteriors: tuple[float, ...]
    fitted_on: Mapping[str, Any]

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"calibration method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0 < self.lr_min <= 1 <= self.lr_max < math.inf:
            raise ValueError(f"LR bounds must satisfy 0 < lr_min <= 1 <= lr_max < inf, got {self.lr_min}, {self.lr_max}")

    @property
    def bounds(self) -> tuple[float, float]:
        """``(lr_min, lr_max)``."""
        return self.lr_min, self.lr_max

    def log_lrs(self, distances: Any) -> np.ndarray:
        """Natural logs of the LRs of ``distances`` (``[N]``, any shape flattened), within ``ln`` of the bounds."""
        values = np.asarray(distances, dtype=np.float64).reshape(-1)
        if not np.isfinite(values).all():
            raise ValueError("distances must be finite to have a likelihood ratio")
        if self.method == "logistic":
            fit = self.logistic
            posterior_log_odds = fit["intercept"] + fit["coef"] * (values - fit["center"]) / fit["scale"]
        else:
            posterior_log_odds = _posterior_log_odds(np.interp(values, self.pav_distances, self.pav_posteriors))
        return np.clip(posterior_log_odds - self.prior_log_odds, math.log(self.lr_min), math.log(self.lr_max))

    def likelihood_ratios(self, distances: Any) -> np.ndarray:
        """The LRs of ``distances`` (``[N]``): finite, within ``bounds``."""
        return np.exp(self.log_lrs(distances))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (``save_calibration``), with the version of this layout and the rule of the bounds."""
        return {"version": CALIBRATION_VERSION, **dataclasses.asdict(self),
                "score": "the model's distance of a pair (smaller = more alike)",
                "bounds_rule": "[1 / (n_genuine + 1), n_forged + 1] of the fitting set"}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        """The ``Calibration`` of ``to_dict``'s data (read back from JSON)."""
        if data.get("version") != CALIBRATION_VERSION:
            raise ValueError(f"calibration version {data.get('version')!r}, this code reads {CALIBRATION_VERSION}")
        fields = {field.name for field in dataclasses.fields(cls)}
        values = {name: value for name, value in data.items() if name in fields}
        return cls(**{**values, "pav_distances": tuple(values["pav_distances"]),
                      "pav_posteriors": tuple(values["pav_posteriors"])})


def fit_calibration(distances: Any, labels: Any, *, method: str = "logistic", split: str = "val",
                    n_writers: int | None = None) -> Calibration:
    """Fit the map distance -> LR on a set of pairs (both fits; ``method`` chooses which one applies).

    Args:
        distances: ``[N]`` finite distances (smaller = more alike).
        labels: ``[N]``, 1 same writer, 0 different writers (forged).
        split, n_writers: recorded in ``fitted_on``.
    """
    from sklearn.isotonic import IsotonicRegression  # here: importing the Verifier must not load SciPy
    from sklearn.linear_model import LogisticRegression

    values, genuine = _scores_and_labels(distances, labels, "distances")
    n_genuine, n_forged = int(genuine.sum()), int((~genuine).sum())
    # The slope is fitted on the standardized distance, so that LOGISTIC_C means the same whatever the distances' scale.
    center, scale = float(values.mean()), float(values.std()) or 1.0
    logistic = LogisticRegression(C=LOGISTIC_C, max_iter=1000).fit(((values - center) / scale)[:, None], genuine)
    coef = float(logistic.coef_[0, 0])
    if coef > 0:
        warnings.warn(f"the {split} split's forged pairs are closer than its genuine pairs (logistic slope {coef:.3g} "
                      "> 0): its likelihood ratios favour the same writer for larger distances", stacklevel=2)
    isotonic = IsotonicRegression(increasing=False, out_of_bounds="clip").fit(values, genuine.astype(np.float64))
    lr_min, lr_max = lr_bounds(n_genuine, n_forged)
    return Calibration(
        method=method, lr_min=lr_min, lr_max=lr_max, prior_log_odds=math.log(n_genuine / n_forged),
        logistic={"center": center, "scale": scale, "coef": coef, "intercept": float(logistic.intercept_[0])},
        pav_distances=tuple(isotonic.X_thresholds_.tolist()), pav_posteriors=tuple(isotonic.y_thresholds_.tolist()),
        fitted_on={"split": split, "n_genuine": n_genuine, "n_forged": n_forged, "n_writers": n_writers},
    )


def _cllr_of(log_lrs: np.ndarray, genuine: np.ndarray) -> float:
    # log2(1 + 1/LR) = logaddexp(0, -ln LR) / ln 2: exact for LRs far beyond the float range of LR itself.
    return float(0.5 * (np.mean(np.logaddexp(0.0, -log_lrs[genuine]))
                        + np.mean(np.logaddexp(0.0, log_lrs[~genuine]))) / math.log(2))


def cllr(lrs: Any, labels: Any) -> float:
    """The log-likelihood-ratio cost (bits) of ``lrs`` (``[N]``, finite, > 0) for ``labels`` (``[N]``, 1 same writer)."""
    return _cllr_of(*_log_lrs_of(lrs, labels))


def _pav_log_lrs(log_lrs: np.ndarray, genuine: np.ndarray, bounds: tuple[float, float] | None) -> np.ndarray:
    from sklearn.isotonic import IsotonicRegression

    # Tied scores are pooled into one value: a set's optimal LRs cannot tell apart pairs its scores do not.
    posteriors = IsotonicRegression(increasing=True).fit_transform(log_lrs, genuine.astype(np.float64))
    lr_min, lr_max = bounds if bounds is not None else (math.exp(log_lrs.min()), math.exp(log_lrs.max()))
    prior_log_odds = math.log(genuine.sum() / (~genuine).sum())
    return np.clip(_posterior_log_odds(posteriors) - prior_log_odds, math.log(lr_min), math.log(lr_max))


def pav_likelihood_ratios(lrs: Any, labels: Any, bounds: tuple[float, float] | None = None) -> np.ndarray:
    """The optimally calibrated LRs of a set: PAV of its own labels on its LRs, the set's prior removed.

    Among all LRs that are a non-decreasing function of ``lrs`` and lie within ``bounds`` (default: the range
    of ``lrs``), these have the lowest Cllr on this set; tied ``lrs`` get one LR. ``[N]`` in, ``[N]`` out.
    """
    log_lrs, genuine = _log_lrs_of(lrs, labels)
    return np.exp(_pav_log_lrs(log_lrs, genuine, bounds))


def cllr_min(lrs: Any, labels: Any, bounds: tuple[float, float] | None = None) -> float:
    """The Cllr (bits) of ``pav_likelihood_ratios(lrs, labels, bounds)``: at most ``cllr(lrs, labels)`` whenever
    ``lrs`` lie within ``bounds`` (always with the default bounds, their own range)."""
    log_lrs, genuine = _log_lrs_of(lrs, labels)
    return _cllr_of(_pav_log_lrs(log_lrs, genuine, bounds), genuine)


def empirical_cross_entropy(lrs: Any, labels: Any, prior_log10_odds: Any) -> np.ndarray:
    """The empirical cross-entropy (bits) of ``lrs`` at each prior (``[P]`` log10 odds of the same writer).

    ``ECE(o) = P * mean_genuine log2(1 + 1 / (LR * O)) + (1 - P) * mean_forged log2(1 + LR * O)``, with ``O``
    the prior odds and ``P = O / (1 + O)``; at even odds (``o = 0``) it is the Cllr. Returns ``[P]``.
    """
    log_lrs, genuine = _log_lrs_of(lrs, labels)
    odds = np.asarray(prior_log10_odds, dtype=np.float64).reshape(-1, 1) * math.log(10)
    prior = 1.0 / (1.0 + np.exp(-odds[:, 0]))
    same = np.mean(np.logaddexp(0.0, -(log_lrs[genuine][None, :] + odds)), axis=1)
    different = np.mean(np.logaddexp(0.0, log_lrs[~genuine][None, :] + odds), axis=1)
    return (prior * same + (1 - prior) * different) / math.log(2)


def evidence_figures(calibration: Calibration, distances: Any, labels: Any,
                     kinds: Sequence[str] | None = None) -> dict[str, Any]:
    """Cllr, Cllr_min and Cllr_cal of ``calibration``'s LRs on a set of pairs, for each kind of forgery.

    Args:
        distances, labels: ``[N]`` (``validate``'s).
        kinds: ``[N]`` ``PAIR_KINDS`` (``genuine``, ``skilled``, ``random``), or ``None`` when the file names do
            not say: then one entry ``all`` of the genuine against every forged pair.

    Returns:
        ``method``, ``lr_bounds``, ``fitted_on``, and ``skilled``, ``random`` (or ``all``): ``cllr``, ``cllr_min``
        (PAV within the calibration's bounds), ``cllr_cal``, ``n_genuine``, ``n_forged``, or ``None`` where the
        set has no such forgery.
    """
    log_lrs = calibration.log_lrs(distances)
    genuine = np.asarray(labels).reshape(-1) == 1
    if kinds is None:
        forgeries = {"all": ~genuine}
    else:
        kind_values = np.asarray(kinds).astype(str)
        forgeries = {kind: kind_values == kind for kind in ("skilled", "random")}
    figures: dict[str, Any] = {"method": calibration.method, "lr_bounds": list(calibration.bounds),
                               "fitted_on": dict(calibration.fitted_on)}
    for kind, forged in forgeries.items():
        if not forged.any() or not genuine.any():
            figures[kind] = None
            continue
        chosen = genuine | forged
        lrs, same = np.exp(log_lrs[chosen]), genuine[chosen]
        total, least = cllr(lrs, same), cllr_min(lrs, same, calibration.bounds)
        figures[kind] = {"cllr": total, "cllr_min": least, "cllr_cal": total - least,
                         "n_genuine": int(same.sum()), "n_forged": int((~same).sum())}
    return figures


def verbal_equivalent(lr: float) -> str:
    """The verbal equivalent of an LR on the ENFSI guideline's scale (``VERBAL_SCALE``), for either proposition.

    ``LR > 1`` supports the same-writer proposition (the query was written by the writer of the references),
    ``LR < 1`` the different-writer proposition, with the strength of ``1 / LR``.
    """
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"a likelihood ratio is finite and > 0, got {lr}")
    if lr == 1:
        return "no support for either proposition"
    strength = max(lr, 1 / lr)
    word = next(word for bound, word in VERBAL_SCALE if strength >= bound)
    return f"{word} support for the {'same' if lr > 1 else 'different'}-writer proposition"


def save_calibration(calibration: Calibration, path: str | Path) -> Path:
    """Write ``calibration`` as JSON (atomically); returns the path."""
    return write_json(path, calibration.to_dict())


def load_calibration(run: str | Path) -> Calibration | None:
    """The calibration of a run folder (``calibration.json`` in it, or beside a checkpoint file), or ``None``."""
    folder = Path(run) if Path(run).is_dir() else Path(run).parent
    path = folder / CALIBRATION
    if not path.is_file():
        return None
    return Calibration.from_dict(json.loads(path.read_text()))


def missing_calibration_note(run: str | Path) -> str:
    """Why a run's decisions have no likelihood ratio, and the step that adds one, in the words of the interface."""
    folder = Path(run) if Path(run).is_dir() else Path(run).parent
    call = f"calibrate_run({str(folder)!r})"
    add = step(f"python finetune.py calibrate --run {folder}",
               f"from training_utils import calibrate_run; {call} in a cell", call)
    return (f"{folder} has no {CALIBRATION} (it was trained before likelihood ratios were reported), so its decisions "
            f"carry no likelihood ratio: add one with {add} (it fits on the run's validation split, without training)")
