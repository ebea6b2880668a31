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
  ``_SCALING_RANGE[dtype] * eps`` (the ``cos`` cost spans at most 2 = 40 eps
  at the training epsilon); at the evaluation epsilon (5e-8) every exponent is
  ~1e7, so evaluation is the log domain's: a potential that moves by one
  float64 ulp (2e-9) moves the distance by ~1e-9. A pair whose stopping
  decision the scaling form could make differently (an error within
  ``_DECISION_BAND[dtype]`` of the threshold) goes on too, so every pair does
  the iterations the log domain would. On ``cos`` costs float32 is within
  ~2e-7 of float64 in distances and ~2e-6 in gradients (a pair that runs to
  100 iterations gathers more: up to 1.3e-5 of its cost gradient on synthetic
  two-level costs); the float64 scaling form within ~1e-13.
* Gradient: the scaling form runs without autograd and differentiates its
  iterations by hand (``_ScalingIterations``); the log domain through
  autograd. Both are the derivative of the unrolled iterations each pair did.
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

# Scaling iterations: a pair's potentials stay within its exponents' span (max - min of -C / eps over its valid
# entries) plus ~16, and its kernel entries within exp(-span); float32 holds exp(+-87), float64 exp(+-709). Wider
# pairs go on to the next precision.
_SCALING_RANGE = {torch.float32: 60.0, torch.float64: 600.0}

# A scaling pair whose error comes this close (relative) to the stopping threshold, at or before the iteration where
# it stops, is computed again in the next precision. Near the threshold float32's errors are within 8.5e-5
# (relative) of the log domain's (90,000 iterations at eps 5e-2, cos costs and costs spread over [0, 2]), float64's
# within 2.6e-13 (3,694 errors within a factor 2 of the threshold, 100 iterations, cos and uniform costs); so
# outside the band both decide as the log domain does.
_DECISION_BAND = {torch.float32: 2e-3, torch.float64: 1e-9}

# The float32 iterations' matrices are padded to multiples of this many entries a side (see ``_Scaling``).
_ALIGNMENT = 8


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
        settings = _Settings(eps, max_iter, stop_threshold, check_every)
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
            part, still = _scaling_plan(*tensors, span, list(range(len(span))) if index is not None else pending,
                                        dtype, settings)
            plan = part.to(self.dtype) if index is None else plan.index_copy(0, index, part.to(self.dtype))
            pending = still if index is None else [pending[pair] for pair in still]
            if not pending:
                return plan
            index = torch.tensor(pending, device=plan.device, dtype=torch.long)
        solver = _LogDomain(*(tensor.index_select(0, index) for tensor in (self.cost, self.row_valid,
                                                                            self.col_valid)), eps)
        return plan.index_copy(0, index, solver.plan(*_solve(solver, list(range(len(pending))), settings)[:2]).to(
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


class _LogDomain:
    """float64 log-domain iterations, operation for operation those of the padded implementation.

    State: the potentials in units of eps, ``a = u / eps [A, R]``, ``b = v / eps [A, C]``. The spec's update
    ``u <- eps * (log mu - logsumexp((-C + u + v) / eps)) + u`` simplifies to ``a <- log mu - logsumexp(-C / eps + b)``,
    one pass per half-step. Differentiated by autograd, through every iteration.

    Attributes:
        matrices: ``(M,)``, ``M [B, R, C]`` float64 ``-C / eps``, log-zero on invalid entries: what every
            iteration reads.
        pair_data: per-pair tensors ``(log_mu [B, R], log_nu [B, C], row_valid, col_valid)``.
        decision_band: ``None``: the stopping decisions are float64's own.
    """

    decision_band = None

    def __init__(self, cost: torch.Tensor, row_valid: torch.Tensor, col_valid: torch.Tensor, eps: float) -> None:
        valid = row_valid[:, :, None] & col_valid[:, None, :]
        log_mu = torch.log(row_valid.double() / row_valid.sum(1, keepdim=True).clamp_min(1).double() + 1e-8)
        log_nu = torch.log(col_valid.double() / col_valid.sum(1, keepdim=True).clamp_min(1).double() + 1e-8)
        self.matrix = (-cost.double() / eps).masked_fill(~valid, _LOG_ZERO)
        self.matrices = (self.matrix,)
        self.pair_data = (log_mu, log_nu, row_valid, col_valid)

    @staticmethod
    def start(pair_data: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        log_mu, log_nu = pair_data[:2]
        return torch.zeros_like(log_mu), torch.zeros_like(log_nu)

    @staticmethod
    def step(matrices: tuple[torch.Tensor, ...], pair_data: tuple[torch.Tensor, ...], a: torch.Tensor,
             b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (matrix,) = matrices
        log_mu, log_nu, row_valid, col_valid = pair_data
        # The padded rows (columns) of a pair keep a = 0 (b = 0): their logsumexp runs over log-zeros only.
        a = (log_mu - torch.logsumexp(matrix + b[:, None, :], dim=2)).masked_fill(~row_valid, 0.0)
        b = (log_nu - torch.logsumexp(matrix + a[:, :, None], dim=1)).masked_fill(~col_valid, 0.0)
        return a, b

    @staticmethod
    def row_potentials(pair_data: tuple[torch.Tensor, ...], a: torch.Tensor) -> torch.Tensor:
        """The row potentials in units of eps of the stacked iterates ``a [steps, A, R]``, for the stopping rule."""
        return a.detach()

    def plan(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.matrix + a[:, :, None] + b[:, None, :])


class _Scaling:
    """float32 iterations on the scaling form: ``u' = exp(a + m)``, ``v' = exp(b)``, ``K' = exp(-C / eps - m)``.

    The same iterations as ``_LogDomain``'s, as products: ``a <- log mu - logsumexp(-C / eps + b)`` is
    ``u' <- mu / (K' v')``. ``m``, each pair's largest exponent, keeps ``K' <= 1``; it is a constant for autograd
    (the plan does not depend on it), and the stopping rule gets back ``a = log u' - m``. Differentiated by
    ``_ScalingIterations``, which runs the iterations without autograd and their derivative by hand.

    Attributes:
        matrix: ``[B, R, C]`` float32 kernel ``K'``, exactly 0 on invalid entries.
        matrices: ``(K', K'^T)``, the kernel and its transpose ``[B, C, R]`` (contiguous): both products of an
            iteration are then a row vector times a matrix, which CPU ``bmm`` does several times faster than a
            matrix times a column vector.
        pair_data: per-pair tensors ``(row_data [B, 4, R], col_data [B, 3, C])``: for each row ``mu``,
            ``row_padding``, ``m`` (0 on the padding) and ``1 / mu``; for each column ``nu``, ``col_padding`` and
            ``1 / nu``. The marginals are ``1 / count + 1e-8`` (the log domain's ``log(mu + 1e-8)``), 0 on the
            padding (and their inverses 1 there); the paddings are 1.0 on the padded rows (columns), 0.0
            elsewhere, so that the iterations need no masks. Two tensors, so that a compaction is two gathers.
        decision_band: see ``_FLOAT32_DECISION_BAND``.
    """

    def __init__(self, cost: torch.Tensor, row_valid: torch.Tensor, col_valid: torch.Tensor, lowest: torch.Tensor,
                 eps: float, dtype: torch.dtype) -> None:
        """``lowest [B]``: each pair's lowest valid cost (any value for an empty pair)."""
        self.decision_band = _DECISION_BAND[dtype]
        self.rows, self.cols = cost.shape[1:]
        # Padded to multiples of 8 entries (exact: padding carries no mass): at other sizes CPU bmm rounds a
        # matrix's products by where it lies in memory, and a pair's result would depend on its batch mates.
        cost = _padded(_padded(cost, 1, _ALIGNMENT), 2, _ALIGNMENT)
        row_valid, col_valid = _padded(row_valid, 1, _ALIGNMENT), _padded(col_valid, 1, _ALIGNMENT)
        valid = row_valid[:, :, None] & col_valid[:, None, :]
        shift = (-lowest.to(dtype) / eps).nan_to_num(0.0, posinf=0.0, neginf=0.0)[:, None]
        # Exponents of 0 on the padding, and the padding masked after exp: exp of a huge negative number takes a
        # slow path on some CPUs, and exp of an unmasked one could overflow where the gradient passes.
        exponent = (-cost.to(dtype) / eps - shift[:, :, None]).masked_fill(~valid, 0.0)
        self.matrix = torch.exp(exponent).masked_fill(~valid, 0.0)
        kernel = self.matrix.detach()
        self.matrices = (kernel, kernel.transpose(1, 2).contiguous())
        mu, row_padding, inverse_mu = _marginals(row_valid, dtype)
        nu, col_padding, inverse_nu = _marginals(col_valid, dtype)
        self.pair_data = (torch.stack((mu, row_padding, shift * (1 - row_padding), inverse_mu), 1),
                          torch.stack((nu, col_padding, inverse_nu), 1))

    @staticmethod
    def start(pair_data: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``u' [A, 1, R]`` (computed before it is read) and ``v' [A, 1, C]`` (b = 0): row vectors, for ``bmm``."""
        row_data, col_data = pair_data
        return torch.zeros_like(row_data[:, :1]), 1 - col_data[:, 1:2]

    @staticmethod
    def step(matrices: tuple[torch.Tensor, ...], pair_data: tuple[torch.Tensor, ...], u: torch.Tensor,
             v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kernel, kernel_t = matrices
        row_data, col_data = pair_data
        # A padded row (column) sums to exactly 0: plus its padding 1, its 0 marginal keeps u' = 0 (v' = 0).
        u = row_data[:, :1] / torch.baddbmm(row_data[:, 1:2], v, kernel_t)
        v = col_data[:, :1] / torch.baddbmm(col_data[:, 1:2], u, kernel)
        return u, v

    @staticmethod
    def row_potentials(pair_data: tuple[torch.Tensor, ...], u: torch.Tensor) -> torch.Tensor:
        """The row potentials ``a [steps, A, R]`` in units of eps of the stacked iterates ``u [steps, A, 1, R]``,
        0 on the padding, for the stopping rule."""
        row_data = pair_data[0]
        return (torch.log(u + row_data[:, 1:2]) - row_data[:, 2:3])[:, :, 0]

    def plan(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``[B, R, C]`` from ``u [B, 1, R]``, ``v [B, 1, C]``, the alignment padding cut."""
        return (u.transpose(1, 2) * self.matrix * v)[:, :self.rows, :self.cols]


def _scaling_plan(cost: torch.Tensor, row_valid: torch.Tensor, col_valid: torch.Tensor, lowest: torch.Tensor,
                  span: list[float], pairs: list[int], dtype: torch.dtype,
                  settings: _Settings) -> tuple[torch.Tensor, list[int]]:
    """The plan ``[B, R, C]`` in ``dtype`` of the ``pairs`` the scaling form can take in ``dtype`` (0 for the
    others), and the pairs it cannot: a span of costs too wide for ``dtype``, or a stopping decision too close to
    call (host lists)."""
    # "<=", so that a NaN span (a NaN cost) goes on to the log domain, which gives NaN as the padded one did.
    narrow = [pair for pair in pairs if span[pair] / settings.eps <= _SCALING_RANGE[dtype]]
    # With no iteration the plan is exp(-C / eps) (zero potentials): the log domain's, not worth a case here.
    if not narrow or settings.max_iter == 0:
        return cost.new_zeros(cost.shape, dtype=dtype), pairs
    solver = _Scaling(cost, row_valid, col_valid, lowest, settings.eps, dtype)
    if solver.matrix.requires_grad:
        uncertain: list[int] = []
        u, v = _ScalingIterations.apply(solver.matrix, solver, narrow, settings, uncertain)
    else:
        u, v, uncertain = _solve(solver, narrow, settings)
    return solver.plan(u, v), sorted(set(pairs) - set(narrow) | set(uncertain))


def _marginals(valid: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(marginal, padding, 1 / marginal)`` in ``dtype``, each ``[B, N]``, of a mask ``valid [B, N]``.

    The marginal is ``1 / count + 1e-8`` on the valid entries, rounded from float64 (the log domain's), 0 on the
    padding; its inverse 1 there."""
    valid_float = valid.to(dtype)
    marginal = (1.0 / valid.sum(1, keepdim=True).clamp_min(1).double() + 1e-8).to(dtype)
    return marginal * valid_float, 1 - valid_float, (1 / marginal) * valid_float + (1 - valid_float)


def _padded(tensor: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """``tensor`` with zeros (False) appended along ``dim`` up to a multiple of ``multiple``."""
    missing = -tensor.shape[dim] % multiple
    if not missing:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat((tensor, tensor.new_zeros(shape)), dim)


class _Block(NamedTuple):
    """What ``_solve`` keeps of ``check_every`` iterations of the pairs then active, for ``_ScalingIterations``.

    ``pairs [A]``: their rows in the batch; ``matrices``, ``pair_data``: theirs; ``start``: the number of
    iterations before the block; ``v_before [A, ...]``: the column iterate before it; ``u [steps, A, ...]``,
    ``v [steps, A, C]``: the iterates; ``stop [A]``: the step at which a pair stopped (its result), -1 for the
    pairs that go on; ``going_on [A']``: their places in this block (the next block's pairs, in order);
    ``last_stop``: the latest iteration at which a pair of the block stopped, -1 if none did; ``stop_steps``:
    the steps at which some pair stopped (host side).
    """

    pairs: torch.Tensor
    matrices: tuple[torch.Tensor, ...]
    pair_data: tuple[torch.Tensor, ...]
    start: int
    v_before: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    stop: torch.Tensor
    going_on: torch.Tensor
    last_stop: int
    stop_steps: frozenset[int]


def _solve(solver: _LogDomain | _Scaling, active: list[int], settings: _Settings,
           tape: list[_Block] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Each pair's potentials where it stopped, ``x [B, ...]``, ``y [B, ...]`` in the solver's shapes (0 for the
    pairs not in ``active``, a host list), and the pairs (host list) whose stopping decisions came within
    ``solver.decision_band`` of the
    threshold. ``tape``: where to keep each block's iterates (``_Block``).
    """
    matrices = solver.matrices
    batch, rows, cols = matrices[0].shape
    device = matrices[0].device
    pairs = torch.tensor(active, device=device, dtype=torch.long)
    # The iterations read ``blocks``: views of the matrices, then at each compaction the remaining pairs' copy of
    # the previous block. So autograd adds up the iterations' gradients w.r.t. the matrix one at a time, latest
    # first, and adds the plan's last, whatever the blocks (a copy taken from the matrix itself would first add up
    # its own iterations'): the gradient is the same bit for bit for any check_every.
    if len(active) == batch:
        blocks = tuple(matrix.view_as(matrix) for matrix in matrices)
    else:
        blocks = tuple(matrix.index_select(0, pairs) for matrix in matrices)
    pair_data = tuple(tensor.index_select(0, pairs) for tensor in solver.pair_data)
    x, y = solver.start(pair_data)
    a = torch.zeros(len(active), rows, dtype=matrices[0].dtype, device=device)  # row potentials, stopping rule
    uncertain = torch.zeros(len(active), dtype=torch.bool, device=device)
    done_pairs, done_x, done_y, flagged = [], [], [], []
    iteration = 0
    while x.shape[0] and iteration < settings.max_iter:
        steps = min(settings.check_every, settings.max_iter - iteration)
        y_before = y
        history_x, history_y = [], []
        for _ in range(steps):
            x, y = solver.step(blocks, pair_data, x, y)
            history_x.append(x)
            history_y.append(y)
        stacked_x, stacked_y = torch.stack(history_x), torch.stack(history_y)  # [steps, A, ...]
        potentials = torch.cat((a[None], solver.row_potentials(pair_data, stacked_x.detach())))
        error = settings.eps * (potentials[1:] - potentials[:-1]).abs().sum(2)  # [steps, A]
        a = potentials[-1]
        iteration += steps
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
        flags = torch.stack((finished.long(), uncertain.long(), stopped_at)).tolist()  # the block's one host sync
        going_on = [i for i, stop in enumerate(flags[0]) if not stop]
        keep = torch.tensor(going_on, device=device, dtype=torch.long)
        if tape is not None:
            start = iteration - steps
            tape.append(_Block(pairs, blocks, pair_data, start, y_before, stacked_x, stacked_y,
                               torch.where(finished, stopped_at, -1), keep,
                               max((start + at for stop, at in zip(flags[0], flags[2]) if stop), default=-1),
                               frozenset(at for stop, at in zip(flags[0], flags[2]) if stop)))
        if len(going_on) == len(active):
            continue
        done = [i for i, stop in enumerate(flags[0]) if stop]
        flagged += [active[i] for i in done if flags[1][i]]
        done_index = torch.tensor(done, device=device, dtype=torch.long)
        at = stopped_at[done_index]
        done_pairs.append(pairs[done_index])
        done_x.append(stacked_x[at, done_index])
        done_y.append(stacked_y[at, done_index])
        active = [active[i] for i in going_on]
        pairs, x, y, a, uncertain = (tensor.index_select(0, keep) for tensor in (pairs, x, y, a, uncertain))
        blocks = tuple(matrix.index_select(0, keep) for matrix in blocks)
        pair_data = tuple(tensor.index_select(0, keep) for tensor in pair_data)
    x_all = x.new_zeros((batch, *x.shape[1:]))
    y_all = y.new_zeros((batch, *y.shape[1:]))
    if done_pairs:
        index = torch.cat(done_pairs)
        x_all = x_all.index_copy(0, index, torch.cat(done_x))
        y_all = y_all.index_copy(0, index, torch.cat(done_y))
    return x_all, y_all, sorted(flagged)


class _ScalingIterations(torch.autograd.Function):
    """``_solve``'s potentials ``u [B, 1, R]``, ``v [B, 1, C]`` of a ``_Scaling`` solver, differentiable w.r.t. its
    kernel.

    The forward runs the iterations without autograd and keeps their iterates (``_Block``); the backward is the
    derivative of those iterations, each pair's up to the one it stopped at, taken by hand: the same terms
    autograd would add up through ``u <- mu / (K v)``, ``v <- nu / (K^T u)``, without its bookkeeping (hundreds
    of small nodes a batch). For iteration ``k`` with ``s = K v_{k-1}``, ``t = K^T u_k``:
    ``beta = -dv_k v_k / t``, ``du_k += K beta``, ``alpha = -du_k u_k / s``, ``dv_{k-1} = K^T alpha``, and
    ``dK += u_k beta^T + alpha v_{k-1}^T``; the outer products of all iterations are one ``bmm`` at the end.
    """

    @staticmethod
    def forward(ctx, kernel: torch.Tensor, solver: _Scaling, active: list[int], settings: _Settings,
                uncertain: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        tape: list[_Block] = []
        u, v, flagged = _solve(solver, active, settings, tape)
        uncertain.extend(flagged)
        ctx.tape, ctx.shape = tape, kernel.shape
        return u, v

    @staticmethod
    def backward(ctx, grad_u: torch.Tensor, grad_v: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        batch, rows, cols = ctx.shape
        tape: list[_Block] = ctx.tape
        # Slots 2k and 2k + 1 of the outer products hold iteration k's (u_k, beta) and (alpha, v_{k-1}); none past
        # the last iteration any pair stopped at, so the sizes (and the sums) do not depend on check_every.
        last = max((block.last_stop for block in tape), default=-1)
        left = grad_u.new_zeros(batch, 2 * (last + 1), rows)
        right = grad_u.new_zeros(batch, 2 * (last + 1), cols)
        dv_later = None
        for block in reversed(tape):
            kernel, kernel_t = block.matrices
            row_data, col_data = block.pair_data
            out_u, out_v = grad_u.index_select(0, block.pairs), grad_v.index_select(0, block.pairs)
            dv = grad_u.new_zeros(len(block.pairs), 1, cols)
            if dv_later is not None:
                dv = dv.index_copy(0, block.going_on, dv_later)
            steps = min(len(block.u), last + 1 - block.start)
            stops = block.stop[None, :, None, None] == torch.arange(steps, device=grad_u.device)[:, None, None, None]
            products = []
            for step in reversed(range(steps)):
                stops_here = step in block.stop_steps
                if stops_here:
                    dv = dv + out_v * stops[step]
                # u^2 / mu = u / s and v^2 / nu = v / t, 0 on the padding.
                beta = -dv * block.v[step] * block.v[step] * col_data[:, 2:3]
                du = torch.bmm(beta, kernel_t)
                if stops_here:
                    du = du + out_u * stops[step]
                alpha = -du * block.u[step] * block.u[step] * row_data[:, 3:4]
                dv = torch.bmm(alpha, kernel)
                v_before = block.v[step - 1] if step else block.v_before
                products.append((block.u[step], alpha, beta, v_before))
            dv_later = dv
            products.reverse()
            slots = torch.arange(2 * block.start, 2 * (block.start + steps), device=grad_u.device)
            left[block.pairs[:, None], slots] = torch.cat([row for u, alpha, _, _ in products for row in (u, alpha)], 1)
            right[block.pairs[:, None], slots] = torch.cat(
                [column for _, _, beta, v_before in products for column in (beta, v_before)], 1)
        return torch.bmm(left.transpose(1, 2), right), None, None, None, None
