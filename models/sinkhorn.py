"""The Sinkhorn iterations behind ``models.emd``, on a packed batch (see its docstring for the design).

Two forms: the scaling form (``u = exp(a)``, ``K = exp(-C / eps)``), run
without autograd in float32 or float64 and differentiated by hand
(``_ScalingIterations``), and the float64 log domain, operation for operation
the padded implementation and differentiated by autograd. ``solve`` runs
either on the pairs still iterating, ``check_every`` iterations between the
host checks which pairs have stopped; ``scaling_plan`` sends each pair to the
scaling form and says which ones it could not hold or decide.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["LogDomain", "Settings", "scaling_plan", "solve"]

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


class Settings(NamedTuple):
    eps: float
    max_iter: int
    stop_threshold: float
    check_every: int


class LogDomain:
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

    The same iterations as ``LogDomain``'s, as products: ``a <- log mu - logsumexp(-C / eps + b)`` is
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


def scaling_plan(cost: torch.Tensor, row_valid: torch.Tensor, col_valid: torch.Tensor, lowest: torch.Tensor,
                  span: list[float], pairs: list[int], dtype: torch.dtype,
                  settings: Settings) -> tuple[torch.Tensor, list[int]]:
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
        u, v, uncertain = solve(solver, narrow, settings)
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
    """What ``solve`` keeps of ``check_every`` iterations of the pairs then active, for ``_ScalingIterations``.

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


def solve(solver: LogDomain | _Scaling, active: list[int], settings: Settings,
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
    """``solve``'s potentials ``u [B, 1, R]``, ``v [B, 1, C]`` of a ``_Scaling`` solver, differentiable w.r.t. its
    kernel.

    The forward runs the iterations without autograd and keeps their iterates (``_Block``); the backward is the
    derivative of those iterations, each pair's up to the one it stopped at, taken by hand: the same terms
    autograd would add up through ``u <- mu / (K v)``, ``v <- nu / (K^T u)``, without its bookkeeping (hundreds
    of small nodes a batch). For iteration ``k`` with ``s = K v_{k-1}``, ``t = K^T u_k``:
    ``beta = -dv_k v_k / t``, ``du_k += K beta``, ``alpha = -du_k u_k / s``, ``dv_{k-1} = K^T alpha``, and
    ``dK += u_k beta^T + alpha v_{k-1}^T``; the outer products of all iterations are one ``bmm`` at the end.
    """

    @staticmethod
    def forward(ctx, kernel: torch.Tensor, solver: _Scaling, active: list[int], settings: Settings,
                uncertain: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        tape: list[_Block] = []
        u, v, flagged = solve(solver, active, settings, tape)
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
