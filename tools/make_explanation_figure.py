"""Draw the README's explanation figure: why a run's best model accepted its worst-accepted forgery.

usage: python tools/make_explanation_figure.py [--run runs/demo] [--out docs/explanation.png] [--dpi 72]

Evaluates the run's test split, takes its worst false accept (the forged
pair with the smallest distance at or below the validation EER threshold; the
worst false reject when nothing was falsely accepted) and draws the
transport plan of that pair with plot_explanation.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from module.evaluation.plots import plot_explanation
from module.evaluation.reports import worst_errors
from training_utils import build_datasets, load_trained_model, run_threshold, validate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/demo", help="a trained run folder (default %(default)s)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "explanation.png"), help="the PNG (default %(default)s)")
    parser.add_argument("--dpi", type=int, default=72, help="resolution; 72 keeps the PNG under 200 KB (default %(default)s)")
    args = parser.parse_args()

    threshold, _ = run_threshold(args.run)
    config, model = load_trained_model(args.run)
    data = build_datasets(config, splits=("test",))["test"]
    metrics = validate(model, data, batch_size=config.eval_batch_size, desc="test")
    mistakes = worst_errors(metrics, threshold)
    mistake = "false accept" if mistakes["false accept"] is not None else "false reject"
    if mistakes[mistake] is None:
        raise SystemExit(f"the run makes no mistake on its test split at threshold {threshold:.4g}: nothing to explain")
    ref_path, query_path, _ = data.pairs[mistakes[mistake]]
    ref, query = data.load_image(ref_path), data.load_image(query_path)
    explanation = model.explain(ref, query)
    title = f"worst {mistake} of the test split: {Path(query_path).name} against {Path(ref_path).name}"
    path = plot_explanation(explanation, ref, query, args.out, threshold=threshold, title=title, dpi=args.dpi)
    print(f"{path}: {path.stat().st_size / 1000:.0f} KB; distance {explanation.distance:.4f}, "
          f"threshold {threshold:.4f}")


if __name__ == "__main__":
    main()
