"""Evaluation: a model's distances, loss and metrics on a set of pairs, and the reports written from them.

``validate`` runs the model in eval mode (the Sinkhorn's evaluation
epsilon) over a pair dataset, a ``FeatureCache`` or a ``DataLoader`` of
image pairs; ``evaluate_and_report`` also writes the metrics JSON, the
writer-level figures and the ROC and distance plots.
``evaluate_with_references`` evaluates the way a bank verifies: each query
against several references of its writer. ``explain_worst_errors`` draws why
the model made its worst mistakes.
"""
from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from module.checkpoint import BEST_CHECKPOINT, read_checkpoint
from module.config import FinetuneConfig
from module.distributed import SINGLE_PROCESS, ProcessGroup, gather_in_order
from module.epoch_order import share
from module.features import FeatureCache, compute_features, model_device, pair_distances
from module.loss import NonFiniteLossError
from module.metrics import (AGGREGATES, compute_metrics, compute_writer_metrics, save_metrics_json,
                            save_per_writer_csv)
from module.pair_files import pair_kind, signature_of
from module.plots import plot_explanation, plot_roc_curve, plot_score_distribution, plot_writer_eers
from module.wording import option

__all__ = ["validate", "evaluate_and_report", "starting_model_note", "writer_metrics_of", "evaluate_with_references",
           "worst_errors", "explain_worst_errors"]


def validate(
    model: nn.Module,
    data: Any,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 64,
    amp: bool | str = False,
    feature_dtype: str | torch.dtype = "float32",
    feature_dir: str | Path = "",
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "validation",
    group: ProcessGroup = SINGLE_PROCESS,
) -> tuple[float, dict[str, Any]]:
    """Loss and metrics of ``model`` (eval mode, Sinkhorn eval epsilon) on a set of pairs.

    Args:
        data: a pair dataset (each distinct image is embedded once, then the
            pairs are compared), a ``FeatureCache`` of one, or a ``DataLoader``
            of image pairs (the per-pair path: two backbone passes per pair).
        amp: autocast of the backbone on CUDA (``True``, or an ``AMP_DTYPES`` name).
        group: the processes of a torchrun job: each compares its share of the
            pairs (of a dataset or cache), and every process gets all the distances.

    Returns:
        ``(loss, metrics)``: the mean loss per pair, and ``compute_metrics``'
        dict plus ``loss``, ``distances`` ``[P]`` float64 and ``labels`` ``[P]`` int64.
    """
    device = torch.device(device) if device is not None else model_device(model)
    if isinstance(data, DataLoader):
        loader, mine, total = data, None, None
    else:
        cache = data if isinstance(data, FeatureCache) else compute_features(
            model, data, batch_size=batch_size, device=device, dtype=feature_dtype, feature_dir=feature_dir,
            amp=amp, num_workers=num_workers, progress=progress, desc=f"{desc}: embedding images", group=group)
        mine, total = share(np.arange(len(cache)), group), len(cache)
        loader = DataLoader(cache, batch_size=batch_size, sampler=mine.tolist(), collate_fn=cache.collate)
    distances, labels = [torch.empty(0, dtype=torch.float64)], [torch.empty(0)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not (progress and group.is_main)):
                distance, label = pair_distances(model, batch, device, amp)
                distances.append(distance.detach().double().cpu().reshape(-1))
                labels.append(label.cpu().reshape(-1))
            all_distances, all_labels = torch.cat(distances), torch.cat(labels)
            if mine is not None and group.is_distributed:
                all_distances = gather_in_order(all_distances, mine, total, group)
                all_labels = gather_in_order(all_labels, mine, total, group)
            if not len(all_distances):
                raise ValueError("validation got no pairs")
            # From every pair's distance at once: the same number whatever the batches or the processes were.
            loss = model.loss_fn(all_distances.reshape(-1, 1), all_labels.double().reshape(-1, 1)).item()
    finally:
        model.train(was_training)
    all_distances, all_labels = all_distances.numpy(), all_labels.numpy().astype(np.int64)
    if not math.isfinite(loss):
        bad = int((~np.isfinite(all_distances)).sum())
        raise NonFiniteLossError(f"{desc} loss is {loss}: {bad} of {len(all_distances)} distances are NaN or infinite")
    metrics = compute_metrics(all_distances, all_labels)
    metrics.update(loss=loss, distances=all_distances, labels=all_labels)
    return loss, metrics


def _pair_paths(data: Any) -> list[tuple[str, str]]:
    """(reference, query) paths of each pair of a pair dataset or a ``FeatureCache``, in order."""
    if isinstance(data, FeatureCache):
        return [(data.paths[ref], data.paths[query]) for ref, query in data.pair_rows.tolist()]
    return [(ref, query) for ref, query, _ in data.pairs]


def writer_metrics_of(data: Any, distances: Any, labels: Any) -> dict[str, Any] | None:
    """``compute_writer_metrics`` of a pair dataset's (or ``FeatureCache``'s) distances, kinds read from file names.

    ``None``, with a warning saying why, when a file name follows no layout,
    a kind disagrees with its label, or no pair is a skilled forgery.
    """
    pairs = _pair_paths(data)
    kinds = [pair_kind(ref, query) for ref, query in pairs]
    labels = np.asarray(labels).reshape(-1)
    unknown = next((index for index, kind in enumerate(kinds) if kind is None), None)
    mislabelled = next((index for index, kind in enumerate(kinds)
                        if kind is not None and (kind == "genuine") != (labels[index] == 1)), None)
    reason = None
    if unknown is not None:
        reason = (f"the kind of pair {pairs[unknown]} is not known from its file names (genuine, skilled or random "
                  "forgery of a CEDAR, BHSig or GPDS layout)")
    elif mislabelled is not None:
        reason = f"pair {pairs[mislabelled]} is labelled {labels[mislabelled]}, but its file names make it {kinds[mislabelled]}"
    elif "skilled" not in kinds:
        reason = "no pair holds a skilled forgery"
    if reason is not None:
        warnings.warn(f"no writer-level figures: {reason}", stacklevel=2)
        return None
    return compute_writer_metrics(distances, [signature_of(ref)[0] for ref, _ in pairs], kinds)


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
    _, metrics = validate(model, data, batch_size=config.eval_batch_size, amp=config.autocast,
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
def reference_trials(pairs: Sequence[tuple[str, str]], references: int,
                     rng: np.random.Generator) -> tuple[list[tuple[list[str], str, int, str]], list[int]]:
    """The trials of a bank's protocol over the images of ``pairs`` (kinds from file names; others are ignored).

    Each writer's genuine signatures are its references. Every genuine
    signature of a writer is a query against ``references`` other genuine
    signatures of that writer; every skilled forgery of it and every random
    forgery claimed as it (the query of a random pair) against ``references``
    of its genuine signatures; the references are drawn by ``rng``.

    Returns:
        ``(trials, writers left out)``: trials as ``(reference paths, query
        path, writer, kind)``; a writer with ``references`` or fewer genuine
        signatures is left out.
    """
    genuine: dict[int, set[str]] = defaultdict(set)
    forged: dict[int, set[str]] = defaultdict(set)
    claimed: dict[int, set[str]] = defaultdict(set)
    for ref, query in pairs:
        kind = pair_kind(ref, query)
        if kind is None:
            continue
        writer = signature_of(ref)[0]
        genuine[writer].add(ref)
        queries = {"genuine": genuine, "skilled": forged, "random": claimed}[kind]
        queries[writer].add(query)
    trials, left_out = [], []
    for writer in sorted(genuine):
        own = sorted(genuine[writer])
        if len(own) <= references:
            left_out.append(writer)
            continue
        for query in own:
            others = [path for path in own if path != query]
            trials.append(([others[i] for i in rng.choice(len(others), references, replace=False)], query, writer,
                           "genuine"))
        for kind, queries in (("skilled", forged[writer]), ("random", claimed[writer])):
            for query in sorted(queries):
                trials.append(([own[i] for i in rng.choice(len(own), references, replace=False)], query, writer, kind))
    return trials, left_out


def evaluate_with_references(model: nn.Module, data: Any, references: int, config: FinetuneConfig, *,
                             aggregate: str = "mean", seed: int = 42, progress: bool = True) -> dict[str, Any]:
    """The images of a pair dataset evaluated as a bank verifies: each query against ``references`` of its writer.

    Trials are ``reference_trials`` (references drawn with ``seed``); a
    trial's distance is the ``aggregate`` (``mean``, ``min`` or ``max``) of
    its query's distances to its references. Each distinct image is
    embedded once (eval mode, on the model's device).

    Returns:
        ``compute_writer_metrics`` of the trials (``eer``, ``threshold``,
        ``frr``, ``far_skilled``, ``far_random``, ...), plus ``references``,
        ``aggregate``, ``seed``, ``n_trials`` and ``writers_left_out``
        (too few genuine signatures for that many references).
    """
    if references < 1:
        raise ValueError(f"references must be 1 or more, got {references}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    trials, left_out = reference_trials(_pair_paths(data), references, np.random.default_rng(seed))
    if not trials:
        raise ValueError(f"no writer of {getattr(data, 'pair_file', 'the pairs')} has more than {references} genuine "
                         "signatures (or their file names follow no known layout): use fewer references")
    cache = data if isinstance(data, FeatureCache) else compute_features(
        model, data, batch_size=config.eval_batch_size, dtype=config.feature_dtype,
        feature_dir=config.feature_store_dir(), amp=config.autocast, num_workers=config.num_workers, progress=progress,
        desc="embedding images")
    row_of = {path: row for row, path in enumerate(cache.paths)}
    pair_rows = torch.tensor([[row_of[ref], row_of[query]] for refs, query, _, _ in trials for ref in refs])
    labels = torch.tensor([[float(kind == "genuine")] for _, _, _, kind in trials for _ in range(references)])
    trial_cache = FeatureCache(cache.paths, cache.tokens, cache.kept, pair_rows, labels)
    _, pair_metrics = validate(model, trial_cache, batch_size=config.eval_batch_size, amp=config.autocast,
                               progress=progress, desc=f"{references} references a query")
    distances = getattr(np, aggregate)(pair_metrics["distances"].reshape(len(trials), references), axis=1)
    metrics = compute_writer_metrics(distances, [writer for _, _, writer, _ in trials], [kind for *_, kind in trials])
    metrics.update(references=references, aggregate=aggregate, seed=seed, n_trials=len(trials),
                   writers_left_out=left_out)
    return metrics


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
