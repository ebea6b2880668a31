"""The double-margin contrastive loss and the warm-up schedule."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR

from models.loss import ContrastiveLoss
from module.run.schedule import GradualWarmupScheduler


def test_contrastive_loss_formula() -> None:
    distance = torch.tensor([[0.1], [0.5], [0.5], [1.2], [0.95]])
    label = torch.tensor([[1.0], [1.0], [0.0], [0.0], [0.0]])
    expected = (0 + (0.5 - 0.3) ** 2 + (0.9 - 0.5) ** 2 + 0 + 0) / 5
    assert float(ContrastiveLoss()(distance, label)) == pytest.approx(expected)
    assert float(ContrastiveLoss(margin=2.0, margin_1=0.0)(distance[:1], label[:1])) == pytest.approx(0.01)


def make(lr: float = 1e-3, warmup: int = 3, multiplier: float = 8.0, epochs: int = 10):
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([parameter], lr=lr)
    cosine = CosineAnnealingLR(optimizer, T_max=epochs - warmup)
    return optimizer, GradualWarmupScheduler(optimizer, multiplier=multiplier, total_epoch=warmup, after_scheduler=cosine)


def run(optimizer, scheduler, epochs: int) -> list[float]:
    rates = []
    for _ in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_warmup_then_cosine_sequence() -> None:
    optimizer, scheduler = make()
    rates = run(optimizer, scheduler, 10)
    peak = 8e-3
    warmup = [1e-3 * (1 + 7 * e / 3) for e in range(4)]
    cosine = [peak * (1 + math.cos(math.pi * k / 7)) / 2 for k in range(1, 7)]
    assert rates == pytest.approx(warmup + cosine, rel=1e-9)


def test_multiplier_one_warms_up_from_zero() -> None:
    optimizer, scheduler = make(multiplier=1.0, warmup=4)
    assert run(optimizer, scheduler, 5) == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])
    with pytest.raises(ValueError, match="multiplier"):
        make(multiplier=0.5)


@pytest.mark.parametrize("stop_after", [2, 3, 4, 7])
def test_state_resumes_to_the_same_rates_and_loads_weights_only(stop_after: int) -> None:
    optimizer, scheduler = make()
    expected = run(optimizer, scheduler, 10)

    optimizer, scheduler = make()
    first = run(optimizer, scheduler, stop_after)
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    optimizer, scheduler = make()
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    assert first + run(optimizer, scheduler, 10 - stop_after) == pytest.approx(expected, rel=1e-12)


def test_without_after_scheduler_the_rate_stays_at_the_peak() -> None:
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    scheduler = GradualWarmupScheduler(optimizer, multiplier=2.0, total_epoch=2)
    assert run(optimizer, scheduler, 5) == pytest.approx([0.1, 0.15, 0.2, 0.2, 0.2])
    state = scheduler.state_dict()
    assert state["after_scheduler"] is None
