"""Figures from metrics, training histories and explanations, as PNG files (matplotlib's Agg, no pyplot state)."""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from module.core.io import atomic_write
from module.evaluation.metrics import ROC_KEYS

if TYPE_CHECKING:
    from model_v3 import Explanation

# Beyond this many writers the per-writer EER plot names none of them (the CSV does).
MAX_WRITER_TICKS = 60

__all__ = ["plot_training_history", "plot_roc_curve", "plot_score_distribution", "plot_writer_eers",
           "plot_explanation", "score_distribution_figure", "writer_eers_figure"]


def _new_figure(width: float, height: float, columns: int = 1) -> tuple[Any, list[Any]]:
    # A bare Figure renders through Agg without pyplot, so no global backend is switched and nothing stays open.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    axes = [figure.add_subplot(1, columns, column + 1) for column in range(columns)]
    return figure, axes


def _save(figure: Any, path: str | Path, dpi: int = 120) -> Path:
    """Write ``figure`` as a PNG, atomically (a plot cut off by a disconnect is never left behind).

    Rendered in memory first, so that a full disk is an ``OSError`` naming the file, whatever matplotlib does.
    """
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
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


def score_distribution_figure(metrics: Mapping[str, Any], title: str = "Distance distribution") -> Any:
    """The figure of ``plot_score_distribution``, not yet saved."""
    missing = [key for key in ("distances", "labels", "threshold", "eer") if key not in metrics]
    if missing:
        raise ValueError(f"metrics lack {missing}: pass the dict returned by validate")
    distances = np.asarray(metrics["distances"], dtype=np.float64).ravel()
    genuine = np.asarray(metrics["labels"]).ravel() == 1
    bins = np.histogram_bin_edges(distances, bins=min(60, max(10, distances.size // 20)))
    figure, (axes,) = _new_figure(10, 4.5)
    axes.hist(distances[genuine], bins=bins, density=True, alpha=0.6, color="tab:green",
              label=f"genuine pairs ({int(genuine.sum())})")
    axes.hist(distances[~genuine], bins=bins, density=True, alpha=0.6, color="tab:red",
              label=f"forged pairs ({int((~genuine).sum())})")
    axes.axvline(metrics["threshold"], color="black", linestyle="--",
                 label=f"this split's EER threshold {metrics['threshold']:.4g}\n(EER {100 * metrics['eer']:.2f}%)")
    point = metrics.get("operating_point")
    if point is not None:
        axes.axvline(point["threshold"], color="tab:blue", linewidth=2,
                     label=f"verify's threshold {point['threshold']:.4g}, the validation split's EER\n"
                           f"threshold (here FRR {100 * point['frr']:.1f}%, FAR {100 * point['far']:.1f}%)")
    axes.set(title=title, xlabel="distance (smaller = more likely genuine; accepted at or below a threshold)",
             ylabel="density")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)  # beside the bars, never on them
    return figure


def plot_score_distribution(metrics: Mapping[str, Any], path: str | Path, title: str = "Distance distribution") -> Path:
    """Histograms of genuine and forged pair distances with the split's EER threshold, as a PNG; returns the path.

    ``metrics`` is ``validate``'s output (it holds ``distances``, ``labels`` and ``threshold``). With the
    ``operating_point`` of ``evaluate_and_report`` (a split other than the validation split), the threshold
    ``verify`` decides at is drawn too, with the error rates there.
    """
    return _save(score_distribution_figure(metrics, title), path)


def writer_eers_figure(writer_metrics: Mapping[str, Any], title: str = "EER of each writer") -> Any:
    """The figure of ``plot_writer_eers``, not yet saved."""
    records = writer_metrics["per_writer"]
    if not records:
        raise ValueError("no writer has both genuine and skilled pairs: there are no per-writer EERs to plot")
    records = sorted(records, key=lambda record: record["eer"])
    figure, (axes,) = _new_figure(min(16.0, max(6.0, 0.25 * len(records) + 2)), 5)
    positions = np.arange(len(records))
    axes.bar(positions, [100 * record["eer"] for record in records], color="tab:blue",
             label=f"each writer's own threshold (pooled {100 * writer_metrics['eer_user_thresholds']:.2f}%)")
    axes.axhline(100 * writer_metrics["eer"], color="tab:red", linestyle="--",
                 label=f"global EER {100 * writer_metrics['eer']:.2f}% (one threshold for all)")
    if len(records) <= MAX_WRITER_TICKS:
        axes.set_xticks(positions, [str(record["writer"]) for record in records],
                        rotation=90 if len(records) > 20 else 0, fontsize=8 if len(records) > 20 else 10)
    axes.set(xlabel="writer" if len(records) <= MAX_WRITER_TICKS else f"{len(records)} writers, by EER",
             ylabel="EER, genuine vs skilled (%)")
    axes.grid(alpha=0.3, axis="y")
    # Above the axes, under the figure's title: a legend inside would cover the tallest bars or the global line.
    axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.01), ncols=2 if len(records) > 12 else 1,
                borderaxespad=0, frameon=False)
    figure.suptitle(title)
    return figure


def plot_writer_eers(writer_metrics: Mapping[str, Any], path: str | Path, title: str = "EER of each writer") -> Path:
    """One bar a writer: its EER at its own threshold, against the global EER; returns the path.

    ``writer_metrics`` is ``compute_writer_metrics``' output.
    """
    return _save(writer_eers_figure(writer_metrics, title), path)


def _gray_image(image: Any) -> np.ndarray:
    """A model input (``[1, S, S]`` or ``[S, S]``, ink bright in [0, 1]) as ``[S, S]`` dark ink on white paper."""
    array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image, dtype=np.float64)
    return 1 - array.reshape(array.shape[-2:])


def _patch_centres(positions: Any, grid: tuple[int, int], shape: tuple[int, ...]) -> np.ndarray:
    """``[K, 2]`` (x, y) pixel centres of token-grid ``positions`` ``[K, 2]`` (row, column) on an image of ``shape``."""
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    cell = np.array([shape[1] / grid[1], shape[0] / grid[0]])
    return (positions[:, ::-1] + 0.5) * cell


def _share_map(shares: np.ndarray, positions: Any, grid: tuple[int, int]) -> np.ndarray:
    """``[rows, columns]`` grid of each kept token's share (NaN where no token was kept)."""
    share_grid = np.full(grid, np.nan)
    for (row, column), share in zip(np.asarray(positions).reshape(-1, 2), shares):
        share_grid[row, column] = share
    return share_grid


def plot_explanation(explanation: Explanation, ref_image: Any, query_image: Any, path: str | Path, *,
                     threshold: float | None = None, title: str | None = None, max_lines: int = 20,
                     dpi: int = 100) -> Path:
    """Why the model gave a pair its distance, as a PNG; returns the path.

    Top: both scans side by side, the ``max_lines`` strongest matches of the
    transport plan (largest mass) drawn between patch centres, coloured by
    their cost and as thick as their mass. Bottom: for each scan, each
    patch's share of the structural distance (its row or column of
    ``plan * cost``). The title gives the distances and, with ``threshold``,
    the decision (genuine when ``distance <= threshold``).

    Args:
        explanation: ``ViT_for_OSV_DSNet.explain``'s output for the pair.
        ref_image, query_image: the images the model saw (``[1, S, S]`` or ``[S, S]``, ink bright on black).
        title: a first line above the distances (e.g. which pair this is).
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch

    ref, query = _gray_image(ref_image), _gray_image(query_image)
    plan, cost = (np.asarray(values, dtype=np.float64) for values in (explanation.plan, explanation.cost))
    grid = tuple(explanation.grid)
    ref_centres = _patch_centres(explanation.ref_positions, grid, ref.shape)
    query_centres = _patch_centres(explanation.query_positions, grid, query.shape) + [ref.shape[1] * 1.1, 0]

    figure = Figure(figsize=(10, 9), layout="constrained")
    top, bottom = figure.subfigures(2, 1, height_ratios=[1.1, 1])
    match_axes = top.add_subplot(1, 1, 1)
    gap = np.ones((max(ref.shape[0], query.shape[0]), int(ref.shape[1] * 0.1)))
    canvas = np.ones((gap.shape[0], ref.shape[1] + gap.shape[1] + query.shape[1]))
    canvas[:ref.shape[0], :ref.shape[1]] = ref
    canvas[:query.shape[0], ref.shape[1] + gap.shape[1]:] = query
    match_axes.imshow(canvas, cmap="gray", vmin=0, vmax=1)
    cost_colours = colormaps["RdYlGn_r"]
    cost_scale = Normalize(vmin=float(cost.min()), vmax=float(cost.max())) if cost.size else Normalize(0, 1)
    if plan.size:
        strongest = np.argsort(plan, axis=None)[::-1][:max_lines]
        rows, columns = np.unravel_index(strongest, plan.shape)
        widest = plan[rows[0], columns[0]]
        for row, column in zip(rows[::-1], columns[::-1]):  # the strongest drawn last, on top
            # Arcs, not straight lines: matches between the same rows would otherwise run along each other.
            match_axes.add_patch(FancyArrowPatch(
                ref_centres[column], query_centres[row], arrowstyle="-", connectionstyle="arc3,rad=-0.3",
                color=cost_colours(cost_scale(cost[row, column])), linewidth=0.5 + 3 * plan[row, column] / widest,
                alpha=0.85))
        match_axes.plot(*ref_centres.T, ".", color="tab:blue", markersize=4)
        match_axes.plot(*query_centres.T, ".", color="tab:blue", markersize=4)
    top.colorbar(ScalarMappable(cost_scale, cost_colours), ax=match_axes, shrink=0.8,
                 label="cost of the match (smaller = more alike)")
    match_axes.set_title(f"reference (left) and query (right): the {min(max_lines, plan.size)} strongest matches "
                         "of the transport plan", fontsize=10)
    match_axes.set_axis_off()

    contribution = plan * cost
    total = contribution.sum() or 1.0
    share_scale = Normalize(vmin=0, vmax=max(100 * contribution.sum(1).max(initial=0) / total,
                                             100 * contribution.sum(0).max(initial=0) / total, 1e-9))
    for column, (name, image, shares, positions) in enumerate((
            ("reference", ref, contribution.sum(0), explanation.ref_positions),
            ("query", query, contribution.sum(1), explanation.query_positions))):
        axes = bottom.add_subplot(1, 2, column + 1)
        axes.imshow(image, cmap="gray", vmin=0, vmax=1)
        axes.imshow(100 * _share_map(shares / total, positions, grid), cmap="Reds", norm=share_scale, alpha=0.55,
                    extent=(0, image.shape[1], image.shape[0], 0), interpolation="nearest")
        axes.set_title(f"{name}: each patch's share of the structural distance", fontsize=10)
        axes.set_axis_off()
    bottom.colorbar(ScalarMappable(share_scale, "Reds"), ax=bottom.axes, shrink=0.8,
                    label="share of the structural distance (%)")

    lines = [title] if title else []
    lines.append(f"distance {explanation.distance:.4f} = global {explanation.global_distance:.4f} + "
                 f"{explanation.temp:g} x structural {explanation.structural_distance:.4f}")
    if threshold is not None:
        decision = "GENUINE" if explanation.distance <= threshold else "FORGED"
        lines[-1] += f"; threshold {threshold:.4f}: {decision}"
    figure.suptitle("\n".join(lines))
    return _save(figure, path, dpi=dpi)
