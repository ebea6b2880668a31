"""module/data/scan_statistics.py measures what it says on drawn scans, the procedural corpus stays within what
real CEDAR scans measure, and benchmarks/bench_realism.py writes its table."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from module.data.preprocess import BlankScanError
from module.data.scan_statistics import (
    SCAN_STATISTICS,
    WRITER_STATISTICS,
    corpus_statistics,
    scan_statistics,
    summary,
    writer_statistics,
)
from synthetic_signatures import make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]

# benchmarks/bench_realism.py on cedar-dev (real CEDAR writers 1-20, 12 genuine and 12 forged scans each): the
# median of each statistic and its interquartile range.
REAL_CEDAR = {
    "paper_grey": (239, 238, 242),
    "ink_grey": (138, 127, 146),
    "stroke_width_px": (3.18, 2.9, 3.68),
    "components": (5, 3, 6),
    "width_cv": (0.109, 0.0708, 0.126),
    "slant_std_deg": (4.99, 3.62, 7.29),
    "forged_stroke_ratio": (0.941, 0.833, 0.995),
}


def paper(rows: int = 200, cols: int = 400, grey: float = 240.0) -> np.ndarray:
    return np.random.default_rng(0).normal(grey, 2.0, (rows, cols)).clip(0, 255)


def test_a_drawn_bar_measures_its_grey_width_and_count() -> None:
    scan = paper()
    scan[96:104, 50:350] = 100  # a horizontal bar 8 px wide
    scan[20:24, 20:24] = 100  # a speck of 16 px: a blob
    scan[150:152, 380:382] = 100  # dust of 4 px: not a stroke
    stats = scan_statistics(scan.astype(np.uint8))
    assert set(stats) == set(SCAN_STATISTICS)
    assert stats["paper_grey"] == pytest.approx(240, abs=1)
    assert stats["ink_grey"] == pytest.approx(100, abs=1)
    assert stats["stroke_width_px"] == pytest.approx(8, abs=1.5)
    assert stats["components"] == 2
    assert stats["roughness"] == pytest.approx(1, abs=0.15)


def test_a_blank_scan_or_one_of_dust_says_so() -> None:
    with pytest.raises(BlankScanError, match="the scan holds no ink"):
        scan_statistics(np.full((100, 200), 240, dtype=np.uint8))
    dusty = paper()
    dusty[50:52, 50:52] = 60
    with pytest.raises(BlankScanError, match="the scan holds no ink"):
        scan_statistics(dusty.astype(np.uint8))


@pytest.mark.parametrize("degrees", [-20, 0, 25])
def test_the_slant_of_sheared_bars(degrees: int) -> None:
    scan = paper(200, 300)
    rows = np.arange(40, 160)
    for x in (60, 120, 180, 240):
        cols = np.round(x + (160 - rows) * np.tan(np.radians(degrees))).astype(int)  # leaning right for degrees > 0
        for width in range(3):
            scan[rows, cols + width] = 60
    assert scan_statistics(scan.astype(np.uint8))["slant_deg"] == pytest.approx(degrees, abs=2)


def test_writer_statistics_of_a_writer_without_forgeries() -> None:
    genuine = [dict.fromkeys(SCAN_STATISTICS, 1.0) | {"height_fraction": h, "slant_deg": s}
               for h, s in [(0.5, 10), (0.6, 14)]]
    stats = writer_statistics(genuine, [])
    assert set(stats) == set(WRITER_STATISTICS)
    assert stats["height_cv"] == pytest.approx(0.05 / 0.55) and stats["slant_std_deg"] == pytest.approx(2)
    assert np.isnan(stats["forged_stroke_ratio"])


def test_the_procedural_corpus_measures_like_real_cedar_scans(tmp_path: Path) -> None:
    """Full-size scans of 4 writers: each median within the real scans' interquartile range, widened by half of it
    on each side (4 writers are a small sample)."""
    make_synthetic_dataset(tmp_path, "cedar", n_writers=4, n_genuine=6, n_forged=6, seed=0, progress=False)
    corpus = corpus_statistics(tmp_path, samples=6)
    for name, (median, q1, q3) in REAL_CEDAR.items():
        group = "writers" if name in WRITER_STATISTICS else "genuine"
        value = summary(corpus[group], name)[0]
        margin = (q3 - q1) / 2
        assert q1 - margin <= value <= q3 + margin, f"{name}: {value:.3g}, real CEDAR {median} [{q1}, {q3}]"


def test_bench_realism_writes_its_table(tmp_path: Path) -> None:
    real = tmp_path / "real"
    make_synthetic_dataset(real, "cedar", n_writers=2, n_genuine=3, n_forged=2, seed=5, image_size=160, progress=False)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_realism.py"), str(real), "--out",
                             str(tmp_path / "out"), "--samples", "3"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    entries = json.loads((tmp_path / "out" / "realism.json").read_text())
    assert len(entries) == 2 * len(SCAN_STATISTICS) + len(WRITER_STATISTICS)
    assert all(np.isfinite(entry["real"]) and np.isfinite(entry["gap"]) for entry in entries)
    assert "| genuine | stroke_width_px |" in result.stdout
