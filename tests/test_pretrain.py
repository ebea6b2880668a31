"""Synthetic pre-training: a corpus written in parts, the whole model trained, a resumable run, a --pretrained file."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import training_utils
from model_v3 import ViT_for_OSV_DSNet, load_pretrained
from module.run.config import FinetuneConfig
from training_utils import PRETRAINED_FILE, build_model, pretrain

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CORPUS = dict(writers=4, part_writers=2, samples=3, canvas=96)


def config_for(out: Path) -> FinetuneConfig:
    return FinetuneConfig(ckpt_dir=str(out), image_size=64, epochs=2, warmup_epochs=0, batch_size=8,
                          max_train_pairs_per_epoch=8, lr=1e-3, lr_blocks=1e-4, eval_batch_size=32, device="cpu",
                          finetune="all", fast_head_only=False)


class Interrupt(KeyboardInterrupt):
    """A disconnect after the first epoch's checkpoint."""


def test_pretrain_resumes_and_writes_a_file_train_loads_strictly(tmp_path: Path, monkeypatch) -> None:
    whole = pretrain(config_for(tmp_path / "whole"), progress=False, **CORPUS)
    assert whole == tmp_path / "whole" / PRETRAINED_FILE and whole.with_name(whole.name + ".sha256").is_file()
    assert sorted(path.name for path in (tmp_path / "whole" / "corpus").iterdir()) == ["part-000", "part-001"]

    fit = training_utils.fit

    def interrupted_fit(run, train_set, val_set, progress):
        def stop(run, metrics):
            if run.epoch == 1:
                raise Interrupt
        return fit(run, train_set, val_set, progress=progress, on_epoch_end=stop)

    monkeypatch.setattr(training_utils, "fit", interrupted_fit)
    with pytest.raises(Interrupt):
        pretrain(config_for(tmp_path / "parts"), progress=False, **CORPUS)
    monkeypatch.undo()
    resumed = pretrain(config_for(tmp_path / "parts"), progress=False, **CORPUS)  # the corpus is reused, the run resumes

    expected, got = torch.load(whole, weights_only=True), torch.load(resumed, weights_only=True)
    assert expected.keys() == ViT_for_OSV_DSNet().state_dict().keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    # The file is the best epoch's whole model; the run trained every parameter, BatchNorm statistics too.
    best = torch.load(tmp_path / "parts" / "run" / "best.pt", weights_only=True)["trained_state_dict"]
    last = torch.load(tmp_path / "parts" / "run" / "epoch_0002.pt", weights_only=True)["trained_state_dict"]
    assert best.keys() == expected.keys() and all(torch.equal(best[key], got[key]) for key in best)
    statistics = "model.patch_embed.norm1.running_mean"
    fresh = ViT_for_OSV_DSNet()
    assert not torch.equal(fresh.state_dict()[statistics], last[statistics])
    load_pretrained(fresh, resumed, strict=True)
    model = build_model(FinetuneConfig(pretrained=str(resumed), device="cpu"))
    assert torch.equal(model.state_dict()["head_str.weight"], expected["head_str.weight"])


def test_pretraining_that_never_beats_its_start_says_so(tmp_path: Path) -> None:
    """A new best must be 100 times lower (min_improvement 0.99): out of reach, so the exported file is the
    starting model, and a warning says so rather than leave a file that looks pre-trained."""
    config = dataclasses.replace(config_for(tmp_path / "run"), epochs=1, min_improvement=0.99)
    with pytest.warns(UserWarning, match="never did better than its starting model"):
        weights = pretrain(config, progress=False, **CORPUS)
    start = torch.load(tmp_path / "run" / "run" / "best.pt", weights_only=True)
    assert start["epoch"] == 0 and weights.is_file()
