"""The reports of a run folder, written from its committed checkpoints: metrics JSON, per-writer CSV, plots, weights.

``evaluate_and_report`` validates a model on a split and writes its files;
``report_run`` writes a run's whole report from ``best.pt``;
``starting_model_note`` says when a run's model is no better than where it
started; ``explain_worst_errors`` draws why the model made its worst mistakes.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from module.core.precision import model_device
from module.core.wording import option
from module.evaluation.metrics import save_metrics_json, save_per_writer_csv
from module.evaluation.plots import (
    plot_explanation,
    plot_roc_curve,
    plot_score_distribution,
    plot_training_history,
    plot_writer_eers,
)
from module.evaluation.validation import validate, writer_metrics_of
from module.run.checkpoint import BEST_CHECKPOINT, apply_checkpoint, export_state_dict, read_checkpoint
from module.run.config import FinetuneConfig
from module.run.folder import BEST_WEIGHTS
from module.run.lock import lock_run_folder
from module.run.state import TrainingRun
from module.run.trained import EVALUATED_SPLITS

__all__ = ["evaluate_and_report", "explain_worst_errors", "report_run", "starting_model_note", "worst_errors"]


def evaluate_and_report(model: nn.Module, data: Any, out_dir: str | Path, name: str,
                        config: FinetuneConfig, progress: bool = True) -> dict[str, Any]:
    """Validate ``model`` on ``data`` (a pair dataset or a ``FeatureCache``) and write its report into ``out_dir``.

    A dataset's features come from, and go to, the feature store of
    ``config`` (``config.feature_store_dir()``). Files: ``{name}_metrics.json`` (no arrays), ``{name}_roc.png``,
    ``{name}_scores.png``; when the file names give each pair's writer and
    kind (``writer_metrics_of``), also ``{name}_per_writer.csv`` and
    ``{name}_writer_eers.png``. Returns ``validate``'s metrics (with
    ``threshold``, ``distances`` and ``labels``) and ``writer_level``
    (``compute_writer_metrics``' dict, or ``None``). Runs on the model's device.
    """
    out_dir = Path(out_dir)
    metrics = validate(model, data, batch_size=config.eval_batch_size, amp=config.autocast,
                          feature_dtype=config.feature_dtype, feature_dir=config.feature_store_dir(),
                          num_workers=config.num_workers, progress=progress, desc=name)
    metrics["writer_level"] = writer_metrics_of(data, metrics["distances"], metrics["labels"])
    save_metrics_json(metrics, out_dir / f"{name}_metrics.json")
    plot_roc_curve(metrics, out_dir / f"{name}_roc.png", title=f"ROC curve: {name}")
    plot_score_distribution(metrics, out_dir / f"{name}_scores.png", title=f"Distance distribution: {name}")
    if metrics["writer_level"] is not None:
        save_per_writer_csv(metrics["writer_level"], out_dir / f"{name}_per_writer.csv")
        if metrics["writer_level"]["per_writer"]:
            plot_writer_eers(metrics["writer_level"], out_dir / f"{name}_writer_eers.png",
                             title=f"EER of each writer, genuine vs skilled: {name}")
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


def worst_errors(metrics: dict[str, Any], threshold: float) -> dict[str, int | None]:
    """Pair indices of the worst mistakes at ``threshold`` (``validate``'s ``distances`` and ``labels``).

    ``"false accept"``: the forged pair with the smallest distance at or below
    the threshold; ``"false reject"``: the genuine pair with the largest
    distance above it; ``None`` where there is no such mistake.
    """
    distances = np.asarray(metrics["distances"], dtype=np.float64).reshape(-1)
    genuine = np.asarray(metrics["labels"]).reshape(-1) == 1
    accepted = np.flatnonzero(~genuine & (distances <= threshold))
    rejected = np.flatnonzero(genuine & (distances > threshold))
    return {
        "false accept": int(accepted[np.argmin(distances[accepted])]) if accepted.size else None,
        "false reject": int(rejected[np.argmax(distances[rejected])]) if rejected.size else None,
    }


def explain_worst_errors(model: nn.Module, dataset: Any, metrics: dict[str, Any], threshold: float,
                         out_dir: str | Path, name: str = "test") -> dict[str, Path | None]:
    """Explanation figures (``plot_explanation``) of the ``worst_errors`` of a pair dataset's ``validate`` metrics.

    Writes ``{name}_worst_false_accept.png`` and ``{name}_worst_false_reject.png``
    into ``out_dir``; returns ``{mistake: path or None}``.
    """
    device = model_device(model)
    figures: dict[str, Path | None] = {}
    for mistake, index in worst_errors(metrics, threshold).items():
        if index is None:
            figures[mistake] = None
            continue
        ref_path, query_path, label = dataset.pairs[index]
        ref, query = dataset.load_image(ref_path), dataset.load_image(query_path)
        explanation = model.explain(ref.to(device), query.to(device))
        title = (f"worst {mistake} of {name}: {Path(query_path).name} against {Path(ref_path).name} "
                 f"({'genuine' if label == 1 else 'forged'})")
        figures[mistake] = plot_explanation(explanation, ref, query,
                                            Path(out_dir) / f"{name}_worst_{mistake.replace(' ', '_')}.png",
                                            threshold=threshold, title=title)
    return figures


def report_run(run: TrainingRun, datasets: Mapping[str, Any], progress: bool = True) -> dict[str, dict[str, Any]]:
    """Load the best epoch into ``run.model`` and write the run folder's reports; returns ``{split: metrics}``.

    Evaluates the validation and test splits (``{split}_metrics.json`` and
    plots, see ``evaluate_and_report``), and writes ``history.json``,
    ``history.png`` and ``best_weights.pth`` (the whole model, a plain state
    dict that ``model_v3.load_pretrained`` reads). Every file is derived from
    ``best.pt`` and the history, and rewritten each time, under the run
    folder's lock.
    """
    with lock_run_folder(run.ckpt_dir):
        apply_checkpoint(read_checkpoint(run.best_checkpoint), run.best_checkpoint, run.model,
                         fingerprint=run.frozen_fingerprint or None)
        metrics = {split: evaluate_and_report(run.model, datasets[split], run.ckpt_dir, split, run.config, progress)
                   for split in EVALUATED_SPLITS}
        save_metrics_json(run.history, run.ckpt_dir / "history.json")
        plot_training_history(run.history, run.ckpt_dir / "history.png")
        export_state_dict(run.best_checkpoint, run.ckpt_dir / BEST_WEIGHTS, model=run.model)
    return metrics
