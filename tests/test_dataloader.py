"""Lazy pair datasets: items, the reference transform, early and clear errors, augmentation, workers, cache, memory."""
import gc
import os
import shutil
import tracemalloc
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from module.core.wording import command_line
from module.data.preprocess import BlankScanError
from prepare_datasets import (
    PairFileError,
    generate_bhsig_pairs,
    generate_cedar_pairs,
    generate_gdps_pairs,
    make_synthetic_dataset,
    write_pair_file,
)
from sig_dataloader_colab import (
    ImageReadError,
    PairAugmentation,
    SigDataset_BHSig_Colab,
    SigDataset_CEDAR_Colab,
    SigDataset_GDPS_Colab,
    imread_tool,
    load_signature,
)

DATA = Path(__file__).parent / "data" / "preprocess"
S = 64


@pytest.fixture(scope="module")
def cedar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cedar")
    make_synthetic_dataset(root, "cedar", n_writers=3, n_genuine=4, n_forged=3, image_size=96, progress=False)
    generate_cedar_pairs(root, train_ratio=0.67)
    return root


def _copy(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "corpus"
    shutil.copytree(root, dst)
    return dst


def test_items_shape_dtype_and_range(cedar):
    ds = SigDataset_CEDAR_Colab(None, cedar, train=True, image_size=S)
    assert len(ds) == 2 * (6 + 12) and ds.augment is True and ds.image_size == S
    for index in (0, len(ds) - 1):
        pair, label = ds[index]
        assert pair.shape == (2, S, S) and pair.dtype == torch.float32
        assert label.shape == (1, 1) and label.dtype == torch.float32 and label.item() in (0.0, 1.0)
        assert 0.0 <= pair.min() and pair.max() <= 1.0
    test = SigDataset_CEDAR_Colab(None, cedar, train=False, image_size=S)
    assert test.augment is False and len(test) == 18
    labels = [test[i][1].item() for i in range(len(test))]
    assert labels == [label for _, _, label in test.pairs] and labels.count(1.0) == 6


def test_fast_path_interface(cedar):
    ds = SigDataset_CEDAR_Colab(None, cedar, train=False, image_size=S)
    assert all(os.path.isabs(a) and os.path.isabs(b) and label in (0, 1) for a, b, label in ds.pairs)
    paths = ds.image_paths()
    assert paths == sorted(set(paths)) and len(paths) == 7  # one writer: 4 genuine + 3 forged
    reference, query, _ = ds.pairs[0]
    pair, _ = ds[0]
    assert torch.equal(pair[0:1], ds.load_image(reference)) and torch.equal(pair[1:2], ds.load_image(query))
    assert ds.load_image(reference).shape == (1, S, S)
    # Ink bright on black after the inversion.
    assert ds.load_image(reference)[0, 0, 0] == 0 and ds.load_image(reference).max() > 0.5


@pytest.fixture(scope="module")
def reference_root(tmp_path_factory):
    """The reference scans as CEDAR genuines, and a space-separated gray_test.txt pairing each with the next."""
    root = tmp_path_factory.mktemp("reference")
    (root / "full_org").mkdir()
    names = sorted(p.name for p in DATA.glob("sig_*.png"))
    for i, name in enumerate(names):
        shutil.copy(DATA / name, root / f"full_org/original_1_{i + 1}.png")
    lines = [f"full_org/original_1_{i + 1}.png full_org/original_1_{(i + 1) % len(names) + 1}.png 1" for i in range(len(names))]
    (root / "gray_test.txt").write_text("\n".join(lines) + "\n")
    return root, names


def test_eval_tensors_match_the_reference(reference_root):
    root, names = reference_root
    expected = np.load(DATA / "preprocess_expected.npz")
    ds = SigDataset_CEDAR_Colab(types.SimpleNamespace(part=False), root, train=False, image_size=224)
    assert len(ds) == len(names)
    for i in range(len(names)):
        pair, label = ds[i]
        want = np.stack([expected[f"{names[i]}:tensor"][0], expected[f"{names[(i + 1) % len(names)]}:tensor"][0]])
        assert np.abs(pair.numpy() - want).max() <= 1.01 / 255
        assert label.item() == 1.0
    assert torch.equal(load_signature(root / "full_org/original_1_1.png"), ds.load_image(ds.pairs[0][0]))


def test_separators_line_ends_and_blank_lines_read_the_same(cedar, tmp_path):
    ds = SigDataset_CEDAR_Colab(None, cedar, train=False, image_size=S)
    relative = [(os.path.relpath(a, cedar), os.path.relpath(b, cedar), label) for a, b, label in ds.pairs]
    variants = {
        "spaces.txt": "\n".join(f"{a} {b} {label}" for a, b, label in relative),  # no final newline
        "crlf.txt": "\r\n".join(f"{a}\t{b}\t{label}" for a, b, label in relative) + "\r\n\r\n",
        "blank.txt": "\n\n".join(f"{a}\t{b}\t{label}" for a, b, label in relative) + "\n  \n",
    }
    for name, text in variants.items():
        (tmp_path / name).write_bytes(text.encode())
        other = SigDataset_CEDAR_Colab(None, cedar, train=False, image_size=S, pair_file=tmp_path / name)
        assert other.pairs == ds.pairs, name


def test_gpds_names_with_spaces(tmp_path):
    info = make_synthetic_dataset(tmp_path, "gpds", n_writers=4, n_genuine=12, n_forged=4, image_size=64, progress=False)
    with pytest.warns(UserWarning, match="not writer-disjoint"):
        generate_gdps_pairs(tmp_path, val_ratio=0.0)  # every train/ writer trains, the one with a " (Copy)" file too
    ds = SigDataset_GDPS_Colab(None, tmp_path, train=True, image_size=32)
    with_space = next(i for i, (a, b, _) in enumerate(ds.pairs) if " (Copy)" in a or " (Copy)" in b)
    assert ds[with_space][0].shape == (2, 32, 32)
    assert info["files_with_spaces"]


def test_bhsig_dataset(tmp_path):
    make_synthetic_dataset(tmp_path, "bhsig", n_writers=2, n_genuine=3, n_forged=2, image_size=64, progress=False)
    generate_bhsig_pairs(tmp_path, test_writers=[2])
    ds = SigDataset_BHSig_Colab(None, tmp_path, train=False, image_size=32)
    assert len(ds) == 3 + 6 and ds[0][0].shape == (2, 32, 32)


# ---------------------------------------------------------------- errors, early and clear


@pytest.mark.parametrize(
    "cls, dataset",
    [(SigDataset_CEDAR_Colab, "cedar"), (SigDataset_GDPS_Colab, "gpds"), (SigDataset_BHSig_Colab, "bhsig")],
)
def test_missing_pair_file_names_it_and_the_call_that_makes_it(tmp_path, cls, dataset):
    with pytest.raises(FileNotFoundError,
                       match=rf"gray_train.txt not found. Fix: prepare_datasets.ensure_pair_files\('{dataset}'"):
        cls(None, tmp_path)
    with command_line("finetune.py"), pytest.raises(FileNotFoundError, match=rf"Fix: python finetune.py prepare {dataset} "):
        cls(None, tmp_path)


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset root .*nowhere not found"):
        SigDataset_CEDAR_Colab(None, tmp_path / "nowhere")


@pytest.mark.parametrize(
    "text, message",
    [
        ("full_org/original_1_1.png full_org/original_1_2.png\n", r"line 1: expected 3 fields"),
        ("\n\nfull_org/original_1_1.png\tfull_org/original_1_2.png\t2\n", r"line 3: label '2' is not 0 or 1"),
        ("full_org/original_1_1.png full_org/original_1_2.png -1\n", r"line 1: label '-1' is not 0 or 1"),
        ("\n \n", r"holds no pairs"),
    ],
)
def test_bad_pair_files(cedar, tmp_path, text, message):
    (tmp_path / "bad.txt").write_text(text)
    with pytest.raises(PairFileError, match=message):
        SigDataset_CEDAR_Colab(None, cedar, pair_file=tmp_path / "bad.txt")


def test_a_pair_file_that_is_not_utf8_names_the_line(cedar, tmp_path):
    text = "full_org/original_1_1.png\tfull_org/original_1_2.png\t1\nfull_org/origin\xe9l_1_3.png\tx.png\t0\n"
    (tmp_path / "latin1.txt").write_bytes(text.encode("latin-1"))
    with pytest.raises(PairFileError, match=r"latin1.txt: 1 of 2 lines .*\n  line 2: byte 0xe9 \(column 16\) is not UTF-8"):
        SigDataset_CEDAR_Colab(None, cedar, pair_file=tmp_path / "latin1.txt")


def test_missing_images_are_counted_and_named(cedar, tmp_path):
    pairs = [(f"full_org/original_1_{(n - 1) % 4 + 1}.png", f"full_forg/forgeries_9_{n}.png", 0) for n in range(1, 9)]
    write_pair_file(tmp_path / "p.txt", pairs)
    with pytest.raises(FileNotFoundError) as error:
        SigDataset_CEDAR_Colab(None, cedar, pair_file=tmp_path / "p.txt")
    message = str(error.value)
    assert "8 of the 12 images named in" in message and "forgeries_9_1.png" in message
    assert "forgeries_9_8.png" not in message  # only the first few are listed
    assert "prepare_datasets.py validate" in message


def test_undecodable_and_blank_scans_name_the_file(cedar, tmp_path):
    root = _copy(cedar, tmp_path)
    broken = root / "full_org/original_1_1.png"
    broken.write_bytes(broken.read_bytes()[:100])
    blank = root / "full_org/original_1_2.png"
    Image.fromarray(np.full((60, 90), 231, np.uint8)).save(blank)
    write_pair_file(root / "p.txt", [("full_org/original_1_1.png", "full_org/original_1_3.png", 1),
                                     ("full_org/original_1_2.png", "full_org/original_1_3.png", 1)])
    ds = SigDataset_CEDAR_Colab(None, root, pair_file="p.txt", image_size=S)  # nothing is decoded yet
    with pytest.raises(ImageReadError, match=r"cannot decode image .*original_1_1.png"):
        ds[0]
    with pytest.raises(BlankScanError, match=r"original_1_2.png: the scan holds no ink"):
        ds[1]
    with pytest.raises(FileNotFoundError, match="image .*nothing.png not found"):
        imread_tool(root / "nothing.png")


def test_bad_arguments(cedar):
    with pytest.raises(ValueError, match="mode 'binary'"):
        SigDataset_CEDAR_Colab(None, cedar, mode="binary")
    with pytest.raises(ValueError, match="image_size"):
        SigDataset_CEDAR_Colab(None, cedar, image_size=224.0)


def test_transparent_background_reads_as_white_paper(tmp_path):
    rgba = np.zeros((40, 60, 4), np.uint8)  # transparent black everywhere ...
    rgba[18:22, 10:50] = (0, 0, 0, 255)  # ... but an opaque black stroke
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    gray = imread_tool(tmp_path / "t.png")
    assert gray[0, 0] == 255 and gray[20, 20] == 0


def test_a_16_bit_scan_reads_like_its_8_bit_twin(cedar, tmp_path):
    """16-bit PNG and TIFF (PIL mode I;16, little and big endian) and 12-bit data in 16 bits, scaled by their bit depth:
    the scan as it is (its grey paper and ink do not span 0 to 255, so scaling by the range would change it)."""
    twin = np.asarray(Image.open(cedar / "full_org/original_1_1.png"))
    assert twin.dtype == np.uint8 and (twin.min() > 0 or twin.max() < 255)
    Image.fromarray(twin).save(tmp_path / "8bit.png")
    sixteen = twin.astype(np.uint16) * 257
    Image.fromarray(sixteen).save(tmp_path / "16bit.png")
    Image.fromarray(sixteen).save(tmp_path / "16bit.tif")
    Image.fromarray(sixteen.byteswap().view(">u2")).save(tmp_path / "16bit_big_endian.tif")
    Image.fromarray(np.rint(twin * (4095 / 255)).astype(np.uint16)).save(tmp_path / "12bit.tif")
    expected = load_signature(tmp_path / "8bit.png", S)
    for name in ("16bit.png", "16bit.tif", "16bit_big_endian.tif", "12bit.tif"):
        assert Image.open(tmp_path / name).mode.startswith("I;16"), name
        assert np.array_equal(imread_tool(tmp_path / name), twin), name
        assert torch.equal(load_signature(tmp_path / name, S), expected), name
    Image.fromarray(np.full((40, 60), 3000, np.uint16)).save(tmp_path / "blank16.png")
    with pytest.raises(BlankScanError, match="blank16.png"):
        load_signature(tmp_path / "blank16.png", S)


def test_raw_mode_skips_normalization(cedar):
    normalized = SigDataset_CEDAR_Colab(None, cedar, train=False, image_size=S)
    raw = SigDataset_CEDAR_Colab(None, cedar, train=False, image_size=S, mode="raw")
    path = normalized.pairs[0][0]
    # Raw keeps the paper grey (inverted: not 0); normalized whitens it (inverted: 0).
    assert raw.load_image(path)[0, 0, 0] > 0 and normalized.load_image(path)[0, 0, 0] == 0


# ---------------------------------------------------------------- augmentation


def test_augmentation_gives_both_images_the_same_parameters(cedar):
    ds = SigDataset_CEDAR_Colab(None, cedar, train=False, image_size=S)
    image = ds.load_image(ds.pairs[0][0])
    augmentation = PairAugmentation(S)
    changed = 0
    for seed in range(40):
        torch.manual_seed(seed)
        out = augmentation(torch.cat([image, image]))
        assert out.shape == (2, S, S)
        assert torch.equal(out[0], out[1]), f"seed {seed}: the two images were augmented differently"
        changed += not torch.equal(out[0], image[0])
    assert changed >= 35


def test_augmentation_is_applied_in_training_only(cedar):
    ds = SigDataset_CEDAR_Colab(None, cedar, train=True, image_size=S)
    torch.manual_seed(0)
    first = ds[0][0]
    second = ds[0][0]
    assert not torch.equal(first, second)
    ds.augment = False
    assert torch.equal(ds[0][0], ds[0][0])
    assert SigDataset_CEDAR_Colab(None, cedar, train=True, image_size=S, augment=False).augment is False


def test_dataloader_with_two_workers(cedar):
    ds = SigDataset_CEDAR_Colab(None, cedar, train=True, image_size=S)
    loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=2)
    seen = 0
    for pairs, labels in loader:
        assert pairs.shape[1:] == (2, S, S) and labels.shape[1:] == (1, 1)
        seen += len(pairs)
    assert seen == len(ds)


# ---------------------------------------------------------------- cache


def test_disk_cache_matches_and_follows_changed_files(cedar, tmp_path):
    root = _copy(cedar, tmp_path)
    cache = tmp_path / "cache"
    plain = SigDataset_CEDAR_Colab(None, root, train=False, image_size=S)
    cached = SigDataset_CEDAR_Colab(None, root, train=False, image_size=S, cache_dir=cache)
    path = plain.pairs[0][0]
    assert torch.equal(cached.load_image(path), plain.load_image(path))
    entries = list(cache.rglob("*.npy"))
    assert len(entries) == 1
    assert torch.equal(cached.load_image(path), plain.load_image(path))  # served from the cache
    # A damaged entry is recomputed.
    entries[0].write_bytes(b"garbage")
    assert torch.equal(cached.load_image(path), plain.load_image(path))
    # A changed file gets a new entry with the new content.
    other = plain.pairs[-1][1]
    shutil.copy(other, path)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    assert torch.equal(cached.load_image(path), plain.load_image(other))
    assert len(list(cache.rglob("*.npy"))) == 2
    assert not list(cache.rglob("*.tmp*"))


# ---------------------------------------------------------------- memory


def test_memory_for_the_cedar_train_file_is_small(tmp_path):
    """Building a dataset over the 34,080-pair CEDAR train file holds its pairs as arrays: under 2 MB."""
    (tmp_path / "full_org").mkdir()
    (tmp_path / "full_forg").mkdir()
    for w in range(1, 56):
        for n in range(1, 25):
            (tmp_path / f"full_org/original_{w}_{n}.png").touch()
            (tmp_path / f"full_forg/forgeries_{w}_{n}.png").touch()
    generate_cedar_pairs(tmp_path)
    gc.collect()
    tracemalloc.start()
    ds = SigDataset_CEDAR_Colab(None, tmp_path, train=True, image_size=224)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(ds) == 34080
    assert held < 2 * 2**20, f"{held / 2**20:.1f} MB held"  # arrays: 8 bytes a pair's rows, 1 its label
    assert peak < 20 * 2**20, f"{peak / 2**20:.1f} MB at peak"
    assert ds.pair_rows.dtype == np.int32 and ds.pair_rows.shape == (34080, 2) and ds.pair_labels.dtype == np.uint8
    # The public list of tuples still reads as before, made on demand.
    reference, query, label = ds.pairs[-1]
    assert (ds.image_files[ds.pair_rows[-1, 0]], ds.image_files[ds.pair_rows[-1, 1]], 0) == (reference, query, label)
    assert ds.pairs[:2] == [ds.pairs[0], ds.pairs[1]] and len(ds.pairs) == 34080
