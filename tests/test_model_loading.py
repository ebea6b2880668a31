"""load_pretrained: every checkpoint wrapper, the module. prefix, and clear refusals."""
from __future__ import annotations

import collections
import pickle
from pathlib import Path

import pytest
import torch

from model_v3 import CheckpointMismatchError, ViT_for_OSV_DSNet, load_pretrained


@pytest.fixture(scope="module")
def source_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return ViT_for_OSV_DSNet().state_dict()


def assert_loaded(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], state[key]) for key in state)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"model_state_dict": s, "epoch": 3, "optimizer_state_dict": {"state": {}, "param_groups": []}},
        lambda s: {"state_dict": s},
        lambda s: {"model": s, "epoch": 1},
        lambda s: collections.OrderedDict((f"module.{k}", v) for k, v in s.items()),
        lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}},
    ],
    ids=["bare", "model_state_dict", "state_dict", "model", "module-prefix", "wrapped-module-prefix"],
)
def test_every_wrapper_loads_from_file_and_memory(tmp_path: Path, source_state, wrap) -> None:
    checkpoint = wrap(source_state)
    path = tmp_path / "weights.pth"
    torch.save(checkpoint, path)
    for given in (path, str(path), checkpoint):
        torch.manual_seed(2)
        model = load_pretrained(ViT_for_OSV_DSNet(), given)
        assert_loaded(model, source_state)


class _Config:  # a class in a checkpoint makes it need pickled code
    lr = 1e-4


def test_checkpoint_with_pickled_code_is_refused(tmp_path: Path, source_state) -> None:
    path = tmp_path / "needs_code.pth"
    torch.save({"model_state_dict": source_state, "config": _Config()}, path)
    with pytest.raises(ValueError, match=r"weights_only=True.*pickled Python objects") as error:
        load_pretrained(ViT_for_OSV_DSNet(), path)
    assert str(path) in str(error.value) and "re-save only its weights" in str(error.value)
    assert isinstance(error.value.__cause__, pickle.UnpicklingError)


def test_mismatch_lists_missing_unexpected_and_wrong_shapes(source_state) -> None:
    state = dict(source_state)
    del state["model.norm.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["head_str.weight"] = torch.zeros(64, 384)
    with pytest.raises(CheckpointMismatchError) as error:
        load_pretrained(ViT_for_OSV_DSNet(), state)
    message = str(error.value)
    assert "missing keys (1):\n    model.norm.weight" in message
    assert "unexpected keys (1):\n    extra.weight" in message
    assert "head_str.weight: checkpoint [64, 384], model [96, 384]" in message


def test_emd_option_mismatch_explains_head_str(source_state) -> None:
    with pytest.raises(CheckpointMismatchError, match="same 'emd' option"):
        load_pretrained(ViT_for_OSV_DSNet({"emd": False}), source_state)
    model = load_pretrained(ViT_for_OSV_DSNet({"emd": False}), source_state, strict=False)
    assert torch.equal(model.state_dict()["model.norm.bias"], source_state["model.norm.bias"])


def test_missing_corrupt_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_pretrained(ViT_for_OSV_DSNet(), tmp_path / "nowhere.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupt.pth"):
        load_pretrained(ViT_for_OSV_DSNet(), corrupt)
    full = tmp_path / "full.pth"
    torch.save({"w": torch.zeros(1000)}, full)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.pth is not a readable PyTorch checkpoint"):
        load_pretrained(ViT_for_OSV_DSNet(), truncated)
    with pytest.raises(ValueError, match="holds no state dict"):
        load_pretrained(ViT_for_OSV_DSNet(), {"epoch": 3, "history": {"loss": [1.0]}})
