"""The loaders of both paths and the training step's distances.

``make_pair_loader`` builds the loader of either path: over a
``FeatureCache`` (batches of ``CachedPairBatch``) or over a pair dataset
(batches of images, two backbone passes a pair); ``make_epoch_loader`` is the
training loop's, in the order of ``module/data/epoch_order.py``.
``pair_distances`` (and ``PairDistances``, the module DistributedDataParallel
wraps) gives a batch's distances on either path.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from module.core.distributed import SINGLE_PROCESS, ProcessGroup
from module.core.precision import autocast
from module.data.epoch_order import EpochSampler, SeededItems
from module.features.cache import CachedPairBatch, FeatureCache, pair_labels
from module.features.store import LAST_BLOCK

__all__ = ["PairDistances", "make_epoch_loader", "make_pair_loader", "pair_distances"]


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; NumPy and random are derived from it so that
    # augmentation drawing from either differs between workers and epochs and repeats on resume.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_pair_loader(
    data: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A ``DataLoader`` of pairs: over a ``FeatureCache`` (fast path) or a pair dataset (per-pair path).

    ``generator`` orders the pairs and seeds the workers. Batches are
    ``CachedPairBatch`` (fast path) or ``(pairs [B, 2, S, S], labels [B, 1, 1])``
    (per-pair path). The training loop uses ``make_epoch_loader`` instead.
    """
    generator = generator if generator is not None else torch.Generator()
    if isinstance(data, FeatureCache):
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=data.collate)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers,
                      worker_init_fn=_seed_worker, pin_memory=pin_memory)


def make_epoch_loader(data: Dataset, batch_size: int, seed: int, *, group: ProcessGroup = SINGLE_PROCESS,
                      max_pairs: int = 0, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """The training loop's loader: this process's share of each global batch, in the epoch's order.

    Call ``loader.batch_sampler.set_epoch(epoch)`` before each epoch; its
    ``shares()`` are the loss weights (``module/epoch_order.py``). Over a
    pair dataset each pair's augmentation is seeded by the pair and the
    epoch, whichever process or worker loads it.
    """
    fast = isinstance(data, FeatureCache)
    sampler = EpochSampler(len(data), batch_size, seed, group, max_pairs=max_pairs,
                           labels=pair_labels(data) if max_pairs else None, with_seeds=not fast)
    if fast:
        return DataLoader(data, batch_sampler=sampler, collate_fn=data.collate)
    return DataLoader(SeededItems(data), batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator())  # the loader's own seed is not drawn from the global generator


def pair_distances(model: nn.Module, batch: Any, device: torch.device, amp: bool | str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(distance [B, 1], labels [B, 1])`` of a batch from either path.

    The per-pair path computes what ``model.forward`` does: two backbone
    passes, then ``compare``; ``compare`` runs outside autocast, and the EMD in float64.
    """
    if isinstance(batch, CachedPairBatch):
        ref, query = batch.ref.to(device), batch.query.to(device)
        if batch.block != LAST_BLOCK:  # features where the frozen part ends: the trained blocks finish them
            with autocast(device, amp):  # stored float16 features enter the blocks as float32 (or autocast's)
                ref = model.embed_from(ref.to(dtype=torch.float32), batch.block)
                query = model.embed_from(query.to(dtype=torch.float32), batch.block)
        return model.compare(ref, query), batch.labels.to(device)
    pairs, labels = batch
    pairs = pairs.to(device, non_blocking=True)
    with autocast(device, amp):
        ref, query = model.embed(pairs[:, 0:1]), model.embed(pairs[:, 1:2])
    distance = model.compare(ref, query)
    return distance, labels.reshape(-1, 1).to(device, torch.float32)


class PairDistances(nn.Module):
    """``pair_distances`` of a model as a module, which DistributedDataParallel can wrap for the training step.

    ``forward(batch, device, amp) -> (distance [B, 1], labels [B, 1])``, either path's batch.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any, device: torch.device, amp: bool | str) -> tuple[torch.Tensor, torch.Tensor]:
        return pair_distances(self.model, batch, device, amp)
