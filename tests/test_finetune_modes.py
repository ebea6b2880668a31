"""What trains: finetune head / last:N / all, stage 4 trained from stored features, BatchNorm, accumulation, clipping."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import Interrupt, final_weights, interrupt_after

from model_v3 import ViT_for_OSV_DSNet, init_from
from models.fine_tune_utils import setup_head_only_finetune, train_whole_model, unfreeze_last_blocks
from models.weights import CheckpointMismatchError
from module.features.loaders import pair_distances
from module.run.config import ConfigError, FinetuneConfig
from sig_dataloader_colab import SigDataset_CEDAR_Colab
from training_utils import (
    build_model,
    compute_features,
    fit,
    make_pair_loader,
    prepare_run,
    seed_everything,
    train_one_epoch,
)

IMAGE_SIZE = 64
BN_STATISTICS = "model.patch_embed.norm1.running_mean"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(small_cedar_corpus: Path) -> str:
    """4 writers x (4 genuine + 3 forged): 2 training writers, 1 validation writer."""
    return str(small_cedar_corpus)


def datasets(root: str) -> tuple[SigDataset_CEDAR_Colab, SigDataset_CEDAR_Colab]:
    train = SigDataset_CEDAR_Colab(None, root, train=True, image_size=IMAGE_SIZE, augment=False)
    val = SigDataset_CEDAR_Colab(None, root, train=False, image_size=IMAGE_SIZE, pair_file="gray_val.txt")
    return train, val


def config_for(ckpt_dir: Path, **changes) -> FinetuneConfig:
    settings = dict(ckpt_dir=str(ckpt_dir), image_size=IMAGE_SIZE, epochs=2, batch_size=12, lr=4e-3, lr_blocks=1e-3,
                    warmup_epochs=0, eval_batch_size=32, device="cpu", patience=10, keep_last=2)
    settings.update(changes)
    return FinetuneConfig(**settings)


def new_model(seed: int = 0) -> ViT_for_OSV_DSNet:
    seed_everything(seed)
    return ViT_for_OSV_DSNet()


# --------------------------------------------------------------------------- the setting

def test_finetune_names_what_trains_and_unfreeze_blocks_still_says_last_n() -> None:
    assert (FinetuneConfig().finetune, FinetuneConfig().unfreeze_blocks) == ("head", 0)
    assert (FinetuneConfig(unfreeze_blocks=2).finetune, FinetuneConfig(finetune="last:02").unfreeze_blocks) == ("last:2", 2)
    assert FinetuneConfig(finetune="all", fast_head_only=False).unfreeze_blocks == 0
    for wrong in ("last:0", "last:19", "blocks", "last:"):
        with pytest.raises(ConfigError, match="finetune must be head, last:N"):
            FinetuneConfig(finetune=wrong)
    with pytest.raises(ConfigError, match="say different things"):
        FinetuneConfig(unfreeze_blocks=2, finetune="last:3")
    with pytest.raises(ConfigError, match="freezes nothing"):
        FinetuneConfig(finetune="all")
    # A checkpoint written before the setting existed reads as what it trained.
    old = {key: value for key, value in FinetuneConfig(unfreeze_blocks=3).to_dict().items()
           if key not in ("finetune", "grad_accumulation", "clip_grad_norm")}
    assert FinetuneConfig.from_dict(old).to_dict() == FinetuneConfig(finetune="last:3").to_dict()
    with pytest.raises(ConfigError, match="grad_accumulation must be >= 1"):
        FinetuneConfig(grad_accumulation=0)
    with pytest.raises(ConfigError, match="clip_grad_norm must be a finite number >= 0"):
        FinetuneConfig(clip_grad_norm=float("nan"))


def test_each_mode_trains_its_parameters() -> None:
    model = setup_head_only_finetune(new_model())
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {"head_str.weight", "head_str.bias"}
    unfreeze_last_blocks(model, 3)
    trained = {name.split(".")[1] for name, p in model.named_parameters() if p.requires_grad and name.startswith("model.")}
    assert trained == {"blocks4", "norm"}
    group = train_whole_model(model)
    assert all(p.requires_grad for p in model.parameters())
    assert len(group[0]["params"]) == len(list(model.parameters())) - 2  # all but head_str's two


# --------------------------------------------------------------------------- stage 4 from the feature store

def test_stage_4_trained_from_stored_features_equals_the_per_pair_path(corpus: str) -> None:
    """last:3 without augmentation: two SGD steps on features stored at block 15 == two steps through the backbone."""
    train, _ = datasets(corpus)
    model = setup_head_only_finetune(new_model())
    unfreeze_last_blocks(model, 3)
    start = {key: value.clone() for key, value in model.state_dict().items()}
    stored = compute_features(model, train, block=15, progress=False)
    assert stored.block == 15 and tuple(stored.tokens.shape[1:]) == (4, 384)
    trained, gradients, losses = [], [], []
    batch_size = (len(train) + 1) // 2  # two steps
    for data in (stored, train):
        model.load_state_dict(start)
        model.train()
        first = next(iter(make_pair_loader(data, batch_size, shuffle=True, generator=torch.Generator().manual_seed(3))))
        distance, labels = pair_distances(model, first, torch.device("cpu"), amp=False)
        model.zero_grad()
        model.loss_fn(distance, labels).backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad})
        model.zero_grad()
        parameters = [p for p in model.parameters() if p.requires_grad]
        loader = make_pair_loader(data, batch_size, shuffle=True, generator=torch.Generator().manual_seed(3))
        assert len(loader) == 2
        losses.append(train_one_epoch(model, loader, torch.optim.SGD(parameters, lr=0.05), progress=False))
        trained.append({name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for name in trained[0]:
        scale = gradients[0][name].abs().max().item()
        torch.testing.assert_close(gradients[0][name], gradients[1][name], rtol=1e-3, atol=1e-4 * scale + 1e-12)
        torch.testing.assert_close(trained[0][name], trained[1][name], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(trained[0][name], start[name]) for name in trained[0] if name.startswith("model.blocks4"))


def test_last_n_on_the_fast_path_resumes_bit_identical_from_its_store(corpus: str, tmp_path: Path) -> None:
    train, val = datasets(corpus)
    whole = config_for(tmp_path / "whole", finetune="last:3")
    fit(prepare_run(new_model(), whole), train, val, progress=False)
    parts = config_for(tmp_path / "parts", finetune="last:3")
    with pytest.raises(Interrupt):
        fit(prepare_run(new_model(), parts), train, val, progress=False, on_epoch_end=interrupt_after(1))
    run = fit(prepare_run(new_model(), parts), train, val, progress=False)
    assert run.epoch == 2
    expected, resumed = final_weights(tmp_path / "whole", 2), final_weights(tmp_path / "parts", 2)
    assert any(key.startswith("model.blocks4") for key in expected)
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    stores = [path for path in (tmp_path / "parts" / "features").iterdir() if path.is_dir()]
    assert stores and all(next(store.glob("chunk-*.npy"), None) is not None for store in stores)


# --------------------------------------------------------------------------- the whole model

def test_batchnorm_statistics_train_in_all_and_stay_in_the_other_modes(corpus: str, tmp_path: Path) -> None:
    train, val = datasets(corpus)
    for finetune, fast in (("head", True), ("last:2", False), ("all", False)):
        model = new_model()
        before = model.state_dict()[BN_STATISTICS].clone()
        config = config_for(tmp_path / finetune.replace(":", "-"), finetune=finetune, fast_head_only=fast, epochs=1,
                            batch_size=18)
        fit(prepare_run(model, config), train, val, progress=False)
        after = model.state_dict()[BN_STATISTICS]
        saved = final_weights(Path(config.ckpt_dir), 1)
        if finetune == "all":
            assert not torch.equal(before, after)
            assert torch.equal(saved[BN_STATISTICS], after)  # the statistics are in the checkpoint
        else:
            assert torch.equal(before, after) and BN_STATISTICS not in saved


def test_whole_model_training_resumes_bit_identical(corpus: str, tmp_path: Path) -> None:
    train, val = datasets(corpus)
    small_train = torch.utils.data.Subset(train, range(0, len(train), 3))
    settings = dict(finetune="all", fast_head_only=False, batch_size=6)
    whole = config_for(tmp_path / "whole", **settings)
    fit(prepare_run(new_model(), whole), small_train, val, progress=False)
    parts = config_for(tmp_path / "parts", **settings)
    model = new_model()
    with pytest.raises(Interrupt):
        fit(prepare_run(model, parts), small_train, val, progress=False, on_epoch_end=interrupt_after(1))
    torch.rand(100)  # whatever happens in between must not matter
    fit(prepare_run(new_model(), parts), small_train, val, progress=False)
    expected, resumed = final_weights(tmp_path / "whole", 2), final_weights(tmp_path / "parts", 2)
    assert BN_STATISTICS in expected and len(expected) == len(ViT_for_OSV_DSNet().state_dict())
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)


# --------------------------------------------------------------------------- accumulation and clipping

def test_accumulated_batches_take_the_step_of_one_large_batch(corpus: str) -> None:
    train, _ = datasets(corpus)
    model = setup_head_only_finetune(new_model())
    cache = torch.utils.data.Subset(compute_features(model, train, progress=False), range(18))
    cache.collate = cache.dataset.collate
    start = {key: value.clone() for key, value in model.state_dict().items()}
    updates = []
    for batch_size, accumulation in ((9, 1), (3, 3)):  # two steps of 9 pairs each way
        model.load_state_dict(start)
        loader = torch.utils.data.DataLoader(cache, batch_size=batch_size, collate_fn=cache.collate)
        train_one_epoch(model, loader, torch.optim.SGD(model.head_str.parameters(), lr=0.5), progress=False,
                        accumulation=accumulation)
        updates.append(model.head_str.weight.detach() - start["head_str.weight"])
    scale = updates[0].abs().max().item()
    assert scale > 0
    torch.testing.assert_close(updates[0], updates[1], rtol=1e-3, atol=1e-4 * scale)  # float32 summation order

    model.load_state_dict(start)
    loader = torch.utils.data.DataLoader(cache, batch_size=18, collate_fn=cache.collate)
    train_one_epoch(model, loader, torch.optim.SGD(model.head_str.parameters(), lr=1.0), progress=False,
                    clip_grad_norm=1e-3)
    moved = torch.cat([(model.head_str.weight - start["head_str.weight"]).flatten(),
                       model.head_str.bias - start["head_str.bias"]])
    assert moved.norm().item() == pytest.approx(1e-3, rel=1e-4)  # one step of lr 1 on a gradient clipped to 1e-3


# --------------------------------------------------------------------------- weights from any backbone

def test_init_from_loads_what_matches_and_says_what_it_did(tmp_path: Path, capsys) -> None:
    source = new_model(seed=1).state_dict()
    backbone = {key.removeprefix("model."): value for key, value in source.items() if key.startswith("model.")}
    rgb_stem = torch.randn(48, 3, 3, 3)
    backbone["patch_embed.proj1.weight"] = rgb_stem                      # an RGB classifier's first convolution
    backbone["blocks1.0.renamed.weight"] = backbone.pop("blocks1.0.norm1.weight")  # renamed: skipped, left fresh
    del backbone["blocks4.2.mlp.fc2.bias"]                                 # missing: left fresh
    backbone["head.weight"] = torch.randn(1000, 384)                       # extra: skipped
    backbone["pos_embed4"] = torch.randn(1, 14, 14, 384)                   # another shape: skipped
    path = tmp_path / "imagenet_backbone.pth"
    torch.save({"state_dict": backbone}, path)

    model = new_model(seed=2)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    done = init_from(model, path)
    state = model.state_dict()
    assert done.adapted == ["model.patch_embed.proj1.weight"]
    torch.testing.assert_close(state["model.patch_embed.proj1.weight"], rgb_stem.sum(dim=1, keepdim=True))
    assert {name for name, _ in done.skipped} == {"blocks1.0.renamed.weight", "head.weight", "pos_embed4"}
    assert set(done.fresh) == {"model.blocks1.0.norm1.weight", "model.blocks4.2.mlp.fc2.bias", "model.pos_embed4",
                               "head_str.weight", "head_str.bias"}
    assert len(done.loaded) == len(state) - len(done.fresh) - 1
    assert all(torch.equal(state[key], source[key]) for key in done.loaded)
    assert all(torch.equal(state[key], before[key]) for key in done.fresh)
    line = done.summary(str(path))
    assert f"{len(done.loaded)} tensors loaded, 1 adapted" in line and "3 skipped" in line and "5 left fresh" in line

    # Through the settings, as train does: the line is printed; a file that fits nothing is one clear error.
    config = FinetuneConfig(init_from=str(path), device="cpu")
    build_model(config)
    assert "tensors loaded" in capsys.readouterr().out
    torch.save({"fc.weight": torch.randn(10, 10)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointMismatchError, match="not a DSNet or DetailSemNet checkpoint"):
        init_from(new_model(), tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="give one of them"):
        FinetuneConfig(init_from=str(path), pretrained=str(path))
