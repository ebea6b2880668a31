"""Entropic earth mover's distance between token sets, by Sinkhorn iterations.

Every pair in a batch is computed as if it were alone: each image's token set
is given as a fixed-size token grid plus a validity mask, invalid tokens carry
no mass, and each pair stops iterating on its own error (see the spec, section 3).

How a batch is computed, and why:

* Packed: each pair's valid rows and columns are moved to the front, in their
  order, and the padding is cut to the batch's largest valid count (rows and
  columns separately). ``pack_valid`` does the same to token features before a
  projection, so that the padding is never projected.
* Active set: a pair leaves the iteration once it has stopped. Finding out
  which pairs have stopped is a device-to-host sync, so it happens every
  ``check_every`` iterations; in between, every pair still in the set iterates,
  and a pair that stopped inside the block keeps the potentials of its own
  stopping iteration (the later ones are computed and dropped). So a distance
  and its gradient depend neither on ``check_every`` (bit for bit) nor on the
  batch mates (beyond the rounding of sums over the packed width: ~1e-16 of
  the result in float64, ~1e-7 in float32).
* Precision (``dtype``), float64 by default, and form. Each pair goes to the
  first of these that can take it: the scaling form (``u = exp(a)``,
  ``K = exp(-C / eps)``: products and sums instead of log-sum-exps) in float32
  (where ``dtype`` is float32), the scaling form in float64, and the float64
  log domain, operation for operation the padded implementation this
  replaces. The scaling form holds a pair whose costs span at most
  ``models.sinkhorn._SCALING_RANGE[dtype] * eps`` (the ``cos`` cost spans at most 2 = 40 eps
  at the training epsilon); at the evaluation epsilon (5e-8) every exponent is
  ~1e7, so evaluation is the log domain's: a potential that moves by one
  float64 ulp (2e-9) moves the distance by ~1e-9. A pair whose stopping
  decision the scaling form could make differently (an error within
  ``models.sinkhorn._DECISION_BAND[dtype]`` of the threshold) goes on too, so every pair does
  the iterations the log domain would. On ``cos`` costs float32 is within
  ~2e-7 of float64 in distances and ~2e-6 in gradients (a pair that runs to
  100 iterations gathers more: up to 1.3e-5 of its cost gradient on synthetic
  two-level costs); the float64 scaling form within ~1e-13.
* Gradient: the scaling form runs without autograd and differentiates its
  iterations by hand (``models.sinkhorn``); the log domain through
  autograd. Both are the derivative of the unrolled iterations each pair did.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from models.sinkhorn import LogDomain, Settings, scaling_plan, solve

__all__ = ["pack_valid", "pairwise_cost", "sinkhorn_emd", "sinkhorn_plan", "unit_rows"]


def pairwise_cost(query: torch.Tensor, reference: torch.Tensor, dis_type: str, unit: bool = False) -> torch.Tensor:
    """Token cost ``[B, S2, S1]`` between ``query [B, S2, D]`` and ``reference [B, S1, D]``.

    ``cos``: ``1 - cosine similarity`` (eps 1e-8); ``l2``: Euclidean distance.
    ``unit``: (``cos``) the rows are of unit length already (``unit_rows``), so not normalised again.
    """
    if dis_type == "cos":
        if not unit:
            query = query / query.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            reference = reference / reference.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return 1 - query @ reference.transpose(1, 2)
    if dis_type == "l2":
        return (query[:, :, None, :] - reference[:, None, :, :]).norm(dim=-1)
    raise ValueError(f"dis_type must be 'cos' or 'l2', got {dis_type!r}")


def unit_rows(values: torch.Tensor) -> torch.Tensor:
    """``values [..., D]`` over ``max(|row|, 1e-8)``: ``pairwise_cost``'s ``cos`` normalisation, to rounding (~1e-7).

    As ``rsqrt`` of the clamped squared norm: on CPU its backward takes half the time of the vector norm's.
    """
    return values * torch.rsqrt((values * values).sum(-1, keepdim=True).clamp_min(1e-16))


def pack_valid(
    tokens: torch.Tensor,
    valid: torch.Tensor,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each item's valid tokens moved to the front, in their order, and the padding cut to the largest count.

    Args:
        tokens: ``[B, N, D]`` token features, any dtype.
        valid: ``[B, N]`` bool, the tokens to keep.
        transform: applied to the valid tokens alone, ``[T, D] -> [T, E]``
            (``T`` the number of valid tokens in the batch), e.g. a projection:
            the padding is then never computed. Row-wise (each output row a
            function of its input row), so that packing does not change the result.

    Returns:
        ``packed [B, K, E]`` (``K`` the largest count of the batch; zeros after
        item ``i``'s ``count_i`` tokens, in the transform's dtype) and
        ``packed_valid [B, K]`` bool, true on the first ``count_i`` entries.
        Gradients flow to ``tokens`` (through ``transform``) at the valid entries.
    """
    batch = valid.shape[0]
    counts = valid.sum(1)
    count_list = counts.tolist()  # one host sync
    total, size = sum(count_list), max(count_list, default=0)
    # Stable sorts keep the tokens' order: the flat positions of the valid tokens, and of their slots once packed.
    source = torch.argsort((~valid).flatten().to(torch.uint8), stable=True)[:total]
    packed_valid = torch.arange(size, device=valid.device) < counts[:, None]
    target = torch.argsort((~packed_valid).flatten().to(torch.uint8), stable=True)[:total]
    values = tokens.flatten(0, 1).index_select(0, source)
    if transform is not None:
        values = transform(values)
    packed = values.new_zeros(batch * size, values.shape[1]).index_copy(0, target, values)
    return packed.view(batch, size, values.shape[1]), packed_valid


def sinkhorn_plan(
    cost: torch.Tensor,
    row_valid: torch.Tensor,
    col_valid: torch.Tensor,
    eps: float,
    max_iter: int = 100,
    stop_threshold: float = 1e-2,
    check_every: int = 2,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Entropic transport plan with uniform marginals over the valid entries, per pair.

    Args:
        cost: ``[B, S2, S1]`` cost between query rows and reference columns, any float dtype.
        row_valid: ``[B, S2]`` bool, which rows are real tokens.
        col_valid: ``[B, S1]`` bool, which columns are real tokens.
        eps: entropic regularisation (5e-2 in training, 5e-8 in evaluation).
        max_iter: iteration cap.
        stop_threshold: a pair stops after the first iteration (both half-steps)
            at which ``sum |u - u_old| <`` this, ``u`` being its row potentials.
        check_every: iterations between the checks which pairs have stopped
            (each is one device-to-host sync), at which stopped pairs leave the
            batch. The plan is the same for any value; a larger one saves syncs
            and iterates stopped pairs longer (at the evaluation epsilon pairs
            stop after 2 iterations, at the training one, on real scans'
            features, after 8 to 100).
        dtype: precision of the iterations, ``torch.float64`` or
            ``torch.float32`` (for the training epsilon: see the module docstring).

    Returns:
        ``[B, S2, S1]`` plan ``P`` in ``dtype``: the mass moved from each query
        token to each reference token, exactly 0 on invalid entries. The last
        half-step balances the columns (each valid one sums to
        ``1 / S1_valid``); the rows only as far as the iterations got (at the
        evaluation epsilon they stop early, and a row may hold 0.5 to 1.5
        times its ``1 / S2_valid``). The gradient is that of the unrolled
        iterations each pair did (see ``sinkhorn_emd``).
    """
    with torch.autocast(device_type=cost.device.type, enabled=False):
        packed = _Packed(cost, row_valid, col_valid, dtype)
        return packed.unpack(packed.plan(eps, max_iter, stop_threshold, check_every))


def sinkhorn_emd(
    cost: torch.Tensor,
    row_valid: torch.Tensor,
    col_valid: torch.Tensor,
    eps: float,
    max_iter: int = 100,
    stop_threshold: float = 1e-2,
    check_every: int = 2,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Entropic EMD ``sum(P * C)`` with ``P`` from ``sinkhorn_plan`` (same arguments), per pair.

    Returns:
        ``[B]`` distances in ``cost``'s dtype (summed in ``dtype``); 0 for a
        pair with an empty row or column set. The gradient w.r.t. ``cost`` is
        the derivative of the computed distance, through the plan and every
        iteration each pair did (nothing is detached but the shifts that keep
        exponents in range, on which the value does not depend), with each
        pair's number of iterations (chosen by the stopping rule) held fixed:
        the derivative of the unrolled iterations, not of the converged
        transport problem.
    """
    with torch.autocast(device_type=cost.device.type, enabled=False):
        packed = _Packed(cost, row_valid, col_valid, dtype)
        plan = packed.plan(eps, max_iter, stop_threshold, check_every)
        distance = (plan * packed.cost.to(dtype)).sum(dim=(1, 2))
        # An empty pair's plan is all 0 already; the mask keeps its distance 0 even where its cost is not finite.
        distance = torch.where(packed.nonempty, distance, torch.zeros_like(distance))
    return distance.to(cost.dtype)


class _Packed:
    """A batch's cost with each pair's valid rows and columns moved to the front and the padding cut.

    Attributes:
        cost: ``[B, R, C]`` in the input's dtype, ``R`` / ``C`` the largest
            valid row / column count of the batch (pair ``i``'s valid entries
            are ``[:rows_i, :cols_i]``, in their original order).
        row_valid: ``[B, R]`` bool, ``col_valid``: ``[B, C]`` bool.
        nonempty: ``[B]`` bool, the pairs with at least one valid row and column.
        dtype: the precision of the iterations.
        lowest: ``[B]``, each pair's lowest valid cost, and ``span``
            (host list) its highest minus its lowest.
    """

    def __init__(self, cost: torch.Tensor, row_valid: torch.Tensor, col_valid: torch.Tensor,
                 dtype: torch.dtype) -> None:
        if dtype not in (torch.float64, torch.float32):
            raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
        self.dtype = dtype
        self.shape = cost.shape
        row_counts, col_counts = row_valid.sum(1), col_valid.sum(1)
        # Masks that hold each pair's valid entries first already (pack_valid's) need a cut, not a gather.
        prefix = ((row_valid == (torch.arange(row_valid.shape[1], device=cost.device) < row_counts[:, None])).all()
                  & (col_valid == (torch.arange(col_valid.shape[1], device=cost.device) < col_counts[:, None])).all())
        summary = [row_counts.double(), col_counts.double(), prefix.double().expand(len(row_counts))]
        with torch.no_grad():
            valid = row_valid[:, :, None] & col_valid[:, None, :]
            self.lowest = cost.masked_fill(~valid, torch.inf).amin((1, 2))
            summary.append(cost.masked_fill(~valid, -torch.inf).amax((1, 2)).double() - self.lowest.double())
        # One host sync: the shapes, the nonempty pairs and each pair's span of costs.
        rows, cols, prefix_flags, self.span = torch.stack(summary).tolist()
        self.nonempty_list = [pair for pair, (r, c) in enumerate(zip(rows, cols)) if r and c]
        width, height = int(max(rows, default=0)), int(max(cols, default=0))
        self.row_valid = torch.arange(width, device=cost.device) < row_counts[:, None]
        self.col_valid = torch.arange(height, device=cost.device) < col_counts[:, None]
        self.nonempty = (row_counts > 0) & (col_counts > 0)
        if all(prefix_flags):
            self.row_index = self.col_index = None
            self.cost = cost[:, :width, :height]
            return
        # A stable sort keeps the valid entries in their order, and so the padded computation's sums in theirs.
        self.row_index = torch.argsort((~row_valid).to(torch.uint8), dim=1, stable=True)[:, :width]
        self.col_index = torch.argsort((~col_valid).to(torch.uint8), dim=1, stable=True)[:, :height]
        # One index_select of the flat cost: on CPU a third faster than two gathers.
        flat = (torch.arange(len(cost), device=cost.device)[:, None, None] * (cost.shape[1] * cost.shape[2])
                + self.row_index[:, :, None] * cost.shape[2] + self.col_index[:, None, :])
        self.cost = cost.flatten().index_select(0, flat.flatten()).view(len(cost), width, height)

    def plan(self, eps: float, max_iter: int, stop_threshold: float, check_every: int) -> torch.Tensor:
        """The packed plan ``[B, R, C]`` in the iteration dtype (see ``sinkhorn_plan``)."""
        if check_every < 1:
            raise ValueError(f"check_every must be at least 1, got {check_every}")
        settings = Settings(eps, max_iter, stop_threshold, check_every)
        if not self.nonempty_list:  # every pair is empty (the packed matrices may have no rows or no columns)
            return self.cost.new_zeros(self.cost.shape, dtype=self.dtype)
        # The scaling form (in float32 where asked, then in float64), then the log domain, each for the pairs the
        # previous one could not hold or decide; at the evaluation epsilon no pair fits the scaling form.
        plan = self.cost.new_zeros(self.cost.shape, dtype=self.dtype)
        pending, index = self.nonempty_list, None
        for dtype in (torch.float32, torch.float64)[self.dtype == torch.float64:]:
            tensors = (self.cost, self.row_valid, self.col_valid, self.lowest)
            if index is not None:
                tensors = tuple(tensor.index_select(0, index) for tensor in tensors)
            span = self.span if index is None else [self.span[pair] for pair in pending]
            part, still = scaling_plan(*tensors, span, list(range(len(span))) if index is not None else pending,
                                        dtype, settings)
            plan = part.to(self.dtype) if index is None else plan.index_copy(0, index, part.to(self.dtype))
            pending = still if index is None else [pending[pair] for pair in still]
            if not pending:
                return plan
            index = torch.tensor(pending, device=plan.device, dtype=torch.long)
        solver = LogDomain(*(tensor.index_select(0, index) for tensor in (self.cost, self.row_valid,
                                                                            self.col_valid)), eps)
        return plan.index_copy(0, index, solver.plan(*solve(solver, list(range(len(pending))), settings)[:2]).to(
            self.dtype))

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``packed [B, R, C]`` back on the full grid ``[B, S2, S1]``, 0 on the entries that were cut."""
        full = packed.new_zeros(self.shape)
        if self.row_index is None:
            full[:, :packed.shape[1], :packed.shape[2]] = packed
            return full
        batch = torch.arange(self.shape[0], device=packed.device)[:, None, None]
        full[batch, self.row_index[:, :, None], self.col_index[:, None, :]] = packed
        return full
