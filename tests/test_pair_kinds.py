"""Each pair's kind from the layouts' file names, and random-forgery test pairs (prepare --random-forgeries)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from module.data.datasets import pair_kind, signature_of, writer_of
from module.data.pair_files import read_pair_file
from module.data.prepare import random_forgery_pairs
from module.data.validation import validate_pair_file
from prepare_datasets import ensure_pair_files


def touch_cedar(root: Path, n_writers: int, n_genuine: int, n_forged: int) -> Path:
    """Empty files with CEDAR names: pair rules never open an image."""
    for folder in ("full_org", "full_forg"):
        (root / folder).mkdir(parents=True)
    for writer in range(1, n_writers + 1):
        for number in range(1, n_genuine + 1):
            (root / f"full_org/original_{writer}_{number}.png").touch()
        for number in range(1, n_forged + 1):
            (root / f"full_forg/forgeries_{writer}_{number}.png").touch()
    return root


def test_signature_and_pair_kind_in_every_layout() -> None:
    assert signature_of("full_org/original_12_3.png") == (12, False, 3)
    assert signature_of("full_forg/forgeries_7_24.PNG") == (7, True, 24)
    assert signature_of("5/H-S-5-G-01.tif") == (5, False, 1) and signature_of("5/B-S-5-F-30.tif") == (5, True, 30)
    assert signature_of("train/genuine/c-032-11 (Copy).jpg") == (32, False, 11)
    assert signature_of("test/032/forge/cf-032-01.jpg") == (32, True, 1)
    assert signature_of("notes/readme.txt") is None

    assert pair_kind("full_org/original_1_1.png", "full_org/original_1_2.png") == "genuine"
    assert pair_kind("full_org/original_1_1.png", "full_forg/forgeries_1_2.png") == "skilled"
    assert pair_kind("full_org/original_1_1.png", "full_org/original_2_2.png") == "random"
    assert pair_kind("5/H-S-5-G-01.tif", "5/H-S-5-F-03.tif") == "skilled"
    assert pair_kind("train/genuine/c-001-01.jpg", "train/genuine/c-002-01.jpg") == "random"
    # Not one of the three kinds: a forgery as reference, another writer's forgery, a name of no layout.
    assert pair_kind("full_forg/forgeries_1_2.png", "full_org/original_1_1.png") is None
    assert pair_kind("full_org/original_1_1.png", "full_forg/forgeries_2_2.png") is None
    assert pair_kind("scans/a.png", "scans/b.png") is None


def test_random_forgery_pairs_are_distinct_other_writers_genuines_and_seeded() -> None:
    pairs = [(f"full_org/original_{w}_1.png", f"full_org/original_{w}_{n}.png", 1) for w in (1, 2, 3) for n in (2, 3)]
    pairs += [(f"full_org/original_{w}_1.png", f"full_forg/forgeries_{w}_1.png", 0) for w in (1, 2, 3)]
    drawn = random_forgery_pairs(pairs, 4, np.random.default_rng(0))
    assert Counter(writer_of(reference) for reference, _, _ in drawn) == {1: 4, 2: 4, 3: 4}
    assert all(pair_kind(reference, query) == "random" and label == 0 for reference, query, label in drawn)
    unordered = {frozenset(pair[:2]) for pair in pairs + drawn}
    assert len(unordered) == len(pairs) + len(drawn)  # nothing repeats, in either order
    assert drawn == random_forgery_pairs(pairs, 4, np.random.default_rng(0))
    assert drawn != random_forgery_pairs(pairs, 4, np.random.default_rng(1))
    # Asking for more than there are: 3 x 6 candidates a writer, less the reverses of those drawn before.
    everything = random_forgery_pairs(pairs, 100, np.random.default_rng(0))
    assert Counter(writer_of(reference) for reference, _, _ in everything) == {1: 18, 2: 9}
    assert random_forgery_pairs(pairs, 0, np.random.default_rng(0)) == []
    with pytest.raises(ValueError, match="two writers or more"):
        random_forgery_pairs(pairs[:2], 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="0 or more"):
        random_forgery_pairs(pairs, -1, np.random.default_rng(0))


def test_ensure_pair_files_adds_random_forgeries_to_the_test_split_only(tmp_path: Path) -> None:
    root = touch_cedar(tmp_path, 8, 4, 3)
    plain = {split: read_pair_file(path).pairs for split, path in
             ensure_pair_files("cedar", root, val_ratio=0.2, random_state=5).items()}
    with pytest.warns(UserWarning, match="made with other arguments"):
        files = ensure_pair_files("cedar", root, val_ratio=0.2, random_state=5, random_forgeries=3)
    pairs = {split: read_pair_file(path).pairs for split, path in files.items()}
    assert pairs["train"] == plain["train"] and pairs["val"] == plain["val"]  # the same split, seeded
    added = pairs["test"][len(plain["test"]):]
    assert pairs["test"][:len(plain["test"])] == plain["test"]
    test_writers = {writer_of(reference) for reference, _, _ in plain["test"]}
    assert Counter(writer_of(reference) for reference, _, _ in added) == {writer: 3 for writer in test_writers}
    assert {pair_kind(reference, query) for reference, query, _ in added} == {"random"}
    assert validate_pair_file(root, files["test"], check_images=False).ok  # the scans here are empty placeholders
    stamp = Path(files["test"]).stat().st_mtime_ns
    assert ensure_pair_files("cedar", root, val_ratio=0.2, random_state=5, random_forgeries=3) == files
    assert Path(files["test"]).stat().st_mtime_ns == stamp  # the same arguments: kept
