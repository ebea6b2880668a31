"""Data parallelism across the processes ``torchrun`` starts, with one result whatever their number.

``torchrun --nproc_per_node=N finetune.py train ...`` starts N copies of the
command; ``join_process_group`` connects them (NCCL on CUDA, gloo on CPU) from
the variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``). Nothing here is specific to one node:
several nodes are the same command with torchrun's rendezvous options.

Why the result does not depend on N:

* every process draws the same order of training pairs for an epoch (a
  permutation seeded by ``(seed, epoch)``), cut into global batches of
  ``batch_size`` pairs; each process takes its share of each global batch
  (``EpochSampler``);
* the augmentation of a pair is drawn from torch's generator seeded by
  ``(seed, epoch, pair index)`` (``SeededItems``), so it is the same on any
  process and in any loader worker;
* each process scales its loss by its share of the global batch
  (``share_weight``), so DistributedDataParallel's gradient average equals the
  gradient of the global batch's mean loss on one process.

One process and N processes therefore take the same optimizer steps, up to
the order of floating-point sums.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Sampler

__all__ = [
    "ProcessGroup",
    "EpochSampler",
    "SeededItems",
    "SINGLE_PROCESS",
    "epoch_batches",
    "gather_in_order",
    "item_seed",
    "join_process_group",
    "leave_process_group",
    "share_weight",
]

# Long enough for rank 0 to write a checkpoint to a slow Drive while the others wait at a barrier.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class ProcessGroup:
    """Where this process stands among the data-parallel processes (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, metrics, plots and logs."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait until every process gets here (nothing to wait for alone)."""
        if self.is_distributed:
            dist.barrier()


SINGLE_PROCESS = ProcessGroup()


def join_process_group(device: torch.device) -> tuple[ProcessGroup, torch.device]:
    """Join the process group torchrun describes in the environment; ``(SINGLE_PROCESS, device)`` without torchrun.

    Args:
        device: the device the settings ask for; under torchrun on CUDA each
            process takes ``cuda:LOCAL_RANK`` instead.

    Returns:
        ``(group, device this process uses)``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE_PROCESS, device
    group = ProcessGroup(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", group.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return group, device


def leave_process_group() -> None:
    """Close the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of pair ``index``'s augmentation in ``epoch``: the same on every process and loader worker."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def epoch_batches(n_pairs: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The global batches of ``epoch``: a permutation of the ``n_pairs`` pair indices seeded by ``(seed, epoch)``,
    cut into batches of ``batch_size``.

    The last, smaller batch is kept; ``share`` splits any batch over any number of processes.
    """
    if n_pairs < 1:
        raise ValueError("there are no training pairs")
    order = np.random.default_rng([seed, epoch]).permutation(n_pairs)
    return [order[start:start + batch_size] for start in range(0, n_pairs, batch_size)]


def share(batch: np.ndarray, group: ProcessGroup) -> np.ndarray:
    """This process's share of a global batch: contiguous, the first ones one pair longer when it does not divide."""
    return np.array_split(batch, group.world_size)[group.rank]


def share_weight(share_size: int, batch_size: int, group: ProcessGroup) -> float:
    """What a process multiplies its mean loss over ``share_size`` pairs by, so that the average of the
    processes' gradients (DistributedDataParallel's) is the gradient of the mean loss over the ``batch_size``
    pairs of the global batch.
    """
    return share_size * group.world_size / batch_size


class EpochSampler(Sampler[list[Any]]):
    """Batches of this process's share of each global batch of an epoch (``epoch_batches``); call ``set_epoch`` first.

    Items are pair indices, or ``(pair index, augmentation seed)`` with
    ``with_seeds`` (for ``SeededItems``). A process whose share of a global
    batch is empty (fewer pairs than processes) gets the batch's first pair,
    and ``shares()`` tells the loop to weigh it 0, so that every process
    takes part in every gradient exchange.
    """

    def __init__(self, n_pairs: int, batch_size: int, seed: int, group: ProcessGroup = SINGLE_PROCESS,
                 with_seeds: bool = False) -> None:
        self.n_pairs, self.batch_size, self.seed, self.group, self.with_seeds = n_pairs, batch_size, seed, group, with_seeds
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shares(self) -> list[tuple[np.ndarray, int, int]]:
        """``(pair indices to load, pairs that count, global batch size)`` for each global batch of the epoch."""
        result = []
        for batch in epoch_batches(self.n_pairs, self.batch_size, self.seed, self.epoch):
            mine = share(batch, self.group)
            result.append((mine, len(mine), len(batch)) if len(mine) else (batch[:1], 0, len(batch)))
        return result

    def __iter__(self) -> Iterator[list[Any]]:
        for indices, _, _ in self.shares():
            if self.with_seeds:
                yield [(int(index), item_seed(self.seed, self.epoch, int(index))) for index in indices]
            else:
                yield [int(index) for index in indices]

    def __len__(self) -> int:
        return -(-self.n_pairs // self.batch_size)


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


def gather_in_order(values: torch.Tensor, indices: np.ndarray, total: int, group: ProcessGroup) -> torch.Tensor:
    """Every process's ``values`` (rows for the items ``indices``) put together in item order on every process.

    Args:
        values: ``[n, ...]`` this process's rows, on its device.
        indices: ``[n]`` the item index of each row.
        total: the number of items over all processes.

    Returns:
        ``[total, ...]`` on the CPU.
    """
    if not group.is_distributed:
        ordered = torch.empty((total, *values.shape[1:]), dtype=values.dtype)
        ordered[torch.as_tensor(indices)] = values.cpu()
        return ordered
    gathered: list[Any] = [None] * group.world_size
    dist.all_gather_object(gathered, (np.asarray(indices), values.cpu()))
    ordered = torch.empty((total, *values.shape[1:]), dtype=values.dtype)
    for part_indices, part_values in gathered:
        ordered[torch.as_tensor(part_indices)] = part_values
    return ordered


def all_reduce_sum(values: Sequence[float], group: ProcessGroup, device: torch.device) -> list[float]:
    """The sums over all processes of a few numbers (float64)."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    if group.is_distributed:
        dist.all_reduce(tensor)
    return tensor.tolist()


def wrap_for_data_parallel(module: nn.Module, group: ProcessGroup, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel when there are several processes; ``module`` itself alone.

    Buffers are not broadcast (the frozen BatchNorm statistics never change).
    """
    if not group.is_distributed:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)
