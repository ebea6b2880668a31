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
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

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
from module.builders import EVALUATED_SPLITS, build_datasets, build_model, load_trained_model, run_threshold
from module.config import FinetuneConfig
from module.evaluation import evaluate_and_report, evaluate_with_references, explain_worst_errors, starting_model_note, validate
from module.feature_store import resolve_feature_dtype
from module.distributed import (
    SINGLE_PROCESS,
    ProcessGroup,
    all_reduce_sum,
    broadcast_from_main,
    current_group,
    join_process_group,
    wrap_for_data_parallel,
)
from module.epoch_order import share_weight
from module.features import (
    CachedPairBatch,
    FeatureCache,
    PairDistances,
    autocast_dtype,
    compute_features,
    make_epoch_loader,
    make_pair_loader,
    model_device,
)
from module.loss import NonFiniteLossError
from module.metrics import compute_metrics, compute_writer_metrics, format_metric, save_metrics_json
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
    reload_after_interruption,
    run_status,
    set_aside_run,
)
from module.scheduler import GradualWarmupScheduler
from module.verifier import Decision, Verifier
from module.wording import option

__all__ = [
    # defined here
    "TrainingRun", "TrainingResult", "prepare_run", "fit", "train_one_epoch", "HISTORY_KEYS", "report_run",
    "train_and_report",
    # re-exported, so that notebooks import from one place
    "build_model", "build_datasets", "run_status", "load_trained_model", "run_threshold",
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
    amp: bool | str = False,
    epoch: int | None = None,
    progress: bool = True,
    step: nn.Module | None = None,
    shares: Sequence[tuple[Any, int, int]] | None = None,
    group: ProcessGroup = SINGLE_PROCESS,
) -> float:
    """One pass over ``loader`` (either path) in training mode; returns the mean loss per pair.

    The Sinkhorn runs with its training epsilon (``model.training``). A
    non-finite loss raises ``NonFiniteLossError`` before the optimizer step,
    so the weights never take it in. ``scaler`` (a ``GradScaler``) goes with
    float16 ``amp`` on CUDA.

    Args:
        amp: autocast of the backbone on CUDA (``True``, or a ``module.features.AMP_DTYPES`` name).
        step: the module that gives a batch's distances (``PairDistances(model)``, by default; in
            DistributedDataParallel under torchrun).
        shares: for each batch, ``(pair indices, pairs that count, global batch size)`` (the loader's
            ``EpochSampler.shares()``): each process's loss is weighted by its share of the global batch,
            so the processes together take the step one process would (``module/epoch_order.py``).
        group: the processes of a torchrun job; the loss returned is over all of them.
    """
    device = torch.device(device) if device is not None else model_device(model)
    step = step if step is not None else PairDistances(model)
    batch_shares = iter(shares) if shares is not None else None
    model.train()
    total_loss, total_pairs = 0.0, 0
    description = f"epoch {epoch} training" if epoch is not None else "training"
    bar = tqdm(loader, desc=description, unit="batch", leave=False, disable=not (progress and group.is_main))
    for batch_number, batch in enumerate(bar, start=1):
        distance, labels = step(batch, device, amp)
        loss = model.loss_fn(distance, labels)
        counted, weight = len(labels), 1.0
        if batch_shares is not None:
            _, counted, batch_size = next(batch_shares)
            weight = share_weight(counted, batch_size, group)
        batch_loss = loss.item()
        finite = math.isfinite(batch_loss)
        if group.is_distributed:  # every process stops together, or none does
            finite = all_reduce_sum([not finite], group, device)[0] == 0
        if not finite:
            value = batch_loss if not math.isfinite(batch_loss) else "not finite in another process"
            raise NonFiniteLossError(f"training loss is {value} at batch {batch_number} of {len(bar)}"
                                     + (f" in epoch {epoch}" if epoch is not None else ""))
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss * weight).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            (loss * weight).backward()
            optimizer.step()
        total_loss += batch_loss * counted
        total_pairs += counted
        bar.set_postfix(loss=f"{total_loss / max(total_pairs, 1):.4f}")
    total_loss, total_pairs = all_reduce_sum([total_loss, total_pairs], group, device)
    if total_pairs == 0:
        raise ValueError("the training loader yielded no pairs")
    return total_loss / total_pairs


# --------------------------------------------------------------------------- the run and its one loop

HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "val_eer", "val_auc", "val_accuracy", "lr", "seconds")
# Settings that shape the optimisation: a checkpoint resumes only under the same values.
RESUME_MUST_MATCH = (
    "dataset", "image_size", "fast_head_only", "unfreeze_blocks", "epochs", "batch_size", "lr", "lr_blocks",
    "weight_decay", "warmup_epochs", "warmup_multiplier", "amp", "select_metric", "feature_dtype", "seed",
    "emd", "dis_type", "mar_type", "gol_dis", "temp", "max_train_pairs_per_epoch", "amp_dtype",
)


def _log(message: str) -> None:
    # tqdm.write prints above running progress bars instead of through them; under torchrun rank 0 speaks.
    if current_group().is_main:
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
    device: torch.device
    group: ProcessGroup = SINGLE_PROCESS
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
            best_metric=self.best_metric, best_epoch=self.best_epoch,
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
    group, device = join_process_group(config.resolved_device())  # under torchrun: this process's GPU
    model.to(device)
    setup_head_only_finetune(model)
    # The optimizer's base rates are where the warm-up starts; the scheduler multiplies them up to the peak.
    start = 1 / config.warmup_multiplier
    block_groups = unfreeze_last_blocks(model, config.unfreeze_blocks, config.lr_blocks * start) \
        if config.unfreeze_blocks else []
    optimizer = build_optimizer_for_head_only(model, config.lr * start, config.weight_decay, param_groups=block_groups)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs - config.warmup_epochs)
    scheduler = GradualWarmupScheduler(optimizer, config.warmup_multiplier, config.warmup_epochs, after_scheduler=cosine)
    # float16 needs its gradients scaled; bfloat16 has float32's range and does not.
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(config.autocast, device) == torch.float16)
    run = TrainingRun(config, model, optimizer, scheduler, scaler, device, group)
    run.frozen_fingerprint = frozen_fingerprint(model, trained_state_keys(model))

    with lock_run_folder(config.ckpt_dir):
        if group.is_main:
            clean_run_folder(config.ckpt_dir)
            archive = set_aside_run(config.ckpt_dir) if not resume else None
            if archive is not None:
                _log(f"resume=False: the earlier run's checkpoints and report were moved to {archive}")
        group.barrier()  # every process resumes from what rank 0 left in the folder
        point = find_resume_point(config.ckpt_dir) if resume else None
        if point is None:
            _log(f"new run: checkpoints go to {run.ckpt_dir}")
            return run
        if config.feature_dtype == "auto":  # a resumed run keeps the dtype its checkpoints settled on
            run.config = config = dataclasses.replace(config, feature_dtype=point.checkpoint["config"]["feature_dtype"])
        continue_run(run, point, RESUME_MUST_MATCH)
    _log(f"resumed from {point.path} after epoch {run.epoch} of {config.epochs} "
         f"(best validation {format_metric(config.select_metric, run.best_metric)} at epoch {run.best_epoch})")
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
    config, model, device, group = run.config, run.model, run.device, run.group
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
    # Rank 0's choice: "auto" looks at the RAM available, which differs from process to process.
    feature_dtype = broadcast_from_main(resolve_feature_dtype(config.feature_dtype, n_images, config.image_size, _log),
                                        group)
    feature_options = dict(batch_size=config.eval_batch_size, device=device, amp=config.autocast, dtype=feature_dtype,
                           feature_dir=config.feature_store_dir() if backbone_frozen else "",
                           num_workers=config.num_workers, progress=progress, group=group)
    if config.fast_head_only:
        if getattr(train_set, "augment", False):
            _log("fast path: training on cached features of the un-augmented images "
                 "(fast_head_only=False trains with augmentation)")
        train_data = compute_features(model, train_set, desc="training set: embedding images", **feature_options)
    else:
        train_data = train_set
    # Each epoch's pairs in one order for all processes, each taking its share of every global batch.
    train_loader = make_epoch_loader(train_data, config.batch_size, config.seed, group=group,
                                     max_pairs=config.max_train_pairs_per_epoch, num_workers=config.num_workers,
                                     pin_memory=device.type == "cuda")
    step = wrap_for_data_parallel(PairDistances(model), group, device)

    # A frozen backbone gives the same validation features every epoch: embed them once.
    val_cache = compute_features(model, val_set, desc="validation set: embedding images", **feature_options) \
        if backbone_frozen else None

    def run_validation() -> dict[str, Any]:
        data = val_cache if val_cache is not None else val_set
        return validate(model, data, device=device, batch_size=config.eval_batch_size, amp=config.autocast,
                        feature_dtype=feature_dtype, num_workers=config.num_workers, progress=progress,
                        group=group)[1]

    if run.epoch == 0 and not run.history.get("epoch"):
        run.uncommitted_epoch = 0
        start = time.perf_counter()
        metrics = run_validation()
        _record(run, 0, None, None, metrics, time.perf_counter() - start)
        # Seeded before epoch 0 is saved, so that resuming from it repeats this run exactly; the file also
        # pins the starting weights, whatever happens to the model object in memory afterwards.
        seed_everything(config.seed)
        commit_epoch(run, improved=True)
        _log(f"before fine-tuning: val loss {metrics['loss']:.4f}  {format_metric('eer', metrics['eer'])}  "
             f"AUC {metrics['auc']:.4f}")
    elif run.pending_rng_state is not None:
        restore_rng_state(run.pending_rng_state)
        run.pending_rng_state = None

    epoch = run.epoch + 1
    try:
        while run.stop_reason() is None:
            epoch = run.epoch + 1
            start = time.perf_counter()
            lr = run.optimizer.param_groups[0]["lr"]
            run.uncommitted_epoch = epoch
            try:
                train_loader.batch_sampler.set_epoch(epoch)
                train_loss = train_one_epoch(model, train_loader, run.optimizer, device=device, scaler=run.scaler,
                                             amp=config.autocast, epoch=epoch, progress=progress, step=step,
                                             shares=train_loader.batch_sampler.shares(), group=group)
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
                 f"{format_metric('eer', metrics['eer'])}  AUC {metrics['auc']:.4f}  lr {lr:.2e}  "
                 f"{run.history['seconds'][-1]:6.1f} s" + ("  * best" if improved else ""))
            if on_epoch_end is not None:
                on_epoch_end(run, metrics)
    except KeyboardInterrupt:
        _log(f"interrupted during epoch {epoch}; the last checkpoint holds epoch {run.epoch}: "
             "run fit (or train_and_report) again to continue from it")
        raise
    _log(f"{run.stop_reason()}; best validation {format_metric(config.select_metric, run.best_metric)} "
         f"at epoch {run.best_epoch} ({run.best_checkpoint})")
    return run


# --------------------------------------------------------------------------- builders and the pipeline

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
        before = Path(config.ckpt_dir) / "test_before_metrics.json"
        if current_group().is_main and not (resume and before.is_file()):
            # The starting model on the test split, rebuilt as the run starts (the model given may have trained since).
            evaluate_and_report(build_model(config), datasets["test"], config.ckpt_dir, "test_before", config, progress)
        run = prepare_run(model, config, resume=resume)
        if run.config.feature_dtype == "auto":  # settled once, for the whole run, by the size of its images
            images = len({path for split in datasets.values() for path in split.image_paths()})
            chosen = broadcast_from_main(resolve_feature_dtype("auto", images, config.image_size, _log), run.group)
            run.config = dataclasses.replace(run.config, feature_dtype=chosen)
        fit(run, datasets["train"], datasets["val"], progress=progress)
        if not run.group.is_main:  # rank 0 writes the report; the other processes are done
            return TrainingResult(run, {})
        return TrainingResult(run, report_run(run, datasets, progress))


