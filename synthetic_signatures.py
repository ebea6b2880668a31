"""A procedural corpus of signature scans: writers, genuine signatures and skilled forgeries.

Every writer gets a signature of their own: a few cursive words built from
letter-like motifs (humps, cups, ovals, loops above and below the line, a
capital; the pen lifts now and then between letters, some get a dot),
perhaps an initial, an underline flourish and a short bar, drawn
with the writer's slant, baseline tilt, size, width-to-height ratio, pen
width and pressure rhythm. Genuine samples repeat that signature with the
small variation of a practised hand (each point a little off, the whole a
little bigger or more slanted). Skilled forgeries copy the same shape, but
each writer is forged by one to three forgers with habits of their own, the
ways real forgeries differ: a different slant, proportions off (tall letters
too tall or too short, letters misplaced), a slower hand (a slight tremor along
the stroke, blunt stroke ends instead of tapered ones, flatter pressure) and
another, usually finer, pen. Tests/test_synthetic.py and benchmarks/bench_data.py show that a
fixed pixel distance separates the two classes only partly (EER between 0 and
50 %), so a model has something to learn.

Scans look like the real ones: grey ballpoint ink on slightly uneven, noisy
light paper, canvas sizes that vary from scan to scan (CEDAR-like 250-450 x
400-700 pixels at full size), in the real folder layouts and file names (see
`make_synthetic_dataset`). The constants below are set from real CEDAR scans
measured with `benchmarks/bench_realism.py` (paper and ink grey, stroke
width, pen lifts, a writer's variation, how forgeries differ): the README's
"No checkpoint?" gives the table. Everything is deterministic for a seed; each
image has its own random stream, so a writer's scans do not depend on how
many writers are made.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import distance_transform_edt, gaussian_filter

from models.errors import InputError
from module.core.io import atomic_write_text, naming_path
from module.core.progress import progress_bar
from module.data.datasets import DATASETS
from module.data.datasets.bhsig import LANGUAGES

LAYOUTS = tuple(DATASETS)
# Written into a corpus's root when it is complete; see ensure_synthetic_dataset.
MANIFEST = "synthetic_corpus.json"

# Range of full-size canvases (rows, columns); CEDAR scans are of this order.
CANVAS_ROWS = (250, 450)
CANVAS_COLS = (400, 700)

# Letter motifs: keypoints in letter units (x to the right, y up, baseline 0,
# x-height 1, ascenders up to ~2.4, descenders down to ~-1.2).
MOTIFS = {
    "hump": [(0.0, 0.1), (0.15, 0.9), (0.35, 1.0), (0.5, 0.45), (0.6, 0.0)],
    "cup": [(0.05, 1.0), (0.15, 0.1), (0.4, 0.05), (0.55, 0.95), (0.65, 0.1)],
    "oval": [(0.5, 0.9), (0.2, 1.0), (0.05, 0.45), (0.25, 0.0), (0.5, 0.5), (0.55, 1.0), (0.6, 0.2), (0.75, 0.05)],
    "loop_up": [(0.2, 0.6), (0.45, 1.7), (0.45, 2.35), (0.25, 2.3), (0.2, 1.4), (0.3, 0.1), (0.55, 0.1)],
    "loop_down": [(0.35, 0.9), (0.3, 0.0), (0.3, -1.0), (0.1, -1.2), (0.05, -0.8), (0.45, 0.05), (0.65, 0.45)],
    "eye": [(0.0, 0.3), (0.4, 0.75), (0.3, 1.0), (0.1, 0.6), (0.2, 0.1), (0.55, 0.15)],
    "spike": [(0.15, 1.0), (0.25, 0.0), (0.45, 0.4)],
}
CAPITAL = [(0.0, 0.5), (0.35, 2.5), (0.8, 2.9), (0.75, 2.2), (0.25, 0.0), (0.1, 0.7), (0.9, 1.3), (1.1, 0.2)]

# Pen lifts: the chance that a stroke ends between two letters, and that a letter gets a dot. cedar-dev's
# scans have a median of 5 ink blobs (benchmarks/bench_realism.py).
PEN_LIFT_P = 0.2
DOT_P = 0.08

# Variation of genuine samples (a practised hand). Measured on cedar-dev: a writer's genuine signatures vary in
# width and height by 11-12 % (coefficient of variation) and in slant by 5 degrees (standard deviation).
GENUINE_POINT_JITTER = 0.05  # letter units, each keypoint
GENUINE_STROKE_SHIFT = 0.06  # letter units, each stroke as a whole
GENUINE_SCALE_STD = 0.08
GENUINE_SLANT_STD = 0.07  # radians (4 degrees)
GENUINE_TILT_STD = 0.035  # radians

# Habits of a skilled forger, drawn once per forger.
FORGER_SHAPE_ERROR = 0.13  # letter units, a fixed offset per keypoint
FORGER_STROKE_SHIFT = 0.12  # letter units, a fixed offset per stroke
FORGER_HEIGHT_ERROR = 0.18  # relative error of the ascender and descender heights
FORGER_ASPECT_ERROR = 0.08
FORGER_SLANT_OFFSET = (0.09, 0.22)  # radians, either sign (5 to 13 degrees)
# cedar-dev's forgeries are drawn with strokes 6 % thinner than their writer's and outlines no rougher
# (bench_realism.py): the tremor of a slow hand is a fraction of a pixel at scan resolution.
FORGER_TREMOR_PX = (0.1, 0.35)  # amplitude at full size
FORGER_PEN_FACTOR = (0.6, 1.0)
FORGERY_POINT_JITTER = 0.06  # letter units, each keypoint of each forgery


@dataclass(frozen=True)
class Performance:
    """How one signature is drawn: shape and pen, all lengths at full size.

    `strokes` are keypoint arrays [K, 2] in letter units (x right, y up);
    angles are radians; `tremor_px` and `pen_px` are pixels at full size.
    """

    strokes: tuple[np.ndarray, ...]
    slant: float
    tilt: float
    unit_px: float
    aspect: float
    pen_px: float
    pressure_wave: float
    pressure_period_px: float
    taper: float
    tremor_px: float
    tremor_period_px: float
    ink: float


@dataclass(frozen=True)
class ForgerHabits:
    """What one forger gets wrong, the same way in every forgery they make."""

    shape_error: tuple[np.ndarray, ...]
    height_factor: float
    aspect_factor: float
    slant_offset: float
    tremor_px: float
    tremor_period_px: float
    pen_factor: float
    pressure_flatness: float
    ink_offset: float


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _word(rng: np.random.Generator, x0: float, n_letters: int, capital: bool) -> tuple[list[np.ndarray], float]:
    """Strokes (keypoints [K, 2] each) of one cursive word starting at x0, and where it ends.

    The pen lifts between letters now and then (a stroke ends, the next starts at the following letter), and a
    letter may get a dot above it.
    """
    strokes, points = [], [(x0 - 0.2, 0.2 + rng.normal(0, 0.1))]
    motifs = [CAPITAL] if capital else []
    names = list(MOTIFS)
    motifs += [MOTIFS[names[i]] for i in rng.integers(0, len(names), n_letters)]
    x = x0
    for number, motif in enumerate(motifs):
        if number > 0 and rng.random() < PEN_LIFT_P:
            strokes.append(np.asarray(points))
            points = []
        shape = np.asarray(motif) + rng.normal(0, 0.1, (len(motif), 2))
        shape[:, 0] *= rng.uniform(0.8, 1.3)
        points.extend(shape + (x, 0.0))
        if rng.random() < DOT_P:
            dot_x = x + shape[:, 0].mean()
            strokes.append(np.array([(dot_x, 1.6), (dot_x + 0.1, 1.65)]))
        x += shape[:, 0].max() + rng.uniform(0.05, 0.25)
    strokes.append(np.asarray(points))
    return strokes, x


def writer_style(rng: np.random.Generator) -> Performance:
    """A writer's signature as they usually draw it."""
    strokes = []
    x = 0.0
    if rng.random() < 0.4:  # an initial before the name
        initial, x = _word(rng, x, 0, capital=True)
        strokes += initial
        x += 0.4
    for _ in range(rng.integers(1, 3)):
        word, x = _word(rng, x, int(rng.integers(4, 9)), capital=rng.random() < 0.7)
        strokes += word
        x += rng.uniform(0.5, 1.0)
    if rng.random() < 0.5:  # an underline flourish sweeping back under the name
        x_end = x * rng.uniform(0.7, 1.0)
        strokes.append(np.array([
            (x_end, -0.2), (x_end * 0.75, -0.8 + rng.normal(0, 0.15)),
            (x_end * 0.35, -0.9 + rng.normal(0, 0.15)), (rng.uniform(-0.4, 0.3), -0.5),
        ]))
    if rng.random() < 0.5:  # a short bar or dot stroke above the line
        bx = rng.uniform(0.2, 0.8) * x
        strokes.append(np.array([(bx, 1.7), (bx + rng.uniform(0.3, 0.9), 1.8 + rng.normal(0, 0.15))]))
    return Performance(
        strokes=tuple(strokes),
        slant=rng.normal(0.15, 0.2),
        tilt=rng.normal(0.0, 0.05),
        unit_px=rng.uniform(28.0, 45.0),
        aspect=rng.uniform(0.8, 1.25),
        pen_px=rng.uniform(1.8, 4.0),
        pressure_wave=rng.uniform(0.2, 0.5),
        pressure_period_px=rng.uniform(40.0, 120.0),
        taper=rng.uniform(0.04, 0.12),
        tremor_px=0.0,
        tremor_period_px=10.0,
        ink=rng.uniform(75.0, 135.0),  # ballpoint on a scanner: cedar-dev's ink has a median grey of 138
    )


def genuine_sample(style: Performance, rng: np.random.Generator) -> Performance:
    """One genuine signature: the writer's own, with a practised hand's variation."""
    strokes = tuple(
        s + rng.normal(0, GENUINE_STROKE_SHIFT, 2) + rng.normal(0, GENUINE_POINT_JITTER, s.shape) for s in style.strokes
    )
    return replace(
        style,
        strokes=strokes,
        slant=style.slant + rng.normal(0, GENUINE_SLANT_STD),
        tilt=style.tilt + rng.normal(0, GENUINE_TILT_STD),
        unit_px=style.unit_px * (1 + rng.normal(0, GENUINE_SCALE_STD)),
        aspect=style.aspect * (1 + rng.normal(0, GENUINE_SCALE_STD)),
        pen_px=style.pen_px * (1 + rng.normal(0, 0.06)),
        ink=style.ink + rng.normal(0, 5.0),
    )


def forger_habits(style: Performance, rng: np.random.Generator) -> ForgerHabits:
    """A forger of this writer: their fixed errors of shape, slant, pen and hand."""
    return ForgerHabits(
        shape_error=tuple(
            rng.normal(0, FORGER_STROKE_SHIFT, 2) + rng.normal(0, FORGER_SHAPE_ERROR, s.shape) for s in style.strokes
        ),
        height_factor=1 + rng.normal(0, FORGER_HEIGHT_ERROR),
        aspect_factor=1 + rng.normal(0, FORGER_ASPECT_ERROR),
        slant_offset=rng.choice([-1, 1]) * rng.uniform(*FORGER_SLANT_OFFSET),
        tremor_px=rng.uniform(*FORGER_TREMOR_PX),
        tremor_period_px=rng.uniform(6.0, 14.0),
        pen_factor=rng.uniform(*FORGER_PEN_FACTOR),
        pressure_flatness=rng.uniform(0.2, 0.6),
        ink_offset=rng.normal(5.0, 12.0),  # a lighter hand: cedar-dev's forged ink is 8 grey levels lighter
    )


def forgery_sample(style: Performance, habits: ForgerHabits, rng: np.random.Generator) -> Performance:
    """One skilled forgery: the writer's shape, drawn with the forger's habits."""
    strokes = []
    for s, error in zip(style.strokes, habits.shape_error):
        s = s + error + rng.normal(0, FORGERY_POINT_JITTER, s.shape)
        # Tall and deep parts of letters come out too tall or too short.
        y = s[:, 1]
        s[:, 1] = np.where(y > 1, 1 + (y - 1) * habits.height_factor, np.where(y < 0, y * habits.height_factor, y))
        strokes.append(s)
    return replace(
        style,
        strokes=tuple(strokes),
        slant=style.slant + habits.slant_offset + rng.normal(0, GENUINE_SLANT_STD),
        tilt=style.tilt + rng.normal(0, GENUINE_TILT_STD * 1.5),
        unit_px=style.unit_px * (1 + rng.normal(0, GENUINE_SCALE_STD * 1.5)),
        aspect=style.aspect * habits.aspect_factor * (1 + rng.normal(0, GENUINE_SCALE_STD)),
        pen_px=style.pen_px * habits.pen_factor,
        pressure_wave=style.pressure_wave * habits.pressure_flatness,
        taper=0.0,  # a slow hand starts and stops with the pen down: blunt ends
        tremor_px=habits.tremor_px,
        tremor_period_px=habits.tremor_period_px,
        ink=float(np.clip(style.ink + habits.ink_offset, 0.0, 120.0)),
    )


def _catmull_rom(points: np.ndarray, spacing: float) -> np.ndarray:
    """A smooth curve [N, 2] through `points` [K, 2], sampled about every `spacing` units."""
    padded = np.vstack([points[:1], points, points[-1:]])
    length = np.linalg.norm(np.diff(points, axis=0), axis=1).max(initial=0.0)
    steps = max(2, int(np.ceil(2 * length / spacing)))  # curves run up to about twice their chord
    t = np.linspace(0.0, 1.0, steps, endpoint=False)[:, None, None]
    p0, p1, p2, p3 = padded[:-3], padded[1:-2], padded[2:-1], padded[3:]
    curve = 0.5 * (
        2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (3 * p1 - p0 - 3 * p2 + p3) * t**3
    )
    return np.vstack([curve.transpose(1, 0, 2).reshape(-1, 2), points[-1:]])


def _stroke_geometry(perf: Performance, stroke: np.ndarray, scale: float, rng: np.random.Generator):
    """Centre line [N, 2] (x, y pixels, y up) and pen radius [N] of one stroke."""
    shear = np.array([[perf.aspect, np.tan(perf.slant)], [0.0, 1.0]])
    cos, sin = np.cos(perf.tilt), np.sin(perf.tilt)
    rotation = np.array([[cos, -sin], [sin, cos]])
    px = stroke @ shear.T @ rotation.T * perf.unit_px * scale
    line = _catmull_rom(px, spacing=0.4)
    step = np.linalg.norm(np.diff(line, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(step)])
    if perf.tremor_px > 0:
        tangent = np.gradient(line, axis=0)
        normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
        normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-9
        period = perf.tremor_period_px * scale
        wobble = sum(
            np.sin(2 * np.pi * arc / (period * f) + rng.uniform(0, 2 * np.pi)) for f in rng.uniform(0.7, 1.4, 3)
        ) / 3
        line = line + normal * (perf.tremor_px * scale * wobble)[:, None]
    pressure = 1 + perf.pressure_wave * np.sin(2 * np.pi * arc / (perf.pressure_period_px * scale) + rng.uniform(0, 6.3))
    radius = 0.5 * perf.pen_px * scale * pressure
    if perf.taper > 0 and arc[-1] > 0:
        ends = np.minimum(arc, arc[-1] - arc) / (perf.taper * arc[-1])
        radius = radius * np.clip(0.35 + 0.65 * ends, 0.35, 1.0)
    return line, np.maximum(radius, 0.55)


def render(perf: Performance, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """A scan of the performance: uint8 [rows, columns], dark ink on light noisy paper.

    `scale` shrinks everything (canvas, letters, pen) from the full CEDAR-like size.
    """
    geometry = [_stroke_geometry(perf, s, scale, rng) for s in perf.strokes]
    lines = np.vstack([g[0] for g in geometry]) * (1.0, -1.0)  # y up -> rows down
    radii = np.concatenate([g[1] for g in geometry])
    margin = radii.max() + 2.0
    extent = lines.max(axis=0) - lines.min(axis=0) + 2 * margin
    # Scans are cut loosely around the signature: the canvas follows its size
    # within the dataset's range, and a signature too big for the largest
    # canvas is shrunk, as a person signs smaller in a small box.
    cols = int(np.clip(extent[0] / rng.uniform(0.75, 0.9), CANVAS_COLS[0] * scale, CANVAS_COLS[1] * scale))
    rows = int(np.clip(extent[1] / rng.uniform(0.55, 0.75), CANVAS_ROWS[0] * scale, CANVAS_ROWS[1] * scale))
    fit = min(1.0, 0.92 * cols / extent[0], 0.9 * rows / extent[1])
    lines = lines * fit
    lines = lines - (lines.min(axis=0) - margin)
    box_cols, box_rows = (np.ceil(lines.max(axis=0) + margin) + 1).astype(int)
    top = int(rng.integers(0, max(rows - box_rows, 0) + 1))
    left = int(rng.integers(0, max(cols - box_cols, 0) + 1))

    # Pen coverage from the distance to the nearest centre-line pixel and that pixel's pen radius.
    centre = np.zeros((box_rows, box_cols), dtype=np.float32)
    r_idx = np.clip(np.rint(lines[:, 1]).astype(int), 0, box_rows - 1)
    c_idx = np.clip(np.rint(lines[:, 0]).astype(int), 0, box_cols - 1)
    centre[r_idx, c_idx] = radii  # where a stroke crosses itself either radius will do
    distance, (near_r, near_c) = distance_transform_edt(centre == 0, return_indices=True)
    coverage = np.clip(centre[near_r, near_c] - distance + 0.5, 0.0, 1.0)
    coverage = gaussian_filter(coverage, 0.5)  # scanner optics soften the edges

    # Paper: a level, slow unevenness (noise drawn on a coarse grid and
    # smoothly enlarged, far cheaper than blurring a full-size field) and grain.
    # cedar-dev's paper: grey 238-242, standard deviation 2.5-2.8.
    coarse = rng.normal(0.0, rng.uniform(0.5, 2.0), (rows // 16 + 2, cols // 16 + 2)).astype(np.float32)
    unevenness = np.asarray(Image.fromarray(coarse, mode="F").resize((cols, rows), Image.BICUBIC))
    grain = rng.standard_normal((rows, cols), dtype=np.float32) * rng.uniform(2.0, 3.2)
    scan = rng.uniform(228.0, 248.0) + unevenness + grain
    window = scan[top:top + box_rows, left:left + box_cols]
    window -= (window - perf.ink) * coverage[: window.shape[0], : window.shape[1]]
    return np.clip(np.rint(scan), 0, 255).astype(np.uint8)


def _save(scan: np.ndarray, path: Path) -> None:
    image = Image.fromarray(scan, mode="L")
    with naming_path(path):
        if path.suffix == ".jpg":
            image.save(path, quality=92)
        elif path.suffix == ".png":
            image.save(path, compress_level=1)  # noisy paper barely compresses; level 1 is many times faster
        else:
            image.save(path)


def make_synthetic_dataset(
    root: str | os.PathLike,
    layout: str = "cedar",
    n_writers: int = 10,
    n_genuine: int | None = None,
    n_forged: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
    language: str = "hindi",
    progress: bool = True,
) -> dict:
    """Write a synthetic signature corpus in a real dataset's folder layout.

    Layouts and names (writers numbered from 1, samples from 1):
      - "cedar": full_org/original_{w}_{n}.png, full_forg/forgeries_{w}_{n}.png
      - "bhsig": {w}/H-S-{w}-G-{nn}.tif, {w}/H-S-{w}-F-{nn}.tif (B- for language="bengali")
      - "gpds": train/genuine/c-{www}-{nn}.jpg, train/forge/cf-{www}-{nn}.jpg,
        test/{www}/genuine/c-..., test/{www}/forge/cf-...; one writer appears in
        both splits and two names carry " (Copy)", as in copies found in the wild.

    Args:
        root: folder to write into (created; existing files of the same names are replaced).
        n_genuine, n_forged: samples per writer; None takes the real dataset's
            (CEDAR 24 + 24, BHSig and GPDS 24 + 30).
        seed: the corpus is a function of the seed (and the other arguments).
        image_size: longest canvas side in pixels, to make small scans for fast
            tests (canvases then vary from about 57 % to 100 % of it); None
            gives full CEDAR-like scans, 250-450 x 400-700 pixels.
        language: "hindi" or "bengali", for the bhsig layout.

    Returns:
        dict with root, layout, writers (list of int), n_genuine, n_forged,
        counts ({"genuine", "forged", "files"}), files (relative paths),
        seed, image_size, seconds, and
        per layout: language (bhsig); splits, shared_writers, files_with_spaces (gpds).
    """
    if layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if language not in LANGUAGES:
        raise InputError(f"unknown language {language!r}: choose 'hindi' or 'bengali'")
    default_genuine, default_forged = DATASETS[layout].real_counts
    n_genuine = default_genuine if n_genuine is None else n_genuine
    n_forged = default_forged if n_forged is None else n_forged
    if n_writers < 1 or n_genuine < 2 or n_forged < 0:
        raise InputError(f"need n_writers >= 1, n_genuine >= 2, n_forged >= 0; got {n_writers}, {n_genuine}, {n_forged}")
    if image_size is not None and image_size < 48:
        raise InputError(f"image_size {image_size} is too small for a legible signature: use 48 or more, or None")
    scale = 1.0 if image_size is None else image_size / CANVAS_COLS[1]

    start = time.perf_counter()
    root = Path(root)
    writers = list(range(1, n_writers + 1))
    plan, facts = DATASETS[layout].synthetic_files(writers, n_genuine, n_forged, _rng(seed, 0), language=language)
    styles = {w: writer_style(_rng(seed, 1, w)) for w in writers}
    forgers = {}
    for w in writers:
        rng = _rng(seed, 2, w)
        forgers[w] = [forger_habits(styles[w], rng) for _ in range(int(rng.integers(1, 4)))]
    for directory in sorted({(root / p).parent for *_, p in plan}):
        directory.mkdir(parents=True, exist_ok=True)
    for w, forged, n, rel in progress_bar(plan, desc=f"synthetic {layout}", unit="scan", disable=not progress):
        rng = _rng(seed, 3, w, int(forged), n)
        if forged:
            perf = forgery_sample(styles[w], forgers[w][(n - 1) % len(forgers[w])], rng)
        else:
            perf = genuine_sample(styles[w], rng)
        _save(render(perf, rng, scale), root / rel)

    n_forged_files = sum(1 for _, forged, _, _ in plan if forged)
    return {
        "root": str(root),
        "layout": layout,
        "writers": writers,
        "n_genuine": n_genuine,
        "n_forged": n_forged,
        "counts": {"genuine": len(plan) - n_forged_files, "forged": n_forged_files, "files": len(plan)},
        "files": [rel for *_, rel in plan],
        "seed": seed,
        "image_size": image_size,
        "seconds": round(time.perf_counter() - start, 2),
        **facts,
    }


def ensure_synthetic_dataset(
    root: str | os.PathLike,
    layout: str = "cedar",
    n_writers: int = 10,
    n_genuine: int | None = None,
    n_forged: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
    language: str = "hindi",
    progress: bool = True,
) -> dict:
    """`make_synthetic_dataset`, skipped when `root` already holds this very corpus.

    A finished corpus leaves a manifest (synthetic_corpus.json: the arguments
    and the dict returned); it is reused when the arguments match and every
    file is there. Otherwise the manifest is removed first, so that an
    interrupted run is never taken for a finished one, and the corpus is made
    afresh. Returns make_synthetic_dataset's dict plus "reused" (bool).
    """
    root = Path(root)
    arguments = {
        "layout": layout, "n_writers": n_writers, "n_genuine": n_genuine, "n_forged": n_forged,
        "seed": seed, "image_size": image_size, "language": language,
    }
    manifest = root / MANIFEST
    if manifest.is_file():
        try:
            saved = json.loads(manifest.read_text())
            if saved["arguments"] == arguments and all((root / f).is_file() for f in saved["info"]["files"]):
                return {**saved["info"], "reused": True}
        except (ValueError, KeyError, TypeError):
            pass  # an unreadable manifest: make the corpus again
        manifest.unlink()
    info = make_synthetic_dataset(root, **arguments, progress=progress)
    atomic_write_text(manifest, json.dumps({"arguments": arguments, "info": info}, indent=1))
    return {**info, "reused": False}
