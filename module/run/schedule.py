"""Linear learning-rate warm-up followed by another schedule (epoch-level)."""
from __future__ import annotations

from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["GradualWarmupScheduler"]


class GradualWarmupScheduler(LRScheduler):
    """Warm up linearly from ``base_lr`` to ``base_lr * multiplier`` over ``total_epoch`` epochs.

    After the warm-up, ``after_scheduler`` (for example ``CosineAnnealingLR``
    built on the same optimizer) takes over, starting from
    ``base_lr * multiplier``. With ``multiplier == 1`` the warm-up starts from
    0 instead, as in the original implementation. Call ``step()`` once per epoch.

    ``state_dict()`` holds plain data only (the after-scheduler's own state is
    nested as a dict), so a checkpoint containing it loads with
    ``torch.load(weights_only=True)`` and resumes to the same learning rates.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        multiplier: float,
        total_epoch: int,
        after_scheduler: LRScheduler | None = None,
        last_epoch: int = -1,
    ) -> None:
        if multiplier < 1.0:
            raise ValueError(f"multiplier must be >= 1, got {multiplier}")
        if total_epoch < 0:
            raise ValueError(f"total_epoch must be >= 0, got {total_epoch}")
        self.multiplier = multiplier
        self.total_epoch = total_epoch
        self.after_scheduler = after_scheduler
        self.finished = False
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        if self.finished:
            return self.after_scheduler.get_last_lr()
        progress = min(self.last_epoch, self.total_epoch) / self.total_epoch if self.total_epoch else 1.0
        if self.multiplier == 1.0:
            return [base_lr * progress for base_lr in self.base_lrs]
        return [base_lr * (1.0 + (self.multiplier - 1.0) * progress) for base_lr in self.base_lrs]

    def step(self, epoch: None = None) -> None:
        if self.after_scheduler is None or self.last_epoch < self.total_epoch:
            super().step()
            return
        if not self.finished:
            self.after_scheduler.base_lrs = [base_lr * self.multiplier for base_lr in self.base_lrs]
            self.finished = True
        self.after_scheduler.step()
        self.last_epoch += 1
        self._last_lr = self.after_scheduler.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        state = {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "after_scheduler")}
        state["after_scheduler"] = self.after_scheduler.state_dict() if self.after_scheduler is not None else None
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        after_state = state.pop("after_scheduler", None)
        self.__dict__.update(state)
        if (after_state is None) != (self.after_scheduler is None):
            raise ValueError("scheduler state and this scheduler disagree on whether there is an after_scheduler")
        if after_state is not None:
            self.after_scheduler.load_state_dict(after_state)
