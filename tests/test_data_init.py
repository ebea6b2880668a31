"""A fresh backbone initialised from training scans: BatchNorm statistics and the global distance's scale."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import Interrupt, final_weights, interrupt_after

from model_v3 import TokenFeatures, ViT_for_OSV_DSNet
from models.data_init import GLOBAL_DISTANCE_TARGET, data_dependent_init, data_init_keys
from module.run.checkpoint import read_checkpoint
from module.run.config import FinetuneConfig
from module.run.rng import seed_everything
from module.run.trained import build_datasets, build_model, load_trained_model
from training_utils import fit, prepare_run, train_and_report

IMAGE_SIZE = 64

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sparse_ink(n: int, seed: int = 0) -> torch.Tensor:
    """``[n, 1, 64, 64]``: bright ink on a black background, about a fifth of the pixels."""
    generator = torch.Generator().manual_seed(seed)
    ink = torch.rand(n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return ink * (torch.rand(n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator) > 0.8)


def median_global_distance(model: ViT_for_OSV_DSNet, images: torch.Tensor, ref: torch.Tensor, query: torch.Tensor):
    with torch.no_grad():
        features = model.embed(images)
        pairs = (TokenFeatures(features.tokens[rows], features.kept[rows]) for rows in (ref, query))
        return float(model.global_distance(*pairs).median())


def test_data_init_sets_every_batchnorm_statistic_and_the_global_distance_scale() -> None:
    seed_everything(0)
    model = ViT_for_OSV_DSNet().train()
    images, ref, query = sparse_ink(8), torch.arange(4), torch.arange(4, 8)
    stem = model.model.patch_embed
    with torch.no_grad():
        first_conv = [stem.proj1(chunk) for chunk in images.split(4)]

    init = data_dependent_init(model, images, ref, query, batch_size=4)

    assert model.training, "the model's mode is kept"
    # The cumulative average of each pass's statistics (two passes of four scans here).
    mean = torch.stack([out.mean(dim=(0, 2, 3)) for out in first_conv]).mean(0)
    variance = torch.stack([out.var(dim=(0, 2, 3), unbiased=True) for out in first_conv]).mean(0)
    torch.testing.assert_close(stem.norm1.running_mean, mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stem.norm1.running_var, variance, rtol=1e-4, atol=1e-6)
    for name, norm in model.model.named_modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            assert int(norm.num_batches_tracked) == 2, name
            assert norm.momentum == 0.1, f"{name}: the momentum is put back"
            assert not torch.equal(norm.running_var, torch.ones_like(norm.running_var)), name
    model.eval()
    assert median_global_distance(model, images, ref, query) == pytest.approx(GLOBAL_DISTANCE_TARGET, rel=1e-4)
    assert init.scale == pytest.approx(GLOBAL_DISTANCE_TARGET / init.distance_before)
    assert init.distance_before > 1, "a fresh model's distances start far outside the loss's margins (0.3, 0.9)"
    assert (init.images, init.pairs) == (8, 4)

    keys = data_init_keys(model)
    assert model.keys_from_data == tuple(keys)
    assert {"model.patch_embed.norm1.running_mean", "model.patch_embed4.norm.num_batches_tracked",
            "model.norm.weight", "model.norm.bias"} <= set(keys)
    assert len(keys) == 5 * 3 + 2, "three buffers of each of the five BatchNorms, and the final norm's two"
    assert not any(key.startswith("head_str") for key in keys)


def test_the_cosine_global_distance_keeps_its_scale() -> None:
    seed_everything(0)
    model = ViT_for_OSV_DSNet({"gol_dis": "cos"})
    weight = model.model.norm.weight.clone()
    init = data_dependent_init(model, sparse_ink(4), torch.arange(2), torch.arange(2, 4))
    assert init.scale == 1.0
    assert torch.equal(model.model.norm.weight, weight)


def test_build_model_initialises_a_fresh_backbone_alone_and_the_same_every_time(small_cedar_corpus: Path) -> None:
    config = FinetuneConfig(data_root=str(small_cedar_corpus), image_size=IMAGE_SIZE, device="cpu")
    train = build_datasets(config, splits=("train",))["train"]
    first, second = build_model(config, training_set=train), build_model(config, training_set=train)
    assert first.keys_from_data
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    seeded = build_model(config)
    assert seeded.keys_from_data == ()
    assert not torch.equal(seeded.model.norm.weight, first.model.norm.weight)
    off = build_model(FinetuneConfig(**{**config.to_dict(), "data_init": False}), training_set=train)
    assert off.keys_from_data == () and torch.equal(off.model.norm.weight, seeded.model.norm.weight)
    assert not FinetuneConfig(pretrained="weights.pth").inits_from_data
    assert not FinetuneConfig(init_from="imagenet.pth").inits_from_data
    # A checkpoint's settings from before data_init: its run started from the seed's model, and resumes as one.
    older = {key: value for key, value in FinetuneConfig().to_dict().items() if key != "data_init"}
    assert FinetuneConfig.from_dict(older).data_init is False
    assert FinetuneConfig.from_dict(FinetuneConfig().to_dict()).data_init is True


def test_a_head_only_run_keeps_its_initialisation_in_each_checkpoint_and_rebuilds_it(
        small_cedar_corpus: Path, tmp_path: Path) -> None:
    config = FinetuneConfig(data_root=str(small_cedar_corpus), ckpt_dir=str(tmp_path / "run"), image_size=IMAGE_SIZE,
                            epochs=1, batch_size=12, lr=4e-3, warmup_epochs=0, device="cpu")
    datasets = build_datasets(config)
    initialised = build_model(config, training_set=datasets["train"]).state_dict()
    result = train_and_report(config, datasets=datasets, progress=False)

    checkpoint = read_checkpoint(tmp_path / "run" / "epoch_0001.pt")
    trained = checkpoint["trained_state_dict"]
    assert set(trained) == set(data_init_keys(result.model)) | {"head_str.weight", "head_str.bias"}
    for key in data_init_keys(result.model):  # head-only: the initialised statistics and norm do not train
        assert torch.equal(trained[key], initialised[key]), key
    # Rebuilt from the seed and the checkpoint alone (no best_weights.pth): the same model.
    (tmp_path / "run" / "best_weights.pth").unlink()
    _, rebuilt = load_trained_model(tmp_path / "run")
    best = read_checkpoint(tmp_path / "run" / "best.pt")["trained_state_dict"]
    state = rebuilt.state_dict()
    for key, value in initialised.items():
        assert torch.equal(state[key], best.get(key, value)), key


def test_a_whole_model_run_from_data_init_resumes_bit_identical(small_cedar_corpus: Path, tmp_path: Path) -> None:
    """Interrupted after epoch 1 and run again, a run from the data-initialised model (``finetune all``: the
    statistics and the norm then train) ends with the uninterrupted run's tensors, each one."""
    def run(folder: str, **options):
        config = FinetuneConfig(data_root=str(small_cedar_corpus), ckpt_dir=str(tmp_path / folder),
                                image_size=IMAGE_SIZE, epochs=2, batch_size=12, lr=4e-3, lr_blocks=1e-3,
                                warmup_epochs=0, device="cpu", finetune="all", fast_head_only=False)
        train = build_datasets(config, splits=("train", "val"))
        return fit(prepare_run(build_model(config, training_set=train["train"]), config), train["train"],
                   train["val"], progress=False, **options)

    run("whole")
    with pytest.raises(Interrupt):
        run("parts", on_epoch_end=interrupt_after(1))
    assert run("parts").epoch == 2
    expected, resumed = final_weights(tmp_path / "whole", 2), final_weights(tmp_path / "parts", 2)
    assert set(data_init_keys(ViT_for_OSV_DSNet())) <= set(expected)
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    start = read_checkpoint(tmp_path / "whole" / "epoch_0001.pt")["trained_state_dict"]
    assert not torch.equal(expected["model.patch_embed.norm1.running_mean"],
                           start["model.patch_embed.norm1.running_mean"]), "finetune all trains the statistics"
