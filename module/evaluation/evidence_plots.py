"""Figures of likelihood ratios, as PNG files: the Tippett plot and the empirical cross-entropy (ECE) plot.

Drawn as ``module.evaluation.plots`` draws (a bare matplotlib ``Figure``, no pyplot state), written atomically.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from module.evaluation.calibration import empirical_cross_entropy, pav_likelihood_ratios
from module.evaluation.plots import _new_figure, _save

__all__ = ["plot_ece", "plot_tippett"]

# The colour of each kind of pair, as in the score plots: genuine green, forged red (random forgeries orange).
KIND_COLOURS = {"genuine": "tab:green", "skilled": "tab:red", "random": "tab:orange", "all": "tab:red"}
# The priors of the ECE plot: log10 odds of the same writer, from 1 : 1000 to 1000 : 1.
ECE_PRIOR_LOG10_ODDS = np.linspace(-3.0, 3.0, 121)
EVEN_ODDS = int(np.argmin(np.abs(ECE_PRIOR_LOG10_ODDS)))  # where the ECE is the Cllr


def plot_tippett(lrs: Mapping[str, Any], path: str | Path, title: str = "Tippett plot") -> Path:
    """For each kind of pair, the share of its LRs above each value (log10 axis), as a PNG; returns the path.

    ``lrs``: ``{"genuine": [G], "skilled": [S], "random": [R]}`` (any kinds, or ``"all"`` forged pairs), finite
    and > 0. The legend gives the rate of misleading evidence: genuine pairs with LR < 1, forged with LR > 1.
    """
    logs = {kind: np.sort(np.log10(np.asarray(values, dtype=np.float64).reshape(-1))) for kind, values in lrs.items()}
    logs = {kind: values for kind, values in logs.items() if values.size}
    everything = np.concatenate(list(logs.values()))
    margin = 0.05 * max(float(np.ptp(everything)), 1.0)
    left, right = float(everything.min()) - margin, float(everything.max()) + margin
    figure, (axes,) = _new_figure(7, 5.5)
    for kind, log10 in logs.items():
        # Every pair lies above the left edge; past its i-th smallest value, n - 1 - i of the n lie above.
        above = np.concatenate(([1.0], (log10.size - 1 - np.arange(log10.size)) / log10.size, [0.0]))
        misleading = np.mean(log10 < 0) if kind == "genuine" else np.mean(log10 > 0)
        wrong = "LR < 1" if kind == "genuine" else "LR > 1"
        axes.step(np.concatenate(([left], log10, [right])), above, where="post", color=KIND_COLOURS.get(kind),
                  linewidth=2, label=f"{kind} pairs ({log10.size}; {100 * misleading:.1f}% with {wrong})")
    axes.axvline(0.0, color="gray", linestyle="--", linewidth=1)
    axes.set(title=title, xlabel="log10 likelihood ratio (> 0 supports the same writer)",
             ylabel="share of pairs with a larger log10 LR", xlim=(left, right), ylim=(-0.02, 1.02))
    axes.grid(alpha=0.3)
    figure.legend(loc="outside lower center")  # below the axes: the curves fill every corner of them
    return _save(figure, path)


def plot_ece(panels: Mapping[str, tuple[Any, Any]], bounds: tuple[float, float], path: str | Path,
             title: str = "Empirical cross-entropy") -> Path:
    """One ECE panel a kind of forgery: the calibrated LRs, the same after PAV (the minimum), and LR = 1; a PNG.

    ``panels``: ``{kind: (lrs [N], labels [N])}`` (1 same writer); ``bounds``: the calibration's LR bounds,
    within which the PAV LRs are clipped. At prior log10 odds 0 the curves are Cllr and Cllr_min.
    """
    figure, axes_list = _new_figure(6 * len(panels), 4.5, columns=len(panels))
    figure.suptitle(title)
    for axes, (kind, (lrs, labels)) in zip(axes_list, panels.items()):
        genuine = np.asarray(labels).reshape(-1) == 1
        calibrated = empirical_cross_entropy(lrs, labels, ECE_PRIOR_LOG10_ODDS)
        best = empirical_cross_entropy(pav_likelihood_ratios(lrs, labels, bounds), labels, ECE_PRIOR_LOG10_ODDS)
        prior = 1.0 / (1.0 + 10.0 ** -ECE_PRIOR_LOG10_ODDS)
        neutral = -(prior * np.log2(prior) + (1 - prior) * np.log2(1 - prior))  # the ECE of LR = 1 everywhere
        axes.plot(ECE_PRIOR_LOG10_ODDS, calibrated, color="tab:blue", linewidth=2,
                  label=f"calibrated LRs (Cllr {calibrated[EVEN_ODDS]:.3f})")
        axes.plot(ECE_PRIOR_LOG10_ODDS, best, color="tab:blue", linestyle="--",
                  label=f"after PAV on this set (Cllr_min {best[EVEN_ODDS]:.3f})")
        axes.plot(ECE_PRIOR_LOG10_ODDS, neutral, color="gray", linestyle=":", label="an LR of 1 for every pair (no information)")
        axes.axvline(0.0, color="gray", linewidth=0.5)
        # Head room above the curves for the legend.
        top = 1.45 * float(max(neutral.max(), calibrated.max()))
        axes.set(title=f"genuine ({int(genuine.sum())}) vs {kind} forgeries ({int((~genuine).sum())})",
                 xlabel="prior log10 odds of the same writer", ylabel="empirical cross-entropy (bits)", ylim=(0, top))
        axes.grid(alpha=0.3)
        axes.legend(loc="upper right", fontsize="small")
    return _save(figure, path)
