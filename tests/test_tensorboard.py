"""TensorBoard curves of a tiny run (64 px, 4 writers) killed twice and resumed: one point an epoch for each scalar."""
from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import training_utils
from model_v3 import ViT_for_OSV_DSNet
from module.evaluation.curves import TrainingCurves
from sig_dataloader_colab import SigDataset_CEDAR_Colab
from training_utils import FinetuneConfig, fit, prepare_run, seed_everything

IMAGE_SIZE = 64
EPOCHS = 3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Interrupt(KeyboardInterrupt):
    """Stands in for Ctrl-C or a Colab disconnect."""


@pytest.fixture(scope="module")
def corpus(small_cedar_corpus: Path) -> str:
    return str(small_cedar_corpus)


def tiny_run(corpus: str, ckpt_dir: Path) -> tuple[training_utils.TrainingRun, object, object]:
    """``prepare_run`` of a fresh model, as a new process would (it resumes from ``ckpt_dir`` when it can)."""
    config = FinetuneConfig(ckpt_dir=str(ckpt_dir), image_size=IMAGE_SIZE, epochs=EPOCHS, batch_size=16, lr=4e-3,
                            warmup_epochs=1, eval_batch_size=32, device="cpu", patience=10)
    seed_everything(0)
    train = SigDataset_CEDAR_Colab(None, corpus, train=True, image_size=IMAGE_SIZE)
    val = SigDataset_CEDAR_Colab(None, corpus, train=False, image_size=IMAGE_SIZE, pair_file="gray_val.txt")
    return prepare_run(ViT_for_OSV_DSNet(config), config), train, val


def curves(ckpt_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(ckpt_dir / "tensorboard"))
    events.Reload()
    return events


def test_a_run_killed_and_resumed_has_one_point_an_epoch_for_each_scalar(corpus: str, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt_dir = tmp_path / "run"

    def interrupt_after_epoch_1(run, metrics) -> None:
        if run.epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):  # killed after epoch 1's commit
        fit(*tiny_run(corpus, ckpt_dir), progress=False, on_epoch_end=interrupt_after_epoch_1)

    commit = training_utils.commit_epoch

    def killed_before_committing_epoch_2(run, improved):
        if run.epoch == 2:
            raise Interrupt
        return commit(run, improved)

    # Killed between writing epoch 2's points and committing its checkpoint: those points are orphans.
    with monkeypatch.context() as patch, pytest.raises(Interrupt):
        patch.setattr(training_utils, "commit_epoch", killed_before_committing_epoch_2)
        fit(*tiny_run(corpus, ckpt_dir), progress=False)
    assert sorted(event.step for event in curves(ckpt_dir).Scalars("loss/validation")) == [0, 1, 2]

    run, train, val = tiny_run(corpus, ckpt_dir)
    assert run.epoch == 1  # epoch 2 was never committed: it trains again
    fit(run, train, val, progress=False)
    history = run.history
    assert history["epoch"] == list(range(EPOCHS + 1))

    events = curves(ckpt_dir)
    validation = {"loss/validation": "val_loss", "validation/eer": "val_eer", "validation/auc": "val_auc"}
    trained = {"loss/train": "train_loss", "learning_rate/head_str": "lr"}
    assert set(validation) | set(trained) <= set(events.Tags()["scalars"])
    for tag, key in {**validation, **trained}.items():
        points = events.Scalars(tag)
        first = 0 if tag in validation else 1  # epoch 0 validates the untrained model; nothing trains in it
        assert [point.step for point in points] == list(range(first, EPOCHS + 1)), tag  # no duplicate, no gap
        assert [point.value for point in points] == pytest.approx(history[key][first:], rel=1e-6), tag
    # Every parameter group's rate: the head's, with and without weight decay.
    rate_tags = {tag for tag in events.Tags()["scalars"] if tag.startswith("learning_rate/")}
    assert rate_tags == {f"learning_rate/{group['name']}" for group in run.optimizer.param_groups}

    files = sorted((ckpt_dir / "tensorboard").iterdir())
    fit(*tiny_run(corpus, ckpt_dir), progress=False)  # nothing left to train: no new event file
    assert sorted((ckpt_dir / "tensorboard").iterdir()) == files


def test_rank_1_writes_nothing(tmp_path: Path) -> None:
    with TrainingCurves(tmp_path / "run", enabled=False) as quiet:
        quiet.add_epoch({"epoch": [0], "train_loss": [None], "val_loss": [1.0], "val_eer": [0.5], "val_auc": [0.5]})
    assert not (tmp_path / "run").exists()
