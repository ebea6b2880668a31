"""Plots read at a glance: legends outside the data, and the histograms show where verify decides."""
from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg

from module.evaluation.metrics import compute_metrics
from module.evaluation.plots import score_distribution_figure, writer_eers_figure


def legend_and_axes_boxes(figure):
    canvas = FigureCanvasAgg(figure)
    canvas.draw()  # lays the figure out, as saving it does
    (axes,) = figure.axes
    renderer = canvas.get_renderer()
    return axes.get_legend(), axes.get_legend().get_window_extent(renderer), axes.get_window_extent(renderer)


def split_metrics(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    distances = np.concatenate([rng.normal(0.5, 0.08, 200), rng.normal(0.7, 0.1, 400)])
    labels = np.concatenate([np.ones(200), np.zeros(400)])
    return {**compute_metrics(distances, labels), "distances": distances, "labels": labels}


def test_the_writer_eer_legend_covers_no_bar_and_no_line() -> None:
    # Ten writers with the tallest bars where a legend inside would sit (its upper right).
    eers = [0.05, 0.1, 0.12, 0.15, 0.2, 0.22, 0.25, 0.3, 0.45, 0.5]
    writers = {"eer": 0.24, "eer_user_thresholds": 0.2,
               "per_writer": [{"writer": w + 1, "eer": eer} for w, eer in enumerate(eers)]}
    legend, legend_box, axes_box = legend_and_axes_boxes(writer_eers_figure(writers, "EER of each writer: val"))
    assert not legend_box.overlaps(axes_box), "the legend sits on the bars"
    assert [text.get_text() for text in legend.get_texts()][0].startswith("global EER 24.00%")


def test_the_score_histogram_draws_verifys_threshold_beside_the_splits_own() -> None:
    metrics = split_metrics()
    own = score_distribution_figure(metrics, "test")
    assert [text.get_text() for text in own.axes[0].get_legend().get_texts()][-1].startswith("this split's EER")

    metrics["operating_point"] = {"threshold": 0.74, "frr": 0.01, "far": 0.9}
    figure = score_distribution_figure(metrics, "test")
    legend, legend_box, axes_box = legend_and_axes_boxes(figure)
    labels = [text.get_text() for text in legend.get_texts()]
    assert labels[-1].startswith("verify's threshold 0.74") and "FRR 1.0%, FAR 90.0%" in labels[-1]
    lines = {round(line.get_xdata()[0], 6) for line in figure.axes[0].get_lines()}
    assert lines == {round(metrics["threshold"], 6), 0.74}
    assert not legend_box.overlaps(axes_box), "the legend sits on the histograms"
