"""Unstructured and N:M pruning of selected linears: every method of `solvers.registry` (magnitude, Wanda,
SparseGPT, ...).

Per block: the selected linears' inputs get the statistics their solver needs (the Gram for SparseGPT, column
norms for Wanda, none for magnitude); each linear is solved with the layer's sparsity (the recipe's, or its share of
a global budget); linears that read one input and whose solver has a shared-input form (q/k/v, gate/up with
SparseGPT) are solved together, one factorisation of ``H`` — on one rank; with several ranks every matrix is its own
task so that they run on different ranks at once (the same result: each matrix selects among its own rows).
Nothing changes shape, so the one-pass true-sequential path (`engine.sequential`) can run this stage input group by
input group (`linear_wise`).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from engine.arch import ArchAdapter, LinearSpec
from engine.coordinator import LayerDecision, LayerModel
from engine.dense_pass import stats_to
from engine.reconstruct import resolve_reconstruct
from engine.schema import ConfigError, PruningError, compile_pattern, name_selected, parse_nm, resolve_allocation
from engine.stage import BlockVisit, ModelInfo, StageBase, StageResult, StatsRequest, register_stage
from solvers.masks import magnitude_prune, n_pruned, wanda_prune, wanda_scores
from solvers.registry import (
    available_solvers,
    get_group_solver,
    get_solver,
    needs_gram,
    needs_stats,
    solver_options,
    workspace_bytes,
)
from solvers.stats import InputStats, col_norm_sq

log = logging.getLogger(__name__)

_EXPERT_INDEX = re.compile(r"experts\.\d+\.")


@dataclass
class UnstructuredConfig:
    """Magnitude, Wanda, SparseGPT (any method of `solvers.registry`) on every selected linear of every block.

    `targets` / `ignore`: patterns over the linear's name inside the block (e.g. `self_attn.q_proj`,
    `mlp.experts.3.down_proj`): shell globs (`*proj`, `mlp.*`) or regular expressions prefixed `re:`.
    A linear is pruned when it matches a target and no ignore pattern. Solver options (`blocksize`, `percdamp`, ...)
    go to the solvers that take them.
    """

    method: str
    sparsity: float = 0.5
    pattern: str = "unstructured"  # unstructured | N:M (e.g. "2:4")
    targets: list[str] = field(default_factory=lambda: ["*"])
    ignore: list[str] = field(default_factory=list)
    blocksize: int = 128  # SparseGPT lazy-update block
    percdamp: float | None = None  # damping of the Gram (None: the solver's default; SparseGPT 0.01, ADMM 0.1)
    iterations: int = 20  # ADMM iterations
    schedule_iterations: int = 15  # ADMM iterations over which the mask grows to the target (cubic schedule)
    allocation: dict[str, Any] = field(default_factory=lambda: {"rule": "uniform"})  # docs/allocation.md
    reconstruct: Any | None = None  # block-local reconstruction after the block is pruned (engine/reconstruct.py)

    def validate(self, where: str) -> None:
        self.reconstruct = resolve_reconstruct(self.reconstruct, f"{where}.reconstruct")
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"{where}.sparsity = {self.sparsity}: must be in [0, 1)")
        self.allocation = resolve_allocation(self.allocation, f"{where}.allocation", structured=False)
        nm = parse_nm(self.pattern, where)
        if nm is not None and self.allocation["rule"] != "uniform":
            raise ConfigError(
                f"{where}: pattern {self.pattern} fixes every layer's sparsity; allocation.rule "
                f"{self.allocation['rule']!r} needs pattern: unstructured"
            )
        if nm is not None and self.sparsity not in (0.5, 1 - nm[0] / nm[1]):
            # N:M fixes the sparsity; accept the default 0.5 or the exact value, and say so otherwise
            raise ConfigError(
                f"{where}: pattern {self.pattern} means sparsity {1 - nm[0] / nm[1]:g}, but sparsity = {self.sparsity}"
            )
        if self.blocksize < 1:
            raise ConfigError(f"{where}.blocksize must be >= 1")
        if self.percdamp is not None and not 0 <= self.percdamp < math.inf:
            raise ConfigError(f"{where}.percdamp = {self.percdamp}: must be a finite number >= 0")
        if self.iterations < 1 or not 0 <= self.schedule_iterations <= self.iterations:
            raise ConfigError(
                f"{where}: need iterations >= 1 and 0 <= schedule_iterations <= iterations, got {self.iterations} "
                f"and {self.schedule_iterations}"
            )
        for p in self.targets + self.ignore:
            compile_pattern(p, where)

    @property
    def effective_sparsity(self) -> float:
        nm = parse_nm(self.pattern, "stage")
        return self.sparsity if nm is None else 1 - nm[0] / nm[1]

    def selects(self, name: str) -> bool:
        return name_selected(name, self.targets, self.ignore)


class UnstructuredStage(StageBase):
    """See the module docstring. Allocatable: a global budget hands each layer its sparsity (`LayerDecision`)."""

    linear_wise = True
    config: UnstructuredConfig

    def __init__(self, config: UnstructuredConfig, index: int) -> None:
        super().__init__(config, index)
        self.last_gram_reader = False
        self.sparsity = config.effective_sparsity  # what every layer gets without a coordinated budget
        self.options = {  # recipe keys that name one of the solver's options (None: the solver's default)
            k: getattr(config, k) for k in solver_options(config.method) if getattr(config, k, None) is not None
        }

    # ---- before the loop ----------------------------------------------------------------------------------------
    def setup(self, model: ModelInfo) -> None:
        # the last stage of the run may let its solver factorise a Gram in place (nothing reads it afterwards)
        self.last_gram_reader = model.stages[-1] is self
        adapter = model.adapter
        specs = [s for i in range(adapter.num_layers) for s in adapter.meta_linears(i)]
        chosen = [s for s in specs if self.config.selects(s.name)]
        if not chosen:
            names = ", ".join(sorted({s.name for s in specs})[:12])
            raise ConfigError(
                f"{self.key}: targets {self.config.targets} (ignore {self.config.ignore}) select no linear; "
                f"names: {names}"
            )
        nm = parse_nm(self.config.pattern, self.key)
        if nm is not None:
            bad = [s.name for s in chosen if s.d_in % nm[1]]
            if bad:
                raise ConfigError(
                    f"{self.key}: pattern {self.config.pattern} needs input widths divisible by {nm[1]}: {bad[0]}"
                )

    # ---- the budget's view (engine.budget) ----------------------------------------------------------------------
    @property
    def allocation(self) -> dict:
        return self.config.allocation

    @property
    def global_target(self) -> float:
        return self.config.sparsity

    def set_uniform_target(self, S: float) -> None:
        """Every layer at `S` (`allocation.of: total` rescales the recipe's target onto the prunable parameters)."""
        self.sparsity = S

    def layer_model(self, adapter: ArchAdapter, i: int) -> LayerModel:
        """``P_l``: the selected linears' parameters of layer `i` (as `adapter` builds it); one step = one weight per
        output row of every selected linear."""
        specs = [s for s in adapter.meta_linears(i) if self.config.selects(s.name)]
        return LayerModel(layer=i, params=sum(s.d_out * s.d_in for s in specs), unit=float(sum(s.d_out for s in specs)))

    def score_identity(self) -> dict:
        """What this stage's scores depend on (part of the scores cache key)."""
        score = "magnitude" if self.config.method == "magnitude" else "wanda"
        return {"kind": "unstructured", "score": score, "targets": self.config.targets, "ignore": self.config.ignore}

    def scored_specs(self, adapter: ArchAdapter, block: nn.Module, i: int) -> list[LinearSpec]:
        return [s for s in adapter.linears(block, i) if self.config.selects(s.name)]

    def score_request(self, adapter: ArchAdapter, block: nn.Module, i: int) -> StatsRequest:
        return StatsRequest(moments={s.input_id for s in self.scored_specs(adapter, block, i)})

    def refine_model(self, model: LayerModel, record: dict) -> LayerModel:
        return model

    def score_block(
        self,
        adapter: ArchAdapter,
        block: nn.Module,
        i: int,
        stats: dict[str, InputStats],
        norm: float,
        model: LayerModel,
        measure: Callable,
    ) -> tuple[dict, Callable[[float], list]]:
        """(this stage's part of the layer's scoring record: the weight-score sums per linear role, a function
        ``S -> [(weight view, prune mask)]`` of every selected linear at sparsity S for the block-error forwards)."""
        specs = self.scored_specs(adapter, block, i)
        magnitude = self.config.method == "magnitude"
        rec = {"score_stats": _weight_score_stats(adapter, block, specs, stats, magnitude)}
        return rec, lambda S: _weight_masks(adapter, block, specs, stats, magnitude, S)

    # ---- per block ----------------------------------------------------------------------------------------------
    def _layer_sparsity(self, target: LayerDecision | None) -> float:
        return self.sparsity if target is None else target.sparsity

    def stats(self, visit: BlockVisit, target: LayerDecision | None) -> StatsRequest:
        req = StatsRequest()
        method = self.config.method
        for spec in visit.specs():
            if not self.config.selects(spec.name):
                continue
            if needs_gram(method):
                req.gram.add(spec.input_id)
            elif needs_stats(method):
                req.moments.add(spec.input_id)
        req.moments -= req.gram
        return req

    def apply(self, visit: BlockVisit, target: LayerDecision | None) -> StageResult:
        return self.solve_linears(visit, visit.specs(), visit.stats, target)

    def solve_linears(
        self, visit: BlockVisit, specs: list[LinearSpec], stats: dict[str, InputStats], target: LayerDecision | None
    ) -> StageResult:
        """Prune the selected linears among `specs` in place (module docstring); returns their records and the zeros
        they hold."""
        chosen = [s for s in specs if self.config.selects(s.name)]
        sparsity = self._layer_sparsity(target)
        several = visit.rt.dist.enabled and visit.rt.dist.world_size > 1
        shared = get_group_solver(self.config.method) is not None and not several
        groups: dict[tuple, list[LinearSpec]] = {}
        for spec in chosen:
            key = (spec.input_id,) if shared and spec.input_id in stats else (spec.name,)
            groups.setdefault(key, []).append(spec)
        tasks = list(groups.values())

        def solve(group: list[LinearSpec]) -> list[tuple[Tensor, dict]]:
            st = stats.get(group[0].input_id)
            W0s = [visit.adapter.get_weight(visit.block, spec) for spec in group]
            # the group is the only reader of its Gram (one task per input, the last stage that reads Grams): the
            # solver may factorise it in place (solvers.registry: consume_gram)
            consume = shared and self.last_gram_reader and st is not None and st.H is not None
            # Gram solvers work on float32 copies; the mask solvers (magnitude, Wanda) score a chunk of rows in
            # float32 and write the pruned weight in the weight's own dtype: no float32 copy of a bf16 matrix
            f32 = needs_gram(self.config.method)
            Ws, errors = self._solve(group, [W0.float() if f32 else W0 for W0 in W0s], st, sparsity, consume)
            return [(W.to(W0.dtype), _linear_record(W, sparsity, err)) for W0, W, err in zip(W0s, Ws, errors)]

        results = visit.run_sharded(tasks, [self._cost(g) for g in tasks], solve)
        out = StageResult()
        for group, result in zip(tasks, results):
            for spec, (W, rec) in zip(group, result):
                visit.adapter.set_weight(visit.block, spec, W)
                out.linears[spec.name] = rec
                out.removed += rec["zeros"]
        return out

    def verify(self, result: StageResult, target: LayerDecision | None) -> None:
        """Every pruned linear holds at least the zeros its sparsity asks for, up to the rounding of the solvers'
        selections (per row, per column block): a linear whose statistics were NaN/Inf (which no solver prunes
        from) or that a solver skipped fails here, before anything is written."""
        for name, rec in result.linears.items():
            d_out, d_in = rec["shape"]
            planned = float(rec["planned"])
            need = min(n_pruned(planned, d_out * d_in), d_out * n_pruned(planned, d_in))
            slack = d_out + -(-d_in // 16)  # one per row, one per 16-column sub-block
            if rec["zeros"] < need - slack:
                raise PruningError(
                    f"{self.key} ({self.config.method}) {name}: {rec['zeros']} zeros of {d_out * d_in} "
                    f"(sparsity {rec['sparsity']:.4f}) but the plan is {planned:.4f}; NaN/Inf in this block's "
                    "calibration activations or weights?"
                )

    def _solve(
        self, group: list[LinearSpec], Ws: list[Tensor], st: InputStats | None, s: float, consume: bool
    ) -> tuple[list[Tensor], list[float | None]]:
        """The pruned weights and each one's relative reconstruction error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` (None
        without a Gram), measured on at most `ERROR_ROWS` evenly spaced rows (exact for smaller matrices; the full
        products would cost ``d_out·d_in²`` each, as much as the solve)."""
        method, pattern = self.config.method, self.config.pattern
        if st is not None:
            st = stats_to(st, Ws[0].device)  # statistics of a chunked gather wait on the host
        if (st is None or st.n == 0) and needs_stats(method):  # an expert that received no calibration token
            log.warning("%s: no calibration tokens reached this linear; using magnitude", group[0].name)
            return [get_solver("magnitude")(W, None, s, pattern).weight for W in Ws], [None] * len(Ws)
        H = st.H if st is not None else None
        rows = [_error_rows(W.shape[0]) for W in Ws]
        base = [_row_energy(W, H, r) for W, r in zip(Ws, rows)] if H is not None else None
        kept = [W[r].clone() for W, r in zip(Ws, rows)] if H is not None and not consume else None
        many = get_group_solver(method)
        extra = {"consume_gram": True} if consume else {}
        if many is not None:
            results = many(Ws, st, s, pattern, **self.options, **extra)
        else:
            results = [get_solver(method)(W, st, s, pattern, **self.options) for W in Ws]
        if base is None:
            return [r.weight for r in results], [None] * len(Ws)
        errors: list[float | None] = []
        for k, (res, r, b) in enumerate(zip(results, rows, base)):
            if kept is not None:  # the Gram is still there: the error on the same rows
                errors.append(_row_energy(res.weight, H, r, minus=kept[k]) / max(b, 1e-30))
            else:  # consumed: the solver's own undamped error (per token, all rows) against the rows' energy
                scale = Ws[k].shape[0] / len(r)
                err = res.info.get("error")
                errors.append(None if err is None else float(err) * st.n / max(b * scale, 1e-30))
        return [r.weight for r in results], errors

    def solve_bytes(self, visit: BlockVisit, target: LayerDecision | None) -> int:
        """The largest task's solver workspace (a shared-input group counts its stacked rows)."""
        groups: dict[str, list[LinearSpec]] = {}
        shared = get_group_solver(self.config.method) is not None
        for spec in visit.specs():
            if self.config.selects(spec.name):
                groups.setdefault(spec.input_id if shared else spec.name, []).append(spec)
        consume = shared and self.last_gram_reader
        return max(
            (
                workspace_bytes(
                    self.config.method, sum(s.d_out for s in g), g[0].d_in, consume_gram=consume, cuda=visit.on_cuda
                )
                for g in groups.values()
            ),
            default=0,
        )

    def _cost(self, group: list[LinearSpec]) -> float:
        """Estimated flops: a Gram solver ~ d_in³ (factorisation) + d_out·d_in² (updates); others ~ d_out·d_in."""
        d_in, d_out = group[0].d_in, sum(s.d_out for s in group)
        if needs_gram(self.config.method):
            return float(d_in**3 + d_out * d_in**2)
        return float(d_out * d_in)


ERROR_ROWS = 256  # rows of a pruned linear on which its relative reconstruction error is measured


def _error_rows(d_out: int) -> Tensor:
    """At most `ERROR_ROWS` evenly spaced row indices (all rows of a smaller matrix)."""
    if d_out <= ERROR_ROWS:
        return torch.arange(d_out)
    return torch.linspace(0, d_out - 1, ERROR_ROWS).round().to(torch.int64).unique()


def _row_energy(W: Tensor, H: Tensor, rows: Tensor, minus: Tensor | None = None) -> float:
    """``Σ_{r ∈ rows} v_r H v_rᵀ`` with ``v = W[rows] − minus`` (or ``W[rows]``), in float32 at least."""
    dtype = torch.promote_types(H.dtype, torch.float32)
    V = W[rows.to(W.device)].to(device=H.device, dtype=dtype)
    if minus is not None:
        V = V - minus.to(device=H.device, dtype=dtype)
    return float(((V @ H.to(dtype)) * V).sum())


def _linear_record(W: Tensor, planned: float, error: float | None) -> dict:
    zeros = W.numel() - int(torch.count_nonzero(W))
    rec = {"sparsity": round(zeros / W.numel(), 6), "zeros": zeros, "shape": list(W.shape), "planned": planned}
    if error is not None:
        rec["error"] = error
    return rec


# --------------------------------------------------------------------------------------------- scoring helpers


def _norms(stats: dict[str, InputStats], spec: LinearSpec) -> Tensor | None:
    st = stats.get(spec.input_id)
    return None if st is None or st.n == 0 else col_norm_sq(st)


def _role(name: str) -> str:
    return _EXPERT_INDEX.sub("experts.*.", name)


def _weight_score_stats(
    adapter: ArchAdapter, block: nn.Module, specs: list[LinearSpec], stats: dict[str, InputStats], magnitude: bool
) -> dict[str, list[float]]:
    """Per linear role: [count, Σ s, Σ s²] of the weight scores (|W| for magnitude, else Wanda)."""
    out: dict[str, list[float]] = {}
    for s in specs:
        W = adapter.get_weight(block, s)
        n = _norms(stats, s)
        S = (W.abs() if magnitude or n is None else wanda_scores(W, n)).double()
        acc = out.setdefault(_role(s.name), [0.0, 0.0, 0.0])
        acc[0] += S.numel()
        acc[1] += float(S.sum())
        acc[2] += float(S.square().sum())
    return out


def _weight_masks(
    adapter: ArchAdapter,
    block: nn.Module,
    specs: list[LinearSpec],
    stats: dict[str, InputStats],
    magnitude: bool,
    S: float,
) -> list[tuple[Tensor, Tensor]]:
    """(weight view, boolean prune mask) pairs: every selected linear at sparsity `S` (magnitude: one threshold per
    matrix; Wanda: per row; a linear that saw no token: magnitude)."""
    out = []
    for s in specs:
        W = adapter.get_weight(block, s)
        n = _norms(stats, s)
        res = magnitude_prune(W.float(), S) if magnitude or n is None else wanda_prune(W.float(), n, S)
        out.append((W, ~res.mask))
    return out


register_stage(available_solvers(), UnstructuredConfig, UnstructuredStage)
