"""What a signature scan looks like, in numbers: paper and ink grey, stroke width, pen lifts, slant, size.

Measured to compare corpora (a procedural one with real scans: ``benchmarks/bench_realism.py``), not used by
training. Every scan is first resized so that its longer side is ``MEASURE_SIDE`` pixels (the size of
cedar-dev's scans), so that widths in pixels compare across corpora scanned at other sizes.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from module.data.datasets.cedar import scan_cedar
from module.data.images import imread_tool
from module.data.preprocess import BLUR_SIGMA, MIN_INK_CONTRAST, BlankScanError, ink_threshold

MEASURE_SIDE = 400  # pixels, the longer side every scan is measured at
MIN_COMPONENT_PX = 15  # ink blobs smaller than this (dust, scanner specks) are not pen strokes
PAPER_MARGIN_PX = 3  # paper pixels this close to ink are the stroke's blurred edge, not paper
SLANTS_DEG = np.arange(-45.0, 45.5, 1.0)  # the slants tried, degrees from vertical, right-leaning positive

SCAN_STATISTICS = {
    "paper_grey": "median grey level of the paper (0 black, 255 white)",
    "paper_noise": "standard deviation of the paper's grey levels",
    "ink_grey": "median grey level of the ink",
    "ink_grey_iqr": "interquartile range of the ink's grey levels (pen pressure variation)",
    "stroke_width_px": "mean stroke width along the strokes, pixels at the measured size",
    "ink_fraction": "ink pixels over the ink's bounding box",
    "components": "connected ink blobs of at least 15 pixels (pen lifts + 1)",
    "slant_deg": "slant of the writing, degrees from vertical, right-leaning positive",
    "aspect": "width over height of the ink's bounding box",
    "height_fraction": "height of the ink's bounding box over the scan's height",
    "roughness": "outline length over twice the stroke length (1 for a smooth pen line; tremor raises it)",
}


def _resized(scan: np.ndarray) -> np.ndarray:
    rows, cols = scan.shape
    factor = MEASURE_SIDE / max(rows, cols)
    size = (max(1, round(cols * factor)), max(1, round(rows * factor)))
    return np.asarray(Image.fromarray(scan).resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)


def _slant(ink: np.ndarray) -> float:
    """The shear that makes the ink's column profile sharpest: near-vertical strokes stack into few columns."""
    rows, cols = np.nonzero(ink)
    height = rows.max() - rows + 0.0  # sheared about the bottom row
    best, best_score = 0.0, -1.0
    for degrees in SLANTS_DEG:
        shifted = np.round(cols - height * np.tan(np.radians(degrees))).astype(np.int64)
        score = float(np.square(np.bincount(shifted - shifted.min())).sum())
        if score > best_score:
            best, best_score = float(degrees), score
    return best


def scan_statistics(scan: np.ndarray) -> dict[str, float]:
    """The statistics of ``SCAN_STATISTICS`` for one scan.

    Args:
        scan: grayscale uint8 [H, W], dark ink on light paper.

    Returns:
        name -> value, widths in pixels at a longer side of ``MEASURE_SIDE``.

    Raises:
        BlankScanError: the scan holds no ink (blank paper, only dust), as ``normalize_image`` judges it.
    """
    from scipy.ndimage import binary_dilation, distance_transform_edt
    from skimage.filters import gaussian, threshold_otsu
    from skimage.measure import label, perimeter
    from skimage.morphology import skeletonize

    image = _resized(np.asarray(scan, dtype=np.uint8))
    blurred = gaussian(image.astype(np.float64), sigma=BLUR_SIGMA, preserve_range=True)
    # The preprocessing's test for ink (BlankScanError on blank paper), and the blurred strokes' extent.
    near_ink = binary_dilation(blurred <= ink_threshold(blurred), iterations=PAPER_MARGIN_PX)
    ink = image <= threshold_otsu(image)
    contrast = float(image[~ink].mean() - image[ink].mean())
    if contrast < MIN_INK_CONTRAST:  # dust on the paper: Otsu split the paper's own noise
        raise BlankScanError(f"the scan holds no ink to measure (its two grey classes differ by {contrast:.1f})")
    near_ink |= ink
    labels = label(ink, connectivity=2)
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= MIN_COMPONENT_PX) + 1
    if not keep.size:
        raise BlankScanError(f"the scan holds no ink blob of {MIN_COMPONENT_PX} pixels or more to measure")
    ink &= np.isin(labels, keep)
    paper, ink_levels = image[~near_ink].astype(np.float64), image[ink].astype(np.float64)
    skeleton = skeletonize(ink)
    width = 2.0 * float(distance_transform_edt(ink)[skeleton].mean())
    rows, cols = np.nonzero(ink)
    box_rows, box_cols = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    q1, median, q3 = np.percentile(ink_levels, [25, 50, 75])
    return {
        "paper_grey": float(np.median(paper)),
        "paper_noise": float(paper.std()),
        "ink_grey": float(median),
        "ink_grey_iqr": float(q3 - q1),
        "stroke_width_px": width,
        "ink_fraction": float(ink.sum() / (box_rows * box_cols)),
        "components": float(len(keep)),
        "slant_deg": _slant(ink),
        "aspect": float(box_cols / box_rows),
        "height_fraction": float(box_rows / image.shape[0]),
        "roughness": float(perimeter(ink) / (2.0 * skeleton.sum())),
    }


WRITER_STATISTICS = {
    "width_cv": "a writer's genuine signatures: coefficient of variation of the ink's width",
    "height_cv": "a writer's genuine signatures: coefficient of variation of the ink's height",
    "slant_std_deg": "a writer's genuine signatures: standard deviation of the slant, degrees",
    "forged_width_ratio": "a writer's forgeries over their genuines: median ink width (aspect x height)",
    "forged_stroke_ratio": "a writer's forgeries over their genuines: median stroke width",
    "forged_roughness_ratio": "a writer's forgeries over their genuines: median roughness",
    "forged_slant_shift_deg": "a writer's forgeries minus their genuines: |median slant difference|, degrees",
    "forged_paper_shift": "a writer's forgeries minus their genuines: median paper grey difference",
}


def writer_statistics(genuine: Iterable[Mapping[str, float]], forged: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """How one writer's scans vary, and how their forgeries differ, from ``scan_statistics`` of each scan.

    Returns:
        name -> value for ``WRITER_STATISTICS``; the forgery ones are NaN for a writer without forgeries.
    """
    genuine, forged = list(genuine), list(forged)

    def values(scans: list[Mapping[str, float]], name: str) -> np.ndarray:
        if name == "width":
            return np.array([s["aspect"] * s["height_fraction"] for s in scans])
        return np.array([s[name] for s in scans])

    def cv(name: str) -> float:
        v = values(genuine, name)
        return float(v.std() / v.mean())

    def forged_vs_genuine(name: str, how: str) -> float:
        if not forged:
            return float("nan")
        f, g = np.median(values(forged, name)), np.median(values(genuine, name))
        return float(f / g) if how == "ratio" else float(f - g)

    return {
        "width_cv": cv("width"),
        "height_cv": cv("height_fraction"),
        "slant_std_deg": float(values(genuine, "slant_deg").std()),
        "forged_width_ratio": forged_vs_genuine("width", "ratio"),
        "forged_stroke_ratio": forged_vs_genuine("stroke_width_px", "ratio"),
        "forged_roughness_ratio": forged_vs_genuine("roughness", "ratio"),
        "forged_slant_shift_deg": abs(forged_vs_genuine("slant_deg", "difference")),
        "forged_paper_shift": forged_vs_genuine("paper_grey", "difference"),
    }


def corpus_statistics(root: str | os.PathLike, samples: int = 12) -> dict[str, list[dict[str, float]]]:
    """Every scan's and every writer's statistics in a CEDAR-layout folder.

    Args:
        root: a folder with ``full_org/`` and ``full_forg/`` (``scan_cedar``).
        samples: genuine and forged scans measured a writer, the first by sample number.

    Returns:
        ``{"genuine": [scan_statistics], "forged": [...], "writers": [writer_statistics]}``; writers with fewer
        than 2 genuine scans are left out.
    """
    root = Path(root)
    found = scan_cedar(root).files
    corpus = {"genuine": [], "forged": [], "writers": []}
    for writer in sorted(found):
        scans = {kind: [scan_statistics(imread_tool(root / path)) for _, path in sorted(found[writer][kind])[:samples]]
                 for kind in ("genuine", "forged")}
        if len(scans["genuine"]) < 2:
            continue
        corpus["genuine"] += scans["genuine"]
        corpus["forged"] += scans["forged"]
        corpus["writers"].append(writer_statistics(scans["genuine"], scans["forged"]))
    return corpus


def summary(rows: list[Mapping[str, float]], name: str) -> tuple[float, float, float]:
    """(median, 25th, 75th percentile) of one statistic, NaNs left out."""
    values = np.array([row[name] for row in rows], dtype=np.float64)
    values = values[np.isfinite(values)]
    return tuple(float(v) for v in np.percentile(values, [50, 25, 75])) if values.size else (np.nan,) * 3
