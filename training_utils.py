"""Fine-tuning DetailSemNet: the training loop and the pipeline the notebook and the command line share.

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

This file holds the loop (``train_one_epoch``, ``fit``) and the pipeline
(``train_and_report``); the floors below it are ``models/`` and
``module/{core,data,features,run,evaluation}``. It is also the face users
import: every public name of the helpers is re-exported here, so ``from
training_utils import compute_metrics`` keeps working (the project's own
code imports each name from the module that defines it).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.fine_tune_utils import (
    build_optimizer_for_head_only,
    print_trainable_params,
    setup_head_only_finetune,
    train_whole_model,
    unfreeze_last_blocks,
)
from models.loss import NonFiniteLossError
from models.weights import CheckpointError
from module.core.distributed import (
    SINGLE_PROCESS,
    ProcessGroup,
    all_reduce_sum,
    current_group,
    join_process_group,
    wrap_for_data_parallel,
)
from module.core.precision import model_device
from module.core.progress import progress_bar
from module.core.wording import format_metric, option, rerun_hint
from module.data.epoch_order import share_weight
from module.data.pair_dataset import PairDatasets, SignaturePairDataset
from module.data.prepare import ensure_pair_files
from module.evaluation.calibration import cllr, cllr_min, fit_calibration, load_calibration, verbal_equivalent
from module.evaluation.curves import TrainingCurves, learning_rates
from module.evaluation.metrics import compute_metrics, compute_writer_metrics, save_metrics_json
from module.evaluation.plots import (
    plot_explanation,
    plot_roc_curve,
    plot_score_distribution,
    plot_training_history,
    plot_writer_eers,
)
from module.evaluation.reports import (
    OperatingBasis,
    calibrate_run,
    evaluate_and_report,
    evidence_summary,
    explain_worst_errors,
    report_is_whole,
    report_run,
    starting_model_note,
)
from module.evaluation.validation import evaluate_with_references, validate
from module.features.cache import CachedPairBatch, FeatureCache, compute_features
from module.features.loaders import PairDistances, make_epoch_loader, make_pair_loader
from module.features.store import LAST_BLOCK
from module.run.checkpoint import epoch_checkpoint_path, export_state_dict, load_checkpoint, save_checkpoint
from module.run.config import FinetuneConfig
from module.run.folder import RunFolderError, find_latest_checkpoint, find_resume_point, run_status
from module.run.lock import lock_run_folder
from module.run.rng import capture_rng_state, restore_rng_state, seed_everything
from module.run.state import (
    HISTORY_KEYS,
    TrainingRun,
    commit_epoch,
    log,
    prepare_run,
    record_epoch,
    reload_after_interruption,
    settle_feature_dtype,
)
from module.run.trained import build_datasets, build_model, load_trained_model, run_threshold
from module.verifier import Decision, Verifier

__all__ = [
    # defined here
    "TrainingResult", "fit", "train_one_epoch", "train_and_report",
    # re-exported, so that notebooks import from one place
    "TrainingRun", "prepare_run", "HISTORY_KEYS", "report_run",
    "build_model", "build_datasets", "run_status", "load_trained_model", "run_threshold",
    "FinetuneConfig", "validate", "evaluate_and_report", "starting_model_note", "evaluate_with_references",
    "explain_worst_errors", "NonFiniteLossError", "Verifier", "Decision",
    "OperatingBasis", "calibrate_run", "evidence_summary", "fit_calibration", "load_calibration", "cllr", "cllr_min",
    "verbal_equivalent",
    "compute_features", "FeatureCache", "CachedPairBatch", "make_pair_loader",
    "compute_metrics", "compute_writer_metrics", "save_metrics_json",
    "plot_training_history", "plot_roc_curve", "plot_score_distribution", "plot_writer_eers", "plot_explanation",
    "seed_everything", "capture_rng_state", "restore_rng_state", "save_checkpoint", "load_checkpoint",
    "find_latest_checkpoint", "epoch_checkpoint_path", "export_state_dict", "CheckpointError", "RunFolderError",
    "lock_run_folder",
    "setup_head_only_finetune", "print_trainable_params", "build_optimizer_for_head_only", "unfreeze_last_blocks",
    "train_whole_model", "pretrain",
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
    accumulation: int = 1,
    clip_grad_norm: float = 0.0,
) -> float:
    """One pass over ``loader`` (either path) in training mode; returns the mean loss per pair.

    The Sinkhorn runs with its training epsilon (``model.training``). A
    non-finite loss raises ``NonFiniteLossError`` before the optimizer step,
    so the weights never take it in. ``scaler`` (a ``GradScaler``) goes with
    float16 ``amp`` on CUDA.

    Args:
        amp: autocast of the backbone on CUDA (``True``, or a ``module.core.precision.AMP_DTYPES`` name).
        step: the module that gives a batch's distances (``PairDistances(model)``, by default; in
            DistributedDataParallel under torchrun).
        shares: for each batch, ``(pair indices, pairs that count, global batch size)`` (the loader's
            ``EpochSampler.shares()``): each process's loss is weighted by its share of the global batch,
            so the processes together take the step one process would (``module/epoch_order.py``).
        group: the processes of a torchrun job; the loss returned is over all of them.
        accumulation: batches whose gradients add up before each optimizer step (each batch's loss divided
            by the batches of its step, so a step follows the mean over its pairs' batches); the last step of
            the epoch takes what is left.
        clip_grad_norm: clip the gradients' total norm to this before each step (0: no clipping).
    """
    device = torch.device(device) if device is not None else model_device(model)
    step = step if step is not None else PairDistances(model)
    batch_shares = iter(shares) if shares is not None else None
    model.train()
    total_loss, total_pairs = 0.0, 0
    description = f"epoch {epoch} training" if epoch is not None else "training"
    bar = progress_bar(loader, desc=description, unit="batch", leave=False, disable=not (progress and group.is_main))
    n_batches = len(loader)
    optimizer.zero_grad(set_to_none=True)
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
        step_start = (batch_number - 1) // accumulation * accumulation  # batches before this step's first
        batches_in_step = min(accumulation, n_batches - step_start)
        scaled = loss * (weight / batches_in_step)
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if batch_number - step_start == batches_in_step:
            _optimizer_step(model, optimizer, scaler, clip_grad_norm)
        total_loss += batch_loss * counted
        total_pairs += counted
        bar.set_postfix(loss=f"{total_loss / max(total_pairs, 1):.4f}")
    total_loss, total_pairs = all_reduce_sum([total_loss, total_pairs], group, device)
    if total_pairs == 0:
        raise ValueError("the training loader yielded no pairs")
    return total_loss / total_pairs



def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                    clip_grad_norm: float) -> None:
    """Clip (on unscaled gradients), step and clear the gradients."""
    if clip_grad_norm > 0:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- the loop

@dataclass
class EpochData:
    """What ``fit`` feeds each epoch: the training loader (either path) and the validation set.

    Attributes:
        train_loader: this process's share of each global batch, in the epoch's order (``make_epoch_loader``).
        step: the module giving a batch's distances (``PairDistances``; in DistributedDataParallel under torchrun).
        validate: the validation metrics of the model as it is now (``validate``'s dict).
    """

    train_loader: Any
    step: nn.Module
    validate: Callable[[], dict[str, Any]]


def _epoch_data(run: TrainingRun, train_set: Any, val_set: Any, progress: bool) -> EpochData:
    """The loaders of ``fit``. The fast path: features where the backbone's frozen part ends (the stage-4 tokens
    for head-only training, the input of block ``18 - N`` for ``last:N``) come from the feature store, embedded
    once and kept across resumes, and the trained blocks finish them each step. The per-pair path: every pair
    through the whole backbone, augmented; a head-only run still validates on stored features."""
    config, model, device, group = run.config, run.model, run.device, run.group
    # Where the frozen part of the backbone ends: features at that block's input never change while training.
    block = 0 if config.finetune == "all" else LAST_BLOCK - config.unfreeze_blocks
    frozen = set() if config.finetune == "all" else \
        dict(model.model.named_parameters()).keys() & model.model.state_dict_until(block).keys()
    if any(model.model.get_parameter(name).requires_grad for name in frozen):
        raise ValueError(f"the backbone trains before block {block}, which {option('finetune', config.finetune)} "
                         "keeps frozen; build the run with prepare_run(model, config)")
    stored = config.fast_head_only or block == LAST_BLOCK  # the blocks after the cut run on stored features
    feature_dtype = settle_feature_dtype(run, [train_set, val_set] if config.fast_head_only else [val_set],
                                         block if stored else LAST_BLOCK)
    features = dict(batch_size=config.eval_batch_size, device=device, amp=config.autocast, dtype=feature_dtype,
                    feature_dir=config.feature_store_dir() if stored else "", block=block,
                    num_workers=config.num_workers, progress=progress, group=group)
    train_data = train_set
    if config.fast_head_only:
        if getattr(train_set, "augment", False):
            log(f"fast path: training on cached features of the un-augmented images "
                f"({option('fast_head_only', False)} trains with augmentation)")
        train_data = compute_features(model, train_set, desc="training set: embedding images", **features)
    val_data = compute_features(model, val_set, desc="validation set: embedding images", **features) \
        if stored else val_set
    loader = make_epoch_loader(train_data, config.batch_size, config.seed, group=group,
                               max_pairs=config.max_train_pairs_per_epoch, num_workers=config.num_workers,
                               pin_memory=device.type == "cuda")
    return EpochData(loader, wrap_for_data_parallel(PairDistances(model), group, device), lambda: validate(
        model, val_data, device=device, batch_size=config.eval_batch_size, amp=config.autocast,
        feature_dtype=feature_dtype, num_workers=config.num_workers, progress=progress, group=group))


def _validate_starting_model(run: TrainingRun, data: EpochData, curves: TrainingCurves) -> None:
    """Epoch 0: the untrained model's validation, committed as ``epoch_0000.pt`` (a candidate for ``best.pt``)."""
    run.uncommitted_epoch = 0
    start = time.perf_counter()
    metrics = data.validate()
    record_epoch(run, 0, None, None, metrics, time.perf_counter() - start)
    curves.add_epoch(run.history)
    # Seeded before epoch 0 is saved, so that resuming from it repeats this run exactly; the file also
    # pins the starting weights, whatever happens to the model object in memory afterwards.
    seed_everything(run.config.seed)
    commit_epoch(run, improved=True)
    log(f"before fine-tuning: val loss {metrics['loss']:.4f}  {format_metric('eer', metrics['eer'])}  "
        f"AUC {metrics['auc']:.4f}")


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
    ``epoch_0000.pt``. ``feature_dtype="auto"`` is settled before the first
    commit and kept in every checkpoint. Each epoch's losses, EER, AUC and
    learning rates also go to the run folder's ``tensorboard/`` (rank 0;
    ``module/evaluation/curves.py``). The run folder's lock is held
    throughout. Interrupting (Ctrl-C, Colab's stop button, ``kill -9``) loses
    at most the current epoch: calling ``fit`` again with the same run
    reloads the last checkpoint first (the model in memory is half-trained),
    and so does ``prepare_run``; either continues exactly where it left off.

    Args:
        run: from ``prepare_run``.
        train_set, val_set: pair datasets (``sig_dataloader_colab`` interface).
        on_epoch_end: called as ``on_epoch_end(run, val_metrics)`` after each epoch's checkpoint is written.

    Raises:
        NonFiniteLossError: a NaN or infinite loss; the message names the last good checkpoint.
    """
    with lock_run_folder(run.ckpt_dir), TrainingCurves(run.ckpt_dir, enabled=run.group.is_main) as curves:
        if run.uncommitted_epoch is not None:
            reload_after_interruption(run)
        if run.stop_reason() is not None:
            log(f"nothing to train: {run.stop_reason()}")
            return run
        data = _epoch_data(run, train_set, val_set, progress)
        if run.epoch == 0 and not run.history.get("epoch"):
            _validate_starting_model(run, data, curves)
        elif run.pending_rng_state is not None:
            restore_rng_state(run.pending_rng_state)
            run.pending_rng_state = None
        config, sampler = run.config, data.train_loader.batch_sampler
        while run.stop_reason() is None:
            epoch, start, lr = run.epoch + 1, time.perf_counter(), run.optimizer.param_groups[0]["lr"]
            rates = learning_rates(run.optimizer)
            run.uncommitted_epoch = epoch
            try:
                sampler.set_epoch(epoch)
                train_loss = train_one_epoch(run.model, data.train_loader, run.optimizer, device=run.device,
                                             scaler=run.scaler, amp=config.autocast, epoch=epoch, progress=progress,
                                             step=data.step, shares=sampler.shares(), group=run.group,
                                             accumulation=config.grad_accumulation,
                                             clip_grad_norm=config.clip_grad_norm)
                metrics = data.validate()
                run.scheduler.step()
                run.epoch = epoch
                improved = record_epoch(run, epoch, train_loss, lr, metrics, time.perf_counter() - start)
                # On disk before the commit: a resumed writer purges what a run killed in between wrote.
                curves.add_epoch(run.history, rates)
                commit_epoch(run, improved)
            except NonFiniteLossError as error:
                raise NonFiniteLossError(
                    f"{error}. Training stopped; the last good checkpoint is "
                    f"{epoch_checkpoint_path(run.ckpt_dir, run.epoch)} (epoch {run.epoch}). Lower the learning rate "
                    f"({option('lr', config.lr)}), or check the data for blank or broken images.") from error
            except KeyboardInterrupt:  # Ctrl-C, the notebook's stop button, SIGTERM (finetune.py): say what is on disk
                point = find_resume_point(run.ckpt_dir) if run.group.is_main else None
                done = f"epoch {point.checkpoint['epoch']} ({point.path.name})" if point else "nothing (no checkpoint)"
                log(f"interrupted during epoch {epoch}; a re-run continues after {done}: {rerun_hint()}")
                raise
            log(f"epoch {epoch:>3}/{config.epochs}  train loss {train_loss:.4f}  val loss {metrics['loss']:.4f}  "
                f"{format_metric('eer', metrics['eer'])}  AUC {metrics['auc']:.4f}  lr {lr:.2e}  "
                f"{run.history['seconds'][-1]:6.1f} s" + ("  * best" if improved else ""))
            if on_epoch_end is not None:
                on_epoch_end(run, metrics)
        log(f"{run.stop_reason()}; best validation {format_metric(config.select_metric, run.best_metric)} "
            f"at epoch {run.best_epoch} ({run.best_checkpoint})")
    return run


# --------------------------------------------------------------------------- the pipeline

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

    Says when the backbone is fresh, and writes the ``test_before`` report
    (the starting model on the test split) unless resuming a run that has it whole (``report_is_whole``).

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
    # A device this machine lacks, or a run folder in use, is reported before any work (under torchrun by rank 0 alone).
    group, _ = join_process_group(config.resolved_device())
    with lock_run_folder(config.ckpt_dir, group):
        datasets = datasets if datasets is not None else build_datasets(config)
        if not (config.pretrained or config.init_from):
            log(f"the backbone is fresh (no {option('pretrained')} weights): its features say little about a writer, "
                + ("so fine-tuning the head has little to work with; the authors' weights give it real structure, "
                   f"or train the whole model ({option('finetune', 'all')}; README: No checkpoint?)"
                   if config.finetune == "head" else f"and {option('finetune', config.finetune)} trains it from "
                   "where it starts (README: No checkpoint?)"))
        given = model is not None
        model = model if given else build_model(config, training_set=datasets["train"])
        if current_group().is_main and not (resume and report_is_whole(config.ckpt_dir, "test_before")):
            # The starting model on the test split: rebuilt when one was given (it may have trained since).
            start = build_model(config, training_set=datasets["train"]) if given else copy.deepcopy(model)
            evaluate_and_report(start, datasets["test"], config.ckpt_dir, "test_before", config, progress)
        run = prepare_run(model, config, resume=resume)
        fit(run, datasets["train"], datasets["val"], progress=progress)
        if not run.group.is_main:  # rank 0 writes the report; the other processes are done
            return TrainingResult(run, {})
        return TrainingResult(run, report_run(run, datasets, progress))


# --------------------------------------------------------------------------- synthetic pre-training

PRETRAINED_FILE = "pretrained.pth"


def pretrain(config: FinetuneConfig, *, writers: int = 200, part_writers: int = 50, samples: int = 12,
             canvas: int = 256, resume: bool = True, progress: bool = True) -> Path:
    """Train the whole model on a synthetic corpus; returns the weights file for ``pretrained`` (``--pretrained``).

    For users with no checkpoint: the corpus (``writers`` procedural writers, ``samples`` genuine signatures
    and as many skilled forgeries each, scans of at most ``canvas`` pixels) is written in parts of
    ``part_writers`` writers, ``ckpt_dir/corpus/part-NNN`` (CEDAR layout, each made once and kept: a kill
    loses at most the part being written). 90 % of each part's writers train; the first part's other
    writers validate. The run, ``ckpt_dir/run``, trains every parameter (``finetune all``, per-pair path,
    augmented) and resumes like any run; its best epoch is exported as ``ckpt_dir/pretrained.pth`` (a whole
    state dict with its checksum, which ``build_model`` loads with ``strict=True``). The other settings
    (``image_size``, ``epochs``, ``lr``, ``lr_blocks``, ``max_train_pairs_per_epoch``, ...) come from ``config``.
    """
    from synthetic_signatures import ensure_synthetic_dataset  # here: importing the helpers leaves the generator out

    out = Path(config.ckpt_dir)
    parts = []
    for number, first in enumerate(range(0, writers, part_writers)):
        root = out / "corpus" / f"part-{number:03d}"
        ensure_synthetic_dataset(root, layout="cedar", n_writers=min(part_writers, writers - first), n_genuine=samples,
                                 n_forged=samples, seed=config.seed * 100_003 + number, image_size=canvas,
                                 progress=progress)
        ensure_pair_files("cedar", root, random_state=config.seed, train_ratio=0.9)
        parts.append(root)
    run_config = dataclasses.replace(config, dataset="cedar", data_root=str(parts[0]), ckpt_dir=str(out / "run"),
                                     finetune="all", unfreeze_blocks=0, fast_head_only=False)
    train_set = PairDatasets([SignaturePairDataset(None, root, train=True, image_size=config.image_size,
                                                   dataset="cedar", cache_dir=config.cache_dir or None)
                              for root in parts])
    val_set = SignaturePairDataset(None, parts[0], train=False, image_size=config.image_size, dataset="cedar",
                                   cache_dir=config.cache_dir or None)
    log(f"synthetic pre-training: {writers} writers in {len(parts)} parts, {len(train_set):,} training pairs, "
        f"{len(val_set):,} validation pairs")
    run = fit(prepare_run(build_model(run_config, training_set=train_set), run_config, resume=resume), train_set,
              val_set, progress=progress)
    weights = export_state_dict(run.best_checkpoint, out / PRETRAINED_FILE)
    log(f"pre-trained weights: {weights} (best validation {format_metric(config.select_metric, run.best_metric)} at "
        f"epoch {run.best_epoch}); fine-tune from them with {option('pretrained', str(weights))}")
    if run.best_epoch == 0:
        warnings.warn(f"pre-training never did better than its starting model on its validation writers: {weights} "
                      f"holds the starting model; try a lower {option('lr', config.lr)} or more "
                      f"{option('writers', writers)}", stacklevel=2)
    return weights
