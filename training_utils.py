"""Fine-tuning DetailSemNet: the training loop, the builders and the pipeline the notebook and command line share.

``train_and_report(config)`` is the whole pipeline; its steps are usable on their own::

    data = build_datasets(config)                  # {"train", "val", "test"} from gray_{split}.txt
    model = build_model(config)                    # seeded, pretrained weights, on config's device
    run = prepare_run(model, config)               # freeze, optimizer, schedule; resume when ckpt_dir has a checkpoint
    fit(run, data["train"], data["val"])           # the one loop; commits epoch_NNNN.pt, keeps best.pt in step
    metrics = report_run(run, data)                # best model on val and test; history, plots, best_weights.pth

Two paths feed pairs to the model: the fast path (``config.fast_head_only``:
with the backbone frozen and no augmentation, every distinct image is
embedded once and each epoch runs only ``model.compare`` on cached features)
and the per-pair path (a ``DataLoader`` of image pairs, two backbone passes a
pair, with the dataset's augmentation). Labels: 1 genuine-genuine, 0
genuine-forged. Distances: smaller = more likely genuine.

The building blocks live in ``module/`` (configuration, metrics, plots,
checkpoints, features, evaluation) and ``models/fine_tune_utils.py``; every
public name is re-exported here, so ``from training_utils import
compute_metrics`` keeps working.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from model_v3 import ViT_for_OSV_DSNet, load_pretrained
from models.fine_tune_utils import (
    build_optimizer_for_head_only,
    print_trainable_params,
    setup_head_only_finetune,
    unfreeze_last_blocks,
)
from module.checkpoint import (
    BEST_CHECKPOINT,
    CheckpointError,
    apply_checkpoint,
    capture_rng_state,
    epoch_checkpoint_path,
    export_state_dict,
    frozen_fingerprint,
    load_checkpoint,
    read_checkpoint,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
    trained_state_keys,
)
from module.config import FinetuneConfig
from module.evaluation import evaluate_and_report, evaluate_with_references, explain_worst_errors, starting_model_note, validate
from module.feature_store import resolve_feature_dtype
from module.features import (
    CachedPairBatch,
    FeatureCache,
    amp_enabled,
    compute_features,
    epoch_pair_sample,
    make_pair_loader,
    model_device,
    pair_distances,
    pair_labels,
)
from module.loss import NonFiniteLossError
from module.metrics import compute_metrics, compute_writer_metrics, save_metrics_json
from module.pair_files import PAIR_FILES
from module.plots import (
    plot_explanation,
    plot_roc_curve,
    plot_score_distribution,
    plot_training_history,
    plot_writer_eers,
)
from module.run_folder import (
    BEST_WEIGHTS,
    RunFolderError,
    clean_run_folder,
    commit_epoch,
    continue_run,
    find_latest_checkpoint,
    find_resume_point,
    lock_run_folder,
    read_run_checkpoint,
    rebuild_trained_model,
    reload_after_interruption,
    set_aside_run,
)
from module.scheduler import GradualWarmupScheduler
from module.verifier import Decision, Verifier
from module.wording import option
from prepare_datasets import pair_file_fix
from sig_dataloader_colab import SigDataset_BHSig_Colab, SigDataset_CEDAR_Colab, SigDataset_GDPS_Colab

__all__ = [
    # defined here
    "TrainingRun", "TrainingResult", "prepare_run", "fit", "train_one_epoch", "HISTORY_KEYS",
    "build_model", "build_datasets", "report_run", "train_and_report", "run_status", "load_trained_model", "run_threshold",
    # re-exported, so that notebooks import from one place
    "FinetuneConfig", "validate", "evaluate_and_report", "starting_model_note", "evaluate_with_references",
    "explain_worst_errors", "NonFiniteLossError", "Verifier", "Decision",
    "compute_features", "FeatureCache", "CachedPairBatch", "make_pair_loader",
    "compute_metrics", "compute_writer_metrics", "save_metrics_json",
    "plot_training_history", "plot_roc_curve", "plot_score_distribution", "plot_writer_eers", "plot_explanation",
    "seed_everything", "capture_rng_state", "restore_rng_state", "save_checkpoint", "load_checkpoint",
    "find_latest_checkpoint", "epoch_checkpoint_path", "export_state_dict", "CheckpointError", "RunFolderError",
    "lock_run_folder",
    "setup_head_only_finetune", "print_trainable_params", "build_optimizer_for_head_only", "unfreeze_last_blocks",
]


# --------------------------------------------------------------------------- one epoch

def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device | str | None = None,
    scaler: torch.amp.GradScaler | None = None,
    amp: bool = False,
    epoch: int | None = None,
    progress: bool = True,
) -> float:
    """One pass over ``loader`` (either path, see ``make_pair_loader``) in training mode; returns the mean loss per pair.

    The Sinkhorn runs with its training epsilon (``model.training``). A
    non-finite loss raises ``NonFiniteLossError`` before the optimizer step,
    so the weights never take it in. ``scaler`` (a ``GradScaler``) goes with
    ``amp`` on CUDA.
    """
    device = torch.device(device) if device is not None else model_device(model)
    model.train()
    total_loss, total_pairs = 0.0, 0
    description = f"epoch {epoch} training" if epoch is not None else "training"
    bar = tqdm(loader, desc=description, unit="batch", leave=False, disable=not progress)
    for batch_number, batch in enumerate(bar, start=1):
        distance, labels = pair_distances(model, batch, device, amp)
        loss = model.loss_fn(distance, labels)
        batch_loss = loss.item()
        if not math.isfinite(batch_loss):
            raise NonFiniteLossError(f"training loss is {batch_loss} at batch {batch_number} of {len(bar)}"
                                     + (f" in epoch {epoch}" if epoch is not None else ""))
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total_loss += batch_loss * len(labels)
        total_pairs += len(labels)
        bar.set_postfix(loss=f"{total_loss / total_pairs:.4f}")
    if total_pairs == 0:
        raise ValueError("the training loader yielded no pairs")
    return total_loss / total_pairs


# --------------------------------------------------------------------------- the run and its one loop

HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "val_eer", "val_auc", "val_accuracy", "lr", "seconds")
# Settings that shape the optimisation: a checkpoint resumes only under the same values.
RESUME_MUST_MATCH = (
    "dataset", "image_size", "fast_head_only", "unfreeze_blocks", "epochs", "batch_size", "lr", "lr_blocks",
    "weight_decay", "warmup_epochs", "warmup_multiplier", "amp", "select_metric", "feature_dtype", "seed",
    "emd", "dis_type", "mar_type", "gol_dis", "temp", "max_train_pairs_per_epoch",
)


def _format_metric(name: str, value: float) -> str:
    return f"EER {100 * value:.2f}%" if name == "eer" else f"loss {value:.4f}"


def _log(message: str) -> None:
    # tqdm.write prints above running progress bars instead of through them.
    tqdm.write(message)


@dataclass
class TrainingRun:
    """What a run holds between epochs; ``prepare_run`` builds it, ``fit`` advances it.

    Attributes:
        epoch: epochs completed (0 before training).
        history: lists per ``HISTORY_KEYS``, one entry per epoch; entry 0 is
            the model before fine-tuning (``None`` for ``train_loss``, ``lr``).
            EER and accuracy are fractions; ``seconds`` is wall time.
        best_metric: the lowest validation ``config.select_metric`` so far (EER fraction or loss).
        best_epoch: the epoch it came from (0: the model before fine-tuning).
        resumed_from: the checkpoint this run continued from, if any.
        pending_rng_state: RNG states ``fit`` restores before the next epoch (set on resume).
        frozen_fingerprint: of the weights that do not train (``module.checkpoint.frozen_fingerprint``).
        best_source: the best epoch's checkpoint, which ``best.pt`` is a copy of.
        uncommitted_epoch: the epoch in progress while the model, optimizer or history in memory are ahead
            of the last checkpoint (``None`` between epochs); after an interruption ``fit`` reloads the
            last checkpoint rather than continue from them.
    """

    config: FinetuneConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: GradualWarmupScheduler
    scaler: torch.amp.GradScaler
    data_generator: torch.Generator
    device: torch.device
    epoch: int = 0
    history: dict[str, list[Any]] = field(default_factory=lambda: {key: [] for key in HISTORY_KEYS})
    best_metric: float | None = None
    best_epoch: int | None = None
    resumed_from: Path | None = None
    pending_rng_state: dict[str, Any] | None = None
    frozen_fingerprint: str = ""
    best_source: Path | None = None
    uncommitted_epoch: int | None = None

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.config.ckpt_dir)

    @property
    def best_checkpoint(self) -> Path:
        """``ckpt_dir/best.pt``: a copy of the checkpoint of the epoch with the best validation metric."""
        return self.ckpt_dir / BEST_CHECKPOINT

    def stop_reason(self) -> str | None:
        """Why training is over (all epochs done, or early stop), or ``None`` while it is not."""
        config = self.config
        if self.epoch >= config.epochs:
            return f"all {config.epochs} epochs done"
        if self.best_epoch is not None and self.epoch - self.best_epoch >= config.patience:
            return (f"early stop: validation {config.select_metric} has not improved by {config.min_improvement:.1%} "
                    f"(relative) for {config.patience} epochs; best at epoch {self.best_epoch}")
        return None

    def save(self, path: Path) -> Path:
        """Write this run's state as a checkpoint at ``path`` (see ``save_checkpoint``)."""
        return save_checkpoint(
            path, model=self.model, epoch=self.epoch, config=self.config, history=self.history,
            optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
            best_metric=self.best_metric, best_epoch=self.best_epoch, data_generator=self.data_generator,
            fingerprint=self.frozen_fingerprint or None,
        )


def prepare_run(model: nn.Module, config: FinetuneConfig, resume: bool = True) -> TrainingRun:
    """Freeze, build the optimizer, schedule and AMP scaler, and resume from ``config.ckpt_dir`` when it holds a checkpoint.

    The model is moved to ``config.resolved_device()``; ``head_str`` trains
    (AdamW, peak ``config.lr``), plus the last ``config.unfreeze_blocks``
    backbone blocks (peak ``config.lr_blocks``); the frozen part stays in eval
    mode. The schedule is ``GradualWarmupScheduler`` then
    ``CosineAnnealingLR`` (see ``FinetuneConfig``). Holding the run folder's
    lock, it removes what interrupted writes left there; then, with
    ``resume`` and a checkpoint that verifies (damaged ones are skipped with
    a warning, see ``module/run_folder.py``), the trained weights, optimizer,
    schedule, history, best metric and RNG states continue from it and
    ``best.pt`` is made again if it is missing, stale or damaged; without
    ``resume``, an earlier run's checkpoints and report in the folder are
    moved into a ``previous-<date>`` sub-folder first, never overwritten.

    Raises:
        RunFolderError: the checkpoint was written under different settings (see ``RESUME_MUST_MATCH``),
            was trained on other frozen weights, or the folder holds checkpoints none of which can be used.
        RunFolderInUse: another process holds the run folder.
    """
    device = config.resolved_device()
    model.to(device)
    setup_head_only_finetune(model)
    # The optimizer's base rates are where the warm-up starts; the scheduler multiplies them up to the peak.
    start = 1 / config.warmup_multiplier
    block_groups = unfreeze_last_blocks(model, config.unfreeze_blocks, config.lr_blocks * start) \
        if config.unfreeze_blocks else []
    optimizer = build_optimizer_for_head_only(model, config.lr * start, config.weight_decay, param_groups=block_groups)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs - config.warmup_epochs)
    scheduler = GradualWarmupScheduler(optimizer, config.warmup_multiplier, config.warmup_epochs, after_scheduler=cosine)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_enabled(config.amp, device))
    run = TrainingRun(config, model, optimizer, scheduler, scaler, torch.Generator().manual_seed(config.seed), device)
    run.frozen_fingerprint = frozen_fingerprint(model, trained_state_keys(model))

    with lock_run_folder(config.ckpt_dir):
        clean_run_folder(config.ckpt_dir)
        if not resume:
            archive = set_aside_run(config.ckpt_dir)
            if archive is not None:
                _log(f"resume=False: the earlier run's checkpoints and report were moved to {archive}")
        point = find_resume_point(config.ckpt_dir) if resume else None
        if point is None:
            _log(f"new run: checkpoints go to {run.ckpt_dir}")
            return run
        if config.feature_dtype == "auto":  # a resumed run keeps the dtype its checkpoints settled on
            run.config = config = dataclasses.replace(config, feature_dtype=point.checkpoint["config"]["feature_dtype"])
        continue_run(run, point, RESUME_MUST_MATCH)
    _log(f"resumed from {point.path} after epoch {run.epoch} of {config.epochs} "
         f"(best validation {_format_metric(config.select_metric, run.best_metric)} at epoch {run.best_epoch})")
    return run


def _record(run: TrainingRun, epoch: int, train_loss: float | None, lr: float | None,
            metrics: Mapping[str, Any], seconds: float) -> bool:
    """Append an epoch to the history and update the best; True when this epoch is the new best."""
    values = {"epoch": epoch, "train_loss": train_loss, "val_loss": metrics["loss"], "val_eer": metrics["eer"],
              "val_auc": metrics["auc"], "val_accuracy": metrics["accuracy"], "lr": lr, "seconds": seconds}
    for key in HISTORY_KEYS:
        run.history.setdefault(key, []).append(values[key])
    score = metrics["eer"] if run.config.select_metric == "eer" else metrics["loss"]
    improved = run.best_metric is None or score < run.best_metric * (1 - run.config.min_improvement)
    if improved:
        run.best_metric, run.best_epoch = float(score), epoch
    return improved


def fit(
    run: TrainingRun,
    train_set: Any,
    val_set: Any,
    *,
    progress: bool = True,
    on_epoch_end: Callable[[TrainingRun, dict[str, Any]], None] | None = None,
) -> TrainingRun:
    """The training loop: from ``run.epoch + 1`` to ``config.epochs``, or until early stopping.

    Each epoch: train (fast path on cached features, or per-pair path with
    the dataset's augmentation), validate (each distinct validation image
    embedded once), step the schedule, record the history, then commit:
    write ``epoch_NNNN.pt`` and make ``best.pt`` a copy of the best epoch's
    checkpoint (the newest ``keep_last`` and the best one are kept). Before
    the first epoch of a new run the untrained model is validated (history
    entry 0, also a candidate for ``best.pt``) and saved as
    ``epoch_0000.pt``. The run folder's lock is held throughout.
    Interrupting (Ctrl-C, Colab's stop button, ``kill -9``) loses at most
    the current epoch: calling ``fit`` again with the same run reloads the
    last checkpoint first (the model in memory is half-trained), and so does
    ``prepare_run``; either continues exactly where it left off.

    Args:
        run: from ``prepare_run``.
        train_set, val_set: pair datasets (``sig_dataloader_colab`` interface).
        on_epoch_end: called as ``on_epoch_end(run, val_metrics)`` after each epoch's checkpoint is written.

    Raises:
        NonFiniteLossError: a NaN or infinite loss; the message names the last good checkpoint.
    """
    with lock_run_folder(run.ckpt_dir):
        return _fit_holding_the_lock(run, train_set, val_set, progress, on_epoch_end)


def _fit_holding_the_lock(run: TrainingRun, train_set: Any, val_set: Any, progress: bool,
                          on_epoch_end: Callable[[TrainingRun, dict[str, Any]], None] | None) -> TrainingRun:
    config, model, device = run.config, run.model, run.device
    if run.uncommitted_epoch is not None:
        reload_after_interruption(run, RESUME_MUST_MATCH)
    done = run.stop_reason()
    if done is not None:
        _log(f"nothing to train: {done}")
        return run
    backbone_frozen = not any(parameter.requires_grad for parameter in model.model.parameters())
    if config.fast_head_only and not backbone_frozen:
        raise ValueError("fast_head_only needs a frozen backbone; build the run with prepare_run(model, config)")
    # A frozen backbone's features go to the feature store (kept across resumes); a training one's change every epoch.
    embedded = [train_set, val_set] if config.fast_head_only else [val_set]
    n_images = len({path for data in embedded for path in data.image_paths()}) if config.feature_dtype == "auto" else 0
    feature_options = dict(batch_size=config.eval_batch_size, device=device, amp=config.amp,
                           dtype=resolve_feature_dtype(config.feature_dtype, n_images, config.image_size, _log),
                           feature_dir=config.feature_store_dir() if backbone_frozen else "",
                           num_workers=config.num_workers, progress=progress)
    if config.fast_head_only:
        if getattr(train_set, "augment", False):
            _log("fast path: training on cached features of the un-augmented images "
                 "(fast_head_only=False trains with augmentation)")
        train_data = compute_features(model, train_set, desc="training set: embedding images", **feature_options)
    else:
        train_data = train_set

    def train_loader(epoch: int) -> Iterable[Any]:
        sample = epoch_pair_sample(pair_labels(train_data), config.max_train_pairs_per_epoch, config.seed, epoch) \
            if config.max_train_pairs_per_epoch else None
        return make_pair_loader(train_data, config.batch_size, shuffle=True, generator=run.data_generator,
                                num_workers=config.num_workers, pin_memory=device.type == "cuda", pairs=sample)

    # A frozen backbone gives the same validation features every epoch: embed them once.
    val_cache = compute_features(model, val_set, desc="validation set: embedding images", **feature_options) \
        if backbone_frozen else None

    def run_validation() -> dict[str, Any]:
        data = val_cache if val_cache is not None else val_set
        return validate(model, data, device=device, batch_size=config.eval_batch_size, amp=config.amp,
                        feature_dtype=feature_options["dtype"], num_workers=config.num_workers, progress=progress)[1]

    if run.epoch == 0 and not run.history.get("epoch"):
        run.uncommitted_epoch = 0
        start = time.perf_counter()
        metrics = run_validation()
        _record(run, 0, None, None, metrics, time.perf_counter() - start)
        # Seeded before epoch 0 is saved, so that resuming from it repeats this run exactly; the file also
        # pins the starting weights, whatever happens to the model object in memory afterwards.
        seed_everything(config.seed)
        run.data_generator.manual_seed(config.seed)
        commit_epoch(run, improved=True)
        _log(f"before fine-tuning: val loss {metrics['loss']:.4f}  {_format_metric('eer', metrics['eer'])}  "
             f"AUC {metrics['auc']:.4f}")
    elif run.pending_rng_state is not None:
        restore_rng_state(run.pending_rng_state, run.data_generator)
        run.pending_rng_state = None

    epoch = run.epoch + 1
    try:
        while run.stop_reason() is None:
            epoch = run.epoch + 1
            start = time.perf_counter()
            lr = run.optimizer.param_groups[0]["lr"]
            run.uncommitted_epoch = epoch
            try:
                train_loss = train_one_epoch(model, train_loader(epoch), run.optimizer, device=device, scaler=run.scaler,
                                             amp=config.amp, epoch=epoch, progress=progress)
                metrics = run_validation()
            except NonFiniteLossError as error:
                raise NonFiniteLossError(
                    f"{error}. Training stopped; the last good checkpoint is "
                    f"{epoch_checkpoint_path(run.ckpt_dir, run.epoch)} (epoch {run.epoch}). "
                    f"Lower the learning rate (lr={config.lr}), or check the data for blank or broken images."
                ) from error
            run.scheduler.step()
            run.epoch = epoch
            improved = _record(run, epoch, train_loss, lr, metrics, time.perf_counter() - start)
            commit_epoch(run, improved)
            _log(f"epoch {epoch:>3}/{config.epochs}  train loss {train_loss:.4f}  val loss {metrics['loss']:.4f}  "
                 f"{_format_metric('eer', metrics['eer'])}  AUC {metrics['auc']:.4f}  lr {lr:.2e}  "
                 f"{run.history['seconds'][-1]:6.1f} s" + ("  * best" if improved else ""))
            if on_epoch_end is not None:
                on_epoch_end(run, metrics)
    except KeyboardInterrupt:
        _log(f"interrupted during epoch {epoch}; the last checkpoint holds epoch {run.epoch}: "
             "run fit (or train_and_report) again to continue from it")
        raise
    _log(f"{run.stop_reason()}; best validation {_format_metric(config.select_metric, run.best_metric)} "
         f"at epoch {run.best_epoch} ({run.best_checkpoint})")
    return run


# --------------------------------------------------------------------------- builders and the pipeline

DATASET_CLASSES = {"cedar": SigDataset_CEDAR_Colab, "gpds": SigDataset_GDPS_Colab, "bhsig": SigDataset_BHSig_Colab}
EVALUATED_SPLITS = ("val", "test")


def build_model(config: FinetuneConfig, pretrained: str | Path | None = None) -> ViT_for_OSV_DSNet:
    """``ViT_for_OSV_DSNet(config)`` seeded with ``config.seed``, with pretrained weights, on ``config``'s device.

    ``pretrained``: a weights file (``load_pretrained``, ``strict=True``);
    ``None`` takes ``config.pretrained``; empty means a fresh backbone.
    """
    seed_everything(config.seed)
    model = ViT_for_OSV_DSNet(config)
    source = pretrained if pretrained is not None else config.pretrained
    if source:
        load_pretrained(model, source, strict=True)
    return model.to(config.resolved_device())


def build_datasets(config: FinetuneConfig, splits: Sequence[str] = ("train", "val", "test")) -> dict[str, Any]:
    """The pair datasets of ``config.dataset`` under ``config.data_root``, one per split.

    Split ``s`` reads ``gray_{s}.txt`` (``module.pair_files.PAIR_FILES``); only
    ``train`` augments (which the fast path ignores). A missing pair file or
    image raises the dataset's error, which names the command that makes it.
    """
    dataset_class = DATASET_CLASSES[config.dataset]
    unknown = [split for split in splits if split not in PAIR_FILES]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}: choose from {', '.join(PAIR_FILES)}")
    missing = [split for split in splits if not (Path(config.data_root) / PAIR_FILES[split]).is_file()]
    if missing and Path(config.data_root).is_dir():
        raise FileNotFoundError(f"{', '.join(PAIR_FILES[split] for split in missing)} not found in {config.data_root}. "
                                f"Fix: {pair_file_fix(config.dataset, config.data_root, missing)}")
    return {
        split: dataset_class(None, config.data_root, train=split == "train", image_size=config.image_size,
                             pair_file=PAIR_FILES[split], augment=split == "train", cache_dir=config.cache_dir or None)
        for split in splits
    }


def report_run(run: TrainingRun, datasets: Mapping[str, Any], progress: bool = True) -> dict[str, dict[str, Any]]:
    """Load the best epoch into ``run.model`` and write the run folder's reports; returns ``{split: metrics}``.

    Evaluates the validation and test splits (``{split}_metrics.json`` and
    plots, see ``evaluate_and_report``), and writes ``history.json``,
    ``history.png`` and ``best_weights.pth`` (the whole model, a plain state
    dict that ``model_v3.load_pretrained`` reads). Every file is derived from
    ``best.pt`` and the history, and rewritten each time, under the run
    folder's lock.
    """
    with lock_run_folder(run.ckpt_dir):
        apply_checkpoint(read_checkpoint(run.best_checkpoint), run.best_checkpoint, run.model,
                         fingerprint=run.frozen_fingerprint or None)
        metrics = {split: evaluate_and_report(run.model, datasets[split], run.ckpt_dir, split, run.config, progress)
                   for split in EVALUATED_SPLITS}
        save_metrics_json(run.history, run.ckpt_dir / "history.json")
        plot_training_history(run.history, run.ckpt_dir / "history.png")
        export_state_dict(run.best_checkpoint, run.ckpt_dir / BEST_WEIGHTS, model=run.model)
    return metrics


@dataclass
class TrainingResult:
    """What ``train_and_report`` returns.

    Attributes:
        run: the finished run; ``run.model`` holds the best epoch's weights.
        metrics: ``{"val": ..., "test": ...}``, each ``validate``'s metrics dict.
    """

    run: TrainingRun
    metrics: dict[str, dict[str, Any]]

    @property
    def model(self) -> nn.Module:
        return self.run.model


def train_and_report(
    config: FinetuneConfig,
    *,
    resume: bool = True,
    model: nn.Module | None = None,
    datasets: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> TrainingResult:
    """The whole pipeline, as the notebook and ``finetune.py train`` run it: build, resume, fit, evaluate, export.

    Says when the backbone is fresh, and writes ``test_before_metrics.json``
    (the starting model on the test split) unless resuming a run that has it.
    ``feature_dtype="auto"`` is settled here once for the run (the resumed
    checkpoints' choice, else by the features' size).

    Args:
        config: the run's settings; ``config.ckpt_dir`` is the run folder.
        resume: continue from the newest valid checkpoint in the run folder
            (always from the file, whatever ``model`` holds in memory: after
            an interrupted call, calling again with the same ``model`` gives
            the result of an uninterrupted run); ``False`` sets an earlier
            run aside and starts over.
        model: a model from ``build_model(config)`` to train (built when ``None``).
        datasets: ``build_datasets(config)``'s splits (built when ``None``).
    """
    config.resolved_device()  # a device this machine lacks, or a run folder in use, is reported before any work
    with lock_run_folder(config.ckpt_dir):
        datasets = datasets if datasets is not None else build_datasets(config)
        if not config.pretrained:
            _log(f"the backbone is fresh (no {option('pretrained')} weights): its features say little about a writer, "
                 "so fine-tuning the head has little to work with; the authors' weights give it real structure")
        model = model if model is not None else build_model(config)
        if not (resume and (Path(config.ckpt_dir) / "test_before_metrics.json").is_file()):
            # The starting model on the test split, rebuilt as the run starts (the model given may have trained since).
            evaluate_and_report(build_model(config), datasets["test"], config.ckpt_dir, "test_before", config, progress)
        run = prepare_run(model, config, resume=resume)
        if run.config.feature_dtype == "auto":  # settled once, for the whole run, by the size of its images
            images = len({path for split in datasets.values() for path in split.image_paths()})
            run.config = dataclasses.replace(run.config, feature_dtype=resolve_feature_dtype(
                "auto", images, config.image_size, _log))
        fit(run, datasets["train"], datasets["val"], progress=progress)
        return TrainingResult(run, report_run(run, datasets, progress))


def run_status(ckpt_dir: str | Path) -> str:
    """One line on where the run in ``ckpt_dir`` stands: new, or the epoch it continues from and its best so far."""
    latest = find_latest_checkpoint(ckpt_dir)
    if latest is None:
        return f"new run: nothing to resume in {ckpt_dir}"
    checkpoint = read_checkpoint(latest)
    config = checkpoint["config"]
    return (f"{checkpoint['epoch']} of {config['epochs']} epochs done ({latest.name}); best validation "
            f"{_format_metric(config['select_metric'], checkpoint['best_metric'])} at epoch {checkpoint['best_epoch']}")


def _best_checkpoint_of(run: str | Path) -> Path:
    """``best.pt`` of a run folder, or the checkpoint file given."""
    path = Path(run)
    checkpoint = path / BEST_CHECKPOINT if path.is_dir() else path
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint} not found. Fix: give the folder of a trained run (it holds "
                                f"{BEST_CHECKPOINT}), e.g. the run folder of `python finetune.py train`.")
    return checkpoint


def load_trained_model(run: str | Path) -> tuple[FinetuneConfig, ViT_for_OSV_DSNet]:
    """A trained run's settings and best model (eval mode, on the run's device), from its run folder alone.

    ``run`` is a run folder (its ``best.pt`` is read) or a checkpoint file;
    the returned ``config.ckpt_dir`` is the folder it is in now (a run folder
    may have been copied off Drive since it was trained). A checkpoint holds
    only what trained; the frozen weights come from ``best_weights.pth``
    beside it (the whole best model, so a copied run folder is
    self-contained), else from the run's pretrained weights or its seeded
    fresh backbone, whichever has the checkpoint's fingerprint.

    Raises:
        CheckpointError: the checkpoint is damaged (the message says how to make ``best.pt`` again),
            unreadable, or its frozen weights are found nowhere (``RunFolderError``).
    """
    checkpoint_path = _best_checkpoint_of(run)
    checkpoint = read_run_checkpoint(checkpoint_path)
    config = FinetuneConfig.from_dict(checkpoint["config"])
    config = dataclasses.replace(config, ckpt_dir=str(checkpoint_path.parent.absolute()))
    best_weights = checkpoint_path.parent / BEST_WEIGHTS
    base = f"the run's pretrained weights {config.pretrained}" if config.pretrained else \
        f"a fresh backbone seeded with {config.seed}"
    base_weights = [(str(best_weights), lambda: build_model(config, best_weights)), (base, lambda: build_model(config))]
    return config, rebuild_trained_model(checkpoint, checkpoint_path, base_weights).eval()


def run_threshold(run: str | Path) -> tuple[float, str]:
    """``(threshold, where it comes from)``: the validation EER threshold of a run (the test one when there is no
    validation split), read from the ``{split}_metrics.json`` beside its checkpoint.
    """
    folder = _best_checkpoint_of(run).parent
    for split in EVALUATED_SPLITS:
        metrics_file = folder / f"{split}_metrics.json"
        if metrics_file.is_file():
            return float(json.loads(metrics_file.read_text())["threshold"]), f"EER threshold of {metrics_file}"
    raise FileNotFoundError(f"no val_metrics.json or test_metrics.json in {folder}. Fix: evaluate the run first "
                            "(`python finetune.py evaluate --run ...`), or give a threshold.")
