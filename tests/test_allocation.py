"""Tests of solvers.allocation: uniform / OWL / softmax rules against float64 references, and the reconciler."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from solvers.allocation import (
    BudgetReconciler,
    outlier_ratio,
    owl_allocation,
    scaled_allocation,
    softmax_allocation,
    standardize_energy,
    uniform_allocation,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _budget(P: torch.Tensor, s: torch.Tensor) -> float:
    return float((P * s).sum() / P.sum())


def _ref_softmax(E: np.ndarray, P: np.ndarray, S: float, T: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Plain bisection on ``log c`` (400 halvings) for ``Σ P clip(c e^{−E/T}, lo, hi) = S Σ P``."""
    f = lambda u: np.clip(np.exp(u - E / T), lo, hi)
    a, b = -1e3, 1e3
    for _ in range(400):
        mid = 0.5 * (a + b)
        a, b = (mid, b) if (P * f(mid)).sum() < S * P.sum() else (a, mid)
    return f(0.5 * (a + b))


def _random_problem(g: torch.Generator) -> dict:
    L = int(torch.randint(1, 40, (1,), generator=g))
    P = torch.randint(1, 10_000, (L,), generator=g).double()
    E = standardize_energy(torch.randn(L, generator=g, dtype=torch.float64))
    if torch.rand(1, generator=g) < 0.5:
        lo, hi = sorted(torch.rand(2, generator=g, dtype=torch.float64).tolist())
    else:
        lo = 0.3 * torch.rand(L, generator=g, dtype=torch.float64)
        hi = lo + (1 - lo) * torch.rand(L, generator=g, dtype=torch.float64)
    lo_t = torch.as_tensor(lo, dtype=torch.float64).expand(L)
    hi_t = torch.as_tensor(hi, dtype=torch.float64).expand(L)
    u = float(torch.rand(1, generator=g, dtype=torch.float64))
    S = _budget(P, lo_t + u * (hi_t - lo_t))  # always feasible
    T = 10 ** float(torch.empty(1).uniform_(-1.5, 1.5, generator=g))
    return {"E": E, "P": P, "S": S, "T": T, "lo": lo, "hi": hi, "lo_t": lo_t, "hi_t": hi_t}


# ---------------------------------------------------------------- uniform, standardisation, outlier ratio


def test_uniform_allocation() -> None:
    assert_close(uniform_allocation([10, 20, 30], 0.3), torch.full((3,), 0.3, dtype=torch.float64))
    with pytest.raises(ValueError, match="S must lie in"):
        uniform_allocation([1, 2], 1.5)


def test_standardize_energy() -> None:
    x = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    z = standardize_energy(x)
    assert_close(z.mean(), torch.tensor(0.0, dtype=torch.float64), atol=1e-15, rtol=0)
    assert_close(z.std(unbiased=False), torch.tensor(1.0, dtype=torch.float64))
    assert_close(standardize_energy(x, log=True), standardize_energy(x.log()))
    assert_close(standardize_energy([3.0, 3.0, 3.0]), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="strictly positive"):
        standardize_energy([1.0, 0.0], log=True)


def test_outlier_ratio_hand_example() -> None:
    scores = torch.ones(100)
    scores[7] = 1000.0  # mean 10.99, threshold 54.95: exactly one outlier
    assert outlier_ratio(scores) == pytest.approx(0.01)
    assert outlier_ratio(scores, M=200.0) == 0.0
    parts = [scores[:30].reshape(5, 6), scores[30:]]
    assert outlier_ratio(parts) == outlier_ratio(scores)


# ---------------------------------------------------------------- OWL


def test_owl_mean_spread_and_order() -> None:
    D = torch.tensor([0.01, 0.05, 0.02, 0.09, 0.03], dtype=torch.float64)
    s = owl_allocation(D, 0.5, lam=0.08)
    assert float(s.mean()) == pytest.approx(0.5, abs=1e-15)
    assert float(s.max() - s.min()) == pytest.approx(0.16, abs=1e-15)
    assert torch.equal(torch.argsort(s), torch.argsort(-D))  # more outliers, less pruning
    assert bool(((s - 0.5).abs() <= 2 * 0.08 + 1e-15).all())


def test_owl_symmetric_within_lambda_and_constant_is_uniform() -> None:
    s = owl_allocation([0.0, 0.25, 0.5, 0.75, 1.0], 0.4, lam=0.1)
    assert_close(s, torch.tensor([0.5, 0.45, 0.4, 0.35, 0.3], dtype=torch.float64))
    assert_close(owl_allocation([0.02] * 4, 0.3), uniform_allocation([1] * 4, 0.3))


def test_owl_infeasible_and_weighted_budget_via_reconciler() -> None:
    with pytest.raises(ValueError, match="outside \\[0, 1\\]; lower lam"):
        owl_allocation([0.0, 1.0, 0.0], 0.02, lam=0.08)
    P = torch.tensor([100.0, 400.0, 50.0, 900.0], dtype=torch.float64)
    s_owl = owl_allocation([0.01, 0.05, 0.02, 0.09], 0.3)
    assert abs(_budget(P, s_owl) - 0.3) > 1e-3  # OWL alone ignores layer sizes
    rec = BudgetReconciler(s_owl, P, 0.3)
    assert _budget(P, rec.current) == pytest.approx(0.3, abs=1e-12)


# ---------------------------------------------------------------- softmax


def test_softmax_worked_example() -> None:
    s = softmax_allocation([0.0, math.log(2.0)], [1, 1], 0.3, T=1.0)
    assert_close(s, torch.tensor([0.4, 0.2], dtype=torch.float64))


def test_softmax_infinite_temperature_is_uniform() -> None:
    g = _gen(1)
    E, P = torch.randn(12, generator=g, dtype=torch.float64), torch.randint(1, 100, (12,), generator=g).double()
    assert torch.equal(softmax_allocation(E, P, 0.35, T=math.inf), uniform_allocation(P, 0.35))
    assert_close(softmax_allocation(E, P, 0.35, T=1e9), uniform_allocation(P, 0.35), atol=1e-8, rtol=0)


@pytest.mark.parametrize("T", [1e-3, 1e-8, 1e-14])
def test_softmax_zero_temperature_fills_lowest_energies(T: float) -> None:
    g = _gen(2)
    L, s_min, s_max, S = 16, 0.05, 0.8, 0.4
    E = standardize_energy(torch.randn(L, generator=g, dtype=torch.float64))
    P = torch.randint(10, 1000, (L,), generator=g).double()
    s = softmax_allocation(E, P, S, T=T, s_min=s_min, s_max=s_max)
    ref, left = torch.full((L,), s_min, dtype=torch.float64), S * float(P.sum()) - s_min * float(P.sum())
    for l in torch.argsort(E).tolist():  # greedy water-filling from the lowest energy
        take = min(left, (s_max - s_min) * float(P[l]))
        ref[l] += take / float(P[l])
        left -= take
    assert_close(s, ref, atol=1e-12, rtol=0)
    assert _budget(P, s) == pytest.approx(S, abs=1e-12)


def test_softmax_random_problems_bounds_budget_and_reference() -> None:
    g = _gen(3)
    for _ in range(100):
        pr = _random_problem(g)
        s = softmax_allocation(pr["E"], pr["P"], pr["S"], T=pr["T"], s_min=pr["lo"], s_max=pr["hi"])
        assert bool((s >= pr["lo_t"]).all()) and bool((s <= pr["hi_t"]).all())
        assert abs(_budget(pr["P"], s) - pr["S"]) <= 1e-9
        ref = _ref_softmax(pr["E"].numpy(), pr["P"].numpy(), pr["S"], pr["T"], pr["lo_t"].numpy(), pr["hi_t"].numpy())
        assert_close(s, torch.from_numpy(ref), atol=1e-9, rtol=0)


def test_softmax_is_monotone_in_energy() -> None:
    g = _gen(4)
    E = torch.randn(20, generator=g, dtype=torch.float64)
    s = softmax_allocation(E, torch.ones(20), 0.5, T=0.7, s_min=0.1, s_max=0.9)
    order = torch.argsort(E)
    assert bool((s[order][1:] <= s[order][:-1]).all())


def test_softmax_per_layer_bounds_keep_dense_layers_dense() -> None:
    hi = torch.tensor([0.0, 0.8, 0.8, 0.0], dtype=torch.float64)
    s = softmax_allocation([-2.0, 0.0, 1.0, -3.0], [1, 1, 1, 1], 0.2, T=1.0, s_max=hi)
    assert s[0] == 0.0 and s[3] == 0.0
    assert _budget(torch.ones(4), s) == pytest.approx(0.2, abs=1e-15)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"S": 0.9}, "infeasible"),
        ({"S": 0.05, "s_min": 0.1}, "infeasible"),
        ({"S": 0.3, "s_min": 0.5, "s_max": 0.4}, "s_min <= s_max"),
        ({"S": 0.3, "T": 0.0}, "T must be > 0"),
        ({"S": 0.3, "P": [1, -1, 1]}, ">= 0"),
        ({"S": 0.3, "P": [1, 1]}, "expected 3"),
        ({"S": 0.3, "E": [0.0, math.nan, 1.0]}, "NaN"),
        ({"S": 0.3, "s_max": [0.5, 0.5]}, "one value per layer"),
    ],
)
def test_softmax_errors(kwargs: dict, match: str) -> None:
    args = {"E": [0.0, 1.0, 2.0], "P": [1, 1, 1]} | kwargs
    with pytest.raises(ValueError, match=match):
        softmax_allocation(args.pop("E"), args.pop("P"), args.pop("S"), **args)


def test_scaled_allocation_zero_weights_stay_at_min() -> None:
    w = torch.tensor([0.0, -math.inf, math.log(0.5)], dtype=torch.float64)
    s = scaled_allocation(w, [1, 1, 1], 0.3, s_min=0.1, s_max=0.9)
    assert s[1] == 0.1
    assert _budget(torch.ones(3), s) == pytest.approx(0.3, abs=1e-15)
    with pytest.raises(ValueError, match="infeasible"):
        scaled_allocation(w, [1, 1, 1], 0.7, s_min=0.1, s_max=0.9)  # max reachable (0.9 + 0.1 + 0.9) / 3


# ---------------------------------------------------------------- reconciler


def _run_with_rounding(rec: BudgetReconciler, units: torch.Tensor, g: torch.Generator) -> None:
    for l in range(rec.P.numel()):
        want = rec.planned_removed(l) / float(units[l])
        n = math.floor(want) if torch.rand(1, generator=g) < 0.5 else math.ceil(want)
        rec.record(l, min(max(n, 0) * float(units[l]), float(rec.P[l])))


def test_reconciler_property_random_rounding() -> None:
    g = _gen(5)
    for _ in range(120):
        L = int(torch.randint(2, 40, (1,), generator=g))
        units = torch.randint(1, 5000, (L,), generator=g).double()  # params per head / channel
        P = units * torch.randint(4, 64, (L,), generator=g).double()
        S = float(torch.empty(1).uniform_(0.05, 0.7, generator=g))
        T = 10 ** float(torch.empty(1).uniform_(-1.5, 1.0, generator=g))
        plan = softmax_allocation(standardize_energy(torch.randn(L, generator=g)), P, S, T=T, s_max=0.8)
        rec = BudgetReconciler(plan, P, S, s_max=0.8, units=units)
        _run_with_rounding(rec, units, g)
        assert abs(rec.final_error()) <= max(1e-3 * rec.target_removed, float(units.max()))
        assert not math.isnan(float(rec.planned_at_visit.sum()))


def test_reconciler_without_rounding_is_exact_and_keeps_plan() -> None:
    P = torch.tensor([100.0, 200.0, 300.0], dtype=torch.float64)
    plan = softmax_allocation([1.0, 0.0, -1.0], P, 0.3)
    rec = BudgetReconciler(plan, P)
    assert abs(rec.S - 0.3) < 1e-12
    for l in range(3):
        rec.record(l, rec.planned_removed(l))
    assert_close(rec.achieved, plan)
    assert abs(rec.final_error()) < 1e-9


def test_reconciler_rebalances_proportionally() -> None:
    P = torch.full((3,), 100.0, dtype=torch.float64)
    rec = BudgetReconciler([0.2, 0.4, 0.2], P, 0.8 / 3)
    plan = rec.record(0, 0.0)  # 20 short: the rest scale by 80/60
    assert_close(plan, torch.tensor([0.0, 0.4 * 80 / 60, 0.2 * 80 / 60], dtype=torch.float64))


def test_reconciler_guard_keeps_the_rest_reachable() -> None:
    P = torch.full((3,), 100.0, dtype=torch.float64)
    rec = BudgetReconciler([0.5, 0.8, 0.8], P, 0.7, s_max=0.8, units=10.0)
    # the tail reaches at most 160 of 210, and must keep 10 of room for layer 1's rounding (layer 2, the last,
    # needs none); layer 0 itself may round 10 low: it plans 210 - 150 + 10 = 70, the tail 140
    assert_close(rec.current, torch.tensor([0.7, 0.7, 0.7], dtype=torch.float64))
    unguarded = BudgetReconciler([0.5, 0.8, 0.8], P, 0.7, s_max=0.8)
    assert_close(unguarded.current, torch.tensor([0.5, 0.8, 0.8], dtype=torch.float64))


def test_reconciler_zero_planned_layers_help_when_needed() -> None:
    P = torch.full((3,), 100.0, dtype=torch.float64)
    rec = BudgetReconciler([0.5, 0.5, 0.0], P, 1 / 3, s_max=0.5)
    plan = rec.record(0, 0.0)  # 100 left for two layers; layer 1 caps at 50, layer 2 was planned at zero
    assert_close(plan, torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64))


def test_reconciler_out_of_reach_clamps_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    rec = BudgetReconciler([0.1, 0.1], [100, 100], 0.1, s_max=0.2)
    with caplog.at_level(logging.WARNING, logger="solvers.allocation"):
        plan = rec.record(0, 0.0)  # 20 needed from a layer capped at 20: reachable, no warning
        assert not caplog.records
        assert_close(plan, torch.tensor([0.0, 0.2], dtype=torch.float64))
    rec = BudgetReconciler([0.1, 0.1], [100, 100], 0.1, s_max=0.2)
    with caplog.at_level(logging.WARNING, logger="solvers.allocation"):
        plan = rec.record(0, 100.0)  # overshoot: the rest goes to s_min
    assert plan[1] == 0.0 and "outside the bounds' reach" in caplog.text
    assert rec.record(1, 0.0)[1] == 0.0 and rec.final_error() == pytest.approx(80.0)


def test_reconciler_errors() -> None:
    rec = BudgetReconciler([0.3, 0.3], [10, 10])
    with pytest.raises(ValueError, match="not recorded yet"):
        rec.final_error()
    rec.record(0, 3.0)
    with pytest.raises(ValueError, match="already recorded"):
        rec.record(0, 3.0)
    with pytest.raises(ValueError, match="removed 11"):
        rec.record(1, 11.0)
    with pytest.raises(IndexError, match="out of range"):
        rec.planned_sparsity(2)
    with pytest.raises(ValueError, match="outside the bounds' reach"):
        BudgetReconciler([0.3, 0.3], [10, 10], 0.9, s_max=0.8)


def test_reconciler_state_round_trip() -> None:
    g = _gen(6)
    P = torch.randint(100, 1000, (6,), generator=g).double()
    rec = BudgetReconciler(softmax_allocation(torch.randn(6, generator=g), P, 0.3), P, 0.3, s_max=0.8)
    rec.record(0, 17.0)
    rec.record(1, 250.0)
    again = BudgetReconciler.from_state_dict(json.loads(json.dumps(rec.state_dict())))
    assert again.state_dict() == rec.state_dict()
    assert_close(again.current, rec.current)
    assert again.remaining == [2, 3, 4, 5]


# ---------------------------------------------------------------- within a layer, interpolation


def test_best_head_count_examples() -> None:
    from solvers.allocation import best_head_count

    grid = [0.0, 0.25]
    assert best_head_count(10, 10, 40, [0.0, 0.5], grid, [0.0, 0.2]) == 0  # the docstring's example
    assert best_head_count(10, 10, 40, [0.0, 0.1], grid, [0.0, 0.2]) == 1  # now the group is cheaper
    assert best_head_count(45, 10, 40, [0.0, 0.1, 0.2], [0.0, 1.0], [0.0, 1.0], max_channel_fraction=0.5) == 2
    assert best_head_count(100, 10, 40, [0.0, 0.1, 0.2], [0.0, 1.0], [0.0, 1.0], max_channel_fraction=0.5) == 2
    assert best_head_count(26, 10, 0, [0.0, 1.0, 2.0, 3.0], [], []) == 3  # heads only: nearest count, capped


def test_best_head_count_brute_force() -> None:
    from solvers.allocation import best_head_count

    g = _gen(7)
    for _ in range(50):
        n = int(torch.randint(2, 8, (1,), generator=g))
        herr = torch.cat([torch.zeros(1), torch.rand(n - 1, generator=g).cumsum(0)]).double()
        grid = torch.linspace(0, 1, 9, dtype=torch.float64)
        cerr = (torch.rand(9, generator=g, dtype=torch.float64) * 0.3).cumsum(0)
        cerr = cerr - float(cerr[0])
        hp, cp = float(torch.randint(5, 50, (1,), generator=g)), float(torch.randint(50, 500, (1,), generator=g))
        x = float(torch.rand(1, generator=g)) * (cp + hp * (n - 1))
        costs = {
            r: float(herr[r]) + float(np.interp((x - r * hp) / cp, grid.numpy(), cerr.numpy()))
            for r in range(n)
            if 0 <= x - r * hp <= cp
        }
        want = min(costs, key=lambda r: (costs[r], r)) if costs else n - 1
        assert best_head_count(x, hp, cp, herr, grid, cerr) == want


def test_interpolate_log() -> None:
    from solvers.allocation import interpolate_log

    assert interpolate_log([0.1, 0.3], [1e-3, 1e-1], 0.2) == pytest.approx(1e-2)
    assert interpolate_log([0.1, 0.3], [1e-3, 1e-1], 0.05) == pytest.approx(1e-3)  # clamped to the ends
    assert interpolate_log([0.1, 0.3], [1e-3, 1e-1], 0.3) == pytest.approx(1e-1)
    assert interpolate_log([0.1, 0.2, 0.4], [0.0, 1e-2, 1e-2], 0.15, floor=1e-6) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="sorted"):
        interpolate_log([0.3, 0.1], [1.0, 2.0], 0.2)


def test_reconciler_property_per_layer_bounds_and_coarse_units() -> None:
    """Per-layer caps (as whole units allow), coarse layers (few units) and a plan from every rule: any rounding
    to the layer's units lands within 0.1% of the target or one (coarsest) unit, and every layer is asked for a
    sparsity inside its bounds."""
    g = _gen(8)
    for trial in range(150):
        L = int(torch.randint(2, 30, (1,), generator=g))
        units = torch.randint(50, 3000, (L,), generator=g).double()
        P = units * torch.randint(3, 200, (L,), generator=g).double()
        hi = torch.minimum(torch.full((L,), 0.8, dtype=torch.float64), 1 - units / P)  # keep at least one unit
        S = float(torch.empty(1).uniform_(0.05, 0.6, generator=g)) * float((P * hi).sum() / P.sum())
        rule = trial % 3
        if rule == 0:
            plan = uniform_allocation(P, S)
        elif rule == 1:
            plan = owl_allocation(torch.rand(L, generator=g), max(S, 0.17), lam=0.08).clamp(0, 1)
        else:
            plan = softmax_allocation(torch.randn(L, generator=g), P, S, T=0.3, s_max=hi)
        rec = BudgetReconciler(plan.clamp(max=hi), P, S, s_max=hi, units=units)
        _run_with_rounding(rec, units, g)
        # one unit of the coarsest layer: a tiny last layer cannot absorb a coarse neighbour's rounding
        assert abs(rec.final_error()) <= max(1e-3 * rec.target_removed, float(units.max())) + 1e-6
        visit = rec.planned_at_visit  # what each layer was asked for (its own rounding may then exceed it)
        assert bool((visit <= hi + 1e-12).all()) and bool((visit >= 0).all())
