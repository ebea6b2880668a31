"""The order of an epoch's training pairs, the same whatever the number of processes.

Every process draws the same order for an epoch (a permutation seeded by
``(seed, epoch)`` of all the training pairs, or of the epoch's sample
``epoch_pair_sample``), cut into global batches of ``batch_size`` pairs;
each process takes its share of each global batch (``EpochSampler``). The
augmentation of a pair is drawn from torch's generator seeded by ``(seed,
epoch, pair index)`` (``SeededItems``), so it is the same on any process and
in any loader worker. Each process scales its mean loss by its share of the
global batch (``share_weight``), so DistributedDataParallel's gradient
average equals the gradient of the global batch's mean loss on one process.
One process and N processes therefore take the same optimizer steps, up to
the order of floating-point sums; and a resumed run draws what an
uninterrupted one would, with no random state to carry.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from module.core.distributed import SINGLE_PROCESS, ProcessGroup

__all__ = ["EpochSampler", "SeededItems", "epoch_batches", "epoch_pair_sample", "item_seed", "share", "share_weight"]


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of pair ``index``'s augmentation in ``epoch``: the same on every process and loader worker."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def epoch_pair_sample(labels: np.ndarray, max_pairs: int, seed: int, epoch: int) -> np.ndarray | None:
    """The pair indices an epoch trains on when there are more than ``max_pairs`` (``None``: all of them).

    A fresh sample each epoch, without replacement, that keeps the
    genuine/forgery ratio of ``labels`` (``[P]``); it depends only on
    ``seed`` and ``epoch``, so a resumed run draws the same pairs. Sorted.
    """
    if max_pairs <= 0 or max_pairs >= len(labels):
        return None
    rng = np.random.default_rng([seed, epoch])
    genuine = np.flatnonzero(labels == 1)
    forged = np.flatnonzero(labels != 1)
    n_genuine = round(max_pairs * len(genuine) / len(labels))
    chosen = np.concatenate([rng.choice(genuine, n_genuine, replace=False),
                             rng.choice(forged, max_pairs - n_genuine, replace=False)])
    return np.sort(chosen)


def epoch_batches(pairs: int | np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The global batches of ``epoch``: the pair indices ``pairs`` (or ``range(pairs)``) in an order seeded by
    ``(seed, epoch)``, cut into batches of ``batch_size``.

    The last, smaller batch is kept; ``share`` splits any batch over any number of processes.
    """
    pairs = np.arange(pairs) if isinstance(pairs, (int, np.integer)) else np.asarray(pairs)
    if len(pairs) < 1:
        raise ValueError("there are no training pairs")
    order = pairs[np.random.default_rng([seed, epoch]).permutation(len(pairs))]
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def share(items: np.ndarray, group: ProcessGroup) -> np.ndarray:
    """This process's share of ``items`` (a global batch, the images to embed): contiguous, the first shares one
    longer when the processes do not divide them."""
    return np.array_split(items, group.world_size)[group.rank]


def share_weight(share_size: int, batch_size: int, group: ProcessGroup) -> float:
    """What a process multiplies its mean loss over ``share_size`` pairs by, so that the average of the
    processes' gradients (DistributedDataParallel's) is the gradient of the mean loss over the ``batch_size``
    pairs of the global batch.
    """
    return share_size * group.world_size / batch_size


class EpochSampler(Sampler[list[Any]]):
    """Batches of this process's share of each global batch of an epoch (``epoch_batches``); ``set_epoch`` first.

    Args:
        n_pairs: the training pairs, all of them.
        batch_size: pairs in a global batch, over all processes.
        seed: the run's seed.
        group: this process's place among the processes.
        max_pairs: train each epoch on ``epoch_pair_sample`` of at most this many pairs (0: all), drawn
            with the genuine/forgery ratio of ``labels`` (``[n_pairs]``).
        with_seeds: items are ``(pair index, augmentation seed)`` for ``SeededItems``; else pair indices.

    A process whose share of a global batch is empty (fewer pairs than
    processes) gets the batch's first pair, and ``shares()`` tells the loop
    to weigh it 0, so that every process takes part in every gradient exchange.
    """

    def __init__(self, n_pairs: int, batch_size: int, seed: int, group: ProcessGroup = SINGLE_PROCESS,
                 max_pairs: int = 0, labels: np.ndarray | None = None, with_seeds: bool = False) -> None:
        if max_pairs and labels is None:
            raise ValueError("an epoch sample of max_pairs pairs keeps the class ratio: give the pairs' labels")
        self.n_pairs, self.batch_size, self.seed, self.group = n_pairs, batch_size, seed, group
        self.max_pairs, self.labels, self.with_seeds = max_pairs, labels, with_seeds
        self.set_epoch(1)

    def set_epoch(self, epoch: int) -> None:
        """Draw ``epoch``'s order, once: ``shares``, ``__iter__`` and ``__len__`` read it."""
        self.epoch = epoch
        sample = epoch_pair_sample(self.labels, self.max_pairs, self.seed, epoch) if self.max_pairs else None
        self._shares = []
        for batch in epoch_batches(self.n_pairs if sample is None else sample, self.batch_size, self.seed, epoch):
            mine = share(batch, self.group)
            self._shares.append((mine, len(mine), len(batch)) if len(mine) else (batch[:1], 0, len(batch)))

    def shares(self) -> list[tuple[np.ndarray, int, int]]:
        """``(pair indices to load, pairs that count, global batch size)`` for each global batch of the epoch."""
        return self._shares

    def __iter__(self) -> Iterator[list[Any]]:
        for indices, _, _ in self._shares:
            if self.with_seeds:
                yield [(int(index), item_seed(self.seed, self.epoch, int(index))) for index in indices]
            else:
                yield [int(index) for index in indices]

    def __len__(self) -> int:
        return len(self._shares)


class SeededItems(Dataset):
    """``dataset[index]`` with torch's random state seeded by the item's own seed, then put back.

    Items are keyed ``(index, seed)`` (``EpochSampler(with_seeds=True)``); the
    pair augmentation (torchvision's transforms draw from torch's generator)
    is then a function of the pair and the epoch alone.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


