"""The coordinator of a global sparsity budget: per-layer decisions that keep the run on target.

Pure (no I/O, no ranks, deterministic; docs/allocation.md):

- `LayerModel`: what is known of one layer (prunable parameters ``P_l``, its unit kinds, its error curves);
- `plan_layer(model, x, split)`: the units a layer removes to lose about ``x`` parameters (KV groups vs channels);
- `Coordinator`: ``decide(i) -> LayerDecision`` (a small picklable object: what block ``i`` removes) and
  ``record(i, removed)`` (what it really removed); the remainder of the budget is re-spread over the layers not yet
  visited by `solvers.allocation.BudgetReconciler`, so the run lands on ``S · Σ P_l`` up to the last layer's
  rounding. In distributed runs it lives on rank 0 and its decisions are broadcast.

The policy that drives it during a run (rules, scores, reconciliation, report) is `engine.budget`.

Rules (``S`` the global target as a fraction of ``Σ P_l``; bounds ``[min, max]``, capped per layer by what its units
allow): ``uniform`` (the existing per-stage path; not coordinated), ``owl`` (``solvers.allocation.owl_allocation``
of the outlier ratios, then scaled onto the parameter-weighted budget), ``softmax``
(``s_l = clip(c·exp(−E_l/T), min, max)``, ``c`` exact).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.schema import ConfigError
from engine.units import CHANNEL_GRID, CHANNEL_KINDS, nearest_allowed, split_units
from solvers.allocation import BudgetReconciler, best_head_count

log = logging.getLogger(__name__)

TOLERANCE = 1e-3  # the global removed fraction lands within this of the target (or one unit, whichever is larger)


# --------------------------------------------------------------------------------------------- pure part


@dataclass(frozen=True)
class UnitKind:
    """One kind of structured unit in a layer: `count` units per group, `groups` groups, `params` per unit;
    kept counts are multiples of `align` (at least `align`); KV groups keep at least one."""

    kind: str
    count: int
    groups: int
    params: int
    align: int = 1
    allowed: tuple[int, ...] = ()  # KV groups: the removal counts the output config may take (empty: any)

    @property
    def held(self) -> int:
        return self.count * self.groups * self.params

    @property
    def max_removed(self) -> int:
        if self.kind == "kv_group":
            return (self.count - 1) * self.groups * self.params
        keep = self.align if self.align <= self.count else self.count
        return (self.count - keep) * self.groups * self.params


@dataclass(frozen=True)
class LayerModel:
    """What the coordinator knows of source layer `layer`: `params` (``P_l``), `unit` (parameters of its smallest
    step, the reconciler's rounding margin), for structured stages its unit `kinds` (KV groups first), the stage's
    `align`, and the error curves of the scoring pass (`head_error[r]`, `channel_error` over
    `engine.scoring.CHANNEL_GRID`)."""

    layer: int
    params: int
    unit: float
    kinds: tuple[UnitKind, ...] = ()
    align: int = 1
    head_error: tuple[float, ...] = ()
    channel_error: tuple[float, ...] = ()

    @property
    def max_removed(self) -> int:
        return sum(k.max_removed for k in self.kinds) if self.kinds else self.params

    def kind(self, name: str) -> UnitKind | None:
        return next((k for k in self.kinds if k.kind == name), None)


@dataclass(frozen=True)
class LayerDecision:
    """The plan for one layer, as the pipeline applies it (small and picklable: broadcast in distributed runs).

    `sparsity`: planned fraction of the layer's prunable parameters (unstructured: applied to every selected linear
    of the layer; structured: what `remove` amounts to). `removed`: planned parameters removed. `remove`: structured
    only, units removed from every group of each kind (the `StructuredPlan.remove` of this layer)."""

    layer: int
    sparsity: float
    removed: float
    remove: dict[str, int] = field(default_factory=dict)


def removed_params(model: LayerModel, remove: dict[str, int]) -> int:
    """Parameters that `remove` (units per group of each kind) takes from the layer."""
    return sum(int(remove.get(k.kind, 0)) * k.groups * k.params for k in model.kinds)


def plan_layer(model: LayerModel, x: float, split: str = "proportional") -> dict[str, int]:
    """Units removed per group of each kind so that the layer loses about ``x`` parameters (clamped to what it can).

    KV groups: `proportional` gives them the layer's share (``round(x / held · n_kv)``, as the uniform plan); `error`
    takes the count ``r`` minimising ``head_error[r] + channel_error(rest)`` (`solvers.allocation.best_head_count`).
    Either way at least enough groups that the channels can take the rest. Channels then absorb the remainder
    (`engine.stages.structured.split_units`: coarsest kind first, `align`)."""
    inv = {k.kind: {"count": k.count, "groups": k.groups, "params": k.params} for k in model.kinds}
    kinds = [k.kind for k in model.kinds]
    x = min(max(float(x), 0.0), float(model.max_removed))
    head = model.kind("kv_group")
    channels = [k for k in model.kinds if k.kind in CHANNEL_KINDS]
    heads = None
    if head is not None and channels:
        step, held = head.groups * head.params, sum(k.held for k in channels)
        ch_max = sum(k.max_removed for k in channels)
        if split == "error" and model.head_error and model.channel_error:
            herr = [e if not head.allowed or r in head.allowed else math.inf for r, e in enumerate(model.head_error)]
            heads = best_head_count(
                x, step, held, herr, CHANNEL_GRID, model.channel_error, max_channel_fraction=ch_max / held
            )
        else:
            heads = min(round(x / (held + head.held) * head.count), head.count - 1)
            while heads < head.count - 1 and x - heads * step > ch_max:
                heads += 1
        if head.allowed and heads not in head.allowed:  # the smallest allowed count the channels can complete
            fits = [r for r in head.allowed if x - r * step <= ch_max]
            heads = nearest_allowed(heads, fits or head.allowed)
    allowed = head.allowed if head is not None else None
    for _ in range(8):  # a coarse first channel kind can leave a later one more than it holds: ask a step less
        try:
            return split_units(inv, kinds, x, model.align, heads=heads, allowed_heads=allowed)
        except ConfigError:
            x = max(x - max(k.align * k.groups * k.params for k in channels), 0.0)
    raise ConfigError(f"allocation: layer {model.layer} cannot remove {x:.0f} parameters in whole units")


class Coordinator:
    """`decide(i)` / `record(i, removed)` over the layers of a run (source indices, ascending visits).

    Built from the rule's plan ``s`` (one value per layer, in the order of `models`), the global target ``S`` (a
    fraction of ``Σ P_l``) and per-layer bounds. Pure and deterministic: the same inputs and records give the same
    decisions, so every rank may run its own copy or rank 0 may broadcast each `LayerDecision`."""

    def __init__(
        self,
        models: Sequence[LayerModel],
        plan: Sequence[float],
        S: float,
        *,
        s_min: Sequence[float],
        s_max: Sequence[float],
        split: str = "proportional",
    ) -> None:
        self.models = list(models)
        self.split = split
        self._pos = {m.layer: k for k, m in enumerate(self.models)}
        self.rec = BudgetReconciler(
            list(plan),
            [m.params for m in self.models],
            S,
            s_min=list(s_min),
            s_max=list(s_max),
            units=[m.unit for m in self.models],
        )
        self.planned = self.rec.current.clone()  # the plan on the exact budget, before any record
        self.decisions: dict[int, LayerDecision] = {}

    def decide(self, i: int) -> LayerDecision:
        """The plan for source layer `i` given everything recorded so far (does not change the state)."""
        m = self.models[self._index(i)]
        x = self.rec.planned_removed(self._pos[i])
        if not m.kinds:
            return LayerDecision(layer=i, sparsity=x / m.params if m.params else 0.0, removed=x)
        remove = plan_layer(m, x, self.split)
        removed = removed_params(m, remove)
        return LayerDecision(layer=i, sparsity=removed / m.params, removed=float(removed), remove=remove)

    def record(self, i: int, removed: float, decision: LayerDecision | None = None) -> None:
        """Layer `i` really removed `removed` parameters (after rounding, biases added, ...): re-balance the rest."""
        m = self.models[self._index(i)]
        if not 0 <= removed <= m.params:
            log.warning("allocation: layer %d reports %s removed of %d; clamping", i, removed, m.params)
            removed = min(max(removed, 0), m.params)
        self.rec.record(self._pos[i], float(removed))
        if decision is not None:
            self.decisions[i] = decision

    def final_error(self) -> float:
        """Removed minus target, in parameters (every layer recorded)."""
        return self.rec.final_error()

    @property
    def layers(self) -> list[int]:
        """The planned source layers, in visiting order."""
        return [m.layer for m in self.models]

    def planned_at_visit(self, i: int) -> float:
        """The plan layer `i` had when it was decided and recorded (NaN before its record)."""
        return float(self.rec.planned_at_visit[self._index(i)])

    def _index(self, i: int) -> int:
        if i not in self._pos:
            raise KeyError(f"allocation: layer {i} is not planned (planned: {sorted(self._pos)})")
        return self._pos[i]
