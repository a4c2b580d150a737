"""The global sparsity budget: the per-layer plan of a run and the coordinator that keeps it on target.

Pure part (no I/O, no ranks, deterministic; docs/allocation.md):

- `LayerModel`: what is known of one layer (prunable parameters ``P_l``, its unit kinds, its error curves);
- `plan_layer(model, x, split)`: the units a layer removes to lose about ``x`` parameters (KV groups vs channels);
- `Coordinator`: ``decide(i) -> LayerDecision`` (a small picklable object: what block ``i`` removes) and
  ``record(i, removed)`` (what it really removed); the remainder of the budget is re-spread over the layers not yet
  visited by `solvers.allocation.BudgetReconciler`, so the run lands on ``S · Σ P_l`` up to the last layer's
  rounding. In distributed runs it lives on rank 0 and its decisions are broadcast.

Engine glue: `AllocationJob` is built from the recipe before any weight is read (`make_allocation`), prepared by the
scoring pass (`engine.scoring`, or its cache), then asked by the pipeline, per block, for the stages / the shrunk
adapter to use and told what the block achieved; it writes the `allocation` section of the report and the output
config (per-layer widths: a non-uniform checkpoint unless every layer happens to be equal).

Rules (``S`` the global target as a fraction of ``Σ P_l``; bounds ``[min, max]``, capped per layer by what its units
allow): ``uniform`` (the existing per-stage path; not coordinated), ``owl`` (``solvers.allocation.owl_allocation``
of the outlier ratios, then scaled onto the parameter-weighted budget), ``softmax``
(``s_l = clip(c·exp(−E_l/T), min, max)``, ``c`` exact).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.arch import ArchAdapter
from engine.config import ConfigError, RunConfig, StructuredStage, UnstructuredStage, name_selected
from engine.stages.structured import (
    EXPERT_ALIGN,
    config_overrides,
    layer_inventory,
    layer_params,
    selected_kinds,
    shrunk_config,
    split_units,
)
from solvers.allocation import BudgetReconciler, best_head_count, owl_allocation, softmax_allocation

log = logging.getLogger(__name__)

CHANNEL_KINDS = ("channel", "expert_channel", "shared_channel")
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
            from engine.scoring import CHANNEL_GRID

            heads = best_head_count(
                x, step, held, model.head_error, CHANNEL_GRID, model.channel_error, max_channel_fraction=ch_max / held
            )
        else:
            heads = min(round(x / (held + head.held) * head.count), head.count - 1)
            while heads < head.count - 1 and x - heads * step > ch_max:
                heads += 1
    for _ in range(8):  # a coarse first channel kind can leave a later one more than it holds: ask a step less
        try:
            return split_units(inv, kinds, x, model.align, heads=heads)
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


# --------------------------------------------------------------------------------------------- engine glue


def model_params(adapter: ArchAdapter) -> int:
    """All parameters of the model of `adapter.config` (a meta build; tied embeddings counted once)."""
    from transformers import AutoModelForCausalLM

    config = type(adapter.config).from_dict(adapter.config.to_dict())  # without the adapter's implementation picks
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _structured_model(adapter: ArchAdapter, i: int, stage: StructuredStage) -> LayerModel:
    inv = layer_inventory(adapter, i)
    kinds = []
    for k in selected_kinds(inv, stage.units):
        a = 1 if k == "kv_group" else (math.lcm(stage.align, EXPERT_ALIGN) if k == "expert_channel" else stage.align)
        kinds.append(UnitKind(k, inv[k]["count"], inv[k]["groups"], inv[k]["params"], a))
    steps = [k.align * k.groups * k.params for k in kinds if k.kind in CHANNEL_KINDS]
    unit = min(steps) if steps else max(k.groups * k.params for k in kinds)
    return LayerModel(
        layer=i,
        params=layer_params(adapter, adapter.config, i),
        unit=float(unit),
        kinds=tuple(kinds),
        align=stage.align,
    )


def _unstructured_model(adapter: ArchAdapter, i: int, stage: UnstructuredStage) -> LayerModel:
    specs = [s for s in adapter.meta_linears(i) if name_selected(s.name, stage.targets, stage.ignore)]
    return LayerModel(layer=i, params=sum(s.d_out * s.d_in for s in specs), unit=float(sum(s.d_out for s in specs)))


class AllocationJob:
    """One stage's global allocation during a run (see the module docstring). Built by `make_allocation`."""

    def __init__(
        self, stage: StructuredStage | UnstructuredStage, index: int, adapter: ArchAdapter, output: str | Path
    ) -> None:
        self.stage, self.index, self.adapter = stage, index, adapter
        self.alloc = dict(stage.allocation)
        self.structured = isinstance(stage, StructuredStage)
        self.target = float(stage.target if self.structured else stage.sparsity)
        self.where = f"prune[{index}].allocation"
        build = _structured_model if self.structured else _unstructured_model
        self.models = {i: build(adapter, i, stage) for i in range(adapter.num_layers)}
        prunable = sum(m.params for m in self.models.values())
        self.total_params = model_params(adapter) if self.alloc["of"] == "total" else None
        self.S = self.target * (self.total_params / prunable if self.total_params else 1.0)
        self.coordinator: Coordinator | None = None
        self.scores: list[dict] = []
        self.score_info: dict = {}
        self.rule_plan: list[float] = []
        self.energy: list[float] = []
        self.layers: list[int] = []
        self.blocks: dict[int, dict] = {}
        self._adapters: dict[tuple, ArchAdapter] = {}
        self._scores_path = Path(output) / "blockprune_scores.json"
        from engine.scoring import read_scores

        self._cached = read_scores(self._scores_path) if self.coordinated else {}  # before the writer clears output
        self._check_reach(list(self.models))

    @property
    def coordinated(self) -> bool:
        """Whether layers get their own budgets (any rule but uniform)."""
        return self.alloc["rule"] != "uniform"

    def effective_stage(self):
        """The stage with its global target as a fraction of its own prunable parameters (`of: total` rescaled);
        what the uniform path applies to every layer."""
        key = "target" if self.structured else "sparsity"
        return dataclasses.replace(self.stage, **{key: self.S})

    # ---- bounds -------------------------------------------------------------------------------------------------
    def _bounds(self, layers: list[int]) -> tuple[list[float], list[float]]:
        hi = [min(self.alloc["max"], self.models[i].max_removed / self.models[i].params) for i in layers]
        lo = [min(self.alloc["min"], h) for h in hi]
        return lo, hi

    def _check_reach(self, layers: list[int]) -> None:
        if not 0.0 <= self.S < 1.0:
            raise ConfigError(
                f"{self.where}.of = total: target {self.target} of all {self.total_params} parameters "
                f"is {self.S:.4f} of the prunable ones; it must stay below 1"
            )
        if not self.coordinated:
            return
        lo, hi = self._bounds(layers)
        P = [self.models[i].params for i in layers]
        reach = (sum(p * v for p, v in zip(P, lo)) / sum(P), sum(p * v for p, v in zip(P, hi)) / sum(P))
        if not reach[0] - 1e-12 <= self.S <= reach[1] + 1e-12:
            raise ConfigError(
                f"{self.where}: the target ({self.S:.4f} of the prunable parameters) is outside what "
                f"min = {self.alloc['min']} / max = {self.alloc['max']} allow ({reach[0]:.4f} .. "
                f"{reach[1]:.4f} with whole units)"
            )

    # ---- before the block loop ----------------------------------------------------------------------------------
    def scoring_settings(self, removed: list[int], grid: tuple[float, ...]):
        from engine.scoring import ScoringSettings

        s = self.stage
        if self.structured:
            return ScoringSettings(
                kind="structured",
                score=s.score,
                units=tuple(s.units),
                align=s.align,
                split=self.alloc["split"],
                percdamp=s.percdamp,
                owl_m=self.alloc["m"],
                grid=grid,
                skip=tuple(sorted(removed)),
            )
        return ScoringSettings(
            kind="unstructured",
            score="magnitude" if s.method == "magnitude" else "wanda",
            targets=tuple(s.targets),
            ignore=tuple(s.ignore),
            owl_m=self.alloc["m"],
            grid=grid,
            skip=tuple(sorted(removed)),
        )

    def prepare(
        self,
        reader,
        cache,
        rt,
        ids: torch.Tensor,
        *,
        removed: list[int] | None = None,
        embed: Callable[[], None] | None = None,
        layer_adapter: Callable[[int], ArchAdapter] | None = None,
    ) -> None:
        """Scores (from the cache file, or a scoring pass after `embed()` fills the activation cache), energies,
        the rule's plan and the coordinator. `removed`: layers a depth stage removes (not planned). `layer_adapter`:
        the adapter of each output layer when an earlier stage of the block changes its shapes (experts), so that
        ``P_l`` counts what the allocated stage will see."""
        if not self.coordinated:
            return
        removed = sorted(removed or [])
        self.layers = [i for i in range(self.adapter.num_layers) if i not in removed]
        if layer_adapter is not None and not self.structured:
            self.models = {i: _unstructured_model(layer_adapter(i), i, self.stage) for i in self.models}
        self._check_reach(self.layers)
        self.scores = self._scores(reader, cache, rt, ids, removed, embed)
        by_layer = {r["layer"]: r for r in self.scores}
        if self.structured:
            for i in self.layers:
                r = by_layer[i]
                self.models[i] = dataclasses.replace(
                    self.models[i], head_error=tuple(r["head_error"]), channel_error=tuple(r["channel_error"])
                )
        self.coordinator = self._make_coordinator([by_layer[i] for i in self.layers])

    def _needs_errors(self) -> bool:
        return self.alloc["rule"] == "softmax" and self.alloc["energy"] == "error"

    def _scores(self, reader, cache, rt, ids: torch.Tensor, removed: list[int], embed) -> list[dict]:
        from engine import scoring

        need = self.S if self._needs_errors() else None
        info = getattr(rt, "dist", None)
        key, entry = self._cached_entry(reader, rt, ids, removed, need)
        self.score_info = {"file": self._scores_path.name, "key": key, "reused": entry is not None}
        if entry is None:
            grid = tuple(sorted(set(scoring.ERROR_GRID) | {round(self.S, 6)})) if need is not None else ()
            settings = self.scoring_settings(removed, grid)
            if embed is not None:
                embed()
            log.info("allocation: scoring pass (%s, grid %s)", settings.kind, list(grid))
            # block errors are measured as the run will prune: its split, with the layer's own error curves
            plan_fn = (
                (
                    lambda i, x, rec: plan_layer(
                        dataclasses.replace(
                            self.models[i],
                            head_error=tuple(rec["head_error"]),
                            channel_error=tuple(rec["channel_error"]),
                        ),
                        x,
                        self.alloc["split"],
                    )
                )
                if self.structured
                else None
            )
            layers = scoring.scoring_pass(
                reader, self.adapter, cache, rt, settings, {i: m.params for i, m in self.models.items()}, plan_fn
            )
            entry = {"settings": settings.identity(), "grid": list(grid), "layers": layers}
        else:
            log.info("allocation: reusing the scores in %s (key %s)", self._scores_path, key)
        self._cached[key] = json_roundtrip(entry)
        if info is None or info.is_main:  # (again when reused: the writer may have cleared the output directory)
            scoring.write_scores(self._scores_path, self._cached)
        return json_roundtrip(entry)["layers"]

    def _cached_entry(self, reader, rt, ids: torch.Tensor, removed: list[int], need: float | None):
        """(cache key, the cached entry when it answers this run, else None): the same on every rank (the key hashes
        every rank's slice of the calibration; rank 0's file decides), so all ranks score together or none does."""
        from engine import scoring
        from sharding.dist import all_gather_object, broadcast_object

        info = getattr(rt, "dist", None)
        multi = info is not None and info.enabled
        digests = all_gather_object(scoring.ids_digest(ids), info) if multi else None
        key = scoring.cache_key(
            reader.fingerprint(),
            ids,
            rt.dtype,
            info.world_size if info else 1,
            self.scoring_settings(removed, ()),
            rank_digests=digests,
        )
        entry = self._cached.get(key)
        entry = entry if scoring.covers(entry, need) else None
        return key, (broadcast_object(entry, info) if multi else entry)

    def _make_coordinator(self, scores: list[dict]) -> Coordinator:
        from engine.scoring import layer_energies

        models = [self.models[i] for i in self.layers]
        P = [m.params for m in models]
        lo, hi = self._bounds(self.layers)
        if self.alloc["rule"] == "owl":
            D = [r["outlier_ratio"] for r in scores]
            try:
                plan = owl_allocation(D, self.S, lam=self.alloc["lambda"])
            except ValueError as e:
                raise ConfigError(f"{self.where}.lambda = {self.alloc['lambda']}: {e}") from None
            plan = torch.minimum(
                torch.maximum(plan, torch.tensor(lo, dtype=torch.float64)), torch.tensor(hi, dtype=torch.float64)
            )
        else:
            E = layer_energies(scores, self.alloc["energy"], self.S)
            self.energy = E.tolist()
            plan = softmax_allocation(E, P, self.S, T=self.alloc["temperature"], s_min=lo, s_max=hi)
        self.rule_plan = plan.tolist()
        log.info("allocation (%s): per-layer plan %s", self.alloc["rule"], [round(v, 4) for v in self.rule_plan])
        return Coordinator(models, self.rule_plan, self.S, s_min=lo, s_max=hi, split=self.alloc.get("split", ""))

    # ---- per block ----------------------------------------------------------------------------------------------
    def decide(self, i: int) -> LayerDecision | None:
        """The coordinator's decision for source layer `i` (None when not coordinated or the layer is not planned)."""
        if self.coordinator is None or i not in self.coordinator.layers:
            return None
        return self.coordinator.decide(i)

    def stages(self, decision: LayerDecision | None, stages: list) -> list:
        """The run's stages for one block: the allocated unstructured stage at the layer's sparsity (or at the
        effective global target for `uniform` with `of: total`); others unchanged."""
        if self.structured:
            return stages
        if decision is None and self.coordinated:
            return stages
        s = decision.sparsity if decision is not None else self.S
        return [dataclasses.replace(st, sparsity=s) if st is self.stage else st for st in stages]

    def layer_overrides(self, decision: LayerDecision) -> dict:
        """Output config fields of a structured layer (its shrunk widths; bias flags with compensation)."""
        inv = layer_inventory(self.adapter, decision.layer)
        return config_overrides(self.adapter.config, inv, decision.remove, self.stage.bias_compensation)

    def layer_adapter(self, decision: LayerDecision | None) -> ArchAdapter | None:
        """The adapter that builds the written (shrunk) block of a structured decision; None otherwise."""
        if not self.structured or decision is None:
            return None
        over = self.layer_overrides(decision)
        key = tuple(sorted(over.items()))
        if key not in self._adapters:
            self._adapters[key] = ArchAdapter(self.adapter.spec, shrunk_config(self.adapter.config, over))
        return self._adapters[key]

    def record(self, i: int, entry: dict, decision: LayerDecision | None) -> dict | None:
        """Tell the coordinator what block `i` removed (from its report entry: structured ``P_l − params`` written,
        unstructured the exact zeros of the stage's linears) and return the block's `allocation` record."""
        if self.coordinator is None or decision is None:
            return None
        m = self.models[i]
        removed = m.params - int(entry["params"]) if self.structured else self._zeros(entry)
        self.coordinator.record(i, removed, decision)
        rec = {
            "params": m.params,
            "planned": self.coordinator.planned_at_visit(i),
            "decided": decision.sparsity,
            "achieved": removed / m.params,
            "removed": removed,
            **({"remove": dict(decision.remove)} if self.structured else {}),
        }
        self.blocks[i] = rec
        return rec

    def _zeros(self, entry: dict) -> int:
        lin = {
            n: r for n, r in entry.get("linears", {}).items() if name_selected(n, self.stage.targets, self.stage.ignore)
        }
        return sum(
            int(r["zeros"]) if "zeros" in r else round(r["sparsity"] * math.prod(r["shape"])) for r in lin.values()
        )

    # ---- after the loop -----------------------------------------------------------------------------------------
    def output_overrides(self) -> tuple[dict, dict[int, dict]]:
        """(stock config fields, {source layer: per-layer fields}): the second is empty when every layer has the same
        widths (the output is then the stock architecture with the first)."""
        if not self.structured or self.coordinator is None:
            return {}, {}
        per = {i: self.layer_overrides(d) for i, d in sorted(self.coordinator.decisions.items())}
        distinct = {tuple(sorted(v.items())) for v in per.values()}
        if len(distinct) <= 1:
            return (dict(next(iter(per.values()))) if per else {}), {}
        return {}, per

    def layer_entries(self, entries: list[dict], kept: list[int]) -> list[dict]:
        """`blockprune.layers` entries (one per output layer, source layers `kept`) with each layer's widths."""
        _, per = self.output_overrides()
        return [{**e, "config": {**e.get("config", {}), **per.get(i, {})}} for i, e in zip(kept, entries)]

    def report(self) -> dict:
        """The `allocation` section of `blockprune_report.json` (docs/allocation.md)."""
        out: dict[str, Any] = {
            "stage": self.index,
            "kind": "structured" if self.structured else "unstructured",
            **self.alloc,
            "target": self.target,
            "S": self.S,
            "prunable_params": sum(self.models[i].params for i in self.models),
            **({"total_params": self.total_params} if self.total_params else {}),
        }
        if self.coordinator is None:
            return out
        c = self.coordinator
        P = sum(m.params for m in c.models)
        removed = sum(b["removed"] for b in self.blocks.values())
        err = removed - self.S * P
        unit = max((m.unit for m in c.models), default=0.0)  # one unit of the coarsest layer
        out.update(
            {
                "scores": self.score_info,
                "planned_params": P,
                "target_removed": self.S * P,
                "removed": removed,
                "achieved": removed / P if P else 0.0,
                "error": err,
                "relative_error": err / P if P else 0.0,
                "within_tolerance": (
                    abs(err) <= max(TOLERANCE * self.S * P, unit) if len(self.blocks) == len(c.models) else None
                ),
                "layers": [self._layer_row(k, m) for k, m in enumerate(c.models)],
            }
        )
        return out

    def _layer_row(self, k: int, m: LayerModel) -> dict:
        r = self.scores[k] if k < len(self.scores) else {}
        row = {
            "layer": m.layer,
            "params": m.params,
            "rule": self.rule_plan[k],
            "planned_start": float(self.coordinator.planned[k]),
            "outlier_ratio": r.get("outlier_ratio"),
            "influence": r.get("influence"),
            **({"energy": self.energy[k]} if self.energy else {}),
        }
        return {**row, **self.blocks.get(m.layer, {})}


def json_roundtrip(obj: Any) -> Any:
    """`obj` as JSON would give it back (a fresh run plans from exactly the numbers a resumed run reads)."""
    import json

    return json.loads(json.dumps(obj))


def make_allocation(cfg: RunConfig, adapter: ArchAdapter) -> AllocationJob | None:
    """The allocation job of the recipe (None when every stage is uniform over its own prunable parameters).
    ConfigError, before any weight is read, for a second coordinated stage or an unreachable target."""
    jobs = []
    for k, st in enumerate(cfg.prune):
        alloc = getattr(st, "allocation", None)
        if (
            isinstance(st, StructuredStage | UnstructuredStage)
            and alloc
            and (alloc.get("rule") != "uniform" or alloc.get("of") == "total")
        ):
            jobs.append((k, st))
    if not jobs:
        return None
    if len(jobs) > 1:
        raise ConfigError(
            f"prune[{jobs[1][0]}].allocation: only one stage per run may use a global allocation "
            "(a non-uniform rule or `of: total`)"
        )
    k, st = jobs[0]
    return AllocationJob(st, k, adapter, cfg.output)
