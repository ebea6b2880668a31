"""Double-margin contrastive loss of DetailSemNet."""
from __future__ import annotations

import torch
from torch import nn

from models.errors import InputError

__all__ = ["ContrastiveLoss", "NonFiniteLossError"]


class NonFiniteLossError(InputError, FloatingPointError):
    """The loss became NaN or infinite; no weights were updated with it (a learning rate too high, or broken scans)."""


class ContrastiveLoss(nn.Module):
    """``mean(y * relu(d - margin_1)^2 + (1 - y) * relu(margin - d)^2)``.

    Genuine pairs (``y = 1``) are pulled below ``margin_1``; forged pairs
    (``y = 0``) are pushed above ``margin``. Distances and margins are in the
    model's distance units (global distance + temp * structural distance).
    """

    def __init__(self, margin: float = 0.9, margin_1: float = 0.3) -> None:
        super().__init__()
        self.margin = margin
        self.margin_1 = margin_1

    def forward(self, distance: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """``distance [B, 1]``, ``label [B, 1]`` (1 genuine, 0 forged) -> scalar loss."""
        label = label.to(distance.dtype).view_as(distance)
        genuine = label * torch.clamp(distance - self.margin_1, min=0) ** 2
        forged = (1 - label) * torch.clamp(self.margin - distance, min=0) ** 2
        return (genuine + forged).mean()

    def extra_repr(self) -> str:
        return f"margin={self.margin}, margin_1={self.margin_1}"
