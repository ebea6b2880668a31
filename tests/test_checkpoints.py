"""Checkpoints: atomic, checksummed, weights_only-loadable, what trains only, RNG states restored, corrupt files
skipped, retention."""
from __future__ import annotations

import os
import pickle
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from models.weights import checksum_path, read_torch_file
from module.run.checkpoint import frozen_fingerprint, trained_state_keys
from module.run.folder import prune_checkpoints
from module.run.schedule import GradualWarmupScheduler
from training_utils import (
    CheckpointError,
    FinetuneConfig,
    capture_rng_state,
    epoch_checkpoint_path,
    export_state_dict,
    find_latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.norm = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(x))


def training_objects(seed: int = 0):
    torch.manual_seed(seed)
    model = TinyModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=3)
    scheduler = GradualWarmupScheduler(optimizer, multiplier=4, total_epoch=1, after_scheduler=cosine)
    return model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, steps: int = 3) -> None:
    for _ in range(steps):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def write(path, model, optimizer, scheduler, epoch: int = 1):
    return save_checkpoint(
        path, model=model, epoch=epoch, config=FinetuneConfig(epochs=4), history={"epoch": [0, 1], "val_eer": [0.5, 0.4]},
        optimizer=optimizer, scheduler=scheduler, best_metric=0.4, best_epoch=1,
    )


def test_roundtrip_loads_with_weights_only_and_restores_everything(tmp_path) -> None:
    model, optimizer, scheduler = training_objects()
    train_steps(model, optimizer, scheduler)
    path = write(tmp_path / "epoch_0001.pt", model, optimizer, scheduler)

    raw = torch.load(path, weights_only=True)
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()
    assert raw["config"] == FinetuneConfig(epochs=4).to_dict() and raw["epoch"] == 1

    restored_model, restored_optimizer, restored_scheduler = training_objects(seed=1)
    checkpoint = load_checkpoint(path, restored_model, restored_optimizer, restored_scheduler)
    assert checkpoint["best_metric"] == 0.4 and checkpoint["history"]["val_eer"] == [0.5, 0.4]
    for key, value in model.state_dict().items():
        assert torch.equal(value, restored_model.state_dict()[key]), key
    assert restored_scheduler.get_last_lr() == scheduler.get_last_lr()
    # Both continue identically: the same optimizer moments and schedule.
    torch.manual_seed(3)
    train_steps(model, optimizer, scheduler)
    torch.manual_seed(3)
    train_steps(restored_model, restored_optimizer, restored_scheduler)
    for key, value in model.state_dict().items():
        assert torch.equal(value, restored_model.state_dict()[key]), key
    assert restored_scheduler.get_last_lr() == scheduler.get_last_lr()


def test_rng_states_restore_every_stream() -> None:
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.normal()  # leaves a cached Gaussian in NumPy's state
    state = capture_rng_state()

    def draw():
        return (torch.rand(3), np.random.rand(3), random.random())

    first = draw()
    restore_rng_state(state)
    second = draw()
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]
    # A checkpoint written before the epoch order was seeded by (seed, epoch) also holds the data order's state.
    restore_rng_state({**state, "data_order": torch.Generator().get_state()})
    assert torch.equal(draw()[0], first[0])


def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path) -> None:
    model, optimizer, scheduler = training_objects()
    path = write(tmp_path / "epoch_0001.pt", model, optimizer, scheduler)
    before = path.read_bytes()

    with pytest.raises((AttributeError, pickle.PicklingError, TypeError)):  # torch.save cannot write a function
        save_checkpoint(path, model=model, epoch=2, config=FinetuneConfig(), history={"epoch": [lambda: None]})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0001.pt", "epoch_0001.pt.sha256"]
    load_checkpoint(path, model)  # still verifies against its checksum


def test_a_checkpoint_holds_what_trains_and_the_fingerprint_of_the_rest(tmp_path) -> None:
    model, optimizer, scheduler = training_objects()
    model.linear.requires_grad_(False)
    model.linear.eval()
    optimizer = torch.optim.AdamW(model.norm.parameters(), lr=1e-3)
    path = save_checkpoint(tmp_path / "epoch_0001.pt", model=model, epoch=1, config=FinetuneConfig(), optimizer=optimizer)
    raw = torch.load(path, weights_only=True)
    # The trainable BatchNorm's parameters and its running statistics; not the frozen linear layer.
    assert list(raw["trained_state_dict"]) == ["norm.weight", "norm.bias", "norm.running_mean", "norm.running_var",
                                              "norm.num_batches_tracked"]
    assert list(raw["trained_state_dict"]) == trained_state_keys(model)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in raw["trained_state_dict"].items())
    assert raw["frozen_fingerprint"] == frozen_fingerprint(model, raw["trained_state_dict"])

    same_base, _, _ = training_objects()  # the same seed: the same frozen linear layer
    load_checkpoint(path, same_base)
    assert all(torch.equal(value, same_base.state_dict()[key]) for key, value in model.state_dict().items())
    other_base, _, _ = training_objects(seed=1)
    with pytest.raises(CheckpointError, match="trained on other frozen weights"):
        load_checkpoint(path, other_base)
    with pytest.raises(CheckpointError, match="holds only the trained tensors"):
        export_state_dict(path, tmp_path / "weights.pth")
    exported = read_torch_file(export_state_dict(path, tmp_path / "weights.pth", model=same_base))
    assert set(exported) == set(model.state_dict()) and checksum_path(tmp_path / "weights.pth").is_file()


def test_a_flipped_bit_is_detected_and_a_missing_checksum_refused(tmp_path) -> None:
    model, optimizer, scheduler = training_objects()
    path = write(tmp_path / "epoch_0001.pt", model, optimizer, scheduler)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"epoch_0001.pt is damaged .*SHA-256.*epoch_0001.pt.sha256"):
        load_checkpoint(path, model)
    path = write(tmp_path / "epoch_0002.pt", model, optimizer, scheduler)
    checksum_path(path).unlink()
    with pytest.raises(CheckpointError, match="no checksum file epoch_0002.pt.sha256"):
        load_checkpoint(path, model)


def test_corrupt_latest_checkpoint_is_skipped_with_a_warning(tmp_path) -> None:
    model, optimizer, scheduler = training_objects()
    for epoch in (1, 2, 3):
        write(epoch_checkpoint_path(tmp_path, epoch), model, optimizer, scheduler, epoch=epoch)
    assert find_latest_checkpoint(tmp_path) == tmp_path / "epoch_0003.pt"

    latest = tmp_path / "epoch_0003.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # truncated, as by a disconnect
    (tmp_path / "epoch_0004.pt").write_bytes(b"not a checkpoint")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert find_latest_checkpoint(tmp_path) == tmp_path / "epoch_0002.pt"
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 2
    assert messages[0].startswith("skipping checkpoint epoch_0004.pt")
    assert messages[1].startswith("skipping checkpoint epoch_0003.pt") and "damaged" in messages[1]
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(latest, model)


def test_no_checkpoint_gives_none(tmp_path) -> None:
    assert find_latest_checkpoint(tmp_path / "missing") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_latest_checkpoint(tmp_path) is None


def test_a_plain_state_dict_is_not_taken_for_a_checkpoint(tmp_path) -> None:
    model, _, _ = training_objects()
    torch.save(model.state_dict(), tmp_path / "epoch_0001.pt")
    with pytest.raises(CheckpointError, match="load_pretrained"):
        load_checkpoint(tmp_path / "epoch_0001.pt", model)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing.pt", model)


def test_pruning_keeps_the_newest_and_the_best(tmp_path) -> None:
    model, optimizer, scheduler = training_objects()
    for epoch in range(1, 6):
        write(epoch_checkpoint_path(tmp_path, epoch), model, optimizer, scheduler, epoch=epoch)
    (tmp_path / "best.pt").write_bytes(b"kept")
    (tmp_path / ".epoch_0006.pt.k3j2.tmp").write_bytes(b"left by a killed process")
    (tmp_path / "epoch_0006.pt.sha256").write_text("0" * 64 + "  epoch_0006.pt\n")  # its file was never renamed in
    prune_checkpoints(tmp_path, keep_last=2, keep_epochs=[2])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pt", "epoch_0002.pt", "epoch_0002.pt.sha256", "epoch_0004.pt", "epoch_0004.pt.sha256",
        "epoch_0005.pt", "epoch_0005.pt.sha256"]
    # A run set back to epoch 4 (epoch 5 was damaged): epoch 5 goes, and the newest are counted from epoch 4.
    prune_checkpoints(tmp_path, keep_last=1, keep_epochs=[2], current_epoch=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pt", "epoch_0002.pt", "epoch_0002.pt.sha256", "epoch_0004.pt", "epoch_0004.pt.sha256"]


def test_export_state_dict_is_plain_weights(tmp_path) -> None:
    from model_v3 import load_pretrained

    model, optimizer, scheduler = training_objects()
    train_steps(model, optimizer, scheduler)
    path = write(tmp_path / "epoch_0001.pt", model, optimizer, scheduler)
    exported = torch.load(export_state_dict(path, tmp_path / "weights.pth"), weights_only=True)
    assert set(exported) == set(model.state_dict())
    fresh, _, _ = training_objects(seed=5)
    load_pretrained(fresh, tmp_path / "weights.pth")
    assert all(torch.equal(value, fresh.state_dict()[key]) for key, value in model.state_dict().items())
