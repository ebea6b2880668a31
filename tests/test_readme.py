"""The README's demo figures are those of a run the demo wrote: docs/demo_summary.json, a copy of a
runs/demo/demo_summary.json (``python finetune.py demo``). After a change that moves them, run the demo again,
copy its summary to docs/ and quote it; this test says which figure the README lacks."""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SUMMARY = ROOT / "docs" / "demo_summary.json"


def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    return text[start:text.index("\n## ", start + 1)]


def test_the_readme_quotes_the_demo_summary_it_ships() -> None:
    summary = json.loads(SUMMARY.read_text())
    machine = summary["machine"]
    before, after = 100 * summary["test_eer_before"], 100 * summary["test_eer_after"]
    first_steps, demo_time = readme_section("First steps"), readme_section("Demo time")
    # What the demo prints at its end, as the first step shows it.
    assert f"Demo finished in {summary['seconds']:.0f} s" in first_steps
    assert (f"Test EER before fine-tuning {before:.2f} %, after {after:.2f} % "
            f"(AUC {summary['test_auc_before']:.3f} -> {summary['test_auc_after']:.3f}") in first_steps
    wanted = [f"{summary['seconds']:.0f} s", f"{before:.2f} %", f"{after:.2f} %",
              f"{summary['test_auc_before']:.3f}", f"{summary['test_auc_after']:.3f}",
              f"{machine['cpus']} CPU cores", f"{machine['torch_threads']} threads", f"torch {machine['torch']}",
              f"{machine['load_average_at_start']:.1f}", f"{machine['load_average_at_end']:.1f}"]
    missing = [figure for figure in wanted if figure not in demo_time]
    assert not missing, f"README's Demo time lacks {missing} of {SUMMARY.relative_to(ROOT)}"
    assert summary["pretrained"] is None and summary["seed"] == 42, "the README's demo is the default one"
