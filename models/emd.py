"""Entropic earth mover's distance between token sets, by log-domain Sinkhorn.

Every pair in a batch is computed as if it were alone: each image's token set
is given as a fixed-size token grid plus a validity mask, invalid tokens carry
no mass, and each pair stops iterating on its own error. The iterations run in float64 because at
the evaluation epsilon (5e-8) every exponent is ~1e7 and float32 rounding
changes the distance by up to 5x (see the spec, section 3).
"""
from __future__ import annotations

import torch

__all__ = ["pairwise_cost", "sinkhorn_emd", "sinkhorn_plan"]

# Finite stand-in for log(0) on padded entries: -inf would make logsumexp's
# gradient NaN on an all-padded row even where `torch.where` discards it.
_LOG_ZERO = -1e300


def pairwise_cost(query: torch.Tensor, reference: torch.Tensor, dis_type: str) -> torch.Tensor:
    """Token cost ``[B, S2, S1]`` between ``query [B, S2, D]`` and ``reference [B, S1, D]``.

    ``cos``: ``1 - cosine similarity`` (eps 1e-8); ``l2``: Euclidean distance.
    """
    if dis_type == "cos":
        query = query / query.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        reference = reference / reference.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return 1 - query @ reference.transpose(1, 2)
    if dis_type == "l2":
        return (query[:, :, None, :] - reference[:, None, :, :]).norm(dim=-1)
    raise ValueError(f"dis_type must be 'cos' or 'l2', got {dis_type!r}")


def sinkhorn_plan(
    cost: torch.Tensor,
    row_valid: torch.Tensor,
    col_valid: torch.Tensor,
    eps: float,
    max_iter: int = 100,
    stop_threshold: float = 1e-2,
    check_every: int = 1,
) -> torch.Tensor:
    """Entropic transport plan with uniform marginals over the valid entries, per pair.

    Args:
        cost: ``[B, S2, S1]`` cost between query rows and reference columns.
        row_valid: ``[B, S2]`` bool, which rows are real tokens.
        col_valid: ``[B, S1]`` bool, which columns are real tokens.
        eps: entropic regularisation (5e-2 in training, 5e-8 in evaluation).
        max_iter: iteration cap.
        stop_threshold: a pair stops once ``sum |u - u_old| <`` this.
        check_every: iterations between the checks whether every pair has
            stopped (each is a device-to-host sync on a GPU). The plan is the
            same for any value: a stopped pair's potentials stay as they are.

    Returns:
        ``[B, S2, S1]`` float64 plan ``P``: the mass moved from each query
        token to each reference token, exactly 0 on invalid entries. The last
        half-step balances the columns (each valid one sums to
        ``1 / S1_valid``); the rows only as far as the iterations got (at the
        evaluation epsilon they stop early, and a row may hold 0.5 to 1.5
        times its ``1 / S2_valid``). Gradients flow through every iteration.
    """
    with torch.autocast(device_type=cost.device.type, enabled=False):
        return _plan(cost.double(), row_valid, col_valid, eps, max_iter, stop_threshold, check_every)


def _plan(cost: torch.Tensor, row_valid: torch.Tensor, col_valid: torch.Tensor, eps: float, max_iter: int,
          stop_threshold: float, check_every: int) -> torch.Tensor:
    """``sinkhorn_plan`` of a float64 ``cost``, outside autocast."""
    valid = row_valid[:, :, None] & col_valid[:, None, :]
    n_rows = row_valid.sum(1, keepdim=True).clamp_min(1).double()
    n_cols = col_valid.sum(1, keepdim=True).clamp_min(1).double()
    log_mu = torch.log(row_valid.double() / n_rows + 1e-8)
    log_nu = torch.log(col_valid.double() / n_cols + 1e-8)
    nonempty = row_valid.any(1) & col_valid.any(1)

    # Potentials in units of eps (a = u / eps, b = v / eps): the spec's update
    # u <- eps * (log mu - logsumexp((-C + u + v) / eps)) + u simplifies to
    # a <- log mu - logsumexp(-C / eps + b), which needs one pass per half-step.
    scaled_cost = (-cost / eps).masked_fill(~valid, _LOG_ZERO)
    a = torch.zeros_like(log_mu)
    b = torch.zeros_like(log_nu)
    active = nonempty.clone()
    for iteration in range(max_iter):
        if iteration % check_every == 0 and not active.any():
            break
        a_old = a
        a = torch.where(active[:, None] & row_valid, log_mu - torch.logsumexp(scaled_cost + b[:, None, :], dim=2), a)
        b = torch.where(active[:, None] & col_valid, log_nu - torch.logsumexp(scaled_cost + a[:, :, None], dim=1), b)
        error = eps * (a - a_old).abs().sum(1)
        active = active & (error >= stop_threshold)
    return torch.exp(scaled_cost + a[:, :, None] + b[:, None, :])


def sinkhorn_emd(
    cost: torch.Tensor,
    row_valid: torch.Tensor,
    col_valid: torch.Tensor,
    eps: float,
    max_iter: int = 100,
    stop_threshold: float = 1e-2,
    check_every: int = 1,
) -> torch.Tensor:
    """Entropic EMD ``sum(P * C)`` with ``P`` from ``sinkhorn_plan`` (same arguments), per pair.

    Returns:
        ``[B]`` distances in ``cost``'s dtype; 0 for a pair with an empty row
        or column set. Gradients flow through every iteration.
    """
    with torch.autocast(device_type=cost.device.type, enabled=False):
        cost64 = cost.double()
        distance = (_plan(cost64, row_valid, col_valid, eps, max_iter, stop_threshold, check_every) * cost64).sum(dim=(1, 2))
        nonempty = row_valid.any(1) & col_valid.any(1)
        distance = torch.where(nonempty, distance, torch.zeros_like(distance))
    return distance.to(cost.dtype)
