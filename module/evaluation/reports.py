"""The reports of a run folder, written from its committed checkpoints: metrics JSON, per-writer CSV, plots, weights.

``evaluate_and_report`` validates a model on a split and writes its files, with
the figures at the run's operating point (``OperatingBasis``: the threshold
``verify`` uses and the calibration of its likelihood ratios);
``report_run`` writes a run's whole report from ``best.pt``; ``calibrate_run``
adds the calibration to a run trained without one; ``report_is_whole`` tells a
report all of whose files were written, and are unchanged, from one that a
kill cut short or that was damaged since (its manifest, written last);
``starting_model_note`` says when a run's model is no better than where it
started; ``explain_worst_errors`` draws why the model made its worst mistakes.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from module.core.io import write_json
from module.core.precision import model_device
from module.core.wording import option
from module.evaluation.calibration import (
    Calibration,
    evidence_figures,
    fit_calibration,
    load_calibration,
    save_calibration,
)
from module.evaluation.evidence_plots import plot_ece, plot_tippett
from module.evaluation.metrics import rates_at_threshold, save_metrics_json, save_per_writer_csv
from module.evaluation.plots import (
    plot_explanation,
    plot_roc_curve,
    plot_score_distribution,
    plot_training_history,
    plot_writer_eers,
)
from module.evaluation.validation import pair_kinds_of, validate, writer_count_of, writer_metrics_of
from module.run.checkpoint import BEST_CHECKPOINT, apply_checkpoint, export_state_dict, read_checkpoint
from module.run.config import FinetuneConfig
from module.run.folder import BEST_WEIGHTS, CALIBRATION, MANIFEST_SUFFIX
from module.run.lock import lock_run_folder
from module.run.state import TrainingRun
from module.run.trained import build_datasets, load_trained_model, run_threshold

__all__ = ["OperatingBasis", "calibrate_run", "evaluate_and_report", "evidence_summary", "explain_worst_errors",
           "record_report", "report_is_whole", "report_run", "starting_model_note", "worst_errors"]

# Below either count a validation split says little about new writers: a writer's pairs are alike, so the
# threshold and the likelihood ratios fitted on 2 or 3 writers follow those writers; and with fewer than 500
# pairs a rate of 10 % is known to about +-2.5 points (two binomial standard errors of 250 pairs a class).
FEW_WRITERS = 5
FEW_PAIRS = 500
# How a split's own figures (eer, threshold, accuracy, far, frr at the top of its metrics) are reached.
OWN_THRESHOLD = ("the EER threshold of this split itself, as papers report (it needs this split's labels, so no "
                 "user can know it in advance; operating_point holds the figures at the threshold verify uses)")


@dataclass(frozen=True)
class OperatingBasis:
    """What a split's figures at a run's operating point rest on: the threshold ``verify`` uses, and the calibration.

    Attributes:
        threshold: the distance threshold (``run_threshold``: the validation split's EER threshold).
        source: where it comes from.
        n_writers: the validation writers it was fitted on (``None`` when the file names do not say).
        n_pairs: the validation pairs it was fitted on.
        calibration: the run's ``calibration.json`` (fitted on the same pairs), or ``None``.
    """

    threshold: float
    source: str
    n_writers: int | None
    n_pairs: int
    calibration: Calibration | None = None

    @classmethod
    def of_run(cls, run: str | Path) -> OperatingBasis | None:
        """The basis of a run folder (or a checkpoint file's folder): its ``val_metrics.json`` and ``calibration.json``;
        ``None`` when it has no validation metrics."""
        folder = Path(run) if Path(run).is_dir() else Path(run).parent
        metrics_file = folder / "val_metrics.json"
        if not metrics_file.is_file():
            return None
        validation = json.loads(metrics_file.read_text())
        n_writers = validation.get("n_writers")
        writers = validation.get("writer_level")
        if n_writers is None and writers:  # a run reported before n_writers was recorded
            n_writers = len(writers["per_writer"]) + len(writers["skipped_writers"])
        threshold, source = run_threshold(folder)
        return cls(threshold, source, n_writers, validation["n_genuine"] + validation["n_forged"],
                   load_calibration(folder))

    def warning(self) -> str | None:
        """Why the figures at this basis may not hold for new writers (too few writers or pairs), or ``None``."""
        few = ([f"{_count(self.n_writers, 'writer')} (fewer than {FEW_WRITERS})"]
               if self.n_writers is not None and self.n_writers < FEW_WRITERS else [])
        few += [f"{_count(self.n_pairs, 'pair')} (fewer than {FEW_PAIRS})"] if self.n_pairs < FEW_PAIRS else []
        if not few:
            return None
        fitted = "the threshold and the likelihood ratios rest" if self.calibration else "the threshold rests"
        return (f"{fitted} on {' and '.join(few)} of the validation split: a writer's pairs are alike, so a few writers "
                "say little of new ones, and few pairs leave the rates uncertain by several points; the test figures "
                "at this threshold show how far off it is")

    def operating_point(self, distances: Any, labels: Any, kinds: Any = None) -> dict[str, Any]:
        """The rates of a split at this threshold (``rates_at_threshold``), with what the threshold rests on."""
        return {"threshold": self.threshold, "source": self.source, "n_val_writers": self.n_writers,
                "n_val_pairs": self.n_pairs, **rates_at_threshold(distances, labels, self.threshold, kinds),
                "warning": self.warning()}


def evaluate_and_report(model: nn.Module, data: Any, out_dir: str | Path, name: str,
                        config: FinetuneConfig, progress: bool = True, *,
                        basis: OperatingBasis | None = None) -> dict[str, Any]:
    """Validate ``model`` on ``data`` (a pair dataset or a ``FeatureCache``) and write its report into ``out_dir``.

    A dataset's features come from, and go to, the feature store of
    ``config`` (``config.feature_store_dir()``). Files: ``{name}_metrics.json`` (no arrays), ``{name}_roc.png``,
    ``{name}_scores.png``; when the file names give each pair's writer and
    kind (``writer_metrics_of``), also ``{name}_per_writer.csv`` and
    ``{name}_writer_eers.png``; last, ``{name}_manifest.json`` (``record_report``). Returns
    ``validate``'s metrics (with ``threshold``, ``distances`` and ``labels``), ``writer_level``
    (``compute_writer_metrics``' dict, or ``None``) and ``n_writers``. Runs on the model's device.

    With a ``basis`` (``OperatingBasis.of_run``: the split is not the one the threshold was fitted on), also
    ``threshold_source`` (the top-level figures are at the split's own EER threshold), ``operating_point``
    (the rates at the threshold ``verify`` uses) and, when the basis has a calibration, ``evidence``
    (``evidence_figures``: Cllr, Cllr_min, Cllr_cal a kind of forgery) with ``{name}_tippett.png`` and
    ``{name}_ece.png``.
    """
    out_dir = Path(out_dir)
    metrics = validate(model, data, batch_size=config.eval_batch_size, amp=config.autocast,
                          feature_dtype=config.feature_dtype, feature_dir=config.feature_store_dir(),
                          num_workers=config.num_workers, progress=progress, desc=name)
    metrics["writer_level"] = writer_metrics_of(data, metrics["distances"], metrics["labels"])
    metrics["n_writers"] = writer_count_of(data)
    written = []
    if basis is not None:
        kinds = pair_kinds_of(data, metrics["labels"])
        metrics["threshold_source"] = OWN_THRESHOLD
        metrics["operating_point"] = basis.operating_point(metrics["distances"], metrics["labels"], kinds)
        if basis.calibration is not None:
            metrics["evidence"] = evidence_figures(basis.calibration, metrics["distances"], metrics["labels"], kinds)
            written += _plot_evidence(basis.calibration, metrics, kinds, out_dir, name)
    written += [save_metrics_json(metrics, out_dir / f"{name}_metrics.json"),
                plot_roc_curve(metrics, out_dir / f"{name}_roc.png", title=f"ROC curve: {name}"),
                plot_score_distribution(metrics, out_dir / f"{name}_scores.png", title=f"Distance distribution: {name}")]
    if metrics["writer_level"] is not None:
        written.append(save_per_writer_csv(metrics["writer_level"], out_dir / f"{name}_per_writer.csv"))
        if metrics["writer_level"]["per_writer"]:
            written.append(plot_writer_eers(metrics["writer_level"], out_dir / f"{name}_writer_eers.png",
                                            title=f"EER of each writer, genuine vs skilled: {name}"))
    record_report(out_dir, name, written)
    return metrics


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()  # a report's files are a few hundred kB at most


def record_report(folder: str | Path, name: str, files: Iterable[str | Path]) -> Path:
    """Write ``{name}_manifest.json`` in ``folder``: the name and SHA-256 of each of the report's ``files``; returns it.

    Write it after the files: a manifest that verifies (``report_is_whole``) then means every one of them was
    written whole, whatever the instant a kill came.
    """
    files = {Path(path).name: _sha256(Path(folder) / Path(path).name) for path in files}
    return write_json(Path(folder) / f"{name}{MANIFEST_SUFFIX}", {"files": files})


def report_is_whole(folder: str | Path, name: str) -> bool:
    """True when the report ``name`` in ``folder`` has its manifest and each file it lists has its recorded SHA-256.

    False for a report a kill cut short (no manifest yet), and for one with a file missing, truncated or changed
    since, or a damaged manifest: it is to be written again.
    """
    folder = Path(folder)
    try:
        files = json.loads((folder / f"{name}{MANIFEST_SUFFIX}").read_text())["files"]
        return bool(files) and all(_sha256(folder / file) == digest for file, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # missing, unreadable, or not a manifest
        return False


def _plot_evidence(calibration: Calibration, metrics: Mapping[str, Any], kinds: Any, out_dir: Path,
                   name: str) -> list[Path]:
    """``{name}_tippett.png`` and ``{name}_ece.png`` of a split's LRs (``calibration`` of ``metrics``' distances)."""
    lrs = calibration.likelihood_ratios(metrics["distances"])
    genuine = np.asarray(metrics["labels"]) == 1
    kind_values = np.asarray(kinds).astype(str) if kinds is not None else np.where(genuine, "genuine", "all")
    forgeries = [kind for kind in ("skilled", "random", "all") if (kind_values == kind).any()]
    return [plot_tippett({kind: lrs[kind_values == kind] for kind in ("genuine", *forgeries)},
                         out_dir / f"{name}_tippett.png",
                         title=f"Tippett plot: {name} (likelihood ratios of {calibration.method} calibration)"),
            plot_ece({kind: (lrs[genuine | (kind_values == kind)], genuine[genuine | (kind_values == kind)])
                      for kind in forgeries}, calibration.bounds, out_dir / f"{name}_ece.png",
                     title=f"Empirical cross-entropy: {name}")]


def _count(number: int, thing: str) -> str:
    """``1 writer``, ``2 writers``."""
    return f"{number} {thing}{'' if number == 1 else 's'}"


def _percent(value: float | None) -> str:
    """A rate for people; ``None`` or NaN (no such pairs) as ``n/a``."""
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f} %"


def evidence_summary(metrics: Mapping[str, Any]) -> list[str]:
    """Lines for people: a split's rates at the threshold ``verify`` uses (and why they may not hold), and the Cllr
    figures of its likelihood ratios; none for a split evaluated without a basis (``evaluate_and_report``)."""
    lines = []
    point = metrics.get("operating_point")
    if point:
        writers = f"{_count(point['n_val_writers'], 'writer')}, " if point["n_val_writers"] is not None else ""
        lines.append(f"at the threshold verify uses, {point['threshold']:.6g} ({point['source']}; {writers}"
                     f"{_count(point['n_val_pairs'], 'pair')}): FRR {_percent(point['frr'])}, FAR skilled "
                     f"{_percent(point['far_skilled'])}, FAR random {_percent(point['far_random'])}, FAR all forged "
                     f"{_percent(point['far'])}, accuracy {_percent(point['accuracy'])}")
        if point["warning"]:
            lines.append(f"warning: {point['warning']}")
    evidence = metrics.get("evidence") or {}
    for kind in ("skilled", "random", "all"):
        figures = evidence.get(kind)
        if figures:
            lines.append(f"likelihood ratios ({evidence['method']} calibration), genuine vs {kind} forgeries "
                         f"({figures['n_genuine']} + {figures['n_forged']} pairs): Cllr {figures['cllr']:.3f}, "
                         f"Cllr_min {figures['cllr_min']:.3f}, Cllr_cal {figures['cllr_cal']:.3f} bits")
    return lines


def calibrate_run(run: str | Path, *, method: str = "logistic", progress: bool = True) -> dict[str, Any]:
    """Fit a trained run's likelihood ratios on its validation split, without training; writes ``calibration.json``.

    For a run trained before the calibration was part of its report (``report_run`` writes it at the end of
    every run). ``method``: ``"logistic"`` or ``"pav"`` (``fit_calibration``). Returns ``evidence_figures`` of
    the validation pairs it was fitted on (in-sample, so optimistic; ``evaluate_and_report`` with
    ``OperatingBasis.of_run`` gives the test split's), with ``path``, the file written.
    """
    config, model = load_trained_model(run)
    data = build_datasets(config, splits=("val",))["val"]
    with lock_run_folder(config.ckpt_dir):
        metrics = validate(model, data, batch_size=config.eval_batch_size, amp=config.autocast,
                           feature_dtype=config.feature_dtype, feature_dir=config.feature_store_dir(),
                           num_workers=config.num_workers, progress=progress, desc="val")
        calibration = fit_calibration(metrics["distances"], metrics["labels"], method=method, split="val",
                                      n_writers=writer_count_of(data))
        path = save_calibration(calibration, Path(config.ckpt_dir) / CALIBRATION)
    kinds = pair_kinds_of(data, metrics["labels"])
    return {**evidence_figures(calibration, metrics["distances"], metrics["labels"], kinds), "path": path}


def starting_model_note(run: str | Path) -> str | None:
    """A warning for a run whose best model is its starting model (epoch 0), or whose backbone is fresh; None otherwise.

    ``run``: a run folder (its ``best.pt`` is read) or a checkpoint file. The
    test EER before and after fine-tuning is quoted when the run folder holds those reports whole
    (``report_is_whole``).
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
            for name in ("test_before", "test") if report_is_whole(folder, name)}
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

    Evaluates the validation split, fits the likelihood ratios on its pairs
    (``calibration.json``), then evaluates the test split at the validation
    threshold with them (``{split}_metrics.json`` and plots, see
    ``evaluate_and_report``), and writes ``history.json``,
    ``history.png`` and ``best_weights.pth`` (the whole model, a plain state
    dict that ``model_v3.load_pretrained`` reads). Every file is derived from
    ``best.pt`` and the history, and rewritten each time, under the run
    folder's lock.
    """
    with lock_run_folder(run.ckpt_dir):
        apply_checkpoint(read_checkpoint(run.best_checkpoint), run.best_checkpoint, run.model,
                         fingerprint=run.frozen_fingerprint or None)
        val = evaluate_and_report(run.model, datasets["val"], run.ckpt_dir, "val", run.config, progress)
        save_calibration(fit_calibration(val["distances"], val["labels"], split="val", n_writers=val["n_writers"]),
                         run.ckpt_dir / CALIBRATION)
        metrics = {"val": val, "test": evaluate_and_report(run.model, datasets["test"], run.ckpt_dir, "test", run.config,
                                                           progress, basis=OperatingBasis.of_run(run.ckpt_dir))}
        save_metrics_json(run.history, run.ckpt_dir / "history.json")
        plot_training_history(run.history, run.ckpt_dir / "history.png")
        export_state_dict(run.best_checkpoint, run.ckpt_dir / BEST_WEIGHTS, model=run.model)
    return metrics
