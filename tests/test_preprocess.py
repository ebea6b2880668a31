"""normalize_image against the authors' outputs (tests/data/preprocess) and on edge cases."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.draw import line_aa

from module.data.preprocess import BlankScanError, normalize_image

DATA = Path(__file__).parent / "data" / "preprocess"
SCANS = sorted(p.name for p in DATA.glob("sig_*.png"))


@pytest.fixture(scope="module")
def expected():
    return np.load(DATA / "preprocess_expected.npz")


def _paper(shape=(120, 240), level=230.0, noise=4.0, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.full(shape, level) + rng.normal(0.0, noise, shape)


def _draw_line(img: np.ndarray, r0: int, c0: int, r1: int, c1: int, ink: float, width: int) -> None:
    for k in range(width):
        rr, cc, coverage = line_aa(r0 + k, c0, r1 + k, c1)
        img[rr, cc] = np.minimum(img[rr, cc], img[rr, cc] - (img[rr, cc] - ink) * coverage)


def _uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def test_fixture_scans_are_present():
    assert len(SCANS) == 6


@pytest.mark.parametrize("name", SCANS)
def test_pixel_identical_to_reference(name, expected):
    img = np.asarray(Image.open(DATA / name).convert("L"))
    normalized, cropped = normalize_image(img, img.shape)
    assert normalized.dtype == np.uint8 and cropped.dtype == np.uint8
    np.testing.assert_array_equal(normalized, expected[f"{name}:normalized"])
    np.testing.assert_array_equal(cropped, expected[f"{name}:cropped"])


def test_centre_of_mass_goes_to_canvas_centre():
    img = _paper(noise=0.0)
    img[20:30, 10:20] = 0.0  # a 10x10 blot near the top-left corner
    normalized, cropped = normalize_image(_uint8(img), (120, 240))
    rows, cols = np.nonzero(normalized < 128)
    # The blot is symmetric, so its centre of mass lands within a pixel or two of the canvas centre.
    assert abs(rows.mean() - 60) <= 2 and abs(cols.mean() - 120) <= 2
    assert normalized[0, 0] == 255  # paper brighter than the threshold is whitened


def test_crop_larger_than_canvas_is_cut_centrally():
    img = _paper(shape=(100, 300), noise=0.0)
    _draw_line(img, 50, 10, 50, 290, ink=20.0, width=4)
    normalized, cropped = normalize_image(_uint8(img), (60, 100))
    assert normalized.shape == (60, 100)
    assert cropped.shape[1] == 100  # cut to the canvas width
    assert (normalized < 128).any(axis=0).all()  # the line crosses the whole canvas


def test_rejects_colour_arrays():
    with pytest.raises(ValueError, match="grayscale"):
        normalize_image(np.zeros((10, 10, 3), np.uint8), (10, 10))


@pytest.mark.parametrize(
    "img",
    [
        _uint8(_paper(noise=8.0)),
        _uint8(_paper(noise=20.0, seed=1)),
        np.full((80, 160), 237, np.uint8),
        np.zeros((80, 160), np.uint8),
    ],
    ids=["paper-noise-8", "paper-noise-20", "constant-paper", "constant-black"],
)
def test_blank_scan_raises(img):
    with pytest.raises(BlankScanError, match="holds no ink"):
        normalize_image(img, img.shape)


@pytest.mark.parametrize("ink, width", [(180.0, 2), (170.0, 1), (150.0, 3), (60.0, 4)])
def test_faint_ink_is_not_blank(ink, width):
    img = _paper(shape=(200, 400), noise=4.0)
    _draw_line(img, 50, 50, 150, 350, ink=ink, width=width)
    _draw_line(img, 150, 50, 60, 300, ink=ink, width=width)
    normalized, _ = normalize_image(_uint8(img), (200, 400))
    assert (normalized < 255).sum() > 100
