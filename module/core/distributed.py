"""Data parallelism across the processes ``torchrun`` starts.

``torchrun --nproc_per_node=N finetune.py train ...`` starts N copies of the
command; ``join_process_group`` connects them (NCCL on CUDA, gloo on CPU)
from the variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``). Nothing here is specific to one node:
several nodes are the same command with torchrun's rendezvous options.
Rank 0 (``ProcessGroup.is_main``) holds the run folder's lock and writes
every file; the others read. Why the result does not depend on N is
``module/epoch_order.py``'s business.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "ProcessGroup",
    "SINGLE_PROCESS",
    "all_reduce_sum",
    "broadcast_from_main",
    "current_group",
    "end_this_worker_quietly",
    "end_with_the_launcher",
    "gather_in_order",
    "join_process_group",
    "leave_process_group",
    "wrap_for_data_parallel",
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


def current_group() -> ProcessGroup:
    """This process's place among the ones torchrun started, from the environment (``SINGLE_PROCESS`` without torchrun).

    Readable before the process group is joined: the run folder's lock, the
    logs and the files are rank 0's business from the start.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE_PROCESS
    return ProcessGroup(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def join_process_group(device: torch.device) -> tuple[ProcessGroup, torch.device]:
    """Join the process group torchrun describes in the environment; ``(SINGLE_PROCESS, device)`` without torchrun.

    Args:
        device: this process's device (``FinetuneConfig.resolved_device``: under torchrun its own GPU).

    Returns:
        ``(group, device)``.
    """
    group = current_group()
    if not group.is_distributed:
        return group, device
    end_with_the_launcher()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return group, device


_watched: list[int] = []  # the launcher's pid, once a watch runs


def end_with_the_launcher(period_s: float = 0.5) -> None:
    """Under torchrun, end this worker when the process that started it is gone, say after a ``kill -9`` of torchrun.

    Workers run in sessions of their own, so nothing else would stop them: they would train to the end of the run
    holding the run folder's lock. A daemon thread watches the parent's pid; once the worker has been handed to
    another parent (init, pid 1, is never torchrun), it kills its own process (``SIGKILL``: a worker blocked in a
    collective would never handle a gentler signal; the run folder is safe against a kill at any instant, and the
    lock goes with the process). Call it as early as the process can (``finetune.py train`` does); a second call
    does nothing.
    """
    if current_group().world_size <= 1 or _watched:
        return
    launcher = os.getppid()
    _watched.append(launcher)

    def watch() -> None:
        while os.getppid() == launcher and launcher != 1:
            time.sleep(period_s)
        print(f"torchrun (process {launcher}) is gone: stopping this worker (rank {os.environ.get('RANK', '?')}); "
              "run the same command again to continue after the last finished epoch", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="end-with-torchrun", daemon=True).start()


def end_this_worker_quietly() -> NoReturn:
    """End this torchrun worker (not rank 0) at once, saying nothing, with status 0: rank 0 says why the job stops.

    Status 0, because a worker that exits with another one first makes torchrun stop the others with SIGTERM,
    rank 0 too, maybe before it has printed its reason; torchrun's own status is then rank 0's failure (1). At
    once (``os._exit``), because the worker holds nothing: rank 0 holds the run folder's lock and writes every file.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def leave_process_group() -> None:
    """Close the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def gather_in_order(values: torch.Tensor, indices: np.ndarray, total: int, group: ProcessGroup) -> torch.Tensor:
    """Every process's ``values`` (rows for the items ``indices``) put together in item order on every process.

    Args:
        values: ``[n, ...]`` this process's rows, on its device.
        indices: ``[n]`` the item index of each row.
        total: the number of items over all processes.

    Returns:
        ``[total, ...]`` on the CPU.
    """
    parts: list[Any] = [(np.asarray(indices), values.cpu())]
    if group.is_distributed:
        parts = [None] * group.world_size
        dist.all_gather_object(parts, (np.asarray(indices), values.cpu()))
    ordered = torch.empty((total, *values.shape[1:]), dtype=values.dtype)
    for part_indices, part_values in parts:
        ordered[torch.as_tensor(part_indices)] = part_values
    return ordered


def all_reduce_sum(values: Sequence[float], group: ProcessGroup, device: torch.device) -> list[float]:
    """The sums over all processes of a few numbers (float64)."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    if group.is_distributed:
        dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_from_main(value: Any, group: ProcessGroup) -> Any:
    """Rank 0's ``value`` (any picklable object) on every process: one decision for the whole job."""
    if not group.is_distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def wrap_for_data_parallel(module: nn.Module, group: ProcessGroup, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel when there are several processes; ``module`` itself alone.

    Buffers are not broadcast (the frozen BatchNorm statistics never change).
    """
    if not group.is_distributed:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)
