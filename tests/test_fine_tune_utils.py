"""Freezing: only head_str trains, and the frozen part's BatchNorm stays in eval mode through model.train()."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from model_v3 import ViT_for_OSV_DSNet
from models.fine_tune_utils import (
    backbone_blocks,
    build_optimizer_for_head_only,
    print_trainable_params,
    setup_head_only_finetune,
    unfreeze_last_blocks,
)
from prepare_datasets import generate_cedar_pairs, make_synthetic_dataset
from sig_dataloader_colab import SigDataset_CEDAR_Colab
from training_utils import make_pair_loader, train_one_epoch

HEAD_PARAMETERS = 384 * 96 + 96
ALL_PARAMETERS = 21_024_544


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("cedar")
    make_synthetic_dataset(root, "cedar", n_writers=4, n_genuine=4, n_forged=4, seed=3, image_size=96, progress=False)
    generate_cedar_pairs(root, train_ratio=0.5)
    return str(root)


def batch_norms(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]


def test_only_head_str_trains(capsys) -> None:
    model = setup_head_only_finetune(ViT_for_OSV_DSNet())
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable == ["head_str.weight", "head_str.bias"]
    counts = print_trainable_params(model)
    assert counts == {"trainable": HEAD_PARAMETERS, "total": ALL_PARAMETERS}
    assert "trainable parameters: 36,960 of 21,024,544" in capsys.readouterr().out


def test_frozen_part_stays_in_eval_mode_through_train() -> None:
    model = setup_head_only_finetune(ViT_for_OSV_DSNet())
    for _ in range(2):
        model.train()
        assert model.training and model.head_str.training  # the Sinkhorn epsilon follows model.training
        assert not model.model.training
        assert batch_norms(model) and not any(norm.training for norm in batch_norms(model))
        model.eval()
        assert not any(module.training for module in model.modules())


def test_without_the_hold_batchnorm_statistics_would_move() -> None:
    # Why the hold exists: freezing parameters and calling .eval() once is undone by a plain nn.Module.train().
    model = ViT_for_OSV_DSNet()
    for parameter in model.model.parameters():
        parameter.requires_grad_(False)
    model.model.eval()
    nn.Module.train(model)
    before = batch_norms(model)[0].running_mean.clone()
    model.embed(torch.rand(2, 1, 64, 64))
    assert not torch.equal(before, batch_norms(model)[0].running_mean)


def test_the_hold_survives_pickling_and_copying() -> None:
    """The hold is ViT_for_OSV_DSNet's own train(), not a patch on one instance that a copy would lose."""
    model = setup_head_only_finetune(ViT_for_OSV_DSNet())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        twin.train()
        assert twin.training and twin.head_str.training
        assert not twin.model.training and not any(norm.training for norm in batch_norms(twin))
    nothing_frozen = ViT_for_OSV_DSNet().train()
    assert all(module.training for module in nothing_frozen.modules())  # a plain nn.Module.train() then


def test_head_only_epoch_changes_only_head_str(corpus: str) -> None:
    """Per-pair path with augmentation: the backbone (BatchNorm running stats included) is bit-identical after an epoch."""
    torch.manual_seed(0)
    model = setup_head_only_finetune(ViT_for_OSV_DSNet())
    before = {key: value.clone() for key, value in model.state_dict().items()}
    dataset = SigDataset_CEDAR_Colab(None, corpus, train=True, image_size=64)
    assert dataset.augment
    subset = torch.utils.data.Subset(dataset, range(0, len(dataset), 4))
    optimizer = build_optimizer_for_head_only(model, lr_head=1e-2)
    train_one_epoch(model, make_pair_loader(subset, 8, shuffle=True), optimizer, progress=False)
    after = model.state_dict()
    changed = sorted(key for key in before if not torch.equal(before[key], after[key]))
    assert changed == ["head_str.bias", "head_str.weight"]
    assert any("running_mean" in key for key in before)  # the comparison covered BatchNorm statistics


def test_unfreeze_last_blocks_adds_a_parameter_group() -> None:
    model = setup_head_only_finetune(ViT_for_OSV_DSNet())
    groups = unfreeze_last_blocks(model, 2, lr_blocks=3e-5)
    blocks = backbone_blocks(model)
    assert len(blocks) == 18
    expected = {id(p) for module in (blocks[-2], blocks[-1], model.model.norm) for p in module.parameters()}
    assert {id(p) for p in groups[0]["params"]} == expected and groups[0]["lr"] == 3e-5
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == expected | {id(p) for p in model.head_str.parameters()}

    model.train()
    assert blocks[-1].training and blocks[-2].training and not blocks[-3].training
    assert not any(norm.training for norm in batch_norms(model))

    with pytest.raises(ValueError, match="in no optimizer group"):
        build_optimizer_for_head_only(model)
    optimizer = build_optimizer_for_head_only(model, lr_head=1e-3, weight_decay=0.05, param_groups=groups)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [
        ("head_str", 1e-3, 0.05), ("head_str (no weight decay)", 1e-3, 0.0),
        ("backbone_last_2_blocks", 3e-5, 0.05), ("backbone_last_2_blocks (no weight decay)", 3e-5, 0.0)]
    # Weight decay only on matrices and kernels: biases, LayerNorm weights and layer_scale get none.
    name_of = {id(parameter): name for name, parameter in model.named_parameters()}
    undecayed = {name_of[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    decayed = {name_of[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert {"head_str.bias", "model.norm.weight", "model.blocks4.2.layer_scale_1", "model.blocks4.2.norm1.weight",
            "model.blocks4.2.mlp.fc1.bias"} <= undecayed
    assert {"head_str.weight", "model.blocks4.2.mlp.fc1.weight"} <= decayed
    assert all(model.get_parameter(name).ndim > 1 for name in decayed)
    assert len(decayed) + len(undecayed) == len(trainable)
    without_decay = build_optimizer_for_head_only(model, weight_decay=0.0, param_groups=groups)
    assert sum(len(g["params"]) for g in without_decay.param_groups) == len(trainable)


@pytest.mark.parametrize("n", [0, 19])
def test_unfreeze_rejects_a_block_count_out_of_range(n: int) -> None:
    with pytest.raises(ValueError, match="between 1 and 18"):
        unfreeze_last_blocks(ViT_for_OSV_DSNet(), n)


def test_clear_errors_without_a_head() -> None:
    with pytest.raises(ValueError, match="emd=True"):
        setup_head_only_finetune(ViT_for_OSV_DSNet({"emd": False}))
    model = ViT_for_OSV_DSNet()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with pytest.raises(ValueError, match="setup_head_only_finetune"):
        build_optimizer_for_head_only(model)
