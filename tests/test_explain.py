"""ViT_for_OSV_DSNet.explain: the transport plan behind a distance, and its figure."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model_v3 import Explanation, ViT_for_OSV_DSNet
from module.evaluation.plots import plot_explanation

# The fixture pairs [4, 2, 224, 224] (ink bright), at 128 pixels: a 4x4 token grid, a fifth of the backbone's time.
PAIRS = torch.nn.functional.interpolate(
    torch.from_numpy(np.load(Path(__file__).parent / "data" / "model" / "model_input_pairs.npy")), size=(128, 128),
    mode="area").numpy()
OPTIONS = {
    "cos tokens, l2 global": {"dis_type": "cos", "gol_dis": "l2", "temp": 1.0},
    "l2 tokens, cos global, temp 0.5": {"dis_type": "l2", "gol_dis": "cos", "temp": 0.5},
}


def seeded_model(options: dict) -> ViT_for_OSV_DSNet:
    torch.manual_seed(0)
    model = ViT_for_OSV_DSNet(options)
    with torch.no_grad():  # a head far from its initialisation, so that the structural distance weighs
        model.head_str.weight.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_explanation_identities_and_the_forward_distance(options: dict) -> None:
    model = seeded_model(options).train()  # explain works in eval mode whatever the mode, and restores it
    pairs = torch.from_numpy(PAIRS)
    with torch.no_grad():
        forward = model.eval()(pairs)[0][:, 0]
    model.train()
    for index, pair in enumerate(pairs):
        explanation = model.explain(pair[0:1], pair[1:2][None])  # [1, S, S] and [1, 1, S, S]
        assert isinstance(explanation, Explanation) and model.training
        assert explanation.structural_distance == float((explanation.plan * explanation.cost).sum())
        assert explanation.distance == explanation.global_distance + model.temp * explanation.structural_distance
        assert explanation.temp == model.temp
        # forward rounds to float32; the explanation is the same computation in float64.
        assert explanation.distance == pytest.approx(forward[index].item(), rel=2e-6, abs=1e-6), index
        assert explanation.structural_distance > 1e-3  # not trivially zero: the identities say something

        features = [model.eval().embed(image[None, None]) for image in pair]
        model.train()
        kept_ref, kept_query = features[0].kept[0], features[1].kept[0]
        assert explanation.grid == (4, 4)
        assert explanation.plan.shape == explanation.cost.shape == (int(kept_query.sum()), int(kept_ref.sum()))
        assert explanation.plan.dtype == torch.float64 and (explanation.plan >= 0).all()
        for positions, kept in ((explanation.ref_positions, kept_ref), (explanation.query_positions, kept_query)):
            assert torch.equal(positions[:, 0] * 4 + positions[:, 1], kept.nonzero()[:, 0])
        # The last Sinkhorn half-step balances the columns: each kept reference token receives 1 / S1 of the mass.
        n_ref = explanation.plan.shape[1]
        assert explanation.plan.sum(0).tolist() == pytest.approx([1 / n_ref] * n_ref, abs=1e-7)  # log(1/S1 + 1e-8)


def test_explain_on_a_wide_image_and_errors() -> None:
    model = seeded_model({})
    torch.manual_seed(1)
    ref, query = (torch.rand(1, 96, 160) * (torch.rand(1, 96, 160) > 0.7) for _ in range(2))
    explanation = model.explain(ref, query)
    assert explanation.grid == (3, 5)
    assert explanation.query_positions[:, 0].max() <= 2 and explanation.query_positions[:, 1].max() <= 4
    with torch.no_grad():
        forward = model.eval()(torch.stack([ref, query], dim=1))[0].item()
    assert explanation.distance == pytest.approx(forward, rel=2e-6, abs=1e-6)
    with pytest.raises(ValueError, match="one pair"):
        model.explain(torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64))
    with pytest.raises(ValueError, match="emd=False"):
        ViT_for_OSV_DSNet({"emd": False}).explain(ref, query)


def test_plot_explanation_writes_a_png(tmp_path: Path) -> None:
    model = seeded_model({})
    pair = torch.from_numpy(PAIRS[2])
    explanation = model.explain(pair[0:1], pair[1:2])
    path = plot_explanation(explanation, pair[0], pair[1:2], tmp_path / "explanation.png", threshold=0.5)
    assert path == tmp_path / "explanation.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 20_000 < path.stat().st_size < 400_000
