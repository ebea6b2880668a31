"""Verifier: enroll, verify and explain against a model's own per-pair distances; the evaluation protocols it serves."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model_v3 import ViT_for_OSV_DSNet
from module.data.datasets import pair_kind
from module.evaluation.reports import worst_errors
from module.evaluation.validation import reference_trials
from prepare_datasets import make_synthetic_dataset
from sig_dataloader_colab import load_signature
from training_utils import Decision, Verifier

IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    root = tmp_path_factory.mktemp("scans")
    make_synthetic_dataset(root, "cedar", n_writers=1, n_genuine=4, n_forged=1, seed=2, image_size=96, progress=False)
    genuine = [str(root / f"full_org/original_1_{n}.png") for n in range(1, 5)]
    return {"references": genuine[:3], "genuine": genuine[3:], "forged": [str(root / "full_forg/forgeries_1_1.png")]}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = ViT_for_OSV_DSNet()
    with torch.no_grad():
        model.head_str.weight.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("weights") / "weights.pth"
    torch.save(model.state_dict(), path)
    return path


def pair_distance(model: ViT_for_OSV_DSNet, reference: str, query: str) -> float:
    """The model's forward distance of one pair, alone."""
    pair = torch.cat([load_signature(reference, IMAGE_SIZE), load_signature(query, IMAGE_SIZE)])[None]
    with torch.no_grad():
        return model.eval()(pair)[0].item()


def test_verifier_round_trip(weights: Path, scans: dict, tmp_path: Path, one_torch_thread) -> None:
    verifier = Verifier.from_weights(weights, threshold=1.0, image_size=IMAGE_SIZE, device="cpu")
    embedded = []
    embed = verifier.model.embed
    verifier.model.embed = lambda images: embedded.append(len(images)) or embed(images)  # count backbone inputs

    verifier.enroll("ann", scans["references"])
    assert verifier.enrolled == {"ann": scans["references"]} and embedded == [3]
    for query in scans["genuine"] + scans["forged"]:
        decision = verifier.verify(query, writer="ann")
        assert embedded[-1] == 1, "the query is embedded once, the enrolled references never again"
        expected = [pair_distance(verifier.model, reference, query) for reference in scans["references"]]
        assert isinstance(decision, Decision) and decision.distances == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert decision.distance == pytest.approx(np.mean(decision.distances), rel=1e-12)
        assert decision.threshold == 1.0 and decision.genuine == (decision.distance <= 1.0)
        # The same references as scans: all embedded in one backbone pass, with the query.
        again = verifier.verify(query, references=scans["references"], aggregate="max")
        assert embedded[-1] == 4
        assert again.distances == pytest.approx(decision.distances, rel=1e-5, abs=1e-6)
        assert again.distance == max(again.distances)
    assert verifier.verify(scans["forged"][0], writer="ann", aggregate="min").distance == min(decision.distances)

    # A threshold between the distances decides by the aggregate, at or below meaning genuine.
    verifier.threshold = decision.distance
    assert verifier.verify(scans["forged"][0], writer="ann").genuine

    figure = tmp_path / "why.png"
    explained, explanation = verifier.explain(scans["forged"][0], writer="ann", figure=figure)
    assert explained.distances == pytest.approx(decision.distances, rel=1e-6)
    closest = int(np.argmin(decision.distances))
    assert explanation.distance == pytest.approx(decision.distances[closest], rel=2e-6, abs=1e-6)
    assert explanation.structural_distance == float((explanation.plan * explanation.cost).sum())
    assert figure.read_bytes()[:4] == b"\x89PNG"


def test_verifier_errors(weights: Path, scans: dict) -> None:
    verifier = Verifier.from_weights(weights, threshold=1.0, image_size=IMAGE_SIZE, device="cpu")
    with pytest.raises(ValueError, match="not enrolled"):
        verifier.verify(scans["forged"][0], writer="bob")
    with pytest.raises(ValueError, match="either writer="):
        verifier.verify(scans["forged"][0], writer="bob", references=scans["references"])
    with pytest.raises(ValueError, match="aggregate must be"):
        verifier.verify(scans["forged"][0], references=scans["references"], aggregate="median")
    with pytest.raises(ValueError, match="at least one"):
        verifier.enroll("bob", [])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        verifier.enroll("bob", ["missing.png"])
    assert verifier.enrolled == {}


def test_reference_trials_follow_the_protocol() -> None:
    genuine = {w: [f"full_org/original_{w}_{n}.png" for n in range(1, 6)] for w in (1, 2)}
    genuine[3] = [f"full_org/original_3_{n}.png" for n in range(1, 3)]  # too few for 3 references
    pairs = [(g[0], other, 1) for g in genuine.values() for other in g[1:]]
    pairs += [(genuine[w][0], f"full_forg/forgeries_{w}_{n}.png", 0) for w in (1, 2, 3) for n in (1, 2)]
    pairs += [(genuine[1][0], genuine[2][3], 0), ("notes/a.png", "notes/b.png", 1)]  # a random forgery, a stray pair
    trials, left_out = reference_trials([pair[:2] for pair in pairs], 3, np.random.default_rng(0))
    assert left_out == [3]
    kinds = [(writer, kind) for _, _, writer, kind in trials]
    assert kinds.count((1, "genuine")) == 5 and kinds.count((1, "skilled")) == 2 and kinds.count((1, "random")) == 1
    assert kinds.count((2, "genuine")) == 5 and kinds.count((2, "skilled")) == 2 and len(trials) == 15
    for references, query, _, kind in trials:
        assert len(set(references)) == 3 and query not in references
        assert all(pair_kind(reference, query) == kind for reference in references)
    again, _ = reference_trials([pair[:2] for pair in pairs], 3, np.random.default_rng(0))
    assert again == trials


def test_worst_errors() -> None:
    metrics = {"distances": np.array([0.1, 0.9, 0.3, 0.45, 0.7, 0.2]), "labels": np.array([1, 1, 0, 0, 1, 0])}
    assert worst_errors(metrics, 0.5) == {"false accept": 5, "false reject": 1}
    assert worst_errors(metrics, 0.05) == {"false accept": None, "false reject": 1}
    assert worst_errors(metrics, 1.0) == {"false accept": 5, "false reject": None}


def test_a_calibrated_verifier_reports_the_likelihood_ratio(weights: Path, scans: dict, one_torch_thread) -> None:
    from module.evaluation.calibration import fit_calibration, verbal_equivalent

    plain = Verifier.from_weights(weights, threshold=1.0, image_size=IMAGE_SIZE, device="cpu")
    before = plain.verify(scans["forged"][0], references=scans["references"])
    assert before.likelihood_ratio is None and before.verbal_equivalent is None
    # A calibration around this model's distances: genuine pairs a little closer than forged ones.
    rng = np.random.default_rng(0)
    distances = before.distance + np.r_[rng.normal(-0.05, 0.05, 30), rng.normal(0.05, 0.05, 30)]
    plain.calibration = fit_calibration(distances, np.r_[np.ones(30), np.zeros(30)])
    decision = plain.verify(scans["forged"][0], references=scans["references"])
    assert decision[:4] == before[:4]  # the decision's first fields are those of before
    assert decision.likelihood_ratio == pytest.approx(plain.calibration.likelihood_ratios([decision.distance])[0])
    assert decision.log10_likelihood_ratio == pytest.approx(np.log10(decision.likelihood_ratio))
    assert decision.verbal_equivalent == verbal_equivalent(decision.likelihood_ratio)
