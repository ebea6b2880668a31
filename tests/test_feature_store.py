"""The feature store: reused across runs, resumed after an interruption, an image that changed embedded again alone,
a damaged chunk set aside and embedded again, leftovers of a killed write removed, a full disk said so."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import module.features.store as feature_store
from model_v3 import ViT_for_OSV_DSNet
from models.fine_tune_utils import setup_head_only_finetune
from module.core.io import TEMPORARY_SUFFIX
from module.data.epoch_order import epoch_pair_sample
from module.features.cache import FeatureCache, compute_features
from prepare_datasets import generate_cedar_pairs, make_synthetic_dataset
from sig_dataloader_colab import SigDataset_CEDAR_Colab
from training_utils import FinetuneConfig, fit, prepare_run, seed_everything

pytestmark = pytest.mark.usefixtures("one_torch_thread")
IMAGE_SIZE = 64
ROOT = Path(__file__).resolve().parents[1]


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
    """A pair dataset that counts (and lists) images read, and raises KeyboardInterrupt (a disconnect) at read number
    ``stop_at``."""

    def __init__(self, inner: SigDataset_CEDAR_Colab, stop_at: int | None = None) -> None:
        self.inner, self.stop_at, self.reads, self.read = inner, stop_at, 0, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)

    def load_image(self, path: str) -> torch.Tensor:
        self.reads += 1
        self.read.append(path)
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
    with pytest.warns(UserWarning, match=f"{newest.stem} is damaged"):
        assert compute_features(model, dataset(root), feature_dir=store, progress=False).embedded == 1


def flip_bit(path: Path, offset: int, bit: int) -> None:
    """Flip bit ``bit`` of byte ``offset`` of the file ``path``: a disk or sync error."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def damage(record_path: Path, where: str) -> None:
    """Flip one bit of chunk ``record_path``: in its tokens, in an image's ink mask or in an image's size (its record)."""
    if where == "tokens":
        tokens = record_path.with_suffix(".npy")
        flip_bit(tokens, tokens.stat().st_size - 1, 6)  # the last float32's top exponent bit: 0.5 becomes 8.5e37
        return
    text = record_path.read_bytes()
    path, size, _, mask = json.loads(text)["images"][0]
    if where == "mask":
        offset = text.index(f'"{mask}"'.encode()) + 1  # its first hex digit: the kept bits of the first four tokens
        bit = next(bit for bit in range(4) if chr(text[offset] ^ 1 << bit) in "0123456789abcdef")  # still hex
    else:
        offset = text.index(f"{json.dumps(path)}, {size},".encode()) + len(json.dumps(path)) + 1 + len(str(size))
        bit = 0  # the size's last digit, another digit: the record still reads, with another size
    flip_bit(record_path, offset, bit)


@pytest.fixture(scope="module")
def filled_store(corpus: Path, model, tmp_path_factory) -> tuple[Path, FeatureCache]:
    """A store of the corpus's 14 images in chunks of 5, 5 and 4, and the same features embedded afresh in RAM (batches
    of one image: an image's features then do not depend on its batch mates)."""
    store = tmp_path_factory.mktemp("store")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the tests (one_torch_thread): the sums' order, so the bits, depend on it
    try:
        compute_features(model, dataset(corpus), feature_dir=store, batch_size=1, chunk_images=5, progress=False)
        return store, compute_features(model, dataset(corpus), batch_size=1, progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("where", ["tokens", "mask", "record"])
def test_a_flipped_bit_sets_its_chunk_aside_and_exactly_its_images_are_embedded_again(
        corpus: Path, model, filled_store, tmp_path: Path, where: str) -> None:
    filled, fresh = filled_store
    store = tmp_path / "store"
    shutil.copytree(filled, store)
    (folder,) = store.iterdir()
    chunk = sorted(folder.glob("chunk-*.json"))[1]
    images = [path for path, *_ in json.loads(chunk.read_text())["images"]]
    damage(chunk, where)
    counting = CountingDataset(dataset(corpus))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = compute_features(model, counting, feature_dir=store, batch_size=1, chunk_images=5, progress=False)
    assert len(caught) == 1 and f"chunk {folder / chunk.stem} is damaged" in str(caught[0].message)
    assert cache.embedded == 5 and sorted(counting.read) == sorted(images)
    assert torch.equal(cache.tokens, fresh.tokens) and torch.equal(cache.kept, fresh.kept)
    assert sorted(path.name for path in (folder / feature_store.DAMAGED_FOLDER).iterdir()) == [
        chunk.name, chunk.with_suffix(".npy").name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # set aside: not reported again
        assert compute_features(model, dataset(corpus), feature_dir=store, batch_size=1, progress=False).embedded == 0


def test_the_only_writer_removes_what_a_killed_commit_left(corpus: Path, model, tmp_path: Path) -> None:
    compute_features(model, dataset(corpus), feature_dir=tmp_path, progress=False)
    (folder,) = tmp_path.iterdir()

    def leftovers(age_s: float) -> list[Path]:
        """What a kill during a chunk's commit leaves: its tokens without their record, and the record's temporary file."""
        name = f"chunk-{time.time_ns():020d}-1"
        left = [folder / f"{name}.npy", folder / f".{name}.json.k1ll{TEMPORARY_SUFFIX}"]
        for path in left:
            path.write_bytes(b"\x93NUMPY")
            os.utime(path, (time.time() - age_s,) * 2)
        return left

    young, old = leftovers(0), leftovers(2 * feature_store.ORPHAN_AGE_S)
    with open(folder / feature_store.LOCK_FILE) as other_writer:  # another process in the middle of writing the store
        fcntl.flock(other_writer, fcntl.LOCK_SH)
        assert compute_features(model, dataset(corpus), feature_dir=tmp_path, progress=False).embedded == 0
        assert all(path.exists() for path in young) and not any(path.exists() for path in old)
    assert compute_features(model, dataset(corpus), feature_dir=tmp_path, progress=False).embedded == 0
    assert sorted(path.name for path in folder.iterdir() if not path.name.startswith("chunk-")) == [
        "key.json", feature_store.LOCK_FILE]
    assert len(list(folder.glob("chunk-*.npy"))) == len(list(folder.glob("chunk-*.json"))) == 1


FULL_DISK_SCRIPT = textwrap.dedent("""
    import resource, signal, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from module.core.wording import command_line
    from module.features.store import FeatureStore

    store = FeatureStore(sys.argv[2], {"dtype": "float32"})
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails (EFBIG) instead of ending the process
    with store.writing(), command_line("finetune.py"):
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**16, 2**16))  # files of 64 KiB at most: full in the middle of a chunk
        try:
            store.commit([sys.argv[3]] * 40, np.ones((40, 4, 384), np.float32), np.ones((40, 4), bool))  # 240 KiB
        except OSError as error:
            print(error)
""")


def test_a_full_disk_while_a_chunk_is_written_says_so_and_what_to_do(corpus: Path, tmp_path: Path, monkeypatch) -> None:
    image = str(next((corpus / "full_org").iterdir()))
    result = subprocess.run([sys.executable, "-c", FULL_DISK_SCRIPT, str(ROOT), str(tmp_path / "store"), image],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    (folder,) = (tmp_path / "store").iterdir()
    message = result.stdout.strip()
    assert message.startswith(f"[Errno {errno.EFBIG}] cannot write {folder / 'chunk-'}"), message
    assert message.endswith(".npy: no space left on the device (File too large): free some space on that disk, or "
                            "point --feature-dir elsewhere"), message
    assert sorted(path.name for path in folder.iterdir()) == ["key.json", feature_store.LOCK_FILE]  # nothing half-written

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    store = feature_store.FeatureStore(tmp_path / "store", {"dtype": "float32"})
    monkeypatch.setattr(feature_store, "atomic_write", full)
    with pytest.raises(OSError, match=r"chunk-.*\.npy: no space left on the device: free some space on that disk, or "
                                      r"point feature_dir elsewhere$") as raised:
        store.commit([image], np.ones((1, 4, 384), np.float32), np.ones((1, 4), bool))
    assert raised.value.errno == errno.ENOSPC


def test_a_flipped_bit_in_a_training_chunk_leaves_the_trained_head_as_without_it(corpus: Path, tmp_path: Path) -> None:
    """``fit`` on a store whose training chunk lost a bit trains the head of a run on an intact store, bit for bit."""
    train = dataset(corpus)
    val = SigDataset_CEDAR_Colab(None, corpus, train=False, image_size=IMAGE_SIZE)
    store = tmp_path / "store"

    def trained_head(run_folder: str) -> dict[str, torch.Tensor]:
        config = FinetuneConfig(ckpt_dir=str(tmp_path / run_folder), feature_dir=str(store), image_size=IMAGE_SIZE,
                                epochs=2, batch_size=16, lr=4e-3, warmup_epochs=1, eval_batch_size=32, device="cpu")
        seed_everything(0)
        run = fit(prepare_run(ViT_for_OSV_DSNet(config), config), train, val, progress=False)
        return {name: tensor.clone() for name, tensor in run.model.head_str.state_dict().items()}

    first = trained_head("first")
    (chunk,) = [path for path in store.rglob("chunk-*.json") if json.dumps(train.image_paths()[0]) in path.read_text()]
    tokens = chunk.with_suffix(".npy")
    flip_bit(tokens, tokens.stat().st_size - 1, 6)
    with pytest.warns(UserWarning, match=f"{chunk.stem} is damaged"):
        second = trained_head("second")
    assert first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


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
