"""The float64, per-pair Sinkhorn EMD."""
from __future__ import annotations

import torch

from models.emd import pairwise_cost, sinkhorn_emd


def reference_sinkhorn(cost: torch.Tensor, eps: float) -> torch.Tensor:
    """The spec's algorithm for one pair, unpadded, all in float64."""
    cost = cost.double()
    rows, cols = cost.shape
    log_mu = torch.log(torch.full((rows,), 1.0 / rows, dtype=torch.float64) + 1e-8)
    log_nu = torch.log(torch.full((cols,), 1.0 / cols, dtype=torch.float64) + 1e-8)
    u = torch.zeros(rows, dtype=torch.float64)
    v = torch.zeros(cols, dtype=torch.float64)
    plan = lambda u, v: (-cost + u[:, None] + v[None, :]) / eps  # noqa: E731
    for _ in range(100):
        u_old = u
        u = eps * (log_mu - torch.logsumexp(plan(u, v), dim=1)) + u
        v = eps * (log_nu - torch.logsumexp(plan(u, v).T, dim=1)) + v
        if (u - u_old).abs().sum() < 1e-2:
            break
    return (torch.exp(plan(u, v)) * cost).sum()


def test_padded_batch_equals_each_pair_alone() -> None:
    torch.manual_seed(0)
    sizes = [(5, 7), (9, 3), (1, 1), (9, 9)]
    query = torch.randn(len(sizes), 9, 16)
    reference = torch.randn(len(sizes), 9, 16)
    row_valid = torch.zeros(len(sizes), 9, dtype=torch.bool)
    col_valid = torch.zeros(len(sizes), 9, dtype=torch.bool)
    for i, (rows, cols) in enumerate(sizes):
        row_valid[i, :rows] = True
        col_valid[i, :cols] = True
    for dis_type in ("cos", "l2"):
        cost = pairwise_cost(query, reference, dis_type)
        for eps in (5e-2, 5e-8):
            batched = sinkhorn_emd(cost, row_valid, col_valid, eps=eps)
            for i, (rows, cols) in enumerate(sizes):
                alone = reference_sinkhorn(cost[i, :rows, :cols], eps)
                torch.testing.assert_close(batched[i].double(), alone, rtol=1e-5, atol=1e-6)


def test_runs_in_float64_and_returns_the_input_dtype() -> None:
    torch.manual_seed(0)
    cost = torch.rand(2, 6, 6)
    valid = torch.ones(2, 6, dtype=torch.bool)
    distance = sinkhorn_emd(cost, valid, valid, eps=5e-8)
    assert distance.dtype == torch.float32
    exact = torch.stack([reference_sinkhorn(c, 5e-8) for c in cost])
    torch.testing.assert_close(distance.double(), exact, rtol=1e-6, atol=1e-7)
    # In float32 the same iterations at eps 5e-8 drift far from the float64 answer.
    float32_cost = cost[0]
    u = torch.zeros(6)
    v = torch.zeros(6)
    for _ in range(100):
        u = 5e-8 * (torch.log(torch.tensor(1 / 6) + 1e-8) - torch.logsumexp((-float32_cost + u[:, None] + v) / 5e-8, 1)) + u
        v = 5e-8 * (torch.log(torch.tensor(1 / 6) + 1e-8) - torch.logsumexp(((-float32_cost + u[:, None] + v) / 5e-8).T, 1)) + v
    float32_distance = (torch.exp((-float32_cost + u[:, None] + v) / 5e-8) * float32_cost).sum()
    assert abs(float(float32_distance) - float(exact[0])) > 1e-3


def test_empty_sets_give_zero_and_finite_gradients() -> None:
    points = torch.randn(2, 4, 8, requires_grad=True)
    cost = pairwise_cost(points, points.flip(0), "l2")
    row_valid = torch.tensor([[True] * 4, [False] * 4])
    col_valid = torch.ones(2, 4, dtype=torch.bool)
    distance = sinkhorn_emd(cost, row_valid, col_valid, eps=5e-2)
    assert distance[1].item() == 0.0 and distance[0].item() > 0.0
    distance.sum().backward()
    assert torch.isfinite(points.grad).all()


def test_identical_sets_are_close_to_zero() -> None:
    points = torch.randn(1, 6, 8)
    valid = torch.ones(1, 6, dtype=torch.bool)
    for dis_type in ("cos", "l2"):
        distance = sinkhorn_emd(pairwise_cost(points, points, dis_type), valid, valid, eps=5e-8)
        assert distance.item() < 1e-4


def test_checking_for_convergence_every_k_iterations_changes_nothing() -> None:
    """Fewer checks (device-to-host syncs on a GPU) give the same distances and gradients, bit for bit."""
    torch.manual_seed(1)
    query = torch.randn(6, 12, 16)
    reference = torch.randn(6, 10, 16)
    row_valid = torch.rand(6, 12) < 0.8
    col_valid = torch.rand(6, 10) < 0.8
    for eps in (5e-2, 5e-8):
        results = []
        for check_every in (1, 7):
            leaf = query.clone().requires_grad_()
            distance = sinkhorn_emd(pairwise_cost(leaf, reference, "cos"), row_valid, col_valid, eps=eps,
                                    check_every=check_every)
            distance.sum().backward()
            results.append((distance.detach(), leaf.grad))
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
