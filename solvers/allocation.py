"""Per-layer sparsity under one global budget: uniform, OWL and softmax rules, and a budget reconciler.

Notation: ``L`` layers, ``P_l`` prunable parameters of layer ``l``, global target ``S`` (fraction of
``Σ P_l`` removed), per-layer sparsity ``s_l``. Every rule returns a float64 tensor ``s [L]``.

- uniform: ``s_l = S``.
- OWL (Yin et al. 2023, "Outlier Weighed Layerwise sparsity"): ``D_l`` = share of the layer's Wanda scores above
  ``M · mean`` (M = 5); ``r_l = 2λ (D_l − min D) / (max D − min D)``; ``s_l = S − (r_l − mean r)`` (λ = 0.08).
  Layers with more outliers are pruned less; the *unweighted* mean of ``s`` is ``S`` and ``max s − min s = 2λ``.
- softmax (StructPrune's energy form): ``s_l = clip(c · exp(−E_l / T), s_min, s_max)`` with ``c`` such that
  ``Σ P_l s_l = S · Σ P_l``. Low energy = cheap to prune = more sparsity. ``T → ∞`` gives uniform, ``T → 0`` fills
  the lowest-energy layers up to ``s_max`` first.

The scale ``c`` is found exactly, not by a numeric tolerance: ``f(c) = Σ P_l clip(c w_l, lo_l, hi_l)`` is
continuous, nondecreasing and piecewise linear in ``c`` with breakpoints ``lo_l / w_l`` and ``hi_l / w_l``. A
bisection (``searchsorted``) over the sorted breakpoints finds the segment holding the target; on that segment the
set of unclipped layers is fixed and ``c = (target − clipped sum) / Σ_free P_l w_l`` in closed form. Everything is
computed in log space (``log w_l = −E_l / T``), so ``T = 1e-12`` or ``T = inf`` are fine.

:class:`BudgetReconciler` then keeps the global count exact while layers report what rounding to heads, KV groups,
channels or hardware multiples really removed (its docstring states the re-balancing rule).

Worked example (softmax): ``E = [0, ln 2]``, ``T = 1``, ``P = [1, 1]``, ``S = 0.3``, no active bounds:
``w = [1, 0.5]``, ``c (1 + 0.5) = 0.6`` → ``c = 0.4``, ``s = [0.4, 0.2]``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "BudgetReconciler",
    "best_head_count",
    "interpolate_log",
    "owl_allocation",
    "outlier_ratio",
    "scaled_allocation",
    "softmax_allocation",
    "standardize_energy",
    "uniform_allocation",
]

logger = logging.getLogger(__name__)

Vector = Tensor | Sequence[float]
Bound = float | Vector


def _vec(x: Bound, name: str) -> Tensor:
    """A finite-or-inf 1-D float64 CPU tensor from a tensor or a sequence; NaN is refused."""
    t = torch.as_tensor(x, dtype=torch.float64).detach().cpu().reshape(-1).clone()
    if t.numel() == 0:
        raise ValueError(f"allocation: {name} is empty")
    if bool(torch.isnan(t).any()):
        raise ValueError(f"allocation: {name} contains NaN")
    return t


def _params(P: Vector, n: int | None = None) -> Tensor:
    P = _vec(P, "P (prunable parameters per layer)")
    if n is not None and P.numel() != n:
        raise ValueError(f"allocation: P has {P.numel()} layers, expected {n}")
    if not bool(torch.isfinite(P).all()) or bool((P < 0).any()) or float(P.sum()) <= 0:
        raise ValueError("allocation: P (prunable parameters per layer) must be finite, >= 0, with a positive sum")
    return P


def _target(S: float) -> float:
    if not 0.0 <= float(S) <= 1.0:
        raise ValueError(f"allocation: global target S must lie in [0, 1], got {S}")
    return float(S)


def _per_layer(x: Bound, name: str, n: int) -> Tensor:
    """A scalar or one value per layer, as an ``[n]`` float64 tensor."""
    t = _vec(x, name)
    if t.numel() not in (1, n):
        raise ValueError(f"allocation: {name} must be a scalar or have one value per layer ({n}), got {t.numel()}")
    return t.expand(n).clone()


def _bounds(s_min: Bound, s_max: Bound, n: int) -> tuple[Tensor, Tensor]:
    """``s_min``/``s_max`` as ``[n]`` tensors, checked ``0 <= lo <= hi <= 1``."""
    lo, hi = _per_layer(s_min, "s_min", n), _per_layer(s_max, "s_max", n)
    if bool((lo < 0).any()) or bool((hi > 1).any()) or bool((lo > hi).any()):
        raise ValueError(f"allocation: need 0 <= s_min <= s_max <= 1, got s_min={s_min}, s_max={s_max}")
    return lo, hi


# ---------------------------------------------------------------- simple rules


def uniform_allocation(P: Vector, S: float) -> Tensor:
    """``s_l = S`` for every layer (``P`` only fixes the number of layers)."""
    return torch.full((_params(P).numel(),), _target(S), dtype=torch.float64)


def outlier_ratio(scores: Tensor | Sequence[Tensor], M: float = 5.0) -> float:
    """OWL's layer outlier ratio ``D = #{S_ij > M · mean(S)} / #S`` over all Wanda scores of one layer.

    ``scores`` is one tensor or the list of the layer's per-linear score tensors (concatenated, as OWL does).
    """
    flat = (
        torch.cat([t.detach().reshape(-1).double() for t in scores])
        if not isinstance(scores, Tensor)
        else scores.detach().reshape(-1).double()
    )
    if flat.numel() == 0:
        raise ValueError("outlier_ratio: no scores")
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("outlier_ratio: scores contain NaN or inf")
    return float((flat > M * flat.mean()).double().mean())


def owl_allocation(D: Vector, S: float, *, lam: float = 0.08) -> Tensor:
    """OWL: ``s_l = S − (r_l − mean r)``, ``r_l = 2λ (D_l − min D)/(max D − min D)``; constant ``D`` gives uniform.

    The unweighted mean of ``s`` is exactly ``S`` and the spread is ``max s − min s = 2λ`` (so ``s_l`` lies in
    ``[S − 2λ, S + 2λ]``; it is ``[S − λ, S + λ]`` only when ``mean r = λ``, e.g. for symmetric ``D``). OWL assumes
    equal-sized layers; with unequal ``P`` pass the result through :class:`BudgetReconciler` (or
    :func:`scaled_allocation`) to land on the parameter-weighted budget. A result outside ``[0, 1]`` is an error.
    """
    D, S = _vec(D, "D (outlier ratios)"), _target(S)
    if lam < 0 or not math.isfinite(lam):
        raise ValueError(f"owl_allocation: lam must be finite and >= 0, got {lam}")
    spread = float(D.max() - D.min())
    r = torch.zeros_like(D) if spread == 0.0 else 2.0 * lam * (D - D.min()) / spread
    s = S - (r - r.mean())
    if bool((s < 0).any()) or bool((s > 1).any()):
        raise ValueError(
            f"owl_allocation: S={S} with lam={lam} gives sparsities in [{float(s.min()):.4f}, "
            f"{float(s.max()):.4f}], outside [0, 1]; lower lam"
        )
    return s


def standardize_energy(x: Vector, *, log: bool = False) -> Tensor:
    """``(x − mean x) / std x`` (population std) in float64; ``log=True`` standardises ``ln x`` (needs ``x > 0``).

    A constant ``x`` gives zeros (every layer equally prunable).
    """
    x = _vec(x, "energy")
    if log:
        if bool((x <= 0).any()):
            raise ValueError("standardize_energy: log=True needs strictly positive values")
        x = x.log()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("standardize_energy: values must be finite")
    std = float(x.std(unbiased=False)) if x.numel() > 1 else 0.0
    return torch.zeros_like(x) if std == 0.0 else (x - x.mean()) / std


# ---------------------------------------------------------------- exact scaled allocation


def _layer_breakpoints(logw: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Per layer, the ``log c`` where it leaves ``lo`` (``a_l``) and reaches ``hi`` (``b_l``); ±inf when never."""
    inf = torch.full_like(logw, math.inf)
    a = torch.where(lo > 0, lo.log() - logw, -inf)
    b = torch.where(hi > 0, hi.log() - logw, -inf)
    never = torch.isneginf(logw)  # zero weight: sits at lo for every c
    return torch.where(never, inf, a), torch.where(never, inf, b)


def _values_at(u: Tensor, logw: Tensor, a: Tensor, b: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``s_l`` at the breakpoints ``u [K]`` → ``[K, L]``; the clip side is decided by comparing breakpoints."""
    u, a, b = u[:, None], a[None, :], b[None, :]
    free = (u + logw[None, :]).exp().clamp(lo, hi)
    return torch.where(u >= b, hi, torch.where(u <= a, lo, free))


def scaled_allocation(
    w_log: Vector, P: Vector, S: float, *, s_min: Bound = 0.0, s_max: Bound = 1.0, tol: float = 1e-10
) -> Tensor:
    """``s_l = clip(c · exp(w_log_l), s_min, s_max)`` with ``c`` exact such that ``Σ P_l s_l = S Σ P_l``.

    ``w_log`` may hold ``-inf`` (a layer that stays at ``s_min``). Raises ``ValueError`` when the target lies
    outside the reachable ``[Σ P s_min, Σ P s_max]`` (``s_min`` for ``-inf`` layers in both); ``tol`` bounds the
    relative budget error that is accepted (the closed form lands within rounding, ~1e-15).
    """
    logw = _vec(w_log, "log weights")
    if bool(torch.isposinf(logw).any()):
        raise ValueError("scaled_allocation: log weights must be < +inf")
    P, S = _params(P, logw.numel()), _target(S)
    lo, hi = _bounds(s_min, s_max, logw.numel())
    total = float(P.sum())
    # a zero-weight layer (log w = -inf) never leaves s_min, so it caps the reachable maximum too
    target, floor = S * total, float((P * lo).sum())
    ceil = float((P * torch.where(torch.isneginf(logw), lo, hi)).sum())
    slack = tol * total
    if not floor - slack <= target <= ceil + slack:
        raise ValueError(
            f"allocation: target S={S:.6g} is infeasible with bounds: reachable "
            f"[{floor / total:.6g}, {ceil / total:.6g}] of the prunable parameters"
        )
    if target <= floor:
        return lo
    if target >= ceil:
        return torch.where(torch.isneginf(logw), lo, hi)
    s = _solve_segment(logw, P, target, lo, hi)
    err = abs(float((P * s).sum()) - target)
    if err > slack:
        raise RuntimeError(f"allocation: budget missed by {err / total:.3g} of the parameters (tol {tol})")
    return s


def _solve_segment(logw: Tensor, P: Tensor, target: float, lo: Tensor, hi: Tensor) -> Tensor:
    a, b = _layer_breakpoints(logw, lo, hi)
    knots = torch.cat([a, b])
    knots = torch.unique(knots[torch.isfinite(knots)])  # sorted
    F = (_values_at(knots, logw, a, b, lo, hi) * P).sum(1)
    k = int(torch.searchsorted(F, torch.tensor([target], dtype=torch.float64))[0])  # first F[k] >= target
    if k < knots.numel() and float(F[k]) == target:
        return _values_at(knots[k : k + 1], logw, a, b, lo, hi)[0]
    left = knots[k - 1] if k > 0 else torch.tensor(-math.inf, dtype=torch.float64)
    right = knots[k] if k < knots.numel() else torch.tensor(math.inf, dtype=torch.float64)
    at_hi, at_lo = b <= left, a >= right
    free = ~(at_hi | at_lo)
    clipped = float((P * torch.where(at_hi, hi, lo))[~free].sum())
    g = logw[free] - logw[free].max()  # relative weights, the largest is 1: no overflow for tiny T
    scale = (target - clipped) / float((P[free] * g.exp()).sum())
    s = torch.where(at_hi, hi, lo)
    s[free] = (scale * g.exp()).clamp(lo[free], hi[free])
    return s


def softmax_allocation(
    E: Vector, P: Vector, S: float, *, T: float = 1.0, s_min: Bound = 0.0, s_max: Bound = 0.8, tol: float = 1e-10
) -> Tensor:
    """``s_l = clip(c · exp(−E_l / T), s_min, s_max)``, ``c`` exact so that ``Σ P_l s_l = S · Σ P_l``.

    ``E`` should be standardised (:func:`standardize_energy`). ``T = inf`` gives ``exp(0) = 1``: uniform.
    An infeasible target (``S`` outside the bounds' reach) raises ``ValueError``.
    """
    if not T > 0:
        raise ValueError(f"softmax_allocation: temperature T must be > 0, got {T}")
    E = _vec(E, "E (layer energies)")
    if not bool(torch.isfinite(E).all()):
        raise ValueError("softmax_allocation: energies must be finite")
    w_log = torch.zeros_like(E) if math.isinf(T) else -E / T
    return scaled_allocation(w_log, P, S, s_min=s_min, s_max=s_max, tol=tol)


# ---------------------------------------------------------------- within a layer


def interpolate_log(x: Vector, y: Vector, at: float, *, floor: float = 1e-12) -> float:
    """Piecewise-linear interpolation of ``log max(y, floor)`` over sorted ``x`` at ``at``, returned as ``exp``.

    Errors of a pruned layer grow roughly geometrically with the removed fraction, so interpolating their logarithm
    is closer than interpolating the values. ``at`` outside ``[x_0, x_{-1}]`` takes the nearest end's value.
    Example: ``x = [0.1, 0.3]``, ``y = [1e-3, 1e-1]``, ``at = 0.2`` gives ``1e-2``.
    """
    xs, ys = _vec(x, "interpolation abscissae"), _vec(y, "interpolation values").clamp_min(floor).log()
    if xs.numel() != ys.numel() or bool((xs[1:] < xs[:-1]).any()):
        raise ValueError("interpolate_log: x must be sorted and as long as y")
    if at <= float(xs[0]):
        return float(ys[0].exp())
    if at >= float(xs[-1]):
        return float(ys[-1].exp())
    k = int(torch.searchsorted(xs, torch.tensor([at], dtype=torch.float64), right=True)[0])
    x0, x1, y0, y1 = float(xs[k - 1]), float(xs[k]), float(ys[k - 1]), float(ys[k])
    t = 0.0 if x1 == x0 else (at - x0) / (x1 - x0)
    return math.exp(y0 + t * (y1 - y0))


def best_head_count(
    x: float,
    head_params: float,
    channel_params: float,
    head_error: Vector,
    channel_grid: Vector,
    channel_error: Vector,
    *,
    max_channel_fraction: float = 1.0,
) -> int:
    """KV groups ``r`` to remove from a layer that loses ``x`` parameters: the ``r`` minimising the predicted error

        err(r) = head_error[r] + interp(channel_grid, channel_error, (x − r·head_params) / channel_params)

    over ``r = 0 .. len(head_error) − 1`` with ``0 <= x − r·head_params <= max_channel_fraction · channel_params``
    (the channels take the rest); ties go to fewer groups. ``head_error[r]`` / ``channel_error`` are the layer's
    output errors when only ``r`` groups / only that fraction of the channels are removed (same normaliser).
    No feasible ``r`` (``x`` beyond what the channels can take with any ``r``): the largest ``r``. No channels
    (``channel_params = 0``): ``r = round(x / head_params)`` within range.

    Example: ``x = 10``, ``head_params = 10``, ``channel_params = 40``, ``head_error = [0, 0.5]``, grid ``[0, 0.25]``,
    ``channel_error = [0, 0.2]``: ``r = 0`` costs ``0.2`` (a quarter of the channels), ``r = 1`` costs ``0.5``: 0.
    """
    herr = _vec(head_error, "head errors")
    n = herr.numel()
    if head_params <= 0:
        raise ValueError(f"best_head_count: head_params must be > 0, got {head_params}")
    if channel_params <= 0:
        return int(min(max(round(x / head_params), 0), n - 1))
    grid, cerr = _vec(channel_grid, "channel grid"), _vec(channel_error, "channel errors")
    best, best_cost = None, math.inf
    for r in range(n):
        rest = x - r * head_params
        if rest < 0 or rest > max_channel_fraction * channel_params * (1 + 1e-12):
            continue
        f = rest / channel_params
        cost = float(herr[r]) + float(_interp(grid, cerr, f))
        if best is None or cost < best_cost - 1e-15 * max(1.0, abs(best_cost)):
            best, best_cost = r, cost
    return n - 1 if best is None else best


def _interp(x: Tensor, y: Tensor, at: float) -> float:
    """Piecewise-linear ``y(at)`` over sorted ``x``, clamped to the ends."""
    if at <= float(x[0]):
        return float(y[0])
    if at >= float(x[-1]):
        return float(y[-1])
    k = int(torch.searchsorted(x, torch.tensor([at], dtype=torch.float64), right=True)[0])
    t = (at - float(x[k - 1])) / (float(x[k]) - float(x[k - 1]))
    return float(y[k - 1]) + t * (float(y[k]) - float(y[k - 1]))


# ---------------------------------------------------------------- reconciliation


class BudgetReconciler:
    """Keeps the global removed count on ``S · Σ P`` while layers report what rounding really removed.

    Rule, applied at construction and after each :meth:`record`:

    1. *Spread*: the remaining target ``R = S Σ P − Σ_done removed`` goes to the layers not yet recorded
       proportionally to their initial plan, ``s_l = clip(c · plan_l, s_min, s_max)`` with ``c`` exact
       (:func:`scaled_allocation`). If that cannot reach ``R`` (layers planned at zero stay at zero), the remaining
       layers scale from equal weights instead. If ``R`` is beyond the bounds, they go to the nearest bound and a
       warning is logged.
    2. *Guard the next layer* (the lowest unrecorded index; layers are expected in ascending order): whatever it
       achieves within ``± u_next`` of its plan, the rest must stay inside what the later layers can land whatever
       *their* rounding: ``x_next ∈ [R − B + u_next, R − A − u_next]`` (and within its own bounds) with
       ``[A, B] = [Σ_tail P s_min + ρ, Σ_tail P s_max − ρ]``, ``ρ = Σ`` units of the tail but its last layer
       (the recurrence ``A_j = A_{j+1} + P_j s_min_j + u_j``). When the plan is outside, the next layer takes the
       difference and the tail is spread again with ``R − x_next``.

    So each layer's rounding error is absorbed by the later ones and only the last layer's (``≤ units_last``)
    remains, as long as the bounds leave ``ρ`` of room. ``units`` = parameters per removable unit of each layer (a head group, a channel; for per-row
    unstructured masks the row count); ``None`` means exact amounts (guard margin 0). Pure: no I/O, no ranks.

    Usage: ``rec = BudgetReconciler(plan, P, S=0.3, units=u)``; per layer ``rec.planned_removed(l)`` → prune, round
    to units → ``rec.record(l, removed)``; at the end ``rec.final_error()`` (removed − target, in parameters).

    Attributes: ``plan`` (initial ``s``), ``P``, ``S``, ``s_min``/``s_max``/``units`` (``[L]``), ``current`` (the
    live plan: achieved for recorded layers), ``achieved`` and ``planned_at_visit`` (``NaN`` until recorded).
    """

    def __init__(
        self,
        plan: Vector,
        P: Vector,
        S: float | None = None,
        *,
        s_min: Bound = 0.0,
        s_max: Bound = 1.0,
        units: Bound | None = None,
    ) -> None:
        self.plan = _vec(plan, "plan")
        L = self.plan.numel()
        self.P = _params(P, L)
        self.s_min, self.s_max = _bounds(s_min, s_max, L)
        self.units = _per_layer(0.0 if units is None else units, "units", L)
        if bool((self.plan < 0).any()) or bool((self.plan > 1).any()):
            raise ValueError("BudgetReconciler: planned sparsities must lie in [0, 1]")
        if bool((self.units < 0).any()) or not bool(torch.isfinite(self.units).all()):
            raise ValueError("BudgetReconciler: units must be finite and >= 0 (parameters per unit)")
        self.S = float((self.P * self.plan).sum() / self.P.sum()) if S is None else _target(S)
        reach = float((self.P * self.s_min).sum() / self.P.sum()), float((self.P * self.s_max).sum() / self.P.sum())
        if not reach[0] <= self.S <= reach[1]:
            raise ValueError(
                f"BudgetReconciler: target S={self.S:.6g} is outside the bounds' reach [{reach[0]:.6g}, {reach[1]:.6g}]"
            )
        self.achieved = torch.full_like(self.plan, math.nan)
        self.planned_at_visit = torch.full_like(self.plan, math.nan)
        self.current = self.plan.clone()
        self._rebalance()

    @property
    def target_removed(self) -> float:
        """``S · Σ P`` in parameters."""
        return self.S * float(self.P.sum())

    @property
    def remaining(self) -> list[int]:
        """Layers not yet recorded, ascending."""
        return torch.nonzero(torch.isnan(self.achieved)).reshape(-1).tolist()

    def planned_sparsity(self, layer: int) -> float:
        """The current plan for ``layer`` (the achieved value once recorded)."""
        return float(self.current[self._check(layer)])

    def planned_removed(self, layer: int) -> float:
        """``planned_sparsity(layer) · P_layer`` in parameters."""
        return self.planned_sparsity(layer) * float(self.P[layer])

    def record(self, layer: int, achieved_removed: float) -> Tensor:
        """Store what ``layer`` removed (parameters) and re-balance the rest; returns the plan ``s [L]``."""
        layer = self._check(layer)
        if not torch.isnan(self.achieved[layer]):
            raise ValueError(f"BudgetReconciler: layer {layer} was already recorded")
        if not 0 <= achieved_removed <= float(self.P[layer]):
            raise ValueError(
                f"BudgetReconciler: layer {layer} removed {achieved_removed} of {float(self.P[layer])} parameters"
            )
        self.planned_at_visit[layer] = self.current[layer]
        self.achieved[layer] = achieved_removed / float(self.P[layer]) if float(self.P[layer]) > 0 else 0.0
        self.current[layer] = self.achieved[layer]
        self._rebalance()
        return self.current.clone()

    def removed(self) -> float:
        """Parameters removed by the recorded layers."""
        done = ~torch.isnan(self.achieved)
        return float((self.P[done] * self.achieved[done]).sum())

    def final_error(self) -> float:
        """``Σ removed − S · Σ P`` in parameters (signed); every layer must be recorded."""
        if self.remaining:
            raise ValueError(f"BudgetReconciler: layers {self.remaining} are not recorded yet")
        return self.removed() - self.target_removed

    def state_dict(self) -> dict:
        """JSON-ready state (for the report and for resuming)."""
        as_list = lambda t: [None if math.isnan(v) else v for v in t.tolist()]
        return {
            "S": self.S,
            "P": self.P.tolist(),
            "plan": self.plan.tolist(),
            "s_min": self.s_min.tolist(),
            "s_max": self.s_max.tolist(),
            "units": self.units.tolist(),
            "achieved": as_list(self.achieved),
            "planned_at_visit": as_list(self.planned_at_visit),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> BudgetReconciler:
        """Rebuild from :meth:`state_dict`: the recorded layers are replayed in index order."""
        rec = cls(
            state["plan"], state["P"], state["S"], s_min=state["s_min"], s_max=state["s_max"], units=state["units"]
        )
        for layer, (s, visit) in enumerate(zip(state["achieved"], state["planned_at_visit"])):
            if s is not None:
                rec.record(layer, s * float(rec.P[layer]))
                rec.planned_at_visit[layer] = visit
        return rec

    def _check(self, layer: int) -> int:
        if not 0 <= layer < self.plan.numel():
            raise IndexError(f"BudgetReconciler: layer {layer} out of range [0, {self.plan.numel()})")
        return int(layer)

    def _rebalance(self) -> None:
        todo = torch.nonzero(torch.isnan(self.achieved)).reshape(-1)
        if todo.numel() == 0:
            return
        R = self.target_removed - self.removed()
        self._spread(todo, R, warn=True)
        nxt, tail = int(todo[0]), todo[1:]
        if tail.numel() == 0:
            return
        A, B = self._tail_reach(tail)
        P, u = float(self.P[nxt]), float(self.units[nxt])
        lo, hi = float(self.s_min[nxt]) * P, float(self.s_max[nxt]) * P
        low, high = max(R - B + u, lo), min(R - A - u, hi)
        x = self.planned_removed(nxt)
        x_safe = min(max(x, low), high) if low <= high else min(max(0.5 * (low + high), lo), hi)
        if x_safe != x:
            self.current[nxt] = x_safe / P
            self._spread(tail, R - x_safe, warn=False)

    def _tail_reach(self, tail: Tensor) -> tuple[float, float]:
        """Remaining targets the ``tail`` lands whatever its rounding: ``[Σ lo P + ρ, Σ hi P − ρ]``.

        ``ρ`` = the units of every tail layer but the last (each must leave room for its own ``± u``), shrunk so the
        interval stays non-empty.
        """
        lo, hi = float((self.P * self.s_min)[tail].sum()), float((self.P * self.s_max)[tail].sum())
        reserve = min(float(self.units[tail[:-1]].sum()), 0.5 * (hi - lo))
        return lo + reserve, hi - reserve

    def _spread(self, idx: Tensor, R: float, *, warn: bool) -> None:
        """Plan ``idx`` to remove ``R`` parameters in total (step 1 of the rule)."""
        P, lo, hi = self.P[idx], self.s_min[idx], self.s_max[idx]
        if float(P.sum()) <= 0:  # nothing left that can absorb anything
            return
        want = R / float(P.sum())
        reach = float((P * lo).sum() / P.sum()), float((P * hi).sum() / P.sum())
        if not reach[0] <= want <= reach[1]:
            if warn:
                logger.warning(
                    "BudgetReconciler: remaining target %.6g is outside the bounds' reach [%.6g, %.6g]; "
                    "clamping the %d remaining layers",
                    want,
                    reach[0],
                    reach[1],
                    idx.numel(),
                )
            self.current[idx] = lo if want < reach[0] else hi
            return
        logw = self.plan[idx].log()
        proportional_max = float((P * torch.where(torch.isneginf(logw), lo, hi)).sum() / P.sum())
        if want > proportional_max:  # layers planned at zero must help: scale from equal weights
            logw = torch.zeros_like(logw)
        self.current[idx] = scaled_allocation(logw, P, want, s_min=lo, s_max=hi)
