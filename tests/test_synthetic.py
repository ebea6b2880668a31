"""The synthetic corpus: real layouts and names, determinism, scans that look like scans, learnable but not trivial."""
import hashlib
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.feature import hog

from module.data.preprocess import normalize_image
from prepare_datasets import ensure_synthetic_dataset, make_synthetic_dataset
from synthetic_signatures import CANVAS_COLS, CANVAS_ROWS
from training_utils import compute_metrics


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for rel in _files(root):
        h.update(rel.encode())
        h.update((root / rel).read_bytes())
    return h.hexdigest()


def _gray(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


@pytest.fixture(scope="module")
def cedar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cedar")
    return make_synthetic_dataset(root, "cedar", n_writers=3, n_genuine=4, n_forged=3, seed=1, image_size=96, progress=False)


def test_cedar_layout_and_names(cedar):
    root = Path(cedar["root"])
    expected = [f"full_forg/forgeries_{w}_{n}.png" for w in (1, 2, 3) for n in (1, 2, 3)]
    expected += [f"full_org/original_{w}_{n}.png" for w in (1, 2, 3) for n in (1, 2, 3, 4)]
    assert _files(root) == sorted(expected)
    assert cedar["writers"] == [1, 2, 3]
    assert cedar["counts"] == {"genuine": 12, "forged": 9, "files": 21}
    assert cedar["layout"] == "cedar" and cedar["seed"] == 1 and cedar["image_size"] == 96


def test_scans_look_like_scans(cedar):
    root = Path(cedar["root"])
    shapes = set()
    for rel in _files(root):
        with Image.open(root / rel) as image:
            assert image.mode == "L"
        scan = _gray(root / rel)
        shapes.add(scan.shape)
        assert max(scan.shape) <= 96
        assert np.median(scan) > 170, f"{rel}: paper should be light"
        # Ballpoint ink as cedar-dev's scans have it: grey (median 138 at 400 px), yet far darker than the paper.
        assert np.median(scan) - scan.min() > 80, f"{rel}: ink should be darker than the paper"
        assert scan.std() > 0
        normalize_image(scan, scan.shape)  # holds ink: no BlankScanError
    assert len(shapes) > 5, "canvas sizes should vary from scan to scan"


def test_deterministic_for_a_seed(cedar, tmp_path):
    again = make_synthetic_dataset(tmp_path / "a", "cedar", n_writers=3, n_genuine=4, n_forged=3, seed=1,
                                   image_size=96, progress=False)
    other = make_synthetic_dataset(tmp_path / "b", "cedar", n_writers=3, n_genuine=4, n_forged=3, seed=2,
                                   image_size=96, progress=False)
    assert _digest(Path(again["root"])) == _digest(Path(cedar["root"]))
    assert _digest(Path(other["root"])) != _digest(Path(cedar["root"]))


def test_a_writer_does_not_depend_on_how_many_are_made(cedar, tmp_path):
    fewer = make_synthetic_dataset(tmp_path, "cedar", n_writers=1, n_genuine=4, n_forged=3, seed=1, image_size=96, progress=False)
    for rel in _files(Path(fewer["root"])):
        assert (Path(fewer["root"]) / rel).read_bytes() == (Path(cedar["root"]) / rel).read_bytes()


@pytest.mark.parametrize("language, prefix", [("hindi", "H"), ("bengali", "B")])
def test_bhsig_layout_and_names(tmp_path, language, prefix):
    info = make_synthetic_dataset(tmp_path, "bhsig", n_writers=2, n_genuine=2, n_forged=3, image_size=64,
                                  language=language, progress=False)
    expected = [f"{w}/{prefix}-S-{w}-G-{n:02d}.tif" for w in (1, 2) for n in (1, 2)]
    expected += [f"{w}/{prefix}-S-{w}-F-{n:02d}.tif" for w in (1, 2) for n in (1, 2, 3)]
    assert _files(tmp_path) == sorted(expected)
    assert info["language"] == language
    assert _gray(tmp_path / expected[0]).dtype == np.uint8


def test_gpds_layout_names_with_spaces_and_a_shared_writer(tmp_path):
    info = make_synthetic_dataset(tmp_path, "gpds", n_writers=6, n_genuine=12, n_forged=4, image_size=64, progress=False)
    files = _files(tmp_path)
    assert len(files) == 6 * 16 and info["counts"]["files"] == 96
    train, test = info["splits"]["train"], info["splits"]["test"]
    shared = info["shared_writers"]
    assert len(shared) == 1 and shared[0] in train and shared[0] in test
    for rel in files:
        parts = rel.split("/")
        assert parts[0] in ("train", "test")
        kind = parts[-2]
        assert kind in ("genuine", "forge")
        assert parts[-1].startswith("cf-" if kind == "forge" else "c-") and parts[-1].endswith(".jpg")
        writer = int(parts[-1].split("-")[1])
        if parts[0] == "test":
            assert parts[1] == f"{writer:03d}" and writer in test
        else:
            assert len(parts) == 3 and writer in train
    with_spaces = info["files_with_spaces"]
    assert len(with_spaces) == 2 and all(" (Copy).jpg" in f for f in with_spaces)
    assert set(with_spaces) <= set(files)


def test_full_size_canvases_are_cedar_like(tmp_path):
    info = make_synthetic_dataset(tmp_path, "cedar", n_writers=2, n_genuine=2, n_forged=2, progress=False)
    for rel in _files(Path(info["root"])):
        rows, cols = _gray(tmp_path / rel).shape
        assert CANVAS_ROWS[0] <= rows <= CANVAS_ROWS[1] and CANVAS_COLS[0] <= cols <= CANVAS_COLS[1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layout": "mcyt"}, "unknown layout"),
        ({"image_size": 20}, "too small"),
        ({"n_genuine": 1}, "n_genuine >= 2"),
        ({"layout": "bhsig", "language": "tamil"}, "unknown language"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_synthetic_dataset(tmp_path, **{"n_writers": 1, **kwargs})


def test_learnable_but_not_trivial(tmp_path):
    """A fixed, simple distance separates genuine from forgery pairs only partly.

    Distances between the normalized, inverted scans resized to 64x64: pixel
    L2 and the L2 between HOG descriptors. 0 % EER would mean the task is
    trivial, 50 % that there is nothing to learn. benchmarks/bench_data.py
    gives the figure at full size and with more writers.
    """
    n_writers, n_genuine, n_forged = 6, 8, 8
    info = make_synthetic_dataset(tmp_path, "cedar", n_writers=n_writers, n_genuine=n_genuine, n_forged=n_forged,
                                  image_size=160, progress=False)
    root = Path(info["root"])

    def features(rel: str) -> tuple[np.ndarray, np.ndarray]:
        scan = _gray(root / rel)
        normalized, _ = normalize_image(scan, scan.shape)
        small = np.asarray(Image.fromarray(255 - normalized).resize((64, 64), Image.BILINEAR), np.float32) / 255
        return small.ravel(), hog(small, orientations=8, pixels_per_cell=(8, 8), cells_per_block=(2, 2))

    eers = {"pixel": ([], []), "hog": ([], [])}
    for w in range(1, n_writers + 1):
        genuine = [features(f"full_org/original_{w}_{n}.png") for n in range(1, n_genuine + 1)]
        forged = [features(f"full_forg/forgeries_{w}_{n}.png") for n in range(1, n_forged + 1)]
        pairs = [(a, b, 1) for a, b in itertools.combinations(genuine, 2)] + [(g, f, 0) for g in genuine for f in forged]
        for k, name in enumerate(eers):
            eers[name][0].extend(np.linalg.norm(a[k] - b[k]) for a, b, _ in pairs)
            eers[name][1].extend(label for _, _, label in pairs)
    for name, (distances, labels) in eers.items():
        eer = compute_metrics(distances, labels)["eer"]
        assert 0.05 < eer < 0.45, f"{name} EER {eer:.3f}"


def test_ensure_synthetic_dataset_reuses_a_finished_corpus(tmp_path):
    from synthetic_signatures import MANIFEST

    arguments = dict(layout="cedar", n_writers=2, n_genuine=2, n_forged=2, image_size=48, progress=False)
    first = ensure_synthetic_dataset(tmp_path, **arguments)
    assert first["reused"] is False and (tmp_path / MANIFEST).is_file()
    scan = tmp_path / first["files"][0]
    stamp = scan.stat().st_mtime_ns
    again = ensure_synthetic_dataset(tmp_path, **arguments)
    assert again["reused"] is True and again["files"] == first["files"] and scan.stat().st_mtime_ns == stamp
    scan.unlink()  # a missing scan: made again
    assert ensure_synthetic_dataset(tmp_path, **arguments)["reused"] is False and scan.is_file()
    assert ensure_synthetic_dataset(tmp_path, **{**arguments, "seed": 5})["reused"] is False  # other arguments
    (tmp_path / MANIFEST).write_text("{not json")
    assert ensure_synthetic_dataset(tmp_path, **{**arguments, "seed": 5})["reused"] is False
