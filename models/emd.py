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
* Precision (``dtype``), float64 by default: the log-domain iterations,
  operation for operation those of the padded implementation this replaces.
  At the evaluation epsilon (5e-8) every exponent is ~1e7: a potential that
  moves by one float64 ulp (2e-9) moves the distance by ~1e-9, and float32
  rounding changes it by up to 5x. float32 is for the training epsilon (5e-2):
  the same iterations on the scaling form (``u = exp(a)``, ``K = exp(-C / eps)``:
  products and sums instead of log-sum-exps), which float32 holds where a
  pair's costs span at most ``_SCALING_RANGE * eps`` (the ``cos`` cost spans at
  most 2 = 40 eps). On ``cos`` costs it is within ~2e-7 of float64 in distances
  and ~2e-6 in gradients (a pair that runs to 100 iterations gathers more: up to
  1.3e-5 of its cost gradient on synthetic two-level costs). Pairs of a wider
  span, and pairs whose stopping decision float32 could make differently (an
  error within ``_FLOAT32_DECISION_BAND`` of the threshold), are computed in
  float64; so every pair does the iterations float64 would.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = ["pack_valid", "pairwise_cost", "sinkhorn_emd", "sinkhorn_plan", "unit_rows"]

# Finite stand-in for log(0) on padded entries (float64 log domain): -inf would make logsumexp's gradient NaN on an
# all-padded row even where the row is masked afterwards. exp() of it is exactly 0, and it stays finite after the
# potentials (|a|, |b| < 1e10 even at eps 5e-8) are added to it.
_LOG_ZERO = -1e300

# float32 scaling iterations: a pair's potentials stay within its exponents' span (max - min of -C / eps over its
# valid entries) plus ~16, and its kernel entries within exp(-span); float32 holds exp(+-87). Wider pairs go to float64.
_SCALING_RANGE = 60.0

# A float32 pair whose error comes this close (relative) to the stopping threshold, at or before the iteration where
# it stops, is computed again in float64: near the threshold float32's errors are within 8.5e-5 (relative) of
# float64's (90,000 iterations at eps 5e-2, cos costs and costs spread over [0, 2]), so outside the band both decide
# alike.
_FLOAT32_DECISION_BAND = 2e-3


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
            stop after 2 iterations, at the training one after 4 to 10).
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


class _Settings(NamedTuple):
    eps: float
    max_iter: int
    stop_threshold: float
    check_every: int


class _Packed:
    """A batch's cost with each pair's valid rows and columns moved to the front and the padding cut.

    Attributes:
        cost: ``[B, R, C]`` in the input's dtype, ``R`` / ``C`` the largest
            valid row / column count of the batch (pair ``i``'s valid entries
            are ``[:rows_i, :cols_i]``, in their original order).
        row_valid: ``[B, R]`` bool, ``col_valid``: ``[B, C]`` bool.
        nonempty: ``[B]`` bool, the pairs with at least one valid row and column.
        dtype: the precision of the iterations.
        lowest: (float32) ``[B]``, each pair's lowest valid cost, and ``span``
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
        if dtype == torch.float32:
            with torch.no_grad():
                valid = row_valid[:, :, None] & col_valid[:, None, :]
                self.lowest = cost.masked_fill(~valid, torch.inf).amin((1, 2))
                summary.append(cost.masked_fill(~valid, -torch.inf).amax((1, 2)).double() - self.lowest.double())
        # One host sync: the shapes, the nonempty pairs and (float32) each pair's span of costs.
        rows, cols, prefix_flags, *span = torch.stack(summary).tolist()
        self.nonempty_list = [pair for pair, (r, c) in enumerate(zip(rows, cols)) if r and c]
        self.span = span[0] if span else None
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
        settings = _Settings(eps, max_iter, stop_threshold, check_every)
        if not self.nonempty_list:  # every pair is empty (the packed matrices may have no rows or no columns)
            return self.cost.new_zeros(self.cost.shape, dtype=self.dtype)
        if self.dtype == torch.float64:
            return _solve(_LogDomain(self.cost, self.row_valid, self.col_valid, eps), self.nonempty_list, settings)[0]
        # "<=", so that a NaN span (a NaN cost) goes to float64 too, which gives NaN as the padded one did.
        narrow = [pair for pair in self.nonempty_list if self.span[pair] / eps <= _SCALING_RANGE]
        wide = sorted(set(self.nonempty_list) - set(narrow))
        plan, uncertain = _solve(_Scaling(self.cost, self.row_valid, self.col_valid, self.lowest, eps), narrow,
                                 settings)
        redo = sorted(wide + uncertain)
        if redo:
            index = torch.tensor(redo, device=plan.device, dtype=torch.long)
            again = _solve(_LogDomain(*(tensor.index_select(0, index) for tensor in (
                self.cost, self.row_valid, self.col_valid)), eps), list(range(len(redo))), settings)[0]
            plan = plan.index_copy(0, index, again.to(plan.dtype))
        return plan

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``packed [B, R, C]`` back on the full grid ``[B, S2, S1]``, 0 on the entries that were cut."""
        full = packed.new_zeros(self.shape)
        if self.row_index is None:
            full[:, :packed.shape[1], :packed.shape[2]] = packed
            return full
        batch = torch.arange(self.shape[0], device=packed.device)[:, None, None]
        full[batch, self.row_index[:, :, None], self.col_index[:, None, :]] = packed
        return full


class _LogDomain:
    """float64 log-domain iterations, operation for operation those of the padded implementation.

    State: the potentials in units of eps, ``a = u / eps [A, R]``, ``b = v / eps [A, C]``. The spec's update
    ``u <- eps * (log mu - logsumexp((-C + u + v) / eps)) + u`` simplifies to ``a <- log mu - logsumexp(-C / eps + b)``,
    one pass per half-step.

    Attributes:
        matrix: ``[B, R, C]`` float64 ``-C / eps``, log-zero on invalid entries: what every iteration reads.
        pair_data: per-pair tensors ``(log_mu [B, R], log_nu [B, C], row_valid, col_valid)``.
        decision_band: ``None``: the stopping decisions are float64's own.
    """

    decision_band = None

    def __init__(self, cost: torch.Tensor, row_valid: torch.Tensor, col_valid: torch.Tensor, eps: float) -> None:
        valid = row_valid[:, :, None] & col_valid[:, None, :]
        log_mu = torch.log(row_valid.double() / row_valid.sum(1, keepdim=True).clamp_min(1).double() + 1e-8)
        log_nu = torch.log(col_valid.double() / col_valid.sum(1, keepdim=True).clamp_min(1).double() + 1e-8)
        self.matrix = (-cost.double() / eps).masked_fill(~valid, _LOG_ZERO)
        self.pair_data = (log_mu, log_nu, row_valid, col_valid)

    @staticmethod
    def start(pair_data: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        log_mu, log_nu = pair_data[:2]
        return torch.zeros_like(log_mu), torch.zeros_like(log_nu)

    @staticmethod
    def step(matrix: torch.Tensor, pair_data: tuple[torch.Tensor, ...], a: torch.Tensor,
             b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_mu, log_nu, row_valid, col_valid = pair_data
        # The padded rows (columns) of a pair keep a = 0 (b = 0): their logsumexp runs over log-zeros only.
        a = (log_mu - torch.logsumexp(matrix + b[:, None, :], dim=2)).masked_fill(~row_valid, 0.0)
        b = (log_nu - torch.logsumexp(matrix + a[:, :, None], dim=1)).masked_fill(~col_valid, 0.0)
        return a, b

    @staticmethod
    def row_potential(pair_data: tuple[torch.Tensor, ...], a: torch.Tensor) -> torch.Tensor:
        """The row potentials in units of eps, for the stopping rule (not differentiated)."""
        return a.detach()

    def plan(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.matrix + a[:, :, None] + b[:, None, :])


class _Scaling:
    """float32 iterations on the scaling form: ``u' = exp(a + m)``, ``v' = exp(b)``, ``K' = exp(-C / eps - m)``.

    The same iterations as ``_LogDomain``'s, as products: ``a <- log mu - logsumexp(-C / eps + b)`` is
    ``u' <- mu / (K' v')``. ``m``, each pair's largest exponent, keeps ``K' <= 1``; it is a constant for autograd
    (the plan does not depend on it), and the stopping rule gets back ``a = log u' - m``.

    Attributes:
        matrix: ``[B, R, C]`` float32 kernel ``K'``, exactly 0 on invalid entries.
        pair_data: per-pair tensors ``(mu [B, R], nu [B, C], row_valid, col_valid, m [B, 1])``; the
            marginals are ``1 / count + 1e-8`` (the log domain's ``log(mu + 1e-8)``), 0 on the padding.
        decision_band: see ``_FLOAT32_DECISION_BAND``.
    """

    decision_band = _FLOAT32_DECISION_BAND

    def __init__(self, cost: torch.Tensor, row_valid: torch.Tensor, col_valid: torch.Tensor, lowest: torch.Tensor,
                 eps: float) -> None:
        """``lowest [B]``: each pair's lowest valid cost (any value for an empty pair)."""
        valid = row_valid[:, :, None] & col_valid[:, None, :]
        mu = (row_valid.double() / row_valid.sum(1, keepdim=True).clamp_min(1) + 1e-8) * row_valid
        nu = (col_valid.double() / col_valid.sum(1, keepdim=True).clamp_min(1) + 1e-8) * col_valid
        shift = (-lowest.float() / eps).nan_to_num(0.0, posinf=0.0, neginf=0.0)[:, None, None]
        # Exponents of 0 on the padding, and the padding masked after exp: exp of a huge negative number takes a
        # slow path on some CPUs, and exp of an unmasked one could overflow where the gradient passes.
        exponent = (-cost.float() / eps - shift).masked_fill(~valid, 0.0)
        self.matrix = torch.exp(exponent).masked_fill(~valid, 0.0)
        self.pair_data = (mu.float(), nu.float(), row_valid, col_valid, shift[:, :, 0])

    @staticmethod
    def start(pair_data: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        mu, _, _, col_valid, _ = pair_data
        return torch.zeros_like(mu), col_valid.to(mu.dtype)  # b = 0; u' is computed before it is read

    @staticmethod
    def step(matrix: torch.Tensor, pair_data: tuple[torch.Tensor, ...], u: torch.Tensor,
             v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, nu, row_valid, col_valid, _ = pair_data
        # A padded row (column) sums to 0: divided by 1 instead, its 0 marginal keeps u' = 0 (v' = 0), gradient too.
        u = mu / (matrix * v[:, None, :]).sum(2).masked_fill(~row_valid, 1.0)
        v = nu / (matrix * u[:, :, None]).sum(1).masked_fill(~col_valid, 1.0)
        return u, v

    @staticmethod
    def row_potential(pair_data: tuple[torch.Tensor, ...], u: torch.Tensor) -> torch.Tensor:
        """The row potentials ``a`` in units of eps, 0 on the padding, for the stopping rule (not differentiated)."""
        _, _, row_valid, _, shift = pair_data
        return (torch.log(u.detach().masked_fill(~row_valid, 1.0)) - shift).masked_fill(~row_valid, 0.0)

    def plan(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return u[:, :, None] * self.matrix * v[:, None, :]


def _solve(solver: _LogDomain | _Scaling, active: list[int], settings: _Settings) -> tuple[torch.Tensor, list[int]]:
    """The plan ``[B, R, C]`` of ``solver``'s pairs ``active`` (host list; the others' plan is 0), and the
    pairs (host list) whose stopping decisions came within ``solver.decision_band`` of the threshold.
    """
    matrix = solver.matrix
    batch, rows, cols = matrix.shape
    device = matrix.device
    pairs = torch.tensor(active, device=device, dtype=torch.long)
    # The iterations read ``block``: a view of the matrix, then at each compaction the remaining pairs' copy of the
    # previous block. So autograd adds up the iterations' gradients w.r.t. the matrix one at a time, latest first,
    # and adds the plan's last, whatever the blocks (a copy taken from the matrix itself would first add up its own
    # iterations'): the gradient is the same bit for bit for any check_every.
    block = matrix.view_as(matrix) if len(active) == batch else matrix.index_select(0, pairs)
    pair_data = tuple(tensor.index_select(0, pairs) for tensor in solver.pair_data)
    x, y = solver.start(pair_data)
    a = torch.zeros(len(active), rows, dtype=matrix.dtype, device=device)  # row potentials, for the stopping rule
    uncertain = torch.zeros(len(active), dtype=torch.bool, device=device)
    done_pairs, done_x, done_y, flagged = [], [], [], []
    iteration = 0
    while x.shape[0] and iteration < settings.max_iter:
        steps = min(settings.check_every, settings.max_iter - iteration)
        history_x, history_y, errors = [], [], []
        for _ in range(steps):
            x, y = solver.step(block, pair_data, x, y)
            a_next = solver.row_potential(pair_data, x)
            errors.append(settings.eps * (a_next - a).abs().sum(1))
            a = a_next
            history_x.append(x)
            history_y.append(y)
        iteration += steps
        error = torch.stack(errors)  # [steps, A]
        below = error < settings.stop_threshold
        stopped = below.any(0)
        # The iteration of the block at which each pair stopped: the first below the threshold (argmax gives the
        # first of equal maxima), or the block's last where none was (the pair goes on, or reached max_iter).
        stopped_at = torch.where(stopped, below.to(torch.uint8).argmax(0), steps - 1)
        if solver.decision_band is not None:
            close = (error - settings.stop_threshold).abs() < solver.decision_band * settings.stop_threshold
            until_stop = torch.arange(steps, device=device)[:, None] <= stopped_at
            uncertain = uncertain | (close & until_stop).any(0)
        finished = stopped if iteration < settings.max_iter else torch.ones_like(stopped)
        flags = torch.stack((finished, uncertain)).tolist()  # the block's one host sync
        done = [i for i, stop in enumerate(flags[0]) if stop]
        if not done:
            continue
        flagged += [active[i] for i in done if flags[1][i]]
        done_index = torch.tensor(done, device=device, dtype=torch.long)
        at = stopped_at[done_index]
        done_pairs.append(pairs[done_index])
        done_x.append(torch.stack(history_x)[at, done_index])
        done_y.append(torch.stack(history_y)[at, done_index])
        going_on = [i for i, stop in enumerate(flags[0]) if not stop]
        active = [active[i] for i in going_on]
        keep = torch.tensor(going_on, device=device, dtype=torch.long)
        pairs, block, x, y, a, uncertain = (
            tensor.index_select(0, keep) for tensor in (pairs, block, x, y, a, uncertain))
        pair_data = tuple(tensor.index_select(0, keep) for tensor in pair_data)
    x_all = matrix.new_zeros(batch, rows)
    y_all = matrix.new_zeros(batch, cols)
    if done_pairs:
        index = torch.cat(done_pairs)
        x_all = x_all.index_copy(0, index, torch.cat(done_x))
        y_all = y_all.index_copy(0, index, torch.cat(done_y))
    return solver.plan(x_all, y_all), sorted(flagged)
