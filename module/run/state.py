"""A run's state between epochs (``TrainingRun``): built, resumed, recorded and committed to its run folder.

``prepare_run`` builds a run (what trains, optimizer, schedule, scaler) and
continues it from its run folder when that holds a checkpoint;
``record_epoch`` and ``commit_epoch`` advance it by an epoch;
``reload_after_interruption`` puts back the last commit after an
interrupted epoch. The loop itself is ``training_utils.fit``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.fine_tune_utils import (
    build_optimizer_for_head_only,
    setup_head_only_finetune,
    train_whole_model,
    unfreeze_last_blocks,
)
from models.weights import CheckpointError
from module.core.distributed import SINGLE_PROCESS, ProcessGroup, broadcast_from_main, current_group, join_process_group
from module.core.precision import autocast_dtype
from module.core.progress import write_line
from module.core.wording import format_metric, option, rerun_hint
from module.features.store import LAST_BLOCK, resolve_feature_dtype
from module.run.checkpoint import (
    BEST_CHECKPOINT,
    apply_checkpoint,
    epoch_checkpoint_path,
    frozen_fingerprint,
    save_checkpoint,
    trained_state_keys,
)
from module.run.config import FinetuneConfig
from module.run.folder import (
    ResumePoint,
    RunFolderError,
    clean_run_folder,
    find_resume_point,
    prune_checkpoints,
    set_aside_run,
    sync_best_checkpoint,
)
from module.run.lock import lock_run_folder
from module.run.schedule import GradualWarmupScheduler

__all__ = ["HISTORY_KEYS", "RESUME_MUST_MATCH", "TrainingRun", "commit_epoch", "continue_run", "log", "prepare_run",
           "record_epoch", "reload_after_interruption", "settle_feature_dtype"]

HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "val_eer", "val_auc", "val_accuracy", "lr", "seconds")
# Settings that shape the optimisation: a checkpoint resumes only under the same values.
RESUME_MUST_MATCH = (
    "dataset", "image_size", "fast_head_only", "finetune", "unfreeze_blocks", "epochs", "batch_size", "lr", "lr_blocks",
    "weight_decay", "warmup_epochs", "warmup_multiplier", "amp", "select_metric", "feature_dtype", "seed",
    "emd", "dis_type", "mar_type", "gol_dis", "temp", "max_train_pairs_per_epoch", "amp_dtype", "grad_accumulation",
    "clip_grad_norm", "data_init",
)


def log(message: str) -> None:
    """Print a line of the run's log; write_line prints above running progress bars; under torchrun rank 0 speaks."""
    if current_group().is_main:
        write_line(message)


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
    (AdamW, peak ``config.lr``), plus what ``config.finetune`` adds at peak
    ``config.lr_blocks``: the last N backbone blocks and the final norm
    (``last:N``), or every other parameter (``all``); the frozen part stays in
    eval mode. The schedule is ``GradualWarmupScheduler`` then
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
    if config.finetune == "all":
        block_groups = train_whole_model(model, config.lr_blocks * start)
    elif config.unfreeze_blocks:
        block_groups = unfreeze_last_blocks(model, config.unfreeze_blocks, config.lr_blocks * start)
    else:
        block_groups = []
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
                log(f"{option('resume', False)}: the earlier run's checkpoints and report were moved to {archive}")
        group.barrier()  # every process resumes from what rank 0 left in the folder
        point = find_resume_point(config.ckpt_dir) if resume else None
        if point is None:
            log(f"new run: checkpoints go to {run.ckpt_dir}")
            return run
        continue_run(run, point)
    log(f"resumed from {point.path} after epoch {run.epoch} of {config.epochs} "
        f"(best validation {format_metric(config.select_metric, run.best_metric)} at epoch {run.best_epoch})")
    return run


def record_epoch(run: TrainingRun, epoch: int, train_loss: float | None, lr: float | None,
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


def settle_feature_dtype(run: TrainingRun, datasets: Iterable[Any], block: int = LAST_BLOCK) -> str:
    """Settle ``feature_dtype="auto"`` for the whole run, once, and keep it in ``run.config`` (so every checkpoint
    holds it and a resume adopts it, whatever RAM it then finds); returns the dtype.

    ``auto`` is float32, or float16 when the float32 features of the ``datasets``' distinct images would take
    more than ``RAM_SHARE`` of the RAM available (rank 0 decides for a torchrun job); the features are those at
    the input of backbone block ``block`` (``compute_features``).
    """
    if run.config.feature_dtype == "auto":
        n_images = len({path for data in datasets for path in data.image_paths()})
        chosen = broadcast_from_main(resolve_feature_dtype("auto", n_images, run.config.image_size, log, block), run.group)
        run.config = dataclasses.replace(run.config, feature_dtype=chosen)
    return run.config.feature_dtype



def continue_run(run: TrainingRun, point: ResumePoint, must_match: Sequence[str] = RESUME_MUST_MATCH) -> None:
    """Load ``point`` into ``run`` and put ``best.pt`` in step with it; a run whose ``feature_dtype`` is ``auto``
    adopts the checkpoint's.

    Raises:
        RunFolderError: a setting of ``must_match`` differs from the checkpoint's, or the model's frozen
            weights are not those the checkpoint was trained on.
    """
    checkpoint = point.checkpoint
    if run.config.feature_dtype == "auto":  # a resumed run keeps the dtype its first epoch settled on
        run.config = dataclasses.replace(run.config, feature_dtype=checkpoint["config"]["feature_dtype"])
    current = run.config.to_dict()
    # Through the dataclass: a setting newer than the checkpoint takes its default, which is what the run did then.
    saved = FinetuneConfig.from_dict(checkpoint["config"]).to_dict()
    differences = [f"{key}: checkpoint {saved.get(key)!r}, now {current[key]!r}"
                   for key in must_match if saved.get(key) != current[key]]
    if differences:
        raise RunFolderError(
            f"{point.path} was written with other settings, so it cannot continue under these:\n  "
            + "\n  ".join(differences) + f"\nUse the checkpoint's settings to resume, or start a new run (another "
            f"{option('ckpt_dir')} folder, or start over with {option('resume', False)}).")
    try:
        apply_checkpoint(checkpoint, point.path, run.model, run.optimizer, run.scheduler, run.scaler,
                         fingerprint=run.frozen_fingerprint or None)
    except CheckpointError as error:
        pretrained = checkpoint["config"].get("pretrained") or "none (a fresh backbone, seeded with the run's seed)"
        raise RunFolderError(f"{error} The run's {option('pretrained')} weights: {pretrained}.") from error
    run.epoch = checkpoint["epoch"]
    run.history = {key: list(values) for key, values in checkpoint["history"].items()}
    run.best_metric, run.best_epoch = checkpoint["best_metric"], checkpoint["best_epoch"]
    run.best_source, run.resumed_from = point.best_source, point.path
    run.pending_rng_state = checkpoint["rng_state"]
    run.uncommitted_epoch = None
    if not current_group().is_main:
        return
    if sync_best_checkpoint(run.ckpt_dir, point.best_source):
        write_line(f"{run.ckpt_dir / BEST_CHECKPOINT} made again from {point.best_source.name} "
                   "(it was missing, stale or damaged)")
    prune_checkpoints(run.ckpt_dir, run.config.keep_last, [run.best_epoch], current_epoch=run.epoch)


def reload_after_interruption(run: TrainingRun, must_match: Sequence[str] = RESUME_MUST_MATCH) -> None:
    """After an interrupted epoch, put back the last checkpoint's state, so the lost part leaves no trace.

    Raises:
        RunFolderError: training had begun and there is no checkpoint to go back to.
    """
    interrupted, run.uncommitted_epoch = run.uncommitted_epoch, None
    point = find_resume_point(run.ckpt_dir)
    if point is not None:
        write_line(f"epoch {interrupted} was interrupted: continuing from the last checkpoint, {point.path.name}, "
                   "not from the model in memory")
        continue_run(run, point, must_match)
    elif interrupted == 0:  # only the untrained model's validation was lost: nothing has trained yet
        run.history = {key: [] for key in run.history}
        run.best_metric = run.best_epoch = None
    else:
        run.uncommitted_epoch = interrupted
        raise RunFolderError(f"epoch {interrupted} was interrupted and {run.ckpt_dir} holds no checkpoint to continue "
                             f"from: the model in memory is half-trained; {rerun_hint()} with a model built afresh")


def commit_epoch(run: TrainingRun, improved: bool) -> Path:
    """Write the epoch's checkpoint (the commit), then make ``best.pt`` and the retention follow it; returns its path.

    Under torchrun only rank 0 writes; the others keep the same account of the run.
    """
    path = epoch_checkpoint_path(run.ckpt_dir, run.epoch)
    if current_group().is_main:
        run.save(path)
    run.uncommitted_epoch = None
    if improved or run.best_source is None:
        run.best_source = path if improved else epoch_checkpoint_path(run.ckpt_dir, run.best_epoch)
    if current_group().is_main:
        sync_best_checkpoint(run.ckpt_dir, run.best_source)
        prune_checkpoints(run.ckpt_dir, run.config.keep_last, [run.best_epoch], current_epoch=run.epoch)
    return path
