"""The feature store: reused across runs, resumed after an interruption, an image that changed embedded again alone."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import module.features.store as feature_store
from model_v3 import ViT_for_OSV_DSNet
from models.fine_tune_utils import setup_head_only_finetune
from module.data.epoch_order import epoch_pair_sample
from module.features.cache import compute_features
from prepare_datasets import generate_cedar_pairs, make_synthetic_dataset
from sig_dataloader_colab import SigDataset_CEDAR_Colab

pytestmark = pytest.mark.usefixtures("one_torch_thread")
IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cedar")
    make_synthetic_dataset(root, "cedar", n_writers=3, n_genuine=4, n_forged=3, seed=2, image_size=96, progress=False)
    generate_cedar_pairs(root, train_ratio=0.67)
    return root


@pytest.fixture(scope="module")
def model() -> ViT_for_OSV_DSNet:
    torch.manual_seed(0)
    return setup_head_only_finetune(ViT_for_OSV_DSNet())


def dataset(root: Path) -> SigDataset_CEDAR_Colab:
    return SigDataset_CEDAR_Colab(None, root, train=True, image_size=IMAGE_SIZE)


class CountingDataset:
    """A pair dataset that counts images read, and raises KeyboardInterrupt (a disconnect) at read number ``stop_at``."""

    def __init__(self, inner: SigDataset_CEDAR_Colab, stop_at: int | None = None) -> None:
        self.inner, self.stop_at, self.reads = inner, stop_at, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)

    def load_image(self, path: str) -> torch.Tensor:
        self.reads += 1
        if self.reads == self.stop_at:
            raise KeyboardInterrupt
        return self.inner.load_image(path)


def test_a_second_run_embeds_nothing_and_reads_the_same_features(corpus: Path, model, tmp_path: Path) -> None:
    in_ram = compute_features(model, dataset(corpus), progress=False)
    first = compute_features(model, CountingDataset(dataset(corpus)), feature_dir=tmp_path, progress=False)
    assert first.embedded == len(first.paths) == 14
    again = CountingDataset(dataset(corpus))
    second = compute_features(model, again, feature_dir=tmp_path, progress=False)
    assert second.embedded == 0 and again.reads == 0
    assert torch.equal(second.tokens, in_ram.tokens) and torch.equal(second.kept, in_ram.kept)
    (folder,) = [path for path in tmp_path.iterdir() if path.is_dir()]
    key = json.loads((folder / "key.json").read_text())
    assert key["image_size"] == IMAGE_SIZE and key["dtype"] == "float32" and len(key["backbone"]) == 64

    # Other frozen weights, or another image size or dtype: another key, nothing of the first store reused.
    other = setup_head_only_finetune(ViT_for_OSV_DSNet())
    assert compute_features(other, dataset(corpus), feature_dir=tmp_path, progress=False).embedded == 14
    assert compute_features(model, dataset(corpus), feature_dir=tmp_path, dtype="float16", progress=False).embedded == 14
    assert len([path for path in tmp_path.iterdir() if path.is_dir()]) == 3


def test_an_interrupted_embedding_continues_after_the_last_committed_chunk(corpus: Path, model, tmp_path: Path) -> None:
    interrupted = CountingDataset(dataset(corpus), stop_at=8)  # batches of 2, chunks of 3 images
    with pytest.raises(KeyboardInterrupt):
        compute_features(model, interrupted, feature_dir=tmp_path, batch_size=2, chunk_images=3, progress=False)
    (folder,) = tmp_path.iterdir()
    # 7 images were embedded before the disconnect: two chunks of 3 committed, the 7th lost with its chunk.
    assert len(list(folder.glob("chunk-*.json"))) == 2
    resumed = CountingDataset(dataset(corpus))
    cache = compute_features(model, resumed, feature_dir=tmp_path, batch_size=2, chunk_images=3, progress=False)
    assert cache.embedded == 14 - 6 and resumed.reads == 8
    uninterrupted = compute_features(model, dataset(corpus), batch_size=2, progress=False)
    assert torch.equal(cache.tokens, uninterrupted.tokens) and torch.equal(cache.kept, uninterrupted.kept)


def test_an_image_that_changed_is_embedded_again_and_nothing_else(corpus: Path, model, tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    for path in corpus.rglob("*"):
        if path.is_file():
            (root / path.relative_to(corpus)).parent.mkdir(parents=True, exist_ok=True)
            (root / path.relative_to(corpus)).write_bytes(path.read_bytes())
    store = tmp_path / "store"
    before = compute_features(model, dataset(root), feature_dir=store, progress=False)
    changed = root / "full_org" / "original_1_2.png"
    other = root / "full_org" / "original_1_3.png"
    changed.write_bytes(other.read_bytes())  # a new scan under the old name
    after = compute_features(model, dataset(root), feature_dir=store, progress=False)
    assert after.embedded == 1
    row, other_row = after.paths.index(str(changed)), after.paths.index(str(other))
    # (embedded in a batch of its own, so equal to float32 rounding: the backbone's sums depend on the batch size)
    torch.testing.assert_close(after.tokens[row], after.tokens[other_row], rtol=0, atol=1e-5)
    assert not torch.allclose(before.tokens[row], after.tokens[row], atol=1e-2)
    unchanged = [index for index in range(len(after.paths)) if index != row]
    assert torch.equal(after.tokens[unchanged], before.tokens[unchanged])

    os.utime(changed, ns=(0, 10**18))  # touched: the same bytes, another modification time
    assert compute_features(model, dataset(root), feature_dir=store, progress=False).embedded == 1

    # A damaged chunk is not trusted: its images are embedded again.
    newest = max((store).rglob("chunk-*.npy"))
    newest.write_bytes(newest.read_bytes()[:100])
    assert compute_features(model, dataset(root), feature_dir=store, progress=False).embedded == 1


def test_auto_dtype_and_memory_mapping_follow_the_ram_available(corpus: Path, model, tmp_path: Path, monkeypatch, capsys) -> None:
    assert feature_store.resolve_feature_dtype("auto", 100, 224) == "float32"
    monkeypatch.setattr(feature_store, "available_memory", lambda: 10 * 2**20)  # 10 MiB free
    assert feature_store.resolve_feature_dtype("auto", 100, 224, print) == "float16"  # 7.2 MiB in float32
    assert "float16" in capsys.readouterr().out
    assert feature_store.resolve_feature_dtype("float32", 100, 224) == "float32"
    cache = compute_features(model, dataset(corpus), dtype="auto", feature_dir=tmp_path, progress=False)
    assert cache.tokens.dtype == torch.float32  # 14 images at 64 px: 86 KB


def test_epoch_pair_sample_is_fresh_each_epoch_seeded_and_keeps_the_class_ratio() -> None:
    labels = np.array([1] * 300 + [0] * 700)
    first = epoch_pair_sample(labels, 100, seed=3, epoch=1)
    assert len(first) == 100 and (labels[first] == 1).sum() == 30 and np.all(np.diff(first) > 0)
    assert np.array_equal(first, epoch_pair_sample(labels, 100, seed=3, epoch=1))
    assert not np.array_equal(first, epoch_pair_sample(labels, 100, seed=3, epoch=2))
    assert not np.array_equal(first, epoch_pair_sample(labels, 100, seed=4, epoch=1))
    assert epoch_pair_sample(labels, 0, seed=3, epoch=1) is None and epoch_pair_sample(labels, 1000, seed=3, epoch=1) is None
