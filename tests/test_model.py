"""The model against numbers computed by the authors' code (copied into tests/data/model)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import model_v3
from model_v3 import TokenFeatures, ViT_for_OSV_DSNet

MODEL_DATA = Path(__file__).parent / "data" / "model"
EXPECTED = json.loads((MODEL_DATA / "model_expected.json").read_text())
CONFIGS = EXPECTED["configs"]
ROOT = Path(__file__).resolve().parents[1]


def fill_reference_weights(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The fixtures' deterministic weights: keys sorted, one generator, a rule per kind of tensor."""
    generator = torch.Generator().manual_seed(seed)
    filled = {}
    for key in sorted(state):
        shape = tuple(state[key].shape)
        if key.endswith("num_batches_tracked"):
            filled[key] = torch.zeros((), dtype=torch.long)
        elif key.endswith("running_var"):
            filled[key] = torch.rand(shape, generator=generator) * 0.5 + 0.75
        elif key.endswith("running_mean"):
            filled[key] = torch.randn(shape, generator=generator) * 0.1
        elif len(shape) >= 2:
            filled[key] = torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))
        elif "layer_scale" in key:
            filled[key] = torch.rand(shape, generator=generator) * 0.2
        elif key.endswith("weight"):
            filled[key] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            filled[key] = 0.1 * torch.randn(shape, generator=generator)
    return filled


def reference_model(config_name: str) -> ViT_for_OSV_DSNet:
    model = ViT_for_OSV_DSNet(CONFIGS[config_name]["config"])
    model.load_state_dict(fill_reference_weights(model.state_dict(), EXPECTED["weight_seed"]), strict=True)
    return model


def freeze_batchnorm(model: torch.nn.Module) -> None:
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


@pytest.fixture(scope="module")
def pairs() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.load(MODEL_DATA / "model_input_pairs.npy"))
    y = torch.from_numpy(np.load(MODEL_DATA / "model_input_labels.npy"))
    return x, y


def test_state_dict_matches_the_authors_checkpoints() -> None:
    manifest = json.loads((MODEL_DATA / "state_dict_manifest.json").read_text())
    state = ViT_for_OSV_DSNet({"emd": True}).state_dict()
    assert {key: list(value.shape) for key, value in state.items()} == {key: shape for key, shape, _ in manifest}
    assert {key: str(value.dtype).replace("torch.", "") for key, value in state.items()} == {
        key: dtype for key, _, dtype in manifest
    }


def test_parameter_counts_match_the_spec() -> None:
    model = ViT_for_OSV_DSNet()
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(model) == 21_024_544
    assert count(model.model) == 20_987_584
    assert count(model.head_str) == 36_960
    assert not hasattr(ViT_for_OSV_DSNet({"emd": False}), "head_str")


def test_backbone_tokens_and_kept_mask(pairs) -> None:
    x, _ = pairs
    model = reference_model("emd_cos_uniform_l2").eval()
    with torch.no_grad():
        features = model.embed(x[:1, 0:1])
        normed = model.model.norm(features.tokens)
    expected_tokens = np.load(MODEL_DATA / "backbone_tokens_eval.npy")
    expected_kept = np.load(MODEL_DATA / "backbone_kept_tokens_mask.npy")
    np.testing.assert_allclose(normed.numpy(), expected_tokens, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(features.kept.numpy(), expected_kept)


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_per_pair_eval_distances_and_loss(pairs, config_name: str) -> None:
    x, y = pairs
    expected = CONFIGS[config_name]
    model = reference_model(config_name).eval()
    with torch.no_grad():
        distance, loss = model(x, y)
    assert distance.shape == (4, 1)
    np.testing.assert_allclose(distance.view(-1).numpy(), expected["per_pair_eval_distance"], rtol=1e-4, atol=1e-5)
    assert float(loss) == pytest.approx(expected["per_pair_eval_loss"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_frozen_batchnorm_training_forward_and_head_gradient(pairs, config_name: str) -> None:
    x, y = pairs
    expected = CONFIGS[config_name]
    model = reference_model(config_name)
    freeze_batchnorm(model)
    distance, loss = model(x, y)
    np.testing.assert_allclose(
        distance.view(-1).detach().numpy(), expected["per_pair_frozen_bn_train_distance"], rtol=1e-4, atol=1e-5
    )
    assert float(loss.detach()) == pytest.approx(expected["per_pair_frozen_bn_train_loss"], rel=1e-4, abs=1e-6)
    if "per_pair_frozen_bn_train_head_str_weight_grad_norm" in expected:
        loss.backward()
        grad_norm = float(model.head_str.weight.grad.norm())
        assert grad_norm == pytest.approx(expected["per_pair_frozen_bn_train_head_str_weight_grad_norm"], rel=1e-3)


def test_distances_do_not_depend_on_batch_mates(pairs) -> None:
    x, y = pairs
    model = reference_model("emd_l2_uniform_cos").eval()
    with torch.no_grad():
        together = model(x, y)[0]
        alone = torch.cat([model(x[i : i + 1], y[i : i + 1])[0] for i in range(len(x))])
        reversed_order = model(x.flip(0), y.flip(0))[0].flip(0)
    np.testing.assert_allclose(together.numpy(), alone.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reversed_order.numpy(), alone.numpy(), rtol=1e-5, atol=1e-6)
    # The authors' batched semantics give different numbers for the same pairs.
    batched = CONFIGS["emd_l2_uniform_cos"]["batched_eval_distance"]
    assert np.abs(together.view(-1).numpy() - batched).max() > 0.1


def test_pair_without_ink_gets_zero_structural_distance() -> None:
    torch.manual_seed(0)
    model = ViT_for_OSV_DSNet()
    model.train()
    inked = torch.zeros(1, 1, 64, 64)
    inked[..., 20:40, 10:50] = 1.0
    blank = torch.zeros(1, 1, 64, 64)
    x = torch.cat([torch.cat([inked, blank], dim=1), torch.cat([inked, inked * 0.5], dim=1)])
    y = torch.tensor([[0.0], [1.0]])
    distance, loss = model(x, y)
    ref, query = model.embed(x[:, 0:1]), model.embed(x[:, 1:2])
    structural = model.structural_distance(ref, query)
    assert not query.kept[0].any()
    assert structural[0].item() == 0.0 and structural[1].item() > 0.0
    torch.testing.assert_close(distance[0], model.global_distance(ref, query)[0])
    loss.backward()
    assert torch.isfinite(model.head_str.weight.grad).all()


@pytest.mark.parametrize("size", [(64, 64), (96, 160)])
def test_any_multiple_of_32(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = ViT_for_OSV_DSNet().eval()
    images = torch.rand(3, 1, *size)
    features = model.embed(images)
    n_tokens = (size[0] // 32) * (size[1] // 32)
    assert features.tokens.shape == (3, n_tokens, 384)
    assert features.kept.shape == (3, n_tokens) and features.kept.dtype == torch.bool
    distance, loss = model(torch.rand(2, 2, *size), torch.tensor([[1.0], [0.0]]))
    assert distance.shape == (2, 1) and torch.isfinite(distance).all() and torch.isfinite(loss)


def test_size_not_multiple_of_32_is_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        ViT_for_OSV_DSNet().embed(torch.rand(1, 1, 70, 64))
    with pytest.raises(ValueError, match=r"\[B, 2, H, W\]"):
        ViT_for_OSV_DSNet()(torch.rand(1, 1, 64, 64))


def test_options_from_namespace_dict_dataclass_and_errors() -> None:
    import argparse
    import dataclasses

    @dataclasses.dataclass
    class Options:
        emd: bool = True
        dis_type: str = "l2"
        gol_dis: str = "cos"
        temp: float = 0.5
        unrelated: int = 3

    for opt in (argparse.Namespace(dis_type="l2", gol_dis="cos", temp=0.5), {"dis_type": "l2", "gol_dis": "cos",
                                                                             "temp": 0.5}, Options()):
        assert model_v3.read_model_options(opt) == {"emd": True, "dis_type": "l2", "mar_type": "uniform",
                                                    "gol_dis": "cos", "temp": 0.5}
    assert model_v3.read_model_options(None) == model_v3.MODEL_DEFAULTS
    with pytest.raises(ValueError, match="mar_type 'different' is not supported"):
        ViT_for_OSV_DSNet({"mar_type": "different"})
    with pytest.raises(ValueError, match="dis_type"):
        ViT_for_OSV_DSNet({"dis_type": "l1"})


def test_token_features_helpers() -> None:
    features = TokenFeatures(torch.rand(4, 4, 384), torch.rand(4, 4) > 0.5)
    half = features.to(dtype=torch.float16)
    assert half.tokens.dtype == torch.float16 and half.kept.dtype == torch.bool
    assert features.select(2).tokens.shape == (1, 4, 384)
    assert torch.equal(features.select(torch.tensor([3, 1])).kept, features.kept[[3, 1]])
    tokens, kept = features
    assert tokens is features.tokens and kept is features.kept


def test_compare_accepts_half_precision_features() -> None:
    torch.manual_seed(0)
    model = ViT_for_OSV_DSNet().eval()
    with torch.no_grad():
        features = model.embed(torch.rand(2, 1, 64, 64))
        full = model.compare(features.select(0), features.select(1))
        half = model.compare(features.select(0).to(dtype=torch.float16), features.select(1).to(dtype=torch.float16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model.compare(features.select(0), features.select(1))
    assert half.dtype == torch.float32 and autocast.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(autocast, full)


class DeviceWatch(TorchFunctionMode):
    """Records every torch call that names a device as a string (``.to("cuda")``, ``device="cpu"``) or moves a
    tensor with ``.cuda()`` / ``.cpu()``: code that follows its inputs' device passes ``tensor.device`` instead."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        named = [value for value in (*args[1:], kwargs.get("device")) if isinstance(value, str)
                 and value.split(":")[0] in ("cpu", "cuda", "mps")]
        if name in ("cuda", "cpu") or named:
            self.calls.append(f"{name}{named or ''}")
        return func(*args, **kwargs)


def test_the_model_follows_its_inputs_device() -> None:
    """Embedding, comparing, the forward pass and the loss, in both modes, never name a device."""
    torch.manual_seed(0)
    model = ViT_for_OSV_DSNet()
    pairs, labels = torch.rand(3, 2, 64, 64), torch.tensor([[1.0], [0.0], [1.0]])
    for mode in (True, False):
        model.train(mode)
        with DeviceWatch() as watch:
            distance, loss = model(pairs, labels)
            loss.backward() if mode else None
            model.compare(model.embed(pairs[:, :1]), model.embed(pairs[:, 1:]))
        assert watch.calls == [], watch.calls
        assert distance.device == pairs.device
