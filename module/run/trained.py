"""Building what a run needs from its settings, and rebuilding a trained run from its folder.

``build_model`` and ``build_datasets`` turn a ``FinetuneConfig`` into the
model and the pair datasets; ``load_trained_model`` and ``run_threshold``
read a finished run folder back (what ``evaluate``, ``verify`` and the
``Verifier`` use).
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model_v3 import ViT_for_OSV_DSNet, init_from, load_pretrained
from models.data_init import DataInit, data_dependent_init
from models.errors import InputError
from models.weights import CheckpointError, CheckpointMismatchError, recorded_checksum
from module.core.wording import option, rerun_hint, step
from module.data.pair_dataset import SignaturePairDataset
from module.data.pair_files import PAIR_FILES
from module.data.prepare import pair_file_fix
from module.run.checkpoint import BEST_CHECKPOINT, frozen_fingerprint, load_trained_state, read_checkpoint
from module.run.config import FinetuneConfig
from module.run.folder import BEST_WEIGHTS, RunFolderError
from module.run.rng import seed_everything
from module.run.state import log

__all__ = ["DATA_INIT_PAIRS", "EVALUATED_SPLITS", "build_datasets", "build_model", "init_from_training_pairs",
           "load_trained_model", "read_run_checkpoint", "rebuild_trained_model", "run_threshold"]

# Training pairs a fresh backbone is initialised from (models/data_init.py): at most twice as many scans.
DATA_INIT_PAIRS = 128
# The splits a run is reported on; the first one that has metrics gives a run's threshold.
EVALUATED_SPLITS = ("val", "test")


def build_model(config: FinetuneConfig, pretrained: str | Path | None = None,
                training_set: Any = None) -> ViT_for_OSV_DSNet:
    """``ViT_for_OSV_DSNet(config)`` seeded with ``config.seed``, with pretrained weights, on ``config``'s device.

    ``pretrained``: a weights file (``load_pretrained``, ``strict=True``);
    ``None`` takes ``config.pretrained``; empty means a fresh backbone, or
    ``config.init_from``'s matching tensors (``init_from``; what was loaded,
    adapted, skipped and left fresh is logged). ``training_set``: the
    training pairs; a fresh backbone (``config.inits_from_data``) then takes its
    BatchNorm statistics and global-distance scale from them
    (``init_from_training_pairs``). Without it the model is as the seed made it.
    """
    seed_everything(config.seed)
    model = ViT_for_OSV_DSNet(config)
    source = pretrained if pretrained is not None else config.pretrained
    if source:
        load_pretrained(model, source, strict=True)
    elif config.init_from:
        log(init_from(model, config.init_from).summary(config.init_from))
    model = model.to(config.resolved_device())
    if training_set is not None and config.inits_from_data and not source:
        log(init_from_training_pairs(model, training_set, config.seed).summary())
    return model


def init_from_training_pairs(model: ViT_for_OSV_DSNet, dataset: Any, seed: int,
                             pairs: int = DATA_INIT_PAIRS) -> DataInit:
    """``data_dependent_init`` on ``pairs`` training pairs of ``dataset`` drawn with ``seed`` and their distinct
    images (not augmented): the same sample on every machine and every resume."""
    rows = np.random.default_rng(seed).choice(len(dataset), size=min(pairs, len(dataset)), replace=False)
    chosen = [dataset.pairs[int(row)] for row in np.sort(rows)]
    paths = sorted({path for ref, query, _ in chosen for path in (ref, query)})
    index = {path: row for row, path in enumerate(paths)}
    device = next(model.parameters()).device
    images = torch.stack([dataset.load_image(path) for path in paths]).to(device)
    ref_rows = torch.tensor([index[ref] for ref, _, _ in chosen], device=device)
    query_rows = torch.tensor([index[query] for _, query, _ in chosen], device=device)
    return data_dependent_init(model, images, ref_rows, query_rows)


def build_datasets(config: FinetuneConfig, splits: Sequence[str] = ("train", "val", "test")) -> dict[str, Any]:
    """The pair datasets of ``config.dataset`` under ``config.data_root``, one per split.

    Split ``s`` reads ``gray_{s}.txt`` (``module.pair_files.PAIR_FILES``); only
    ``train`` augments (which the fast path ignores). A missing pair file or
    image raises the dataset's error, which names the command that makes it.
    """
    unknown = [split for split in splits if split not in PAIR_FILES]
    if unknown:
        raise InputError(f"unknown split(s) {unknown}: choose from {', '.join(PAIR_FILES)}")
    missing = [split for split in splits if not (Path(config.data_root) / PAIR_FILES[split]).is_file()]
    if missing and Path(config.data_root).is_dir():
        raise FileNotFoundError(f"{', '.join(PAIR_FILES[split] for split in missing)} not found in {config.data_root}. "
                                f"Fix: {pair_file_fix(config.dataset, config.data_root, missing)}")
    return {
        split: SignaturePairDataset(None, config.data_root, train=split == "train", image_size=config.image_size,
                                    pair_file=PAIR_FILES[split], augment=split == "train",
                                    cache_dir=config.cache_dir or None, dataset=config.dataset)
        for split in splits
    }


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
            # Named without its folder: a run folder's report must not depend on where the folder is.
            return float(json.loads(metrics_file.read_text())["threshold"]), f"EER threshold of {metrics_file.name}"
    evaluate = step(f"python finetune.py evaluate --run {folder}", "run PART 7 to its end",
                    "evaluate_and_report(model, data, run_folder, 'val', config)")
    raise FileNotFoundError(f"no val_metrics.json or test_metrics.json in {folder}. Fix: evaluate the run first "
                            f"({evaluate}), or give {option('threshold')}.")



def read_run_checkpoint(path: str | Path) -> dict[str, Any]:
    """``read_checkpoint`` for evaluation; a damaged ``best.pt`` is refused with how to make it again."""
    path = Path(path)
    try:
        return read_checkpoint(path)
    except CheckpointError as error:
        if path.name != BEST_CHECKPOINT or recorded_checksum(path) is None or "damaged" not in str(error):
            raise
        raise CheckpointError(f"{error}. Fix: {rerun_hint()} with the run's settings (it makes best.pt again from the "
                              "best epoch's checkpoint, and trains nothing when the run is finished).") from error


def rebuild_trained_model(checkpoint: dict[str, Any], source: str | Path,
                          base_weights: Sequence[tuple[str, Callable[[], nn.Module]]]) -> nn.Module:
    """A model holding a checkpoint's trained tensors on top of the frozen weights it was trained on.

    A checkpoint holds only what trains; the rest comes from the first of
    ``base_weights`` (``(description, build)`` pairs, tried in order) whose
    frozen weights have the checkpoint's fingerprint.

    Raises:
        RunFolderError: none has them; the message says what was tried and why each failed.
    """
    trained = list(checkpoint["trained_state_dict"])
    tried = []
    for description, build in base_weights:
        try:
            model = build()
        except (OSError, CheckpointError, CheckpointMismatchError) as error:
            tried.append(f"{description}: {' '.join(str(error).split())[:200]}")
            continue
        fingerprint = frozen_fingerprint(model, trained)
        if fingerprint == checkpoint["frozen_fingerprint"]:
            return load_trained_state(model, checkpoint, str(source), fingerprint)
        tried.append(f"{description}: other weights")
    raise RunFolderError(
        f"cannot rebuild the model of {source}: it holds only the {len(trained)} trained tensors, and the frozen "
        f"weights they apply to were not found ({'; '.join(tried)}). Fix: keep {BEST_WEIGHTS} in the run folder "
        "(it holds the whole model), or put the run's pretrained weights back where they were."
    )
