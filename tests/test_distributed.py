"""The epoch order and its shares: the pieces that make the result independent of the number of processes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from module.core.distributed import ProcessGroup, gather_in_order
from module.data.epoch_order import EpochSampler, SeededItems, epoch_batches, item_seed, share_weight


def test_one_order_an_epoch_cut_into_global_batches() -> None:
    batches = epoch_batches(37, 16, seed=3, epoch=2)
    assert [len(batch) for batch in batches] == [16, 16, 5]
    assert sorted(np.concatenate(batches).tolist()) == list(range(37))
    again = epoch_batches(37, 16, seed=3, epoch=2)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))  # a function of (seed, epoch) alone
    assert not np.array_equal(np.concatenate(batches), np.concatenate(epoch_batches(37, 16, seed=3, epoch=3)))
    with pytest.raises(ValueError, match="no training pairs"):
        epoch_batches(0, 16, seed=3, epoch=1)


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_the_processes_shares_make_up_each_global_batch_and_their_weights_sum_to_one(world_size: int) -> None:
    groups = [ProcessGroup(rank, world_size) for rank in range(world_size)]
    samplers = [EpochSampler(37, 6, seed=1, group=group) for group in groups]
    for sampler in samplers:
        sampler.set_epoch(4)
    global_batches = epoch_batches(37, 6, seed=1, epoch=4)
    per_process = [sampler.shares() for sampler in samplers]
    for number, batch in enumerate(global_batches):
        counted = [per_process[rank][number] for rank in range(world_size)]
        loaded = np.concatenate([indices[:n] for indices, n, _ in counted])
        assert np.array_equal(loaded, batch), "the shares are the global batch, in order"
        assert all(total == len(batch) for _, _, total in counted)
        weights = [share_weight(n, total, group) for (_, n, total), group in zip(counted, groups)]
        assert sum(weights) / world_size == pytest.approx(1.0)  # DistributedDataParallel averages over processes
        assert all(len(indices) >= 1 for indices, _, _ in counted), "every process takes part in every step"
    assert [len(list(sampler)) for sampler in samplers] == [len(global_batches)] * world_size


def test_an_epoch_sample_is_drawn_in_the_same_order_by_any_number_of_processes() -> None:
    labels = np.array([1] * 30 + [0] * 70)
    alone = EpochSampler(100, 8, seed=2, max_pairs=20, labels=labels)
    pair = [EpochSampler(100, 8, seed=2, group=ProcessGroup(rank, 2), max_pairs=20, labels=labels) for rank in range(2)]
    for sampler in (alone, *pair):
        sampler.set_epoch(3)
    together = [index for batches in zip(*pair) for batch in batches for index in batch]
    assert together == [index for batch in alone for index in batch]
    assert len(together) == 20 and sum(labels[together]) == 6  # the class ratio kept
    alone.set_epoch(4)
    assert sorted(index for batch in alone for index in batch) != sorted(together)  # a fresh sample each epoch


def test_item_seeds_are_stable_and_distinct() -> None:
    seeds = {item_seed(42, epoch, index) for epoch in range(1, 4) for index in range(100)}
    assert len(seeds) == 300 and all(0 <= seed < 2**63 for seed in seeds)
    assert item_seed(42, 1, 7) == item_seed(42, 1, 7) != item_seed(43, 1, 7)


class RandomPairs(Dataset):
    """Draws from torch's generator as the pair augmentation does."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(3) + index


def test_seeded_items_draw_the_same_augmentation_in_any_process_or_worker() -> None:
    sampler = EpochSampler(10, 4, seed=5, with_seeds=True)
    sampler.set_epoch(2)
    items = SeededItems(RandomPairs())
    in_process = torch.cat([torch.stack(batch) for batch in DataLoader(items, batch_sampler=sampler, collate_fn=list)])
    torch.manual_seed(123)  # the global state does not matter
    in_workers = torch.cat([torch.stack(batch) for batch in DataLoader(items, batch_sampler=sampler, collate_fn=list,
                                                                      num_workers=2)])
    assert torch.equal(in_process, in_workers)
    state = torch.get_rng_state()
    items[(3, 99)]
    assert torch.equal(torch.get_rng_state(), state), "the global state is put back"
    two_processes = [EpochSampler(10, 4, seed=5, group=ProcessGroup(rank, 2), with_seeds=True) for rank in range(2)]
    for process in two_processes:
        process.set_epoch(2)
    keys = [key for batches in zip(*two_processes) for batch in batches for key in batch]
    assert keys == [key for batch in sampler for key in batch]


def test_gather_in_order_alone() -> None:
    values = torch.tensor([[3.0], [1.0], [2.0]])
    assert gather_in_order(values, np.array([2, 0, 1]), 3, ProcessGroup()).view(-1).tolist() == [1.0, 2.0, 3.0]


def test_autocast_dtype_is_cuda_only_and_bfloat16_only_where_the_gpu_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from module.core.precision import autocast_dtype

    cuda = torch.device("cuda")
    assert autocast_dtype("bfloat16", torch.device("cpu")) is None and autocast_dtype(False, cuda) is None
    assert autocast_dtype(True, cuda) == autocast_dtype("float16", cuda) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert autocast_dtype("bfloat16", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ValueError, match="Tesla T4 has no bfloat16.*use amp_dtype='float16'"):
        autocast_dtype("bfloat16", cuda)
