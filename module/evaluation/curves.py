"""A run's training curves for TensorBoard: one point an epoch for each scalar, in the run folder's ``tensorboard/``.

``training_utils.fit`` writes each epoch (epoch 0, the untrained model's validation, included) through a
``TrainingCurves``; ``tensorboard --logdir RUN/tensorboard`` (or ``%tensorboard`` in a notebook) shows them::

    loss/train, loss/validation         the epoch's mean loss per pair (no training loss at epoch 0)
    validation/eer, validation/auc      EER as a fraction, as in history.json
    learning_rate/<group name>          each optimizer parameter group's rate during the epoch

A resumed run continues the same curves, with neither duplicates nor gaps: each epoch's points are flushed
to disk before its checkpoint is committed, and a resumed writer opens with ``purge_step`` set to the first
epoch it writes, so TensorBoard discards whatever a killed run wrote after its last commit.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

__all__ = ["TENSORBOARD_DIR", "TrainingCurves", "learning_rates"]

TENSORBOARD_DIR = "tensorboard"
# history.json's keys and the tags their values are drawn under.
_TAGS = {"train_loss": "loss/train", "val_loss": "loss/validation", "val_eer": "validation/eer",
         "val_auc": "validation/auc"}


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Each parameter group's learning rate now, by its name (``group_<i>`` for a group without one)."""
    return {str(group.get("name", f"group_{index}")): float(group["lr"])
            for index, group in enumerate(optimizer.param_groups)}


class TrainingCurves:
    """Writes a run's epochs as TensorBoard scalars into ``run_folder/tensorboard``; a context manager.

    The event file is opened by the first ``add_epoch`` (so a run with nothing left to train leaves none),
    with ``purge_step`` at that epoch; ``close`` (the end of the ``with``, an exception included) closes it.

    Args:
        run_folder: the run's ``ckpt_dir``.
        enabled: ``False`` writes nothing (the processes of a torchrun job other than rank 0).
    """

    def __init__(self, run_folder: str | Path, *, enabled: bool = True) -> None:
        self.log_dir = Path(run_folder) / TENSORBOARD_DIR
        self.enabled = enabled
        self._writer: Any = None  # a torch.utils.tensorboard.SummaryWriter once the first epoch comes

    def add_epoch(self, history: Mapping[str, Sequence[Any]], rates: Mapping[str, float] | None = None) -> None:
        """Write the newest entry of ``history`` (``TrainingRun.history``) at step = its epoch, and flush.

        Args:
            rates: the learning rate of each parameter group during the epoch (``learning_rates``, taken
                before the schedule stepped); ``None`` for epoch 0, when nothing trained.
        """
        if not self.enabled:
            return
        epoch = int(history["epoch"][-1])
        if self._writer is None:
            # Imported here: only a training run needs TensorBoard, and it takes a while to import.
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir), purge_step=epoch)
        for key, tag in _TAGS.items():
            value = history[key][-1]
            if value is not None:
                self._writer.add_scalar(tag, float(value), global_step=epoch)
        for name, rate in (rates or {}).items():
            self._writer.add_scalar(f"learning_rate/{name}", rate, global_step=epoch)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TrainingCurves:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
