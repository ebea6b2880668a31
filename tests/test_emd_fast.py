"""The packed, active-set Sinkhorn (models.emd) against the padded float64 implementation it replaced."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from model_v3 import SINKHORN_EPS_EVAL, SINKHORN_EPS_TRAIN, TokenFeatures, ViT_for_OSV_DSNet
from models import sinkhorn
from models.emd import pack_valid, pairwise_cost, sinkhorn_emd, sinkhorn_plan, unit_rows

# Hundreds of small operations: a second thread waiting for a busy core costs more than it gives.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# --- The reference: models/emd.py before packing (commit d690597), unchanged but for the names. ---------------------

_PADDED_LOG_ZERO = -1e300


def padded_plan(cost: torch.Tensor, row_valid: torch.Tensor, col_valid: torch.Tensor, eps: float, max_iter: int = 100,
                stop_threshold: float = 1e-2, check_every: int = 1) -> torch.Tensor:
    """The padded implementation's plan ``[B, S2, S1]`` of a float64 ``cost``: every pair on the whole grid."""
    valid = row_valid[:, :, None] & col_valid[:, None, :]
    n_rows = row_valid.sum(1, keepdim=True).clamp_min(1).double()
    n_cols = col_valid.sum(1, keepdim=True).clamp_min(1).double()
    log_mu = torch.log(row_valid.double() / n_rows + 1e-8)
    log_nu = torch.log(col_valid.double() / n_cols + 1e-8)
    nonempty = row_valid.any(1) & col_valid.any(1)
    scaled_cost = (-cost / eps).masked_fill(~valid, _PADDED_LOG_ZERO)
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


def padded_sinkhorn_emd(cost: torch.Tensor, row_valid: torch.Tensor, col_valid: torch.Tensor, eps: float,
                        max_iter: int = 100, stop_threshold: float = 1e-2, check_every: int = 1) -> torch.Tensor:
    """The padded implementation's distances ``[B]`` in ``cost``'s dtype."""
    with torch.autocast(device_type=cost.device.type, enabled=False):
        cost64 = cost.double()
        plan = padded_plan(cost64, row_valid, col_valid, eps, max_iter, stop_threshold, check_every)
        distance = (plan * cost64).sum(dim=(1, 2))
        nonempty = row_valid.any(1) & col_valid.any(1)
        distance = torch.where(nonempty, distance, torch.zeros_like(distance))
    return distance.to(cost.dtype)


# --- Inputs --------------------------------------------------------------------------------------------------------

TOKENS = 49  # the 7 x 7 grid of a 224 px image


def masks(seed: int, batch: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Query (row) and reference (column) masks ``[batch, 49]``: random at 30-70 % density, and at the start
    the edge cases: no rows, no columns, neither, a single token each side, both sides full."""
    generator = torch.Generator().manual_seed(seed)
    density = torch.rand(batch, 1, generator=generator) * 0.4 + 0.3
    rows = torch.rand(batch, TOKENS, generator=generator) < density
    cols = torch.rand(batch, TOKENS, generator=generator) < density
    rows[0] = False
    cols[1] = False
    rows[2] = cols[2] = False
    rows[3] = cols[3] = False
    rows[3, 17] = cols[3, 40] = True
    rows[4] = cols[4] = True
    return rows, cols


def features(seed: int, batch: int = 12, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and reference token features ``[batch, 49, 96]``, genuine-like (the query half the reference's)."""
    generator = torch.Generator().manual_seed(seed)
    # Scaled so that the l2 costs are ~1, as the cos ones: the pairs stop after 4 to 60 iterations.
    reference = torch.randn(batch, TOKENS, 96, generator=generator, dtype=dtype) / 96**0.5
    query = 0.5 * reference + 0.5 * torch.randn(batch, TOKENS, 96, generator=generator, dtype=dtype) / 96**0.5
    return query, reference


def weights(batch: int, dtype: torch.dtype) -> torch.Tensor:
    """Each pair's weight in the sum that ``distance_and_gradient`` differentiates: a gradient mixing pairs up
    would show."""
    return torch.linspace(0.5, 1.5, batch, dtype=dtype)


def distance_and_gradient(function: Callable[..., torch.Tensor], cost: torch.Tensor, rows: torch.Tensor,
                          cols: torch.Tensor, eps: float, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances ``[B]`` and the gradient of their sum with ``weights`` w.r.t. ``cost``."""
    leaf = cost.detach().clone().requires_grad_()
    distance = function(leaf, rows, cols, eps=eps, **options)
    (distance * weights(len(distance), distance.dtype)).sum().backward()
    return distance.detach(), leaf.grad


def relative(value: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference relative to the largest expected magnitude (a gradient's small entries are
    differences of large terms, so each is compared at the scale of the whole)."""
    return float((value.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-300))


def assert_distances_close(value: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Each distance within ``rtol`` of the expected one, relative to itself; exact 0 where that is 0."""
    value, expected = value.double(), expected.double()
    assert torch.equal(value == 0, expected == 0)
    assert float(((value - expected).abs() / expected.abs().clamp_min(1e-300)).max()) <= rtol


# --- Agreement with the padded implementation -----------------------------------------------------------------------


@pytest.mark.parametrize(("dis_type", "seed"), [("cos", 0), ("cos", 1), ("l2", 2)])
def test_float64_equals_the_padded_implementation(dis_type: str, seed: int) -> None:
    query, reference = features(seed, dtype=torch.float64)
    cost = pairwise_cost(query, reference, dis_type)
    rows, cols = masks(seed)
    for eps in (SINKHORN_EPS_TRAIN, SINKHORN_EPS_EVAL):
        expected = distance_and_gradient(padded_sinkhorn_emd, cost, rows, cols, eps)
        value = distance_and_gradient(sinkhorn_emd, cost, rows, cols, eps)
        assert_distances_close(value[0], expected[0], rtol=1e-12)
        assert (value[0][:3] == 0).all() and (value[0][3:] > 0).all()
        # At the evaluation epsilon the gradient is a sum of terms ~1 / eps = 2e7 times larger than itself, so
        # the order of the sums (over the packed width instead of 49) shows at ~1e-9 of it: the padded
        # implementation moves as much when the same tokens come in another order (test below).
        assert relative(value[1], expected[1]) <= (1e-12 if eps == SINKHORN_EPS_TRAIN else 1e-7)
        assert torch.isfinite(value[1]).all()


def test_the_evaluation_gradient_is_only_defined_to_its_rounding() -> None:
    """The padded implementation itself, on the same pairs with the tokens in another order, changes its
    evaluation-epsilon gradient about as much as the packed one differs from it (both 3.7e-10 here): 1e-7 bounds
    both, 1e-12 neither."""
    query, reference = features(3, dtype=torch.float64)
    rows, cols = masks(3)
    order = torch.randperm(TOKENS, generator=torch.Generator().manual_seed(0))
    cost = pairwise_cost(query, reference, "cos")
    expected = distance_and_gradient(padded_sinkhorn_emd, cost, rows, cols, SINKHORN_EPS_EVAL)
    shuffled = distance_and_gradient(padded_sinkhorn_emd, cost[:, order][:, :, order], rows[:, order], cols[:, order],
                                     SINKHORN_EPS_EVAL)
    back = torch.empty_like(shuffled[1])
    back[:, order[:, None], order[None, :]] = shuffled[1]
    packed = distance_and_gradient(sinkhorn_emd, cost, rows, cols, SINKHORN_EPS_EVAL)
    assert relative(back, expected[1]) <= 1e-7
    assert relative(packed[1], expected[1]) <= 1e-7
    assert_distances_close(shuffled[0], expected[0], rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_float32_at_the_training_epsilon_is_within_1e5(seed: int) -> None:
    query, reference = features(seed, batch=24)
    cost = pairwise_cost(query, reference, "cos")
    rows, cols = masks(seed, batch=24)
    expected = distance_and_gradient(padded_sinkhorn_emd, cost, rows, cols, SINKHORN_EPS_TRAIN)
    value = distance_and_gradient(sinkhorn_emd, cost, rows, cols, SINKHORN_EPS_TRAIN, dtype=torch.float32)
    assert value[0].dtype == value[1].dtype == torch.float32
    assert_distances_close(value[0], expected[0], rtol=1e-5)
    assert relative(value[1], expected[1]) <= 1e-5


def test_gradients_through_a_projection_like_head_str() -> None:
    """Features ``[B, 49, 384]`` through a Linear(384, 96), packed before it (``pack_valid``) or not."""
    torch.manual_seed(0)
    head = torch.nn.Linear(384, 96)
    with torch.no_grad():
        head.weight.normal_(0, 0.2)
    tokens_query, tokens_reference = torch.randn(16, TOKENS, 384), torch.randn(16, TOKENS, 384)
    rows, cols = masks(4, batch=16)

    def run(packed: bool, dtype: torch.dtype, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        head.zero_grad()
        if packed:
            query, query_kept = pack_valid(tokens_query, rows, head)
            reference, reference_kept = pack_valid(tokens_reference, cols, head)
            distance = sinkhorn_emd(pairwise_cost(query, reference, "cos"), query_kept, reference_kept, eps=eps,
                                    dtype=dtype)
        else:
            cost = pairwise_cost(head(tokens_query), head(tokens_reference), "cos")
            distance = padded_sinkhorn_emd(cost, rows, cols, eps=eps)
        distance.sum().backward()
        return distance.detach(), head.weight.grad.clone()

    for eps in (SINKHORN_EPS_TRAIN, SINKHORN_EPS_EVAL):
        expected = run(False, torch.float64, eps)
        value = run(True, torch.float64, eps)
        # The packed features take another path through the float32 matrix products (the cost moves by ~1e-7,
        # which at eps 5e-8 is 2 units of an exponent): tight at the training epsilon only.
        if eps == SINKHORN_EPS_TRAIN:
            assert_distances_close(value[0], expected[0], rtol=1e-5)
            assert relative(value[1], expected[1]) <= 1e-5
            value32 = run(True, torch.float32, eps)
            assert_distances_close(value32[0], expected[0], rtol=1e-5)
            assert relative(value32[1], expected[1]) <= 1e-5
        else:
            assert torch.isfinite(value[1]).all() and torch.equal(value[0] == 0, expected[0] == 0)


def test_the_plan_on_the_full_grid() -> None:
    query, reference = features(5, dtype=torch.float64)
    cost = pairwise_cost(query, reference, "cos")
    rows, cols = masks(5)
    valid = rows[:, :, None] & cols[:, None, :]
    for eps in (SINKHORN_EPS_TRAIN, SINKHORN_EPS_EVAL):
        expected = padded_plan(cost, rows, cols, eps)
        plan = sinkhorn_plan(cost, rows, cols, eps)
        assert plan.shape == cost.shape and plan.dtype == torch.float64
        assert (plan[~valid] == 0).all()
        torch.testing.assert_close(plan, expected, rtol=1e-12, atol=1e-15)
        plan32 = sinkhorn_plan(cost, rows, cols, eps, dtype=torch.float32)
        assert plan32.dtype == torch.float32 and (plan32[~valid] == 0).all()
        if eps == SINKHORN_EPS_TRAIN:
            torch.testing.assert_close(plan32.double(), expected, rtol=1e-5, atol=1e-8)


# --- Independence from the batch and from the check interval --------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_pair_alone_gets_what_it_gets_in_a_batch(dtype: torch.dtype) -> None:
    query, reference = features(6, dtype=dtype)
    cost = pairwise_cost(query, reference, "cos")
    rows, cols = masks(6)
    # float64: the packed width differs alone and in the batch, which reorders sums: ~1e-16 of the result.
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    for eps in ((SINKHORN_EPS_TRAIN, SINKHORN_EPS_EVAL) if dtype == torch.float64 else (SINKHORN_EPS_TRAIN,)):
        together = distance_and_gradient(sinkhorn_emd, cost, rows, cols, eps, dtype=dtype)
        for pair in range(len(cost)):
            alone = distance_and_gradient(sinkhorn_emd, cost[pair:pair + 1], rows[pair:pair + 1],
                                          cols[pair:pair + 1], eps, dtype=dtype)
            assert_distances_close(alone[0], together[0][pair:pair + 1], rtol=tolerance)
            if eps == SINKHORN_EPS_TRAIN and together[1][pair].abs().max() > 0:
                # In the batch pair i has the weight weights(...)[i]; alone it has 0.5.
                weight = weights(len(cost), dtype)[pair] / 0.5
                assert relative(alone[1][0] * weight, together[1][pair]) <= 10 * tolerance


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_check_interval_changes_nothing_bit_for_bit(dtype: torch.dtype) -> None:
    query, reference = features(7, dtype=dtype)
    cost = pairwise_cost(query, reference, "l2")  # l2: the pairs stop at many different iterations
    rows, cols = masks(7)
    for eps in (SINKHORN_EPS_TRAIN, SINKHORN_EPS_EVAL):
        results = [distance_and_gradient(sinkhorn_emd, cost, rows, cols, eps, dtype=dtype, check_every=every)
                   for every in (1, 3, 8)]
        for distance, gradient in results[1:]:
            assert torch.equal(distance, results[0][0]) and torch.equal(gradient, results[0][1])


def test_max_iter_is_each_pairs_own_cap() -> None:
    query, reference = features(8, dtype=torch.float64)
    cost = pairwise_cost(query, reference, "l2")
    rows, cols = masks(8)
    for max_iter in (0, 1, 5, 13):
        for every in (1, 4, 20):
            expected = distance_and_gradient(padded_sinkhorn_emd, cost, rows, cols, SINKHORN_EPS_TRAIN,
                                             max_iter=max_iter)
            value = distance_and_gradient(sinkhorn_emd, cost, rows, cols, SINKHORN_EPS_TRAIN, max_iter=max_iter,
                                          check_every=every)
            assert_distances_close(value[0], expected[0], rtol=1e-12)
            assert relative(value[1], expected[1]) <= 1e-12


# --- float32 details ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("banded", [(torch.float32,), (torch.float32, torch.float64)])
def test_float32_pairs_near_the_threshold_are_redone_in_float64(banded: tuple[torch.dtype, ...],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """With a band that takes in every decision, every float32 pair is computed in float64: by the scaling form,
    or (its band as wide) in the log domain."""
    query, reference = features(9)
    cost = pairwise_cost(query, reference, "cos")
    rows, cols = masks(9)
    float64 = distance_and_gradient(sinkhorn_emd, cost, rows, cols, SINKHORN_EPS_TRAIN)
    for dtype in banded:
        monkeypatch.setitem(sinkhorn._DECISION_BAND, dtype, 1e9)
    redone = distance_and_gradient(sinkhorn_emd, cost, rows, cols, SINKHORN_EPS_TRAIN, dtype=torch.float32)
    # float64's plan, rounded to float32 before the sum and the gradient's last steps.
    assert_distances_close(redone[0], float64[0], rtol=1e-6)
    assert relative(redone[1], float64[1]) <= 1e-6


def test_float32_padding_stays_finite() -> None:
    """float32 has no -1e300: padded entries and empty pairs give exact zeros and finite gradients."""
    query, reference = features(10)
    query.requires_grad_()
    rows, cols = masks(10)
    plan = sinkhorn_plan(pairwise_cost(query, reference, "l2"), rows, cols, SINKHORN_EPS_TRAIN, dtype=torch.float32)
    assert torch.isfinite(plan).all() and (plan[~(rows[:, :, None] & cols[:, None, :])] == 0).all()
    (plan * torch.rand_like(plan)).sum().backward()
    assert torch.isfinite(query.grad).all()


def test_bad_settings_are_refused() -> None:
    cost = torch.rand(1, 3, 3)
    valid = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="dtype"):
        sinkhorn_emd(cost, valid, valid, eps=0.05, dtype=torch.float16)
    with pytest.raises(ValueError, match="check_every"):
        sinkhorn_emd(cost, valid, valid, eps=0.05, check_every=0)


# --- Packing --------------------------------------------------------------------------------------------------------


def test_pack_valid_moves_the_valid_tokens_to_the_front_and_transforms_them_alone() -> None:
    tokens = torch.arange(3 * 4 * 2, dtype=torch.float32).view(3, 4, 2).requires_grad_()
    valid = torch.tensor([[False, True, False, True], [False, False, False, False], [True, True, True, False]])
    seen = []

    def double(values: torch.Tensor) -> torch.Tensor:
        seen.append(values.shape[0])
        return 2 * values

    packed, packed_valid = pack_valid(tokens, valid, double)
    assert seen == [5] and packed.shape == (3, 3, 2)
    assert packed_valid.tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    for item in range(3):
        torch.testing.assert_close(packed[item][packed_valid[item]], 2 * tokens[item][valid[item]])
    assert (packed[~packed_valid] == 0).all()
    packed.sum().backward()
    assert torch.equal(tokens.grad, 2 * valid[:, :, None].float().expand(-1, -1, 2))
    empty, empty_valid = pack_valid(tokens, torch.zeros(3, 4, dtype=torch.bool))
    assert empty.shape == (3, 0, 2) and empty_valid.shape == (3, 0)


def test_unit_rows_normalise_as_the_cos_cost_does() -> None:
    query, reference = features(12)
    query[0, :3] = 0  # zero rows (pack_valid's padding) stay zero, and get the clamped norm's gradient
    cost = pairwise_cost(query, reference, "cos")
    torch.testing.assert_close(pairwise_cost(unit_rows(query), unit_rows(reference), "cos", unit=True), cost,
                               rtol=0, atol=1e-6)
    gradients = []
    for normalise in (unit_rows, lambda rows: rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-8)):
        leaf = query.clone().requires_grad_()
        (normalise(leaf) * reference).sum().backward()
        gradients.append(leaf.grad)
    torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-5, atol=1e-5)


# --- The model's structural distance --------------------------------------------------------------------------------


@pytest.mark.parametrize("dis_type", ["cos", "l2"])
def test_the_model_picks_the_precision_from_its_mode(dis_type: str) -> None:
    torch.manual_seed(0)
    model = ViT_for_OSV_DSNet({"dis_type": dis_type})
    with torch.no_grad():
        model.head_str.weight.normal_(0, 0.2)
    rows, cols = masks(11)
    tokens_query, tokens_reference = torch.randn(12, TOKENS, 384), torch.randn(12, TOKENS, 384)
    query, reference = TokenFeatures(tokens_query, rows), TokenFeatures(tokens_reference, cols)

    def padded(eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        distance = padded_sinkhorn_emd(model._token_cost(reference, query), rows, cols, eps=eps)
        distance.sum().backward()
        return distance.detach(), model.head_str.weight.grad.clone()

    def new() -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        distance = model.structural_distance(reference, query)
        distance.sum().backward()
        return distance.detach(), model.head_str.weight.grad.clone()

    model.eval()
    expected, value = padded(SINKHORN_EPS_EVAL), new()
    assert value[0].dtype == torch.float32
    assert torch.equal(value[0], expected[0])  # the same float64 distances, rounded to float32 alike
    model.train()
    expected, value = padded(SINKHORN_EPS_TRAIN), new()
    assert_distances_close(value[0], expected[0], rtol=1e-5)
    assert relative(value[1], expected[1]) <= 1e-5
