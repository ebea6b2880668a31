"""Fine-tune DetailSemNet from the command line: the helpers training.ipynb uses, for scripts and servers.

    python finetune.py demo                                  # synthetic corpus -> fine-tuned model, in runs/demo
    python finetune.py prepare cedar DATA_ROOT               # pair files gray_{train,val,test}.txt
    python finetune.py train cedar DATA_ROOT --out runs/cedar --pretrained weights.pth
    python finetune.py evaluate --run runs/cedar             # best model on the test split
    python finetune.py verify REF.png QUERY.png --run runs/cedar

`train` continues from the newest checkpoint in --out (stop it any time, run
the same command again); --no-resume starts over. Each command exits with
status 1 and a one-line message on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily below, so that --help and bad paths answer without loading torch
    from torch import nn

    from training_utils import FinetuneConfig

DATASETS = ("cedar", "gpds", "bhsig")
EVALUATED_SPLITS = ("val", "test")


def _config_from_args(
    args: argparse.Namespace, dataset: str, data_root: Path, run_dir: Path, pretrained: Path | None
) -> FinetuneConfig:
    from training_utils import FinetuneConfig

    return FinetuneConfig(
        dataset=dataset,
        data_root=str(data_root),
        pretrained=str(pretrained or ""),
        ckpt_dir=str(run_dir),
        image_size=args.image_size,
        fast_head_only=not args.per_pair,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_epochs=args.warmup_epochs,
        patience=args.patience,
        seed=args.seed,
        device=args.device,
    )


def _set_aside_previous_run(run_dir: Path) -> None:
    """Move an earlier run's checkpoints into a dated subfolder, so --no-resume never mixes two runs' epochs."""
    old = sorted(run_dir.glob("epoch_*.pt")) + sorted(run_dir.glob("best.pt"))
    if not old:
        return
    archive = run_dir / time.strftime("previous-%Y%m%d-%H%M%S")
    archive.mkdir()
    for path in old:
        path.rename(archive / path.name)
    print(f"--no-resume: the earlier run's {len(old)} checkpoints were moved to {archive}")


def _train_and_report(config: FinetuneConfig, pretrained: Path | None, resume: bool) -> dict[str, dict]:
    """Fine-tune (resuming when allowed), then evaluate the best model on val and test; reports go to the run folder."""
    from training_utils import (
        build_datasets, build_model, evaluate_and_report, export_state_dict, fit, load_checkpoint,
        plot_training_history, prepare_run, save_metrics_json,
    )

    datasets = build_datasets(config)
    model = build_model(config, pretrained)
    run = prepare_run(model, config, resume=resume)
    fit(run, datasets["train"], datasets["val"])
    load_checkpoint(run.best_checkpoint, model=run.model)
    metrics = {
        split: evaluate_and_report(run.model, datasets[split], run.ckpt_dir, split, config) for split in EVALUATED_SPLITS
    }
    save_metrics_json(run.history, run.ckpt_dir / "history.json")
    plot_training_history(run.history, run.ckpt_dir / "history.png")
    export_state_dict(run.best_checkpoint, run.ckpt_dir / "best_weights.pth")
    return metrics


def _run_checkpoint(run: str) -> Path:
    """best.pt of a run folder, or the checkpoint file given."""
    path = Path(run)
    checkpoint = path / "best.pt" if path.is_dir() else path
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"{checkpoint} not found. Fix: pass --run the folder of a trained run (it holds best.pt), "
            "e.g. the --out of `python finetune.py train`."
        )
    return checkpoint


def _load_run(checkpoint: Path) -> tuple[FinetuneConfig, nn.Module]:
    """(config, model in eval mode) rebuilt from a run's checkpoint alone."""
    from training_utils import FinetuneConfig, build_model, load_checkpoint

    config = FinetuneConfig.from_dict(load_checkpoint(checkpoint)["config"])
    return config, build_model(config, checkpoint).eval()


def cmd_demo(args: argparse.Namespace) -> None:
    """Synthetic corpus, pair files, fine-tuning on the fast path, evaluation before and after."""
    import downloads
    from prepare_datasets import ensure_pair_files, ensure_synthetic_dataset
    from training_utils import build_datasets, build_model, evaluate_and_report

    start = time.perf_counter()
    # Absolute paths: they are saved in the checkpoints and read back by evaluate/verify from any folder.
    out = Path(args.out).absolute()
    data_root = out / "data"
    pretrained = downloads.resolve_pretrained(args.pretrained, out / "downloads")
    config = _config_from_args(args, "cedar", data_root, out, pretrained)
    ensure_synthetic_dataset(
        data_root, layout="cedar", n_writers=args.writers, n_genuine=args.samples, n_forged=args.samples,
        seed=args.seed, image_size=args.canvas,
    )
    ensure_pair_files("cedar", data_root, val_ratio=args.val_ratio, random_state=args.seed)
    if args.no_resume:
        _set_aside_previous_run(out)

    before_file = out / "test_before_metrics.json"
    if before_file.is_file() and not args.no_resume:
        before = json.loads(before_file.read_text())
    else:
        # The starting model's test EER, measured before any checkpoint can replace its weights.
        untrained = build_model(config, pretrained)
        before = evaluate_and_report(untrained, build_datasets(config, splits=("test",))["test"], out, "test_before", config)
    after = _train_and_report(config, pretrained, resume=not args.no_resume)["test"]

    backbone = f"pretrained weights {pretrained}" if pretrained else "a fresh (untrained) backbone"
    print(f"\nDemo finished in {time.perf_counter() - start:.0f} s on {backbone}.")
    print(f"Test EER before fine-tuning {100 * before['eer']:.2f} %, after {100 * after['eer']:.2f} % "
          f"(AUC {before['auc']:.3f} -> {after['auc']:.3f}).")
    if not pretrained:
        print("A fresh backbone's features say little about a writer, so the head has little to learn from and the "
              "change varies with --seed; with --pretrained weights fine-tuning has real structure to work with.")
    print(f"Metrics JSON and plots: {out.resolve()}  (test_metrics.json, history.png, test_roc.png, test_scores.png)")
    print(f"Try: python finetune.py verify {data_root}/full_org/original_1_1.png "
          f"{data_root}/full_forg/forgeries_1_1.png --run {out}")


def cmd_prepare(args: argparse.Namespace) -> None:
    """Write (or check and keep) the train/val/test pair files of a dataset root."""
    from prepare_datasets import ensure_pair_files, validate_pair_file

    data_root = Path(args.data_root).absolute()
    if not data_root.is_dir():
        raise FileNotFoundError(f"dataset root {data_root} not found. Fix: pass the folder that holds the {args.dataset} scans.")
    for path in ensure_pair_files(args.dataset, data_root, val_ratio=args.val_ratio, random_state=args.seed).values():
        print(validate_pair_file(data_root, path).summary())


def cmd_train(args: argparse.Namespace) -> None:
    """Fine-tune head_str on a prepared dataset; resumes from --out unless --no-resume."""
    import downloads

    # Absolute paths: they are saved in the checkpoints and read back by evaluate/verify from any folder.
    data_root, out = Path(args.data_root).absolute(), Path(args.out).absolute()
    if not data_root.is_dir():
        raise FileNotFoundError(f"dataset root {data_root} not found. Fix: pass the folder that holds the {args.dataset} scans.")
    pretrained = downloads.resolve_pretrained(args.pretrained, out / "downloads")
    config = _config_from_args(args, args.dataset, data_root, out, pretrained)
    if args.no_resume:
        _set_aside_previous_run(out)
    metrics = _train_and_report(config, pretrained, resume=not args.no_resume)
    print(f"\nBest model: validation EER {100 * metrics['val']['eer']:.2f} %, test EER {100 * metrics['test']['eer']:.2f} %, "
          f"test accuracy {100 * metrics['test']['accuracy']:.2f} %.")
    print(f"Run folder: {out.resolve()} (best.pt, best_weights.pth, val/test metrics JSON, plots)")


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Evaluate a run's best model on a split of its dataset, or of another one (cross-dataset)."""
    import dataclasses

    checkpoint = _run_checkpoint(args.run)
    from training_utils import build_datasets, evaluate_and_report

    config, model = _load_run(checkpoint)
    dataset = args.dataset or config.dataset
    data_root = str(Path(args.data_root).absolute()) if args.data_root else config.data_root
    if not Path(data_root).is_dir():
        raise FileNotFoundError(f"dataset root {data_root} not found. Fix: pass --data-root with the {dataset} folder.")
    name = args.name or (args.split if dataset == config.dataset and not args.data_root else f"{dataset}_{args.split}")
    config = dataclasses.replace(config, dataset=dataset, data_root=data_root)
    data = build_datasets(config, splits=(args.split,))[args.split]
    metrics = evaluate_and_report(model, data, checkpoint.parent, name, config)
    print(f"{dataset} {args.split} ({len(data)} pairs): EER {100 * metrics['eer']:.2f} %, "
          f"accuracy {100 * metrics['accuracy']:.2f} %, AUC {metrics['auc']:.4f}, threshold {metrics['threshold']:.6g}")
    print(f"Written: {checkpoint.parent / f'{name}_metrics.json'} and its plots")


def cmd_verify(args: argparse.Namespace) -> None:
    """Distance between two signatures and the decision at the run's EER threshold."""
    import torch

    from sig_dataloader_colab import load_signature

    checkpoint = _run_checkpoint(args.run)
    if args.threshold is not None:
        threshold, source = args.threshold, "--threshold"
    else:
        metrics_file = next((checkpoint.parent / f"{s}_metrics.json" for s in EVALUATED_SPLITS
                             if (checkpoint.parent / f"{s}_metrics.json").is_file()), None)
        if metrics_file is None:
            raise FileNotFoundError(
                f"no val_metrics.json or test_metrics.json beside {checkpoint}. "
                "Fix: run `python finetune.py evaluate --run ...` first, or pass --threshold."
            )
        threshold, source = json.loads(metrics_file.read_text())["threshold"], f"EER threshold of {metrics_file}"
    config, model = _load_run(checkpoint)
    device = config.resolved_device()
    images = [load_signature(path, config.image_size).unsqueeze(0).to(device) for path in (args.reference, args.query)]
    with torch.no_grad():
        distance = model.compare(model.embed(images[0]), model.embed(images[1])).item()
    decision = "GENUINE" if distance <= threshold else "FORGED"
    print(f"distance {distance:.6g}, threshold {threshold:.6g} ({source}): {decision}")


def _add_training_options(parser: argparse.ArgumentParser, epochs: int, image_size: int, lr: float) -> None:
    parser.add_argument("--pretrained", default="", help="DetailSemNet weights: a .pth file, a Google Drive file id or link (default: a fresh backbone)")
    parser.add_argument("--epochs", type=int, default=epochs, help="default %(default)s")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per step (default %(default)s)")
    parser.add_argument("--lr", type=float, default=lr, help="head_str learning rate at the start of the warm-up (default %(default)s)")
    parser.add_argument("--warmup-epochs", type=int, default=1, help="default %(default)s")
    parser.add_argument("--patience", type=int, default=5, help="stop after this many epochs without a better validation EER (default %(default)s)")
    parser.add_argument("--image-size", type=int, default=image_size, help="model input side, a multiple of 32 (default %(default)s)")
    parser.add_argument("--per-pair", action="store_true",
                        help="run every pair through the backbone each epoch, with augmentation (slow); default: backbone features computed once")
    parser.add_argument("--seed", type=int, default=42, help="default %(default)s")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:n] (default %(default)s)")
    parser.add_argument("--no-resume", action="store_true", help="start over: earlier checkpoints in the output folder are moved aside")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="synthetic corpus, fine-tune, evaluate: a few minutes on a CPU",
                               description=cmd_demo.__doc__)
    demo.add_argument("--out", default="runs/demo", help="output folder (default %(default)s)")
    demo.add_argument("--writers", type=int, default=12, help="synthetic writers (default %(default)s)")
    demo.add_argument("--samples", type=int, default=12, help="genuine signatures and forgeries a writer (default %(default)s)")
    demo.add_argument("--canvas", type=int, default=256, help="longest side of the synthetic scans, pixels (default %(default)s)")
    demo.add_argument("--val-ratio", type=float, default=0.2, help="share of writers for validation (default %(default)s)")
    _add_training_options(demo, epochs=8, image_size=128, lr=1e-3)
    demo.set_defaults(handler=cmd_demo)

    prepare = commands.add_parser("prepare", help="write the train/val/test pair files of a dataset",
                                  description=cmd_prepare.__doc__)
    prepare.add_argument("dataset", choices=DATASETS)
    prepare.add_argument("data_root", help="the dataset's root (CEDAR: the folder holding full_org/ and full_forg/)")
    prepare.add_argument("--val-ratio", type=float, default=0.1, help="share of writers for validation (default %(default)s)")
    prepare.add_argument("--seed", type=int, default=42, help="default %(default)s")
    prepare.set_defaults(handler=cmd_prepare)

    train = commands.add_parser("train", help="fine-tune head_str; resumes from --out", description=cmd_train.__doc__)
    train.add_argument("dataset", choices=DATASETS)
    train.add_argument("data_root", help="the dataset's root, with pair files from `prepare`")
    train.add_argument("--out", required=True, help="run folder: checkpoints, metrics JSON, plots")
    _add_training_options(train, epochs=10, image_size=224, lr=1e-4)
    train.set_defaults(handler=cmd_train)

    evaluate = commands.add_parser("evaluate", help="metrics and plots of a run's best model", description=cmd_evaluate.__doc__)
    evaluate.add_argument("--run", required=True, help="run folder (holds best.pt) or a checkpoint file")
    evaluate.add_argument("--split", choices=("train", "val", "test"), default="test", help="default %(default)s")
    evaluate.add_argument("--dataset", choices=DATASETS, default=None, help="another dataset (default: the run's)")
    evaluate.add_argument("--data-root", default=None, help="another dataset root (default: the run's)")
    evaluate.add_argument("--name", default=None, help="file name prefix of the results (default: the split)")
    evaluate.set_defaults(handler=cmd_evaluate)

    verify = commands.add_parser("verify", help="is QUERY by the writer of REF? distance and decision",
                                 description=cmd_verify.__doc__)
    verify.add_argument("reference", metavar="REF", help="a genuine signature's scan")
    verify.add_argument("query", metavar="QUERY", help="the scan to check")
    verify.add_argument("--run", required=True, help="run folder (holds best.pt and val_metrics.json) or a checkpoint file")
    verify.add_argument("--threshold", type=float, default=None, help="distance threshold (default: the run's validation EER threshold)")
    verify.set_defaults(handler=cmd_verify)
    return parser


def _is_bad_input(error: Exception) -> bool:
    """True for the errors the helpers raise about the user's files and settings (not for bugs)."""
    if isinstance(error, (OSError, ValueError, FloatingPointError)):
        return True
    # Imported only now: a missing folder is reported without waiting for torch to load.
    from downloads import DownloadFailed
    from model_v3 import CheckpointMismatchError

    return isinstance(error, (CheckpointMismatchError, DownloadFailed))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The helpers' warnings (a skipped corrupt checkpoint, rewritten pair files) read best as one plain line.
    warnings.formatwarning = lambda message, category, *location: f"warning: {message}\n"
    try:
        args.handler(args)
    except Exception as error:
        if not _is_bad_input(error):
            raise
        # Helpers write several lines for people; a command line wants one.
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: finished epochs are saved; run the same command again to continue.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
