"""Structured pruning: whole KV groups and MLP / expert channels removed, the consumers refit, the block rebuilt smaller.

Per block: the consumers' inputs (o_proj, down_proj, each expert's down_proj) get column sums and squares (scores,
bias compensation) and, for the OBS score or any reconstruction, the Gram; then `engine.surgery.prune_block`
removes the layer's units (the uniform plan of `engine.units.plan_uniform`, or the layer's share of a global
budget: `LayerDecision.remove`) and returns the stock decoder layer of the shrunk config. Formulas:
docs/structured.md; unit bookkeeping: `engine.units`.

For a global budget (`engine.budget`) the scoring pass records per layer, besides what every stage gets, the
``head_error[r]`` / ``channel_error[f]`` curves: the relative block output error when only ``r`` KV groups
(``r = 0 .. n_kv − 1``, one masked forward each: a KV group's output also feeds the MLP, so the attention output's
own error would understate it) / only a fraction ``f`` (of `CHANNEL_GRID`) of every channel group are removed in
score order with no reconstruction — channels need no forward: removing MLP channels changes the block output by
exactly ``Σ_t ‖W_{:,R} x_{t,R}‖² = tr(W_R H_RR W_Rᵀ)`` of the down_proj input Gram.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from engine.align import check_align, resolve_align
from engine.arch import ArchAdapter, LinearSpec
from engine.coordinator import LayerDecision, LayerModel, UnitKind, plan_layer
from engine.reconstruct import resolve_reconstruct
from engine.schema import ConfigError, choice, resolve_allocation
from engine.stage import (
    BlockVisit,
    LayerShape,
    ModelInfo,
    OutputChanges,
    StageBase,
    StageResult,
    StatsRequest,
    register_stage,
)
from engine.surgery import GroupOptions, prune_block
from engine.units import (
    CHANNEL_GRID,
    CHANNEL_KINDS,
    UNIT_KINDS,
    StructuredPlan,
    config_overrides,
    consumer,
    consumer_inputs,
    kv_removals,
    layer_inventory,
    layer_params,
    plan_uniform,
    selected_kinds,
)
from solvers.group_prune import SCORES, SOLVERS, groups_contiguous
from solvers.group_prune import workspace_bytes as group_workspace_bytes
from solvers.scores import group_scores
from solvers.stats import InputStats

log = logging.getLogger(__name__)

Measure = Callable[[list[tuple[Tensor, Tensor]]], tuple[float, float]]


@dataclass
class StructuredConfig:
    """Structured pruning of whole units with reconstruction (docs/structured.md).

    `target`: fraction of the prunable (non-embedding) parameters removed. `units`: `heads` (whole KV groups)
    and/or `channels` (MLP / expert intermediate channels). `score`: how units are chosen; `solver`: how the kept
    weights of o_proj / down_proj are refit. `allocation`: how the target is spread over the layers (`uniform`: every
    layer removes the same units, stock output; `owl` / `softmax`: per-layer widths from a scoring pass, see
    docs/allocation.md). `align`: kept channel counts are multiples of it; `auto` (default) is 64 for real widths,
    clipped to about 1/16 of small ones (`engine.align`), so the output's GEMMs tile evenly on GPUs.
    """

    method: str = "structured"
    target: float = 0.2
    units: list[str] = field(default_factory=lambda: ["heads", "channels"])
    score: str = "obs"  # solvers.group_prune.SCORES
    solver: str = "closed_form"  # solvers.group_prune.SOLVERS
    allocation: dict[str, Any] = field(default_factory=lambda: {"rule": "uniform"})
    bias_compensation: bool = False
    align: str | int = "auto"  # "auto" or an integer >= 1 (engine.align)
    percdamp: float = 0.01
    reconstruct: Any | None = None  # block-local reconstruction after the block is pruned (engine/reconstruct.py)

    def validate(self, where: str) -> None:
        self.reconstruct = resolve_reconstruct(self.reconstruct, f"{where}.reconstruct")
        if not 0.0 < self.target < 1.0:
            raise ConfigError(f"{where}.target = {self.target}: must be in (0, 1)")
        choice(self.units, tuple(UNIT_KINDS), f"{where}.units")
        if not self.units:
            raise ConfigError(f"{where}.units must name at least one of {', '.join(UNIT_KINDS)}")
        choice([self.score], SCORES, f"{where}.score")
        choice([self.solver], SOLVERS, f"{where}.solver")
        self.allocation = resolve_allocation(self.allocation, f"{where}.allocation", structured=True)
        if self.allocation["max"] >= 1.0:
            raise ConfigError(
                f"{where}.allocation.max = {self.allocation['max']}: a structured layer keeps at least "
                "one unit of each kind; use max < 1"
            )
        try:
            self.align = check_align(self.align, f"{where}.align")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not 0 <= self.percdamp < math.inf:
            raise ConfigError(f"{where}.percdamp = {self.percdamp}: must be a finite number >= 0")

    @property
    def needs_gram(self) -> bool:
        return self.score == "obs" or self.solver != "none"


class StructuredStage(StageBase):
    """See the module docstring. Allocatable: a global budget hands each layer its units (`LayerDecision.remove`)."""

    section = "structured"
    config: StructuredConfig

    def __init__(self, config: StructuredConfig, index: int) -> None:
        super().__init__(config, index)
        self.target = config.target
        self.plan: StructuredPlan | None = None
        self.adapter: ArchAdapter | None = None
        self.options = GroupOptions(config.score, config.solver, config.bias_compensation, config.percdamp)
        self._inventory: dict[int, dict] = {}

    # ---- before the loop ----------------------------------------------------------------------------------------
    def setup(self, model: ModelInfo) -> None:
        self.adapter = model.adapter
        if model.adapter.spec.attention != "gqa":
            raise ConfigError(
                f"{self.key}: structured pruning of {model.adapter.model_type} (MLA attention) is not supported; "
                "prune it with magnitude, wanda or sparsegpt, and its routed experts with the experts stage"
            )
        if self.config.allocation["rule"] == "uniform":
            self.plan = plan_uniform(model.adapter, dataclasses.replace(self.config, target=self.target))

    @property
    def coordinated(self) -> bool:
        return self.config.allocation["rule"] != "uniform"

    def _inv(self, i: int) -> dict:
        assert self.adapter is not None
        if i not in self._inventory:
            self._inventory[i] = layer_inventory(self.adapter, i)
        return self._inventory[i]

    # ---- the budget's view (engine.budget) ----------------------------------------------------------------------
    @property
    def allocation(self) -> dict:
        return self.config.allocation

    @property
    def global_target(self) -> float:
        return self.config.target

    def set_uniform_target(self, S: float) -> None:
        """Every layer removes the same units for `S` (`allocation.of: total` rescaled onto the prunable ones)."""
        self.target = S
        if self.adapter is not None and not self.coordinated:
            self.plan = plan_uniform(self.adapter, dataclasses.replace(self.config, target=S))

    def layer_model(self, adapter: ArchAdapter, i: int) -> LayerModel:
        """``P_l`` (all parameters of the block) and its unit kinds: KV groups (step 1) and channel kinds (step
        `align`; routed experts lcm(align, 8))."""
        inv = layer_inventory(adapter, i)
        kinds = []
        align = self.config.align
        for k in selected_kinds(inv, self.config.units):
            a = resolve_align(align, inv[k]["count"], k)
            allowed = kv_removals(adapter.config) if k == "kv_group" else ()
            kinds.append(UnitKind(k, inv[k]["count"], inv[k]["groups"], inv[k]["params"], a, allowed))
        steps = [k.align * k.groups * k.params for k in kinds if k.kind in CHANNEL_KINDS]
        unit = min(steps) if steps else max(k.groups * k.params for k in kinds)
        params = layer_params(adapter, adapter.config, i)
        return LayerModel(layer=i, params=params, unit=float(unit), kinds=tuple(kinds), align=align)

    def refine_model(self, model: LayerModel, record: dict) -> LayerModel:
        """The layer's model with the error curves of its scoring record (the `error` split reads them)."""
        return dataclasses.replace(
            model, head_error=tuple(record["head_error"]), channel_error=tuple(record["channel_error"])
        )

    def score_identity(self) -> dict:
        c = self.config
        return {
            "kind": "structured",
            "score": c.score,
            "units": list(c.units),
            "align": c.align,
            "split": c.allocation["split"],
            "percdamp": c.percdamp,
        }

    def scored_specs(self, adapter: ArchAdapter, block: nn.Module, i: int) -> list[LinearSpec]:
        return adapter.linears(block, i)

    def score_request(self, adapter: ArchAdapter, block: nn.Module, i: int) -> StatsRequest:
        grams = consumer_inputs(adapter, block, i, self.config.units)
        moments = {s.input_id for s in adapter.linears(block, i)} - grams
        return StatsRequest(grams, moments, grams if self.config.score == "fluctuation" else set())

    def score_block(
        self,
        adapter: ArchAdapter,
        block: nn.Module,
        i: int,
        stats: dict[str, InputStats],
        norm: float,
        model: LayerModel,
        measure: Measure,
    ) -> tuple[dict, Callable[[float], list]]:
        """(this stage's part of the layer's scoring record: unit score sums, `head_error`, `channel_error`; a function
        ``S -> [(weight view, zeroed columns)]`` removing the units the run would remove for a budget of ``S·P_l``)."""
        orders, score_stats, channel = _structured_scores(adapter, block, i, stats, self.config, norm)
        rec: dict[str, Any] = {"score_stats": score_stats, "head_error": [], "channel_error": channel}
        heads = next((o for o in orders if o.kind == "kv_group"), None)
        if heads is not None:  # measured: removing r groups, r = 0 .. n_kv − 1 (pooled, like channel_error)
            n_kv = heads.order.numel()
            rec["head_error"] = [0.0] + [
                measure(_unit_masks(adapter, block, [heads], {"kv_group": r}))[0] / norm for r in range(1, n_kv)
            ]
        refined = self.refine_model(model, rec)
        split = self.config.allocation["split"]
        return rec, lambda S: _unit_masks(adapter, block, orders, plan_layer(refined, S * model.params, split))

    # ---- per block ----------------------------------------------------------------------------------------------
    def _remove(self, target: LayerDecision | None) -> dict[str, int]:
        if target is not None:
            return dict(target.remove)
        if self.plan is None:
            raise RuntimeError(f"{self.key}: a coordinated structured stage needs its budget's decision")
        return self.plan.remove

    def layer_shape(self, i: int, target: LayerDecision | None) -> LayerShape:
        if target is None and self.plan is not None:
            return LayerShape.of(self.plan.overrides)
        assert self.adapter is not None
        over = config_overrides(self.adapter.config, self._inv(i), self._remove(target), self.config.bias_compensation)
        return LayerShape.of(over)

    def stats(self, visit: BlockVisit, target: LayerDecision | None) -> StatsRequest:
        inputs = consumer_inputs(visit.adapter, visit.block, visit.i, self.config.units)
        if self.config.needs_gram:
            return StatsRequest(gram=inputs, track=inputs)
        return StatsRequest(moments=inputs, track=inputs)

    def solve_bytes(self, visit: BlockVisit, target: LayerDecision | None) -> int:
        """What `surgery.prune_block` holds at its peak. It solves the consumers one after another, keeping each
        one's solved float32 weights (at most the consumer's shape) until the block is rebuilt: the peak is the
        larger of one consumer's solve (`solvers.group_prune.workspace_bytes` for its shape, unit count and kept
        columns where the removal is known; its own weights are in that workspace) beside the others' weights, and
        all the solved weights beside the rebuilt block's new tensors (at most the block)."""
        specs = {s.name: s for s in visit.specs()}
        kinds = {k for u in self.config.units for k in UNIT_KINDS[u]}
        c = self.config
        remove = self._remove(target) if target is not None or self.plan is not None else None
        groups = [g for g in visit.adapter.units(visit.block, visit.i) if g.kind in kinds]
        cons = [specs[consumer(g)] for g in groups]
        results = [4 * s.d_out * s.d_in for s in cons]
        total = sum(results)
        peak = 0
        for s, g, own in zip(cons, groups, results):
            width = next(w for _, axis, w in g.members if axis == 1)
            kept = None if remove is None else s.d_in - remove.get(g.kind, 0) * width
            work = group_workspace_bytes(s.d_out, s.d_in, c.score, c.solver, g.count, cuda=visit.on_cuda, kept=kept)
            peak = max(peak, work + total - own)
        block = sum(p.numel() * p.element_size() for p in visit.block.parameters())
        return max(peak, total + block)

    def apply(self, visit: BlockVisit, target: LayerDecision | None) -> StageResult:
        before = sum(p.numel() for p in visit.block.parameters())
        block, records = prune_block(
            visit.adapter,
            visit.block,
            visit.i,
            self.options,
            self._remove(target),
            visit.stats,
            visit.out_adapter,
            run_all=visit.run_sharded,
        )
        visit.block = block
        return StageResult(removed=before - sum(p.numel() for p in block.parameters()), section=records)

    def output(self) -> OutputChanges:
        if self.plan is None:
            return OutputChanges()
        p = self.plan
        section = {
            "remove_per_layer": p.remove,
            "config": p.overrides,
            "block_params_before": p.params_before,
            "block_params_after": p.params_after,
            "target": p.target,
            "achieved": round(p.achieved, 6),
        }
        return OutputChanges(report={"structured_plan": section})


# --------------------------------------------------------------------------------------------- scoring helpers


@dataclass
class _Order:
    """Removal order of the units of one group (lowest score first) and where to zero them."""

    kind: str
    consumer: LinearSpec
    width: int
    order: Tensor


def _structured_scores(
    adapter: ArchAdapter,
    block: nn.Module,
    i: int,
    stats: dict[str, InputStats],
    config: StructuredConfig,
    norm: float,
) -> tuple[list[_Order], dict, list[float]]:
    """Per selected unit group: the removal order by the stage's score, the score sums per kind, and the layer's
    channel error curve (normalised by Σ‖y‖²; empty without channel units)."""
    specs = {s.name: s for s in adapter.linears(block, i)}
    kinds = {k for u in config.units for k in UNIT_KINDS[u]}
    orders: list[_Order] = []
    score_stats: dict[str, list[float]] = {}
    channel = torch.zeros(len(CHANNEL_GRID), dtype=torch.float64)
    for g in adapter.units(block, i):
        if g.kind not in kinds:
            continue
        cons = specs[consumer(g)]
        width = next(w for _, axis, w in g.members if axis == 1)
        W = adapter.get_weight(block, cons).float()
        st = stats.get(cons.input_id)
        groups = groups_contiguous(W.shape[1], width)
        usable = st is not None and st.n > 0
        s = group_scores(
            config.score if usable else "magnitude", W, st if usable else None, groups, percdamp=config.percdamp
        )
        order = torch.sort(s.cpu(), stable=True).indices
        orders.append(_Order(g.kind, cons, width, order))
        acc = score_stats.setdefault(g.kind, [0.0, 0.0, 0.0])
        acc[0], acc[1], acc[2] = acc[0] + s.numel(), acc[1] + float(s.sum()), acc[2] + float(s.square().sum())
        if g.kind != "kv_group":
            H = st.H if usable and st is not None and st.H is not None else None
            cum = cumulative_error(W, H, width, order) / norm
            channel += cum[torch.tensor([round(f * g.count) for f in CHANNEL_GRID])]
    has_channels = any(o.kind != "kv_group" for o in orders)
    return orders, score_stats, channel.tolist() if has_channels else []


CUM_CHUNK_BYTES = 1 << 28  # what one row block of ``(WᵀW) ⊙ H`` in cumulative_error may hold (256 MiB)


def cumulative_error(W: Tensor, H: Tensor | None, width: int, order: Tensor) -> Tensor:
    """``E(k) = Σ_t ‖W_{:,R_k} x_{t,R_k}‖²`` for the first ``k`` units of `order` removed (``k = 0..n``), float64 on
    the CPU. With ``M = (WᵀW) ⊙ H`` summed over unit blocks (``M_u``), ``E(k) = Σ_{a,b<k} M_u[o_a, o_b]``, so
    ``E(k+1) − E(k) = 2·Σ_{b<k} M_u[o_k, o_b] + M_u[o_k, o_k]``: one number per unit, computed from row blocks of
    ``M`` of at most `CUM_CHUNK_BYTES` (never a d x d matrix: at d = 53248 that would be 21 GiB in float64). Products
    in W's dtype (float32 for the real blocks, float64 in the references), row sums in float64. Zeros without a Gram
    (no token reached the group: removing it changes nothing the calibration sees)."""
    d = W.shape[1]
    n = d // width
    if H is None:
        return torch.zeros(n + 1, dtype=torch.float64)
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    Wc = W.to(dtype)
    pos = torch.empty(n, dtype=torch.long, device=W.device)
    pos[order.to(W.device)] = torch.arange(n, device=W.device)
    inc = torch.zeros(n, dtype=torch.float64, device=W.device)
    per_unit = width * d * Wc.element_size() + n * 17  # its rows of M; its row of M_u, masked copy, mask
    units = max(1, CUM_CHUNK_BYTES // per_unit)
    for u0 in range(0, n, units):
        u1 = min(u0 + units, n)
        cols = slice(u0 * width, u1 * width)
        rows = (Wc[:, cols].T @ Wc) * H[cols].to(W.device, dtype)  # [(u1-u0)·width, d]: rows of M
        Mu = rows.reshape(u1 - u0, width, n, width).sum(dim=(1, 3)).double()  # [u1-u0, n]: rows of M_u
        del rows
        before = pos[None, :] < pos[u0:u1, None]  # b removed before a
        inc[pos[u0:u1]] = 2.0 * (Mu * before).sum(1) + Mu[torch.arange(u1 - u0), torch.arange(u0, u1)]
    return torch.cat([torch.zeros(1, dtype=torch.float64), inc.cumsum(0).cpu()])


def _unit_masks(
    adapter: ArchAdapter, block: nn.Module, orders: list[_Order], remove: dict[str, int]
) -> list[tuple[Tensor, Tensor]]:
    """(weight view, zeroed column index) pairs removing `remove[kind]` units from every group in score order."""
    out = []
    for o in orders:
        k = int(remove.get(o.kind, 0))
        if k <= 0:
            continue
        cols = torch.cat([torch.arange(int(u) * o.width, (int(u) + 1) * o.width) for u in o.order[:k]])
        out.append((adapter.get_weight(block, o.consumer), cols))
    return out


register_stage("structured", StructuredConfig, StructuredStage)
