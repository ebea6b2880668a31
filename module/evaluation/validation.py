"""A model's distances, loss and metrics on a set of pairs: per pair, per writer, and against several references.

``validate`` runs the model in eval mode (the Sinkhorn's evaluation
epsilon) over a pair dataset, a ``FeatureCache`` or a ``DataLoader`` of
image pairs. ``writer_metrics_of`` adds the writer-level figures, reading
each pair's writer and kind from its file names; ``evaluate_with_references``
evaluates the way a bank verifies: each query against several references of
its writer.
"""
from __future__ import annotations

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

from models.errors import InputError
from models.loss import NonFiniteLossError
from module.core.distributed import SINGLE_PROCESS, ProcessGroup, gather_in_order
from module.core.precision import model_device
from module.core.progress import progress_bar
from module.core.wording import option
from module.data.datasets import pair_kind, signature_of
from module.data.epoch_order import share
from module.evaluation.metrics import AGGREGATES, compute_metrics, compute_writer_metrics
from module.features.cache import FeatureCache, compute_features
from module.features.loaders import pair_distances
from module.run.config import FinetuneConfig

__all__ = ["evaluate_with_references", "pair_kinds_of", "reference_trials", "validate", "writer_count_of",
           "writer_metrics_of"]


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
) -> dict[str, Any]:
    """Metrics and loss of ``model`` (eval mode, Sinkhorn eval epsilon) on a set of pairs.

    Args:
        data: a pair dataset (each distinct image is embedded once, then the
            pairs are compared), a ``FeatureCache`` of one, or a ``DataLoader``
            of image pairs (the per-pair path: two backbone passes per pair).
        amp: autocast of the backbone on CUDA (``True``, or an ``AMP_DTYPES`` name).
        group: the processes of a torchrun job: each compares its share of the
            pairs (of a dataset or cache), and every process gets all the distances.

    Returns:
        ``compute_metrics``' dict plus ``loss`` (the mean loss per pair), ``distances`` ``[P]`` float64 and
        ``labels`` ``[P]`` int64.
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
            for batch in progress_bar(loader, desc=desc, unit="batch", leave=False, disable=not (progress and group.is_main)):
                distance, label = pair_distances(model, batch, device, amp)
                distances.append(distance.detach().double().cpu().reshape(-1))
                labels.append(label.cpu().reshape(-1))
            all_distances, all_labels = torch.cat(distances), torch.cat(labels)
            if mine is not None and group.is_distributed:
                all_distances = gather_in_order(all_distances, mine, total, group)
                all_labels = gather_in_order(all_labels, mine, total, group)
            if not len(all_distances):
                raise InputError(f"{desc} got no pairs")
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
    return metrics


def _pair_paths(data: Any) -> list[tuple[str, str]]:
    """(reference, query) paths of each pair of a pair dataset or a ``FeatureCache``, in order."""
    if isinstance(data, FeatureCache):
        return [(data.paths[ref], data.paths[query]) for ref, query in data.pair_rows.tolist()]
    return [(ref, query) for ref, query, _ in data.pairs]


def _kinds_and_doubt(data: Any, labels: Any) -> tuple[list[tuple[str, str]], list[str | None], str | None]:
    """``(pairs, each pair's kind read from its file names, why the kinds cannot be used or None)``."""
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
    return pairs, kinds, reason


def pair_kinds_of(data: Any, labels: Any) -> list[str] | None:
    """Each pair's kind (``PAIR_KINDS``) read from the file names of a pair dataset or ``FeatureCache``, ``[N]``;
    ``None`` when a name follows no layout or a kind disagrees with its label (``labels``, ``[N]``)."""
    _, kinds, doubt = _kinds_and_doubt(data, labels)
    return None if doubt is not None else kinds


def writer_count_of(data: Any) -> int | None:
    """How many writers the references of a pair dataset (or ``FeatureCache``) come from; ``None`` when a file
    name follows no layout."""
    writers = {signature_of(ref) for ref, _ in _pair_paths(data)}
    return None if None in writers else len({signature.writer for signature in writers})


def writer_metrics_of(data: Any, distances: Any, labels: Any) -> dict[str, Any] | None:
    """``compute_writer_metrics`` of a pair dataset's (or ``FeatureCache``'s) distances, kinds read from file names.

    ``None``, with a warning saying why, when a file name follows no layout,
    a kind disagrees with its label, or no pair is a skilled forgery.
    """
    pairs, kinds, reason = _kinds_and_doubt(data, labels)
    if reason is None and "skilled" not in kinds:
        reason = "no pair holds a skilled forgery"
    if reason is not None:
        warnings.warn(f"no writer-level figures: {reason}", stacklevel=2)
        return None
    return compute_writer_metrics(distances, [signature_of(ref).writer for ref, _ in pairs], kinds)


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
        writer = signature_of(ref).writer
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
        raise InputError(f"{option('references')} must be 1 or more, got {references}")
    if aggregate not in AGGREGATES:
        raise InputError(f"{option('aggregate')} must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    trials, left_out = reference_trials(_pair_paths(data), references, np.random.default_rng(seed))
    if not trials:
        raise InputError(f"no writer of {getattr(data, 'pair_file', 'the pairs')} has more than {references} genuine "
                         f"signatures (or their file names follow no known layout): use a smaller {option('references')}")
    cache = data if isinstance(data, FeatureCache) else compute_features(
        model, data, batch_size=config.eval_batch_size, dtype=config.feature_dtype,
        feature_dir=config.feature_store_dir(), amp=config.autocast, num_workers=config.num_workers, progress=progress,
        desc="embedding images")
    row_of = {path: row for row, path in enumerate(cache.paths)}
    pair_rows = torch.tensor([[row_of[ref], row_of[query]] for refs, query, _, _ in trials for ref in refs])
    labels = torch.tensor([[float(kind == "genuine")] for _, _, _, kind in trials for _ in range(references)])
    trial_cache = FeatureCache(cache.paths, cache.tokens, cache.kept, pair_rows, labels, block=cache.block)
    pair_metrics = validate(model, trial_cache, batch_size=config.eval_batch_size, amp=config.autocast,
                               progress=progress, desc=f"{references} references a query")
    distances = getattr(np, aggregate)(pair_metrics["distances"].reshape(len(trials), references), axis=1)
    metrics = compute_writer_metrics(distances, [writer for _, _, writer, _ in trials], [kind for *_, kind in trials])
    metrics.update(references=references, aggregate=aggregate, seed=seed, n_trials=len(trials),
                   writers_left_out=left_out)
    return metrics
