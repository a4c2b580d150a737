"""A global budget: one stage's target spread over the layers, decided layer by layer and reconciled to the total.

A stage whose `allocation` is not the plain uniform one (`rule: owl | softmax`, or `of: total`) gets a `Budget`
(docs/allocation.md). The stage tells the budget what it knows of each layer (`layer_model`: its prunable
parameters ``P_l`` and units; `score_block`: its part of the scoring record); the budget never asks which kind of
stage it drives:

    budget = make_budget(stages, model)          # before any weight is read: P_l, the reach of min/max, `of: total`
    budget.prepare(model)                        # after the stages' own preparation (e.g. expert counts known)
    budget.lookup(reader, rt, ids)               # the cached scores answer this run?  else:
    budget.scorer()                              #   an observer of the one scoring pass (engine.prepass)
    budget.plan(kept_layers)                     # the rule's per-layer plan and the coordinator
    budget.decide(i) -> LayerDecision            # per block: this layer's target, handed to the stage
    budget.record(i, BlockRecord)                # what the block really removed (`BlockRecord.removed[stage]`)
    budget.report()                              # the `allocation` section of the report

Scoring record per layer (the stage adds its own keys, e.g. the structured error curves): `influence` (block
influence), `outlier_ratio` (OWL's ``D = #{S_ij > M · mean S} / #S`` over the Wanda scores ``|W_ij|·‖X_j‖`` of the
layer's scored linears), `output_norm`, and for each global target ``S`` of the grid `errors[S]` = ``Σ_t ‖y'_t −
y_t‖² / Σ_t ‖y_t‖²`` when this block alone is pruned at ``S`` by the stage's score with no reconstruction (one masked
forward each; `errors_token[S]` = the per-token mean from the same forwards, recorded, not used by default: the
pooled ratio is dominated by tokens with massive activations, e.g. SmolLM2-135M's BOS token from block 11 on, yet it
gave better allocations than the per-token one; docs/allocation.md has the measurements).

Results are cached in ``<output>/blockprune_scores.json`` under a key hashing the input checkpoint's fingerprint,
the calibration token ids, the compute dtype, the world size and the stage's scoring identity (not the target, the
rule or the temperature), so a resumed, re-targeted or re-tempered run reuses them.

Rules (``S`` the global target as a fraction of ``Σ P_l``; bounds ``[min, max]``, capped per layer by what its units
allow): ``owl`` (``solvers.allocation.owl_allocation`` of the outlier ratios, then clipped), ``softmax``
(``s_l = clip(c·exp(−E_l/T), min, max)``, ``c`` exact).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from engine.arch import ArchAdapter, LinearSpec
from engine.coordinator import Coordinator, LayerDecision, LayerModel
from engine.prepass import masked_error
from engine.schema import ConfigError
from engine.stage import BlockRecord, BlockStage, ModelInfo, StatsRequest
from sharding.dist import all_gather_object, broadcast_object
from sharding.writer import atomic_write
from solvers.allocation import interpolate_log, owl_allocation, softmax_allocation, standardize_energy
from solvers.masks import wanda_scores
from solvers.stats import InputStats, col_norm_sq

log = logging.getLogger(__name__)

SCORES_FILE = "blockprune_scores.json"
SCORES_FORMAT = "blockprune-scores"
FORMAT_VERSION = 4  # 4: one scoring pass for all layers (no depth skip in the key); 3: `errors` pooled over tokens
ERROR_GRID: tuple[float, ...] = (0.1, 0.3, 0.5)  # global targets at which block errors are measured (plus the run's)
ERROR_FLOOR = 1e-12  # errors below this count as this (log of zero)
TOLERANCE = 1e-3  # the global removed fraction lands within this of the target (or one unit, whichever is larger)


def allocated(stage: BlockStage) -> bool:
    """Whether `stage` needs a budget: it has an `allocation` whose rule is not uniform, or `of: total`."""
    alloc = getattr(stage, "allocation", None)
    if not alloc:
        return False
    return alloc.get("rule") != "uniform" or alloc.get("of") == "total"


def make_budget(stages: Sequence[BlockStage], model: ModelInfo) -> Budget | None:
    """The budget of the recipe (None when no stage needs one). ConfigError, before any weight is read, for a second
    budgeted stage or an unreachable target."""
    chosen = [s for s in stages if allocated(s)]
    if not chosen:
        return None
    if len(chosen) > 1:
        raise ConfigError(
            f"{chosen[1].key}.allocation: only one stage per run may use a global allocation "
            "(a non-uniform rule or `of: total`)"
        )
    return Budget(chosen[0], model)


def model_params(adapter: ArchAdapter) -> int:
    """All parameters of the model of `adapter.config` (a meta build; tied embeddings counted once)."""
    from transformers import AutoModelForCausalLM

    config = type(adapter.config).from_dict(adapter.config.to_dict())  # without the adapter's implementation picks
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


class Budget:
    """One stage's global budget during a run (see the module docstring)."""

    def __init__(self, stage: Any, model: ModelInfo) -> None:
        self.stage = stage
        self.adapter = model.adapter
        self.alloc = dict(stage.allocation)
        self.target = float(stage.global_target)
        self.where = f"{stage.key}.allocation"
        n = model.adapter.num_layers
        self.models: dict[int, LayerModel] = {i: stage.layer_model(model.adapter, i) for i in range(n)}
        prunable = sum(m.params for m in self.models.values())
        self.total_params = model_params(model.adapter) if self.alloc["of"] == "total" else None
        self.S = self.target * (self.total_params / prunable if self.total_params else 1.0)
        self.coordinator: Coordinator | None = None
        self.scores: list[dict] = []
        self.score_info: dict = {}
        self.rule_plan: list[float] = []
        self.energy: list[float] = []
        self.layers: list[int] = []
        self.blocks: dict[int, dict] = {}
        self._scores_path = Path(model.run.output) / SCORES_FILE
        self._cached = read_scores(self._scores_path) if self.coordinated else {}  # before the writer clears output
        self._key = ""
        self._entry: dict | None = None
        self._is_main = True
        self._reader: Any = None
        self._check_reach(list(self.models))
        if not self.coordinated:
            stage.set_uniform_target(self.S)

    @property
    def coordinated(self) -> bool:
        """Whether layers get their own budgets (any rule but uniform)."""
        return self.alloc["rule"] != "uniform"

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
    def prepare(self, model: ModelInfo) -> None:
        """Recount ``P_l`` with the shapes the stages before this one give each layer (e.g. surviving experts)."""
        if not self.coordinated:
            return
        for i in self.models:
            shape = model.shape_before(self.stage, i)
            self.models[i] = self.stage.layer_model(model.adapter.with_overrides(shape.config), i)
        self._check_reach(list(self.models))

    def _needs_errors(self) -> bool:
        return self.alloc["rule"] == "softmax" and self.alloc["energy"] == "error"

    def _identity(self) -> dict:
        return {"stage": self.stage.score_identity(), "owl_m": self.alloc["m"]}

    def lookup(self, reader, rt, ids: Tensor) -> None:
        """Find the cached scores that answer this run (the same on every rank: the key hashes every rank's slice of
        the calibration; rank 0's file decides), so all ranks score together or none does."""
        if not self.coordinated:
            return
        info = rt.dist
        self._reader = reader
        digests = all_gather_object(ids_digest(ids), info) if info.enabled else None
        self._key = cache_key(reader.fingerprint(), ids, rt.dtype, info.world_size, self._identity(), digests)
        entry = self._cached.get(self._key)
        entry = entry if covers(entry, self.S if self._needs_errors() else None) else None
        self._entry = broadcast_object(entry, info) if info.enabled else entry
        self._is_main = info.is_main
        self.score_info = {"file": self._scores_path.name, "key": self._key, "reused": self._entry is not None}
        if self._entry is not None:
            log.info("allocation: reusing the scores in %s (key %s)", self._scores_path, self._key)

    def scorer(self) -> BudgetScorer | None:
        """The observer of the scoring pass, when the cached scores do not answer this run."""
        if not self.coordinated or self._entry is not None:
            return None
        grid = tuple(sorted(set(ERROR_GRID) | {round(self.S, 6)})) if self._needs_errors() else ()
        log.info("allocation: scoring pass (%s, grid %s)", self.stage.score_identity()["kind"], list(grid))
        return BudgetScorer(self, grid)

    def _store(self, entry: dict) -> None:
        self._entry = json_roundtrip(entry)

    def plan(self, kept: list[int]) -> None:
        """The rule's plan over the layers `kept` (those not removed by a depth stage) and the coordinator."""
        if not self.coordinated:
            return
        assert self._entry is not None, "plan() before the scores are known"
        self._cached[self._key] = self._entry
        if self._is_main:  # (again when reused: the writer may have cleared the output directory)
            write_scores(self._scores_path, self._cached)
        by_layer = {r["layer"]: r for r in self._entry["layers"]}
        self.layers = list(kept)
        self.scores = [by_layer[i] for i in self.layers]
        for i in self.layers:
            self.models[i] = self.stage.refine_model(self.models[i], by_layer[i])
        self._check_reach(self.layers)
        self.coordinator = self._make_coordinator(self.scores)

    def _make_coordinator(self, scores: list[dict]) -> Coordinator:
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

    def record(self, i: int, record: BlockRecord, decision: LayerDecision | None) -> dict | None:
        """Tell the coordinator what block `i` removed (the stage's `StageResult.removed`, carried by the record) and
        return the block's `allocation` record."""
        if self.coordinator is None or decision is None:
            return None
        self._check_source(i)
        m = self.models[i]
        removed = int(record.removed.get(self.stage.key, 0))
        self.coordinator.record(i, removed, decision)
        rec = {
            "params": m.params,
            "planned": self.coordinator.planned_at_visit(i),
            "decided": decision.sparsity,
            "achieved": removed / m.params,
            "removed": removed,
            **({"remove": dict(decision.remove)} if decision.remove else {}),
        }
        self.blocks[i] = rec
        return rec

    def block_digest(self, i: int) -> str | None:
        """The digest of source block `i`'s bytes as the reader has hashed them (None without a reader)."""
        if self._reader is None or not hasattr(self._reader, "digest"):
            return None
        return self._reader.digest(self._reader.names_with_prefix(self.adapter.block_prefix(i)))

    def _check_source(self, i: int) -> None:
        """Reused scores were computed from these bytes: the header fingerprint in the cache key cannot tell a
        block whose values changed, the digest recorded with each layer's scores can."""
        if not self.score_info.get("reused"):
            return
        want = next((r.get("source_digest") for r in self.scores if r["layer"] == i), None)
        got = self.block_digest(i)
        if want is not None and got is not None and want != got:
            raise ConfigError(
                f"{self._scores_path} was scored from other weights of block {i} than the checkpoint holds now; "
                "delete it (or rerun with --overwrite) to score again"
            )

    # ---- after the loop -----------------------------------------------------------------------------------------
    def report(self) -> dict:
        """The `allocation` section of `blockprune_report.json` (docs/allocation.md)."""
        out: dict[str, Any] = {
            "stage": self.stage.index,
            "kind": self.stage.score_identity()["kind"],
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
        done = len(self.blocks) == len(c.models)
        out.update(
            {
                "scores": self.score_info,
                "planned_params": P,
                "target_removed": self.S * P,
                "removed": removed,
                "achieved": removed / P if P else 0.0,
                "error": err,
                "relative_error": err / P if P else 0.0,
                "within_tolerance": abs(err) <= max(TOLERANCE * self.S * P, unit) if done else None,
                "layers": [self._layer_row(k, m) for k, m in enumerate(c.models)],
            }
        )
        return out

    def _layer_row(self, k: int, m: LayerModel) -> dict:
        assert self.coordinator is not None
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


class BudgetScorer:
    """The budget's observer of the scoring pass: one record per layer (module docstring)."""

    def __init__(self, budget: Budget, grid: tuple[float, ...]) -> None:
        self.budget, self.grid = budget, grid
        self.layers: list[dict] = []

    def needed(self) -> bool:
        return True

    def stats(self, adapter: ArchAdapter, block: nn.Module, i: int) -> StatsRequest:
        return self.budget.stage.score_request(adapter, block, i)

    def score(self, i: int, block: nn.Module, dense, runner) -> None:
        stage, adapter = self.budget.stage, runner.adapter
        norm = max(dense.norm, 1e-30)
        tokens = max(dense.tokens, 1)
        specs = stage.scored_specs(adapter, block, i)
        rec: dict[str, Any] = {
            "layer": i,
            "tokens": int(dense.tokens),
            "output_norm": dense.norm / tokens,
            "influence": dense.influence,
            "outlier_ratio": outlier_ratio(adapter, block, specs, dense.stats, self.budget.alloc["m"]),
        }

        def measure(pairs: list) -> tuple[float, float]:
            return masked_error(runner, block, pairs)

        part, masks = stage.score_block(adapter, block, i, dense.stats, norm, self.budget.models[i], measure)
        rec.update(part)
        digest = self.budget.block_digest(i)
        if digest is not None:
            rec["source_digest"] = digest
        measured = {_grid_key(S): measure(masks(S)) for S in self.grid}
        rec["errors"] = {k: pooled / norm for k, (pooled, _) in measured.items()}
        rec["errors_token"] = {k: per_token / tokens for k, (_, per_token) in measured.items()}
        log.info(
            "scored block %d: influence %.4g, outlier ratio %.4g, errors %s",
            i,
            rec["influence"],
            rec["outlier_ratio"],
            {k: f"{v:.3g}" for k, v in rec["errors"].items()},
        )
        self.layers.append(rec)

    def finish(self) -> None:
        self.budget._store({"identity": self.budget._identity(), "grid": list(self.grid), "layers": self.layers})


def _grid_key(S: float) -> str:
    return format(float(S), ".6g")


def outlier_ratio(
    adapter: ArchAdapter, block: nn.Module, specs: list[LinearSpec], stats: dict[str, InputStats], M: float
) -> float:
    """OWL's D over the Wanda scores of every linear that saw tokens (two passes: the mean, then the count above
    M·mean; equal to `solvers.allocation.outlier_ratio` of the concatenated scores without concatenating them)."""
    parts = []
    for s in specs:
        st = stats.get(s.input_id)
        if st is not None and st.n > 0:
            parts.append((s, col_norm_sq(st)))
    if not parts:
        return 0.0
    total = count = 0.0
    for s, n in parts:
        S = wanda_scores(adapter.get_weight(block, s), n)
        total += float(S.double().sum())
        count += S.numel()
    threshold = M * total / count
    above = sum(float((wanda_scores(adapter.get_weight(block, s), n) > threshold).sum()) for s, n in parts)
    return above / count


# --------------------------------------------------------------------------------------------- energies


def error_at(layer: dict, target: float) -> float:
    """The layer's relative block output error at global target `target`: measured when `target` is in its grid, else
    log-interpolated between the two nearest grid targets."""
    grid = sorted((float(k), float(v)) for k, v in layer["errors"].items())
    if not grid:
        raise ValueError(f"layer {layer['layer']}: no block errors were measured (scores without a grid)")
    return interpolate_log([g for g, _ in grid], [v for _, v in grid], target, floor=ERROR_FLOOR)


def layer_energies(layers: list[dict], energy: str, target: float) -> Tensor:
    """Standardised per-layer energies ``E_l`` (float64, mean 0, std 1 unless constant). High = keep more.

    error: ``ln err_l(S)``; influence: ``ln BI_l``; score: the mean over the layer's units of their scores
    standardised per unit kind over all layers, ``Σ_k n_lk (m_lk − μ_k)/σ_k / Σ_k n_lk``.
    """
    if energy == "error":
        raw = [math.log(max(error_at(r, target), ERROR_FLOOR)) for r in layers]
    elif energy == "influence":
        raw = [math.log(max(float(r["influence"]), ERROR_FLOOR)) for r in layers]
    elif energy == "score":
        raw = _mean_standardised_scores(layers)
    else:
        raise ValueError(f"unknown energy {energy!r}")
    return standardize_energy(raw)


def _mean_standardised_scores(layers: list[dict]) -> list[float]:
    pooled: dict[str, list[float]] = {}
    for r in layers:
        for kind, (n, s, sq) in r["score_stats"].items():
            acc = pooled.setdefault(kind, [0.0, 0.0, 0.0])
            acc[0], acc[1], acc[2] = acc[0] + n, acc[1] + s, acc[2] + sq
    moments = {k: (s / n, math.sqrt(max(sq / n - (s / n) ** 2, 0.0))) for k, (n, s, sq) in pooled.items() if n > 0}
    out = []
    for r in layers:
        num = den = 0.0
        for kind, (n, s, _) in r["score_stats"].items():
            mu, sd = moments.get(kind, (0.0, 0.0))
            if n > 0 and sd > 0:
                num += n * ((s / n) - mu) / sd
                den += n
        out.append(num / den if den else 0.0)
    return out


# --------------------------------------------------------------------------------------------- cache file


def ids_digest(ids: Tensor) -> str:
    """sha256 (hex) of calibration token ids and their shape."""
    return hashlib.sha256(_ids_bytes(ids)).hexdigest()


def _ids_bytes(ids: Tensor) -> bytes:
    return ids.detach().to(torch.int64).cpu().contiguous().numpy().tobytes() + str(tuple(ids.shape)).encode()


def cache_key(
    fingerprint: str,
    ids: Tensor,
    dtype: torch.dtype,
    world_size: int,
    identity: dict,
    rank_digests: list[str] | None = None,
) -> str:
    """sha256 (hex, 24 digits) of everything the scores depend on (see the module docstring). With several ranks
    pass every rank's `ids_digest` in rank order (each rank holds a slice of the calibration), so that all ranks
    compute the same key."""
    h = hashlib.sha256()
    head = {
        "version": FORMAT_VERSION,
        "model": fingerprint,
        "dtype": str(dtype),
        "world_size": world_size,
        "identity": identity,
    }
    h.update(json.dumps(head, sort_keys=True).encode())
    h.update(_ids_bytes(ids) if rank_digests is None else "|".join(rank_digests).encode())
    return h.hexdigest()[:24]


def read_scores(path: str | Path) -> dict[str, dict]:
    """The entries {key: entry} of a scores file; {} when absent or unreadable (logged: it is only a cache)."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("format") != SCORES_FORMAT or data.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a {SCORES_FORMAT} v{FORMAT_VERSION} file")
        return dict(data["entries"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("scores cache %s is unusable (%s); scoring again", path, e)
        return {}


def write_scores(path: str | Path, entries: dict[str, dict]) -> None:
    """Write the entries atomically (temporary name, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": SCORES_FORMAT, "version": FORMAT_VERSION, "entries": entries}
    atomic_write(path, json.dumps(doc, indent=1, sort_keys=True).encode())


def covers(entry: dict | None, target: float | None) -> bool:
    """Whether a cached entry answers a run: it exists and, when block errors are needed (`target` given), its
    grid holds `target` or brackets it (log-interpolated)."""
    if entry is None:
        return False
    if target is None:
        return True
    grid = sorted(float(g) for g in entry.get("grid", []))
    return bool(grid) and grid[0] <= target <= grid[-1]


def json_roundtrip(obj: Any) -> Any:
    """`obj` as JSON would give it back (a fresh run plans from exactly the numbers a resumed run reads)."""
    return json.loads(json.dumps(obj))
