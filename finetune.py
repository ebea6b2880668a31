"""Fine-tune DetailSemNet from the command line: the helpers training.ipynb uses, for scripts and servers.

    python finetune.py demo                                  # synthetic corpus -> fine-tuned model, in runs/demo
    python finetune.py prepare cedar DATA_ROOT               # pair files gray_{train,val,test}.txt
    python finetune.py pretrain --out runs/pretrain          # no checkpoint? synthetic writers -> pretrained.pth
    python finetune.py train cedar DATA_ROOT --out runs/cedar --pretrained weights.pth
    python finetune.py evaluate --run runs/cedar             # best model on the test split
    python finetune.py verify REF.png [REF2.png ...] QUERY.png --run runs/cedar
    python finetune.py serve --run runs/cedar                # the verification page, on 127.0.0.1
    python finetune.py calibrate --run runs/cedar            # likelihood ratios for a run trained without them

`train` continues from the newest checkpoint in --out (stop it any time, run
the same command again); --no-resume starts over. Each command exits with
status 1 and a one-line message on bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from module.core.threads import passive_threads

if TYPE_CHECKING:  # imported lazily below, so that --help and bad paths answer without loading torch
    from module.run.config import FinetuneConfig

# Settings the subcommands take as positionals or under other names, or fix themselves.
POSITIONAL_SETTINGS = ("dataset", "data_root")
OUT_SETTING = "ckpt_dir"  # --out
# The demo's defaults: sized for a CPU, the same as the notebook's DEMO_SETTINGS.
DEMO_DEFAULTS = {"image_size": 128, "epochs": 8, "lr": 4e-3}
# Pre-training's defaults: the whole model at CPU size (its mode, finetune all, is fixed by the command).
PRETRAIN_DEFAULTS = {"image_size": 96, "epochs": 10, "lr": 4e-4, "lr_blocks": 1e-4, "warmup_epochs": 1,
                     "max_train_pairs_per_epoch": 2000}


def add_config_options(parser: argparse.ArgumentParser, skip: Sequence[str] = (), defaults: dict | None = None) -> None:
    """One option a ``FinetuneConfig`` field (``--field-name``; booleans also ``--no-field-name``), help from its metadata.

    ``skip``: fields the subcommand sets otherwise; ``defaults``: values that
    replace the dataclass defaults. ``--per-pair`` is the short form of
    ``--no-fast-head-only``.
    """
    import dataclasses

    from module.run.config import FinetuneConfig

    defaults = defaults or {}
    types = FinetuneConfig.setting_types()
    group = parser.add_argument_group("training settings (FinetuneConfig fields)")
    for setting in dataclasses.fields(FinetuneConfig):
        if setting.name in skip:
            continue
        flag = "--" + setting.name.replace("_", "-")
        default = defaults.get(setting.name, setting.default)
        help_text = setting.metadata["help"] + " (default: %(default)s)"
        if types[setting.name] is bool:
            group.add_argument(flag, dest=setting.name, action=argparse.BooleanOptionalAction, default=default,
                               help=help_text)
        else:
            group.add_argument(flag, dest=setting.name, type=types[setting.name], default=default,
                               choices=setting.metadata["choices"], help=help_text)
    if "fast_head_only" not in skip:
        group.add_argument("--per-pair", dest="fast_head_only", action="store_false",
                           help="short for --no-fast-head-only: every pair through the backbone, with augmentation")


def config_from_args(args: argparse.Namespace, **fixed: Any) -> FinetuneConfig:
    """The ``FinetuneConfig`` of parsed options: every field from its option, except those in ``fixed``."""
    import dataclasses

    from module.run.config import FinetuneConfig

    values = {setting.name: getattr(args, setting.name) for setting in dataclasses.fields(FinetuneConfig)
              if setting.name not in fixed}
    return FinetuneConfig(**values, **fixed)


def _resolved_run_folders(args: argparse.Namespace, data_root: Path, out: Path) -> dict[str, str]:
    """Absolute folders and local weights for the config: they are saved in checkpoints and read back from anywhere."""
    import downloads

    pretrained = downloads.resolve_pretrained(args.pretrained, out / "downloads")
    return {"data_root": str(data_root.absolute()), "ckpt_dir": str(out.absolute()), "pretrained": str(pretrained or "")}


def _require_folder(path: Path, what: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"dataset root {path} not found. Fix: pass the folder that holds the {what} scans.")


def _require_run_folder(out: Path) -> None:
    """--out must be a folder this process can write, or one it can create: checked before any work (the folder is
    not left behind when the check made it)."""
    import tempfile

    from module.core.wording import option

    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{option('ckpt_dir', out)} is a file, not a folder. Fix: give {option('ckpt_dir')} "
                                 "a folder (created when missing).")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as error:
        raise type(error)(error.errno, f"cannot write the run folder {option('ckpt_dir', out)}: {error.strerror}. "
                                       f"Fix: give {option('ckpt_dir')} a folder on a disk you can write") from error
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def _machine(load_at_start: float | None) -> dict[str, Any]:
    """What a timing was measured on: cores, torch threads, the device, the load average, versions."""
    import os
    import platform

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    load_at_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device,
            "load_average_at_start": load_at_start, "load_average_at_end": load_at_end,
            "python": platform.python_version(), "torch": torch.__version__}


def cmd_demo(args: argparse.Namespace) -> None:
    """Synthetic corpus, pair files, fine-tuning on the fast path, evaluation before and after; the figures it prints
    are written to demo_summary.json too, with the machine they were measured on."""
    import os

    from module.core.io import write_json
    from module.data.prepare import ensure_pair_files
    from module.evaluation.reports import evidence_summary
    from synthetic_signatures import ensure_synthetic_dataset
    from training_utils import train_and_report

    start, cpu_at_start = time.perf_counter(), time.process_time()
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # 1-minute load: other jobs' share
    out = Path(args.out).absolute()
    _require_run_folder(out)
    data_root = out / "data"
    config = config_from_args(args, dataset="cedar", **_resolved_run_folders(args, data_root, out))
    ensure_synthetic_dataset(
        data_root, layout="cedar", n_writers=args.writers, n_genuine=args.samples, n_forged=args.samples,
        seed=args.seed, image_size=args.canvas,
    )
    ensure_pair_files("cedar", data_root, val_ratio=args.val_ratio, random_state=args.seed)
    after = train_and_report(config, resume=not args.no_resume).metrics["test"]
    before = json.loads((out / "test_before_metrics.json").read_text())  # the starting model, written by train_and_report

    seconds = round(time.perf_counter() - start, 1)  # rounded once: the line printed and the file say the same
    write_json(out / "demo_summary.json", {
        "seconds": seconds, "cpu_seconds": round(time.process_time() - cpu_at_start, 1),
        "pretrained": config.pretrained or None, "seed": config.seed,
        "test_eer_before": before["eer"], "test_eer_after": after["eer"], "test_auc_before": before["auc"],
        "test_auc_after": after["auc"], "machine": _machine(load_at_start)})
    backbone = f"pretrained weights {config.pretrained}" if config.pretrained else "a fresh (untrained) backbone"
    print(f"\nDemo finished in {seconds:.0f} s on {backbone}.")
    print(f"Test EER before fine-tuning {100 * before['eer']:.2f} %, after {100 * after['eer']:.2f} % "
          f"(AUC {before['auc']:.3f} -> {after['auc']:.3f}; at the test split's own EER threshold, as papers report).")
    print("\n".join(evidence_summary(after)))
    if not config.pretrained:
        print("A fresh backbone's features say little about a writer, so the head has little to learn from and the "
              "change varies with --seed; with --pretrained weights fine-tuning has real structure to work with.")
    print(f"Metrics JSON and plots: {out}  (demo_summary.json, test_metrics.json, history.png, test_roc.png, "
          "test_scores.png, test_tippett.png, calibration.json)")
    print(f"Try: python finetune.py verify {data_root}/full_org/original_1_1.png "
          f"{data_root}/full_forg/forgeries_1_1.png --run {out}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    """Train the whole model on a synthetic corpus of many writers, for users with no checkpoint: the corpus is
    written in parts under --out, the run resumes like train, and OUT/pretrained.pth is the --pretrained file
    for train (README: No checkpoint?)."""
    from training_utils import pretrain

    out = Path(args.out).absolute()
    _require_run_folder(out)
    config = config_from_args(args, ckpt_dir=str(out), dataset="cedar", data_root="", pretrained="", finetune="all",
                              unfreeze_blocks=0, fast_head_only=False)
    pretrain(config, writers=args.writers, part_writers=args.part_writers, samples=args.samples, canvas=args.canvas,
             resume=not args.no_resume)


def cmd_prepare(args: argparse.Namespace) -> None:
    """Write (or check and keep) the train/val/test pair files of a dataset root, then check them: lines, images
    (present, and each decodes whole), duplicates, writers shared between the files."""
    from models.errors import InputError
    from module.data.datasets import DATASETS
    from module.data.prepare import ensure_pair_files, pair_options_of
    from module.data.validation import validate_pair_file

    data_root = Path(args.data_root).absolute()
    _require_folder(data_root, args.dataset)
    files = ensure_pair_files(args.dataset, data_root, val_ratio=args.val_ratio, random_state=args.random_state,
                              random_forgeries=args.random_forgeries,
                              **pair_options_of(args, list(DATASETS))).values()
    reports = [validate_pair_file(data_root, path, [other for other in files if other != path]) for path in files]
    print("\n".join(report.summary() for report in reports))
    if not all(report.ok for report in reports):
        shared = any(any(report.shared_writers.values()) for report in reports)
        fix = "--resplit splits the writers afresh" if shared and args.dataset == "gpds" else "see --help for the options"
        raise InputError(f"the pair files in {data_root} have the problems listed above: fix the scans or the options "
                         f"({fix})")


def cmd_train(args: argparse.Namespace) -> None:
    """Fine-tune head_str on a prepared dataset; resumes from --out unless --no-resume. Under torchrun, one
    process a GPU (or CPU processes with gloo), data-parallel, with the result of one process."""
    from module.core.distributed import end_with_the_launcher, leave_process_group

    end_with_the_launcher()  # under torchrun: a worker must not outlive a killed torchrun
    data_root = Path(args.data_root)
    _require_folder(data_root, args.dataset)
    _require_run_folder(Path(args.out))
    from module.evaluation.reports import evidence_summary, starting_model_note
    from training_utils import train_and_report

    config = config_from_args(args, dataset=args.dataset, **_resolved_run_folders(args, data_root, Path(args.out)))
    try:
        result = train_and_report(config, resume=not args.no_resume)
    finally:
        leave_process_group()
    if not result.run.group.is_main:  # under torchrun, rank 0 reports
        return
    metrics = result.metrics
    print(f"\nBest model (epoch {result.run.best_epoch}): validation EER {100 * metrics['val']['eer']:.2f} %, "
          f"test EER {100 * metrics['test']['eer']:.2f} %, test accuracy {100 * metrics['test']['accuracy']:.2f} % "
          "(at the test split's own EER threshold, as papers report).")
    print("\n".join(evidence_summary(metrics["test"])))
    note = starting_model_note(config.ckpt_dir)
    if note:
        print(f"Note: {note}.")
    print(f"Run folder: {config.ckpt_dir} (best.pt, best_weights.pth, val/test metrics JSON, plots)")


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Evaluate a run's best model on a split of its dataset, or of another one (cross-dataset): pair metrics and
    writer-level figures, or with --references K the way a bank verifies (each query against K references)."""
    import dataclasses

    from module.data.prepare import ensure_test_pair_file
    from module.evaluation.calibration import missing_calibration_note
    from module.evaluation.metrics import save_metrics_json
    from module.evaluation.reports import OperatingBasis, evaluate_and_report, evidence_summary
    from module.evaluation.validation import evaluate_with_references
    from module.run.trained import build_datasets, load_trained_model

    config, model = load_trained_model(args.run)
    dataset = args.dataset or config.dataset
    data_root = str(Path(args.data_root).absolute()) if args.data_root else config.data_root
    if not Path(data_root).is_dir():
        raise FileNotFoundError(f"dataset root {data_root} not found. Fix: pass --data-root with the {dataset} folder.")
    name = args.name or (args.split if dataset == config.dataset and not args.data_root else f"{dataset}_{args.split}")
    config = dataclasses.replace(config, dataset=dataset, data_root=data_root)
    if args.split == "test":  # the test file there is read as it is; one is written only where there is none
        ensure_test_pair_file(dataset, data_root)
    data = build_datasets(config, splits=(args.split,))[args.split]
    if args.references is not None:
        metrics = evaluate_with_references(model, data, args.references, config, aggregate=args.aggregate,
                                           seed=config.seed)
        path = save_metrics_json(metrics, Path(config.ckpt_dir) / f"{name}_references_{args.references}_metrics.json")
        far_random = ("n/a (no random forgeries)" if math.isnan(metrics["far_random"])
                      else f"{100 * metrics['far_random']:.2f} %")
        print(f"{dataset} {args.split}, {metrics['n_trials']} queries against {args.references} references each "
              f"({args.aggregate} distance): EER {100 * metrics['eer']:.2f} %, FRR {100 * metrics['frr']:.2f} %, "
              f"FAR skilled {100 * metrics['far_skilled']:.2f} %, FAR random {far_random}, "
              f"threshold {metrics['threshold']:.6g}")
        if metrics["writers_left_out"]:
            print(f"left out, {args.references} or fewer genuine signatures: writers {metrics['writers_left_out']}")
        print(f"Written: {path}")
        return
    # The validation split is where the threshold and the calibration come from: it is not scored against them.
    basis = None if args.split == "val" else OperatingBasis.of_run(config.ckpt_dir)
    metrics = evaluate_and_report(model, data, config.ckpt_dir, name, config, basis=basis)
    print(f"{dataset} {args.split} ({len(data)} pairs): EER {100 * metrics['eer']:.2f} %, "
          f"accuracy {100 * metrics['accuracy']:.2f} %, AUC {metrics['auc']:.4f}, threshold {metrics['threshold']:.6g} "
          "(at this split's own EER threshold, as papers report)")
    print("\n".join(evidence_summary(metrics)))
    if basis is not None and basis.calibration is None:
        print(f"note: {missing_calibration_note(config.ckpt_dir)}")
    writers = metrics["writer_level"]
    if writers is not None:
        print(f"writer level ({len(writers['per_writer'])} writers): EER genuine vs skilled {100 * writers['eer']:.2f} %, "
              f"with each writer's own threshold {100 * writers['eer_user_thresholds']:.2f} %, "
              f"mean writer AUC {writers['mean_writer_auc']:.4f}")
    print(f"Written: {Path(config.ckpt_dir) / f'{name}_metrics.json'}, its plots"
          + (f" and {name}_per_writer.csv" if writers is not None else ""))


def cmd_verify(args: argparse.Namespace) -> None:
    """Is QUERY by the writer of the REF scans? Each reference's distance, their aggregate and the decision at the
    run's EER threshold (genuine when the aggregate is at or below it)."""
    from models.errors import InputError
    from module.evaluation.reports import starting_model_note
    from module.verifier import Verifier

    if len(args.scans) < 2:
        raise InputError("verify needs at least one REF scan and the QUERY scan: finetune.py verify REF [REF ...] QUERY")
    *references, query = args.scans
    verifier = Verifier.from_run(args.run, threshold=args.threshold, aggregate=args.aggregate)
    if args.explain:
        decision, _ = verifier.explain(query, references=references, figure=args.explain)
    else:
        decision = verifier.verify(query, references=references)
    if args.json:
        print(json.dumps(decision._asdict()))
        return
    for reference, distance in zip(references, decision.distances):
        print(f"{reference}: distance {distance:.6g}")
    aggregate = f"{args.aggregate} distance" if len(references) > 1 else "distance"
    print(f"{aggregate} {decision.distance:.6g}, threshold {decision.threshold:.6g} ({verifier.threshold_source}): "
          f"{'GENUINE' if decision.genuine else 'FORGED'}")
    if decision.likelihood_ratio is not None:
        fitted = verifier.calibration.fitted_on
        print(f"likelihood ratio {decision.likelihood_ratio:.4g} (log10 {decision.log10_likelihood_ratio:+.2f}): "
              f"{decision.verbal_equivalent} (ENFSI verbal scale; {verifier.calibration.method} calibration fitted on "
              f"{fitted['n_genuine'] + fitted['n_forged']} {fitted['split']} pairs)")
    if args.explain:
        print(f"Explanation (the query against its closest reference): {args.explain}")
    if note := starting_model_note(args.run):
        print(f"warning: {note}", file=sys.stderr)


def cmd_calibrate(args: argparse.Namespace) -> None:
    """Fit a trained run's likelihood ratios on its validation split, without training, and write calibration.json
    (for runs trained before the calibration was part of a run's report); prints its Cllr figures."""
    from module.evaluation.reports import calibrate_run

    figures = calibrate_run(args.run, method=args.method)
    fitted = figures["fitted_on"]
    writers = f"{fitted['n_writers']} writers, " if fitted["n_writers"] is not None else ""
    print(f"{figures['method']} calibration fitted on the validation split ({writers}{fitted['n_genuine']} genuine and "
          f"{fitted['n_forged']} forged pairs); likelihood ratios bounded to [{figures['lr_bounds'][0]:.3g}, "
          f"{figures['lr_bounds'][1]:.4g}]")
    for kind in ("skilled", "random", "all"):
        if figures.get(kind):
            print(f"on those pairs (in-sample, so optimistic), genuine vs {kind} forgeries: Cllr "
                  f"{figures[kind]['cllr']:.3f}, Cllr_min {figures[kind]['cllr_min']:.3f}, "
                  f"Cllr_cal {figures[kind]['cllr_cal']:.3f} bits")
    print(f"Written: {figures['path']}. The test split's figures: python finetune.py evaluate --run {args.run}")


def cmd_serve(args: argparse.Namespace) -> None:
    """The verification page of a run (Gradio: pip install -e '.[app]'): drop reference scans and a query, press
    Verify, see the decision, the distances, the likelihood ratio and the explanation. It serves on this machine
    only (127.0.0.1); signatures are biometric data, so a public link is made only with --share. Ctrl-C stops it."""
    import importlib.util

    from models.errors import InputError
    from module.verifier import PAGE_INSTALL, Verifier

    if importlib.util.find_spec("gradio") is None:  # before the model is loaded
        raise InputError(f"finetune.py serve needs gradio: {PAGE_INSTALL}")
    verifier = Verifier.from_run(args.run, threshold=args.threshold, aggregate=args.aggregate)
    if args.share:
        print("warning: --share: the page is public at the link below, for anyone who has it, and the scans "
              "travel through Gradio's share servers", file=sys.stderr)
    page = verifier.page()
    # Gradio's own launch lines would suggest share=True; these name this command's flags.
    _, local_url, share_url = page.launch(server_name="127.0.0.1", server_port=args.port, share=args.share,
                                          inbrowser=False, quiet=True, prevent_thread_lock=True)
    print(f"The verification page of {args.run}: {local_url} (this machine only)"
          + (f" and {share_url} (public)" if share_url else "") + "; Ctrl-C stops it.", flush=True)
    page.block_thread()


def build_parser() -> argparse.ArgumentParser:
    from module.data.datasets import DATASETS
    from module.data.prepare import add_pair_options
    from module.run.config import FinetuneConfig

    parser = argparse.ArgumentParser(
        prog="finetune.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1], allow_abbrev=False,
    )
    parser.add_argument("--debug", action="store_true", help="on an error, print the whole traceback")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    datasets = FinetuneConfig.__dataclass_fields__["dataset"].metadata["choices"]

    demo = commands.add_parser("demo", allow_abbrev=False, help="synthetic corpus, fine-tune, evaluate: a few minutes on a CPU",
                               description=cmd_demo.__doc__)
    demo.add_argument("--out", default="runs/demo", help="run folder; the corpus goes to OUT/data (default %(default)s)")
    demo.add_argument("--writers", type=int, default=12, help="synthetic writers (default %(default)s)")
    demo.add_argument("--samples", type=int, default=12, help="genuine signatures and forgeries a writer (default %(default)s)")
    demo.add_argument("--canvas", type=int, default=256, help="longest side of the synthetic scans, pixels (default %(default)s)")
    demo.add_argument("--val-ratio", type=float, default=0.2, help="share of writers for validation (default %(default)s)")
    demo.add_argument("--no-resume", action="store_true", help="start over: earlier checkpoints in --out are moved aside")
    add_config_options(demo, skip=(*POSITIONAL_SETTINGS, OUT_SETTING), defaults=DEMO_DEFAULTS)
    demo.set_defaults(handler=cmd_demo)

    pretrain = commands.add_parser("pretrain", allow_abbrev=False, help="train the whole model on synthetic "
                                   "writers: a --pretrained file for users with no checkpoint",
                                   description=cmd_pretrain.__doc__)
    pretrain.add_argument("--out", default="runs/pretrain", help="folder of the corpus, the run and pretrained.pth "
                          "(default %(default)s)")
    pretrain.add_argument("--writers", type=int, default=200, help="synthetic writers (default %(default)s)")
    pretrain.add_argument("--part-writers", type=int, default=50, help="writers a corpus part (default %(default)s)")
    pretrain.add_argument("--samples", type=int, default=12, help="genuine signatures and forgeries a writer "
                          "(default %(default)s)")
    pretrain.add_argument("--canvas", type=int, default=256, help="longest side of the synthetic scans, pixels "
                          "(default %(default)s)")
    pretrain.add_argument("--no-resume", action="store_true", help="start over: earlier checkpoints are moved aside")
    add_config_options(pretrain, skip=(*POSITIONAL_SETTINGS, OUT_SETTING, "finetune", "unfreeze_blocks",
                                       "fast_head_only", "pretrained"), defaults=PRETRAIN_DEFAULTS)
    pretrain.set_defaults(handler=cmd_pretrain)

    prepare = commands.add_parser("prepare", allow_abbrev=False, help="write the train/val/test pair files of a dataset",
                                  description=cmd_prepare.__doc__)
    prepare.add_argument("dataset", choices=datasets)
    prepare.add_argument("data_root", help="the dataset's root (CEDAR: the folder holding full_org/ and full_forg/)")
    add_pair_options(prepare, list(DATASETS))
    prepare.set_defaults(handler=cmd_prepare)

    train = commands.add_parser("train", allow_abbrev=False, help="fine-tune head_str; resumes from --out",
                                description=cmd_train.__doc__)
    train.add_argument("dataset", choices=datasets)
    train.add_argument("data_root", help="the dataset's root, with pair files from `prepare`")
    train.add_argument("--out", required=True, help="run folder: checkpoints, metrics JSON, plots")
    train.add_argument("--no-resume", action="store_true", help="start over: earlier checkpoints in --out are moved aside")
    add_config_options(train, skip=(*POSITIONAL_SETTINGS, OUT_SETTING))
    train.set_defaults(handler=cmd_train)

    evaluate = commands.add_parser("evaluate", allow_abbrev=False, help="metrics and plots of a run's best model",
                                   description=cmd_evaluate.__doc__)
    evaluate.add_argument("--run", required=True, help="run folder (holds best.pt) or a checkpoint file")
    evaluate.add_argument("--split", choices=("train", "val", "test"), default="test", help="default %(default)s")
    evaluate.add_argument("--dataset", choices=datasets, default=None, help="another dataset (default: the run's)")
    evaluate.add_argument("--data-root", default=None, help="another dataset root (default: the run's)")
    evaluate.add_argument("--name", default=None, help="file name prefix of the results (default: the split)")
    evaluate.add_argument("--references", type=int, default=None, metavar="K",
                          help="verify as a bank does: each query against K other genuine signatures of its writer, "
                               "drawn at random (seeded with the run's seed)")
    evaluate.add_argument("--aggregate", choices=("mean", "min", "max"), default="mean",
                          help="with --references: how the K distances combine (default %(default)s)")
    evaluate.set_defaults(handler=cmd_evaluate)

    verify = commands.add_parser("verify", allow_abbrev=False,
                                 help="is QUERY by the writer of the REF scans? distances and decision",
                                 description=cmd_verify.__doc__, usage="%(prog)s REF [REF ...] QUERY --run RUN [options]")
    verify.add_argument("scans", nargs="+", metavar="REF [REF ...] QUERY",
                        help="genuine signatures of the claimed writer, then the scan to check")
    verify.add_argument("--run", required=True, help="run folder (holds best.pt and val_metrics.json) or a checkpoint file")
    verify.add_argument("--threshold", type=float, default=None,
                        help="distance threshold (default: the run's validation EER threshold)")
    verify.add_argument("--aggregate", choices=("mean", "min", "max"), default="mean",
                        help="how the distances to several references combine (default %(default)s)")
    verify.add_argument("--json", action="store_true",
                        help="print one JSON object: distances, distance, threshold, genuine, likelihood_ratio, "
                             "log10_likelihood_ratio, verbal_equivalent")
    verify.add_argument("--explain", metavar="FIG.png", default=None,
                        help="draw why: the transport plan between the query and its closest reference")
    verify.set_defaults(handler=cmd_verify)

    calibrate = commands.add_parser("calibrate", allow_abbrev=False,
                                    help="fit a run's likelihood ratios on its validation split (calibration.json)",
                                    description=cmd_calibrate.__doc__)
    calibrate.add_argument("--run", required=True, help="run folder (holds best.pt) or a checkpoint file")
    calibrate.add_argument("--method", choices=("logistic", "pav"), default="logistic",
                           help="logistic regression on the distance, or pool-adjacent-violators (default %(default)s)")
    calibrate.set_defaults(handler=cmd_calibrate)

    serve = commands.add_parser("serve", allow_abbrev=False, help="the verification page of a run, on 127.0.0.1",
                                description=cmd_serve.__doc__)
    serve.add_argument("--run", required=True, help="run folder (holds best.pt and val_metrics.json) or a checkpoint file")
    serve.add_argument("--port", type=int, default=None,
                       help="port on 127.0.0.1 (default: the first free one from 7860)")
    serve.add_argument("--share", action="store_true",
                       help="also a public gradio.live link: anyone with it can use the page, and the scans (biometric "
                            "data) pass through Gradio's servers; off by default")
    serve.add_argument("--threshold", type=float, default=None,
                       help="distance threshold (default: the run's validation EER threshold)")
    serve.add_argument("--aggregate", choices=("mean", "min", "max"), default="mean",
                       help="how the distances to several references combine (default %(default)s)")
    serve.set_defaults(handler=cmd_serve)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (Colab, schedulers and torchrun send it to stop a job), raised where the process is, like Ctrl-C."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    passive_threads()  # before torch loads (module/core/threads.py); OMP_WAIT_POLICY in the environment wins
    # The helpers' warnings (a skipped corrupt checkpoint, rewritten pair files) read best as one plain line.
    warnings.formatwarning = lambda message, category, *location: f"warning: {message}\n"
    from models.errors import InputError
    from module.core.wording import command_line

    main_thread = threading.current_thread() is threading.main_thread()  # a signal handler can only be set there
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        with command_line("finetune.py"):  # messages name this command's flags
            args.handler(args)
    except (InputError, OSError) as error:  # the user's input or machine; anything else is a bug: its traceback
        if args.debug:
            raise
        # Helpers write several lines for people; a command line wants one.
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interruption:
        name = "terminated (SIGTERM)" if isinstance(interruption, Terminated) else "interrupted"
        print(f"\n{name}: finished epochs are saved; run the same command again to continue.", file=sys.stderr)
        return 143 if isinstance(interruption, Terminated) else 130  # 128 + the signal's number, as a shell reports it
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
