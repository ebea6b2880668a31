"""``FinetuneConfig``: every setting of a fine-tuning run in one dataclass.

The notebook's parameters (``FinetuneConfig.from_parameters``) and the
command line's options (``finetune.py`` makes one ``--field-name`` option a
field, from its ``metadata["help"]``) both end here; every checkpoint holds
it as a plain dict, so a run can be rebuilt from its checkpoint alone.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from models.errors import InputError
from module.core.wording import option
from module.data.datasets import DATASETS

if TYPE_CHECKING:  # imported where needed: the command line builds its options from this class before loading torch
    import torch

__all__ = ["BACKBONE_BLOCKS", "ConfigError", "FinetuneConfig", "trained_blocks"]

BACKBONE_BLOCKS = 18  # DSNet's num_blocks (stages of 3, 3, 9 and 3); not imported: this module loads without torch


def trained_blocks(finetune: str) -> int | None:
    """The backbone blocks a ``finetune`` setting trains: 0 (``head``), N (``last:N``), all 18 (``all``);
    ``None`` when the setting is not one of those."""
    if finetune == "head":
        return 0
    if finetune == "all":
        return BACKBONE_BLOCKS
    count = finetune.removeprefix("last:")
    if finetune.startswith("last:") and count.isdigit() and 1 <= int(count) <= BACKBONE_BLOCKS:
        return int(count)
    return None


class ConfigError(InputError):
    """A setting of a run is not valid (the message names each, in the words of the interface in use)."""


def _setting(default: Any, help: str, choices: Sequence[str] | None = None) -> Any:
    """A ``FinetuneConfig`` field whose help text (and choices) the command line shows."""
    return field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None})


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run, saved as plain data inside each checkpoint.

    Passed as ``opt`` to ``ViT_for_OSV_DSNet``, which reads the model options
    (``emd``, ``dis_type``, ``mar_type``, ``gol_dis``, ``temp``). Each field's
    help text is its ``metadata["help"]``; ``finetune.py`` turns every field
    into a ``--field-name`` option from it.

    Learning rate (per epoch): ``lr`` is the peak. The warm-up climbs
    linearly from ``lr / warmup_multiplier`` to ``lr`` over
    ``warmup_epochs`` epochs, then a cosine runs over the remaining epochs (it
    would reach 0 one epoch after the last). With ``warmup_multiplier == 1``
    the warm-up starts from 0, as in the authors' scheduler, so the first
    epoch would not train. ``lr_blocks`` follows the same schedule.
    """

    # data (read by build_datasets and build_model)
    dataset: str = _setting("cedar", "dataset layout", tuple(DATASETS))
    data_root: str = _setting("", "folder holding the scans and the gray_{train,val,test}.txt pair files")
    pretrained: str = _setting("", "DetailSemNet weights for build_model: a .pth file (empty: a fresh backbone)")
    init_from: str = _setting("", "start from any checkpoint's tensors whose names and shapes match (an ImageNet "
                                  "backbone, say; a 3-channel first convolution is adapted to 1), the rest fresh; "
                                  "what was loaded, adapted, skipped and left fresh is printed")
    data_init: bool = _setting(True, "a fresh backbone (no pretrained, no init_from) takes its BatchNorm statistics "
                                     "and its global distance's scale from training scans before training "
                                     "(models/data_init.py)")
    ckpt_dir: str = _setting("checkpoints", "run folder: epoch_NNNN.pt, best.pt, metrics, plots (on Google Drive in Colab)")
    image_size: int = _setting(224, "model input side in pixels, a multiple of 32 (224 for the authors' weights)")
    num_workers: int = _setting(0, "image-loading worker processes (2 helps on a GPU machine)")
    cache_dir: str = _setting("", "folder of preprocessed images, reused while a scan is unchanged (empty: none); "
                                  "saves the preprocessing on the per-pair path and when features are embedded")
    # what trains
    fast_head_only: bool = _setting(True, "embed each image once through the backbone's frozen part and train on "
                                          "the stored features, without augmentation (finetune head or last:N); "
                                          "off: every pair through the whole backbone each epoch, augmented")
    finetune: str = _setting("head", "what trains: head (head_str alone), last:N (also the backbone's last N of its "
                                     "18 blocks and its final norm), all (every parameter, patch embeddings and "
                                     "BatchNorms included; on the per-pair path)")
    unfreeze_blocks: int = _setting(0, "the same as finetune last:N, for notebooks written before finetune (0: as "
                                       "finetune says)")
    # optimisation (AdamW; learning rates per epoch, see the class docstring)
    epochs: int = _setting(10, "epochs to train")
    batch_size: int = _setting(32, "training pairs per optimizer step")
    max_train_pairs_per_epoch: int = _setting(0, "train each epoch on a fresh sample of at most this many training "
                                                 "pairs, with the genuine/forgery ratio of all of them (seeded, the "
                                                 "same after a resume); 0: every pair, every epoch")
    lr: float = _setting(4e-4, "peak learning rate of head_str (the warm-up climbs to it)")
    lr_blocks: float = _setting(4e-5, "peak learning rate of the trained backbone parameters (finetune last:N or all)")
    weight_decay: float = _setting(1e-4, "AdamW weight decay (biases and 1-D parameters get none)")
    warmup_epochs: int = _setting(1, "epochs of linear warm-up before the cosine")
    warmup_multiplier: float = _setting(4.0, "the warm-up starts at lr / warmup_multiplier (1: from 0)")
    grad_accumulation: int = _setting(1, "batches whose gradients add up before each optimizer step: the effective "
                                         "batch is batch_size x grad_accumulation pairs (a large batch on a small GPU)")
    clip_grad_norm: float = _setting(0.0, "clip the gradient's total norm to this before each optimizer step (0: no "
                                          "clipping)")
    amp: bool = _setting(False, "mixed precision (autocast) for the backbone on CUDA; the EMD runs outside it")
    amp_dtype: str = _setting("float16", "the autocast dtype: float16 (with a gradient scaler) or bfloat16 (no scaler "
                                         "needed; Ampere and newer GPUs)", ("float16", "bfloat16"))
    # model selection and early stopping, on the validation set
    select_metric: str = _setting("eer", "validation figure that picks the best epoch (lower is better)", ("eer", "loss"))
    patience: int = _setting(5, "stop after this many epochs without a better validation figure")
    min_improvement: float = _setting(0.01, "relative: a new best must be below best * (1 - min_improvement)")
    # feature store (fast path and evaluation)
    feature_dtype: str = _setting("auto", "dtype of stored backbone features: auto (float32, or float16 when float32 "
                                          "features would take more than two fifths of the RAM available), float32, "
                                          "or float16 (half the memory, distances within ~1e-2)", ("auto", "float32", "float16"))
    feature_dir: str = _setting("", "folder of the feature store, which keeps each image's backbone features across "
                                    "re-runs, resumes and disconnects (empty: features/ in the run folder)")
    eval_batch_size: int = _setting(64, "images per backbone pass and pairs per evaluation batch")
    # checkpoints and reproducibility
    keep_last: int = _setting(2, "newest epoch checkpoints kept, besides the best epoch's (best.pt is its copy)")
    seed: int = _setting(42, "seed of the weights' initialisation, the pair order and the augmentation")
    device: str = _setting("auto", "auto (CUDA when available), cpu or cuda[:n]")
    # model options, read by ViT_for_OSV_DSNet (spec section 1)
    emd: bool = _setting(True, "add the structural (EMD) distance; needed for head_str")
    dis_type: str = _setting("cos", "token cost of the EMD", ("cos", "l2"))
    mar_type: str = _setting("uniform", "EMD marginals", ("uniform",))
    gol_dis: str = _setting("l2", "global distance between mean tokens", ("l2", "cos"))
    temp: float = _setting(1.0, "weight of the structural distance")

    def __post_init__(self) -> None:
        if isinstance(self.dataset, str):  # "CEDAR", and the seed's spelling "gdps", name the same layouts
            self.dataset = next((layout.name for layout in DATASETS.values()
                                 if self.dataset.lower() in (layout.name, *layout.aliases)), self.dataset)
        problems = []
        for setting in dataclasses.fields(self):
            choices = setting.metadata.get("choices")
            if choices and getattr(self, setting.name) not in choices:
                problems.append(f"{option(setting.name)} must be one of {', '.join(choices)}; "
                                f"got {getattr(self, setting.name)!r}")

        def check(ok: bool, name: str, rule: str) -> None:
            if not ok:
                problems.append(f"{option(name)} {rule}, got {getattr(self, name)!r}")

        check(self.epochs >= 1, "epochs", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        check(0 <= self.warmup_epochs < self.epochs, "warmup_epochs",
              f"must be in [0, {option('epochs')}={self.epochs}) (lower it, or train more epochs)")
        check(self.warmup_multiplier >= 1, "warmup_multiplier", "must be >= 1")
        for name in ("lr", "lr_blocks"):
            check(math.isfinite(getattr(self, name)) and getattr(self, name) > 0, name, "must be a finite number > 0")
        check(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "must be a finite number >= 0")
        check(math.isfinite(self.temp), "temp", "must be a finite number")
        check(self.patience >= 1, "patience", "must be >= 1")
        check(0 <= self.min_improvement < 1, "min_improvement", "is relative and must be in [0, 1)")
        check(self.max_train_pairs_per_epoch >= 0, "max_train_pairs_per_epoch", "must be >= 0 (0: every pair)")
        check(self.keep_last >= 1, "keep_last", "must be >= 1")
        check(self.num_workers >= 0, "num_workers", "must be >= 0")
        check(self.grad_accumulation >= 1, "grad_accumulation", "must be >= 1")
        check(math.isfinite(self.clip_grad_norm) and self.clip_grad_norm >= 0, "clip_grad_norm",
              "must be a finite number >= 0 (0: no clipping)")
        problems.extend(self._settle_finetune())
        if self.pretrained and self.init_from:
            problems.append(f"{option('pretrained')} loads a whole DetailSemNet and {option('init_from')} starts from "
                            f"part of another: give one of them")
        if self.fast_head_only and self.finetune == "all":
            problems.append(
                f"{option('fast_head_only')} stores the features of the backbone's frozen part, and "
                f"{option('finetune', 'all')} freezes nothing: set {option('fast_head_only', False)} to train the "
                f"whole model on the per-pair path, or {option('finetune', 'last:3')} to train stage 4 on stored features"
            )
        check(self.image_size >= 32 and self.image_size % 32 == 0, "image_size", "must be a positive multiple of 32")
        check(self.device in ("auto", "cpu") or self.device.startswith("cuda"), "device", "must be auto, cpu or cuda[:n]")
        if problems:
            raise ConfigError("invalid settings: " + "; ".join(problems))

    def _settle_finetune(self) -> list[str]:
        """Make ``finetune`` and its older spelling ``unfreeze_blocks`` say the same; return the problems found."""
        if self.unfreeze_blocks < 0:
            return [f"{option('unfreeze_blocks')} must be >= 0, got {self.unfreeze_blocks!r}"]
        if self.unfreeze_blocks and self.finetune == "head":
            self.finetune = f"last:{self.unfreeze_blocks}"
        blocks = trained_blocks(self.finetune)
        if blocks is None:
            return [f"{option('finetune')} must be head, last:N (N from 1 to {BACKBONE_BLOCKS}) or all; "
                    f"got {self.finetune!r}"]
        if self.unfreeze_blocks and self.unfreeze_blocks != blocks:
            return [f"{option('unfreeze_blocks')}={self.unfreeze_blocks} and {option('finetune')}={self.finetune} "
                    f"say different things: set only {option('finetune')}"]
        if self.finetune.startswith("last:"):
            self.finetune = f"last:{blocks}"  # "last:03" is "last:3"
        self.unfreeze_blocks = blocks if self.finetune.startswith("last:") else 0
        return []

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (str, int, float, bool values)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FinetuneConfig:
        """Rebuild from ``to_dict()`` output; an unknown key is an error (a typo would be silently ignored).

        A setting the values lack takes its default, except ``data_init``: values without it were saved before
        the initialisation existed, by a run that started from the seed's model (``False``).
        """
        known = {setting.name for setting in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown FinetuneConfig settings: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**{"data_init": False, **values})

    @classmethod
    def from_parameters(cls, namespace: Mapping[str, Any], **overrides: Any) -> FinetuneConfig:
        """A config from notebook parameters: each UPPER_CASE name whose lower case is a setting
        (``EPOCHS`` -> ``epochs``, ``BATCH_SIZE`` -> ``batch_size``); ``overrides`` win; other names are ignored.

        Typical: ``FinetuneConfig.from_parameters(globals(), data_root=..., ckpt_dir=...)``.
        """
        known = {setting.name for setting in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown FinetuneConfig settings: {', '.join(unknown)}")
        values = {name.lower(): value for name, value in namespace.items()
                  if isinstance(name, str) and name.isupper() and name.lower() in known}
        values.update(overrides)
        return cls(**values)

    @classmethod
    def setting_types(cls) -> dict[str, type]:
        """``{field name: its type}`` (``str``, ``int``, ``float`` or ``bool``), for parsers."""
        hints = typing.get_type_hints(cls)
        return {setting.name: hints[setting.name] for setting in dataclasses.fields(cls)}

    def feature_store_dir(self) -> str:
        """The feature store's folder: ``feature_dir``, or ``features/`` in the run folder."""
        return self.feature_dir or os.path.join(self.ckpt_dir, "features")

    def resolved_device(self) -> torch.device:
        """``device`` with ``auto`` resolved to CUDA when available, else CPU; under torchrun ``auto`` and
        ``cuda`` are this process's GPU, ``cuda:LOCAL_RANK``.

        Raises:
            ConfigError: CUDA was asked for and this machine has none.
        """
        import torch

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"{option('device', self.device)} was asked for, but this machine has no CUDA GPU; "
                              f"use {option('device', 'auto')} or {option('device', 'cpu')}")
        if self.device == "auto" and not torch.cuda.is_available():
            return torch.device("cpu")
        if self.device in ("auto", "cuda"):
            under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if under_torchrun else None)
        return torch.device(self.device)

    @property
    def inits_from_data(self) -> bool:
        """Whether ``build_model`` initialises the model from training scans: ``data_init`` and a fresh backbone."""
        return self.data_init and not (self.pretrained or self.init_from)

    @property
    def autocast(self) -> bool | str:
        """What ``amp`` arguments take: ``False``, or the autocast dtype's name (CUDA only; see ``module.core.precision``)."""
        return self.amp_dtype if self.amp else False
