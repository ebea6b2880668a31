"""Logs that read well in a file: progress bars as lines (module/core/progress.py), the feature store named once.

``python finetune.py demo 2> log.txt`` used to leave one line of tens of kilobytes of carriage returns and two
feature-store lines for each split; here every line of its output is short, and the store speaks when it has news.
"""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tqdm.std import tqdm as std_tqdm

import finetune
from module.core import progress
from module.core.progress import FileProgressBar, progress_bar, write_line

ROOT = Path(__file__).resolve().parents[1]
TINY_DEMO = ["--writers", "4", "--samples", "4", "--canvas", "96", "--val-ratio", "0.25", "--image-size", "64",
             "--epochs", "2", "--batch-size", "16", "--lr", "4e-3"]
LONGEST_LINE = 500


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def longest_line(text: str) -> int:
    return max(map(len, text.splitlines()), default=0)


def test_a_terminal_gets_tqdms_bar_in_place_and_a_file_gets_lines() -> None:
    terminal, log = Terminal(), io.StringIO()
    in_place = progress_bar(range(3), file=terminal, desc="steps")
    assert type(in_place) is std_tqdm
    list(in_place)
    assert "\r" in terminal.getvalue()

    bar = progress_bar(range(3), file=log, desc="steps")
    assert isinstance(bar, FileProgressBar)
    list(bar)
    # Faster than the interval: no line while it runs, and the final line, as the bar stays (leave=True).
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 1 and lines[0].startswith("steps: 100%") and "3/3" in lines[0]


def test_a_file_bar_writes_a_line_each_interval_and_erases_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(0, 10_000, 10))  # each reading of the clock 10 s after the one before
    monkeypatch.setattr(progress, "monotonic", lambda: next(clock))
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 25.0)
    log = io.StringIO()
    bar = FileProgressBar(total=12, file=log, desc="embedding", leave=False)
    for _ in range(12):
        bar.update()
        bar.display()  # what tqdm's own redraws call: only those 25 s or more after the last line write one
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and 0 < len(lines) < 12
    assert all(line.startswith("embedding:") for line in lines)


def test_a_file_bar_keeps_no_final_line_without_leave_and_says_nothing_when_disabled() -> None:
    log = io.StringIO()
    list(progress_bar(range(5), file=log, desc="transient", leave=False))
    list(progress_bar(range(5), file=log, desc="off", disable=True))
    assert log.getvalue() == ""


def test_lines_written_above_a_file_bar_are_not_interrupted(capsys: pytest.CaptureFixture) -> None:
    bar = progress_bar(range(2), desc="training", leave=False)  # on pytest's captured stderr: not a terminal
    for step in bar:
        write_line(f"step {step}")
    captured = capsys.readouterr()
    assert captured.out == "step 0\nstep 1\n" and "\r" not in captured.err


def test_every_line_of_the_demo_is_short_even_with_every_redraw_kept(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 0.0)  # every redraw of every bar is a line of its own
    assert finetune.main(["demo", "--out", str(tmp_path / "run"), *TINY_DEMO]) == 0
    captured = capsys.readouterr()
    assert "embedding images" in captured.err and "\r" not in captured.err
    assert longest_line(captured.err) <= LONGEST_LINE and longest_line(captured.out) <= LONGEST_LINE


def test_demo_to_a_file_reads_line_by_line_and_names_the_store_once(tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "finetune.py"), "demo", "--out", str(out), *TINY_DEMO]
    with open(tmp_path / "log.txt", "w") as log:  # python finetune.py demo 2> log.txt
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True, timeout=600)
    text = (tmp_path / "log.txt").read_text()
    assert done.returncode == 0, text[-3000:]
    assert longest_line(text) <= LONGEST_LINE and "\r" not in text
    assert longest_line(done.stdout) <= LONGEST_LINE

    store_lines = [line for line in done.stdout.splitlines() if line.startswith("feature store")]
    folder = next((out / "features").iterdir())
    # Named once; after that a line only for a split that embeds (test before, training, validation), none for the
    # splits found whole, and no line for features read into RAM, the rule.
    assert [str(folder) in line for line in store_lines] == [True, False, False], store_lines
    assert all("embedding" in line for line in store_lines) and "read into RAM" not in done.stdout

    summary = json.loads((out / "demo_summary.json").read_text())
    assert f"Demo finished in {summary['seconds']:.0f} s" in done.stdout
    assert f"Test EER before fine-tuning {100 * summary['test_eer_before']:.2f} %" in done.stdout
    assert summary["machine"]["cpus"] >= 1 and summary["pretrained"] is None

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)  # a finished run: nothing new
    assert again.returncode == 0, again.stderr[-3000:]
    store_lines = [line for line in again.stdout.splitlines() if line.startswith("feature store")]
    assert len(store_lines) == 1 and re.fullmatch(rf"feature store {re.escape(str(folder))}: (\d+) of \1 images "
                                                  "found, nothing to embed", store_lines[0]), store_lines
