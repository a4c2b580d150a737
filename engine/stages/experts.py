"""MoE expert pruning (STUN, Lee et al. 2024) inside the block loop: routing statistics, the decision, the surgery.

Per MoE block, in the one dense statistics forward the pipeline already does (no extra forward):

- a pre-hook on the fused experts module sums, over calibration tokens, the top-k co-activation counts
  ``a_ij`` (``a_ii`` = tokens routed to ``i``), the routing weight each expert received and the token count: plain
  tensors in one dict (:func:`routing_stats`), so ranks combine them by summing;
- the adapter's input hooks already give each expert's input statistics on its routed tokens (``expert{e}_in``:
  gate/up input, ``expert{e}_out``: down_proj input), Grams for SparseGPT and column norms for Wanda.

Then, with no further forward (`ExpertsStage.apply`)::

    D        = router_distance(W_gate) | coactivation_distance(a) | α·D_router/max + (1−α)·D_coact/max
    clusters = complete-linkage clustering of D into n_keep clusters              (solvers.clustering)
    keep     = per cluster the member closest to the centroid of the experts' weights (gate, up, down)
    block'   = the stock decoder layer of the config with n_keep experts (top_k ≤ n_keep), loaded with the kept
               experts' tensors and router rows (and DeepSeek's score-correction bias): routing, its normalisation
               (`norm_topk_prob`, Mixtral's renormalised top-k) and shared experts are the stock block's
    stats'   = expert statistics renumbered: expert{j}_in = Σ over the cluster's members (the tokens the
               representative receives once its cluster-mates are gone), expert{j}_out = the representative's own

Later unstructured stages of the recipe then prune the surviving experts in the same block visit.

Counts: uniform (every MoE layer keeps ``n_keep = E − round(target·E)``, stock config) or per layer
(:func:`allocate_per_layer`: one global threshold on the complete-linkage merge heights of the router-row distances,
each layer's matrix divided by its mean off-diagonal distance; the same total as uniform; read from the router
weights before the block loop, no forward).

Group-limited routing (DeepSeek-V3, ``n_group > 1``): the router scores each of ``n_group`` contiguous groups of
``E / n_group`` experts by the sum of its two best experts, keeps the ``topk_group`` best groups and picks the top-k
experts inside them. Clusters are then formed within each group (:func:`solvers.clustering.cluster_experts_grouped`),
every group keeps the same number ``n_keep / n_group`` (``n_keep`` rounded to a multiple of ``n_group``, at least 2 per
group, since the group score sums two experts), so the kept experts, renumbered ascending, form the same contiguous
groups; ``num_experts_per_tok`` is clipped to ``topk_group · n_keep / n_group``, what the chosen groups still hold.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform
from torch import Tensor, nn
from transformers import PretrainedConfig

from engine.arch import ArchAdapter
from engine.blocks import build_meta_block, num_experts_of
from engine.reconstruct import resolve_reconstruct
from engine.schema import ConfigError, choice
from engine.stage import BlockVisit, LayerShape, ModelInfo, OutputChanges, StageBase, StageResult, register_stage
from engine.surgery import ROUTER_WEIGHT, cluster_averages, members, select_experts
from sharding import dist
from sharding.reader import CheckpointReader
from solvers.clustering import (
    choose_representatives,
    cluster_experts_grouped,
    coactivation_counts,
    coactivation_distance,
    mixed_distance,
    n_keep_for_target,
    router_distance,
)
from solvers.stats import InputStats, merge

log = logging.getLogger(__name__)

COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")  # as serialised by transformers 5
MIN_PER_GROUP = 2  # group-limited routing scores a group by its two best experts
TOP_K_FIELD = "num_experts_per_tok"
_EXPERT_KEY = re.compile(r"^expert(\d+)_(in|out)$")


@dataclass
class ExpertsConfig:
    """MoE expert pruning (STUN; docs/moe.md): cluster the routed experts of every MoE block by behaviour and keep one
    expert per cluster, with its router row. Shared experts are never removed.

    `target`: fraction of the routed experts removed. `similarity`: `router` (distance between router rows),
    `coactivation` (how often two experts share a token's top-k) or `both` (`alpha`·router + (1−`alpha`)·coactivation,
    each scaled to [0, 1]). `representative`: `centroid` (the member closest to the cluster's weight centroid) or
    `average` (that slot receives the token-weighted cluster average). `per_layer`: per-layer counts from one global
    threshold on the router-row merge heights (same total; non-uniform output), else every layer keeps the same
    number (stock config)."""

    method: str = "experts"
    target: float = 0.25
    similarity: str = "router"
    alpha: float = 0.5
    representative: str = "centroid"
    per_layer: bool = False

    SIMILARITIES: ClassVar[tuple[str, ...]] = ("router", "coactivation", "both")
    REPRESENTATIVES: ClassVar[tuple[str, ...]] = ("centroid", "average")
    reconstruct: Any | None = None  # block-local reconstruction after the block is pruned (engine/reconstruct.py)

    def validate(self, where: str) -> None:
        self.reconstruct = resolve_reconstruct(self.reconstruct, f"{where}.reconstruct")
        if not 0.0 < self.target < 1.0:
            raise ConfigError(f"{where}.target = {self.target}: must be in (0, 1)")
        choice([self.similarity], self.SIMILARITIES, f"{where}.similarity")
        choice([self.representative], self.REPRESENTATIVES, f"{where}.representative")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"{where}.alpha = {self.alpha}: must be in [0, 1]")


def expert_count_field(config: PretrainedConfig) -> str:
    """The config field that holds the routed-expert count in config.json: `num_local_experts` (Mixtral, Qwen3-MoE),
    `num_experts` (Qwen2-MoE) or `n_routed_experts` (DeepSeek-V3). ConfigError when the config has none."""
    names = config.to_dict()
    found = next((f for f in COUNT_FIELDS if f in names), None)
    if found is None:
        raise ConfigError(f"experts stage: {config.model_type} config has none of {', '.join(COUNT_FIELDS)}")
    return found


def expert_groups(config: PretrainedConfig) -> tuple[int, int]:
    """(`n_group`, `topk_group`) of group-limited routing (DeepSeek-V3); (1, 1) for routers without groups."""
    n_group = int(getattr(config, "n_group", None) or 1)
    return n_group, int(getattr(config, "topk_group", None) or 1) if n_group > 1 else 1


def routed_top_k(config: PretrainedConfig, n: int) -> int:
    """`num_experts_per_tok` of a layer of `config` keeping `n` routed experts: at most `n`, and with group-limited
    routing at most `topk_group · n / n_group`, the experts the selected groups hold (a larger top-k would pick
    experts of unselected groups: the router masks them with -inf but still takes them)."""
    n_group, topk_group = expert_groups(config)
    return min(int(getattr(config, TOP_K_FIELD)), n if n_group == 1 else topk_group * (n // n_group))


def grouped_keep(E: int, target: float, n_group: int) -> int:
    """Experts kept with `n_group` routing groups: `E − round(target·E)` rounded to the nearest multiple of `n_group`
    (halves up), so every group keeps the same number. ConfigError when that leaves a group fewer than 2 experts
    (the router's group score sums each group's two best)."""
    n = n_keep_for_target(E, target)
    if n_group == 1:
        return n
    per_group = int(math.floor(n / n_group + 0.5))
    if per_group < MIN_PER_GROUP:
        most = 1 - MIN_PER_GROUP * n_group / E
        raise ConfigError(
            f"experts stage: target {target} keeps {n} of {E} experts, fewer than {MIN_PER_GROUP} in each of the "
            f"n_group = {n_group} routing groups (the router's group score sums each group's best two); the "
            f"largest target is {most:g}"
        )
    return per_group * n_group


def adapter_with_experts(adapter: ArchAdapter, n: int) -> ArchAdapter:
    """`adapter` for the config with `n` routed experts and `num_experts_per_tok` clipped (`routed_top_k`)."""
    return adapter.with_overrides({expert_count_field(adapter.config): n, TOP_K_FIELD: routed_top_k(adapter.config, n)})


# ------------------------------------------------------------------------------------------------ planning


def _router_rows(reader: CheckpointReader, adapter: ArchAdapter, i: int) -> Tensor:
    prefix = adapter.block_prefix(i)
    names = set(reader.names_with_prefix(prefix))
    for name in (f"{prefix}{adapter.spec.moe_disk_prefix}gate.weight", f"{prefix}{ROUTER_WEIGHT}"):
        if name in names:
            return reader.read([name])[name].float()
    raise ValueError(
        f"block {prefix!r}: no router weight ({adapter.spec.moe_disk_prefix}gate.weight) in the checkpoint"
    )


def allocate_per_layer(distances: dict[int, Tensor], n_remove: int, n_group: int = 1) -> tuple[dict[int, int], dict]:
    """Experts kept per layer when `n_remove` experts are removed in all: the `n_remove` lowest complete-linkage
    merge heights over all layers, each layer's distances divided by its mean off-diagonal entry.

    A layer's merge heights never decrease, so taking the globally smallest ones is one threshold `t`: layer l keeps
    the number of clusters its dendrogram has at height `t` (ties: lower layer, earlier merge). Every layer keeps at
    least one expert. With `n_group` routing groups (contiguous expert ranges) experts go in rounds of one per group:
    round r of a layer costs the largest r-th merge height of its groups' own dendrograms, `n_remove / n_group` rounds
    are taken, and every group keeps at least `MIN_PER_GROUP`. Returns ({layer: kept}, {"threshold", "scale"})."""
    rounds, scale, sizes = [], {}, {}
    keep_least = 1 if n_group == 1 else MIN_PER_GROUP
    for i, D in distances.items():
        E = D.shape[0]
        sizes[i] = E
        g = E // n_group
        if g <= keep_least:
            continue
        off = D[~torch.eye(E, dtype=torch.bool)]
        scale[i] = float(off.mean()) if float(off.mean()) > 0 else 1.0
        blocks = [D[c * g : (c + 1) * g, c * g : (c + 1) * g] / scale[i] for c in range(n_group)]
        merges = [linkage(squareform(B.numpy(), checks=False), method="complete")[:, 2] for B in blocks]
        heights = np.max(np.stack(merges), axis=0)[: g - keep_least]  # round r: the r-th merge of every group
        rounds += [(float(h), i, r) for r, h in enumerate(heights)]
    if n_remove % n_group or not 0 <= n_remove // n_group <= len(rounds):
        least = "every layer keeps one" if n_group == 1 else f"each of the {n_group} groups keeps {keep_least}"
        raise ValueError(
            f"allocate_per_layer: cannot remove {n_remove} of {sum(sizes.values())} experts "
            f"(at most {len(rounds) * n_group}, in multiples of {n_group}: {least})"
        )
    chosen = sorted(rounds)[: n_remove // n_group]
    removed = Counter(i for _, i, _ in chosen)
    threshold = chosen[-1][0] if chosen else 0.0
    return {i: E - n_group * removed[i] for i, E in sizes.items()}, {"threshold": threshold, "scale": scale}


# ------------------------------------------------------------------------------------------------ statistics


@contextlib.contextmanager
def routing_stats(block: nn.Module) -> Iterator[dict[str, Tensor]]:
    """While active, every forward of `block` adds its routing to the yielded dict (CPU tensors, sums over tokens):
    "coactivation" int64 `[E, E]` (`a_ij`, tokens whose top-k holds i and j; `a_ii` tokens routed to i),
    "routing_weight" float64 `[E]` (sum of the routing weights each expert received), "tokens" int64 `[]`.
    Empty (no hook) for a dense block. The hook is removed on exit, also on error."""
    stats: dict[str, Tensor] = {}
    E = num_experts_of(block)
    if not E:
        yield stats
        return
    stats.update(
        coactivation=torch.zeros(E, E, dtype=torch.int64),
        routing_weight=torch.zeros(E, dtype=torch.float64),
        tokens=torch.zeros((), dtype=torch.int64),
    )

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
        w = args[2] if len(args) > 2 else kwargs["top_k_weights"]
        idx = idx.detach().reshape(-1, idx.shape[-1]).to("cpu", torch.int64)
        stats["coactivation"] += coactivation_counts(idx, E)
        stats["routing_weight"].index_add_(0, idx.reshape(-1), w.detach().reshape(-1).to("cpu", torch.float64))
        stats["tokens"] += idx.shape[0]

    handle = block.mlp.experts.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield stats
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------------ decision


def expert_distance(stage: ExpertsConfig, W_gate: Tensor, routing: dict[str, Tensor]) -> Tensor:
    """`D [E, E]` (float64) of the stage's `similarity` from the router rows `W_gate [E, H]` and the routing sums."""
    if stage.similarity == "router":
        return router_distance(W_gate)
    d_co = coactivation_distance(routing["coactivation"])
    if stage.similarity == "coactivation":
        return d_co
    return mixed_distance(router_distance(W_gate), d_co, stage.alpha)


@torch.no_grad()
def expert_weight_distance(experts: nn.Module, chunk: int = 64) -> Tensor:
    """Euclidean distances `[E, E]` (float64, CPU) between the experts' flattened weights (gate, up and down):
    `d_ij² = G_ii + G_jj − 2 G_ij` with the Gram `G = F Fᵀ` accumulated in float64 over `chunk` rows at a time, so no
    float64 copy of all experts is made."""
    E = experts.gate_up_proj.shape[0]
    G = torch.zeros(E, E, dtype=torch.float64)
    for T in (experts.gate_up_proj, experts.down_proj):
        for r in range(0, T.shape[1], chunk):
            F = T[:, r : r + chunk].reshape(E, -1).to(torch.float64)
            G += (F @ F.T).cpu()
    d = G.diagonal()
    return (d[:, None] + d[None, :] - 2 * G).clamp_min(0).sqrt().fill_diagonal_(0.0)


# ------------------------------------------------------------------------------------------------ surgery


def remap_stats(stats: dict[str, InputStats], clusters: Tensor, keep: list[int]) -> dict[str, InputStats]:
    """Input statistics of the pruned block: non-expert inputs as they are; kept expert j (source `keep[j]`):
    "expert{j}_in" = the sum of its cluster members' input statistics (the tokens it receives once they are gone),
    "expert{j}_out" = its own down_proj input statistics (or the members' sum when it got no token)."""
    out = {k: v for k, v in stats.items() if not _EXPERT_KEY.match(k)}
    for j, r in enumerate(keep):
        group = members(clusters, r)
        ins = [stats[f"expert{m}_in"] for m in group if f"expert{m}_in" in stats]
        outs = [stats[f"expert{m}_out"] for m in group if f"expert{m}_out" in stats]
        if ins:
            out[f"expert{j}_in"] = functools.reduce(merge, ins)
        if f"expert{r}_out" in stats:
            out[f"expert{j}_out"] = stats[f"expert{r}_out"]
        elif outs:
            out[f"expert{j}_out"] = functools.reduce(merge, outs)
    return out


def _spread(D: Tensor, clusters: Tensor) -> dict[str, float]:
    """Largest distance inside a cluster ("diameter") and smallest between clusters ("separation")."""
    same = clusters[:, None] == clusters[None, :]
    off = ~torch.eye(D.shape[0], dtype=torch.bool)
    diameter = float(D[same & off].max()) if bool((same & off).any()) else 0.0
    separation = float(D[~same].min()) if bool((~same).any()) else 0.0
    return {"diameter": round(diameter, 8), "separation": round(separation, 8)}


class ExpertsStage(StageBase):
    """See the module docstring."""

    section = "experts"
    config: ExpertsConfig

    def __init__(self, config: ExpertsConfig, index: int) -> None:
        super().__init__(config, index)
        self.adapter: ArchAdapter | None = None
        self.count_field = ""
        self.num_experts = 0
        self.top_k = 0
        self.n_group = 1
        self.moe_layers: list[int] = []
        self.n_keep: dict[int, int] = {}
        self.allocation: dict = {}

    def setup(self, model: ModelInfo) -> None:
        """ConfigError, before any weight is read, when the model has no MoE block, routes top-1 under `similarity:
        coactivation` (no co-activations to compare), or routes by expert groups that the target would leave fewer
        than 2 experts each (or whose count does not divide the experts). Until `prepare` reads the router rows,
        every MoE layer is planned with the uniform count (with groups, rounded to a multiple of `n_group`)."""
        adapter = self.adapter = model.adapter
        config = adapter.config
        counts = {i: num_experts_of(build_meta_block(adapter.spec, config, i)) for i in range(adapter.num_layers)}
        self.moe_layers = [i for i, n in counts.items() if n]
        if not self.moe_layers:
            raise ConfigError(f"experts stage: the {adapter.model_type} model has no MoE block")
        self.n_group = expert_groups(config)[0]
        if counts[self.moe_layers[0]] % self.n_group:
            raise ConfigError(
                f"experts stage: n_group = {self.n_group} does not divide the {counts[self.moe_layers[0]]} "
                "routed experts (group-limited routing needs equal contiguous groups)"
            )
        self.top_k = int(getattr(config, TOP_K_FIELD))
        if self.config.similarity == "coactivation" and self.top_k < 2:
            raise ConfigError(
                "experts stage: similarity coactivation needs num_experts_per_tok >= 2 (with top-1 routing "
                "no two experts share a token); use router or both"
            )
        self.count_field = expert_count_field(config)
        self.num_experts = counts[self.moe_layers[0]]
        n = grouped_keep(self.num_experts, self.config.target, self.n_group)
        self.n_keep = {i: n for i in self.moe_layers}

    def prepare(self, reader: CheckpointReader) -> None:
        """`n_keep`: `E − round(target·E)` in every MoE layer, or with `per_layer` the counts of
        :func:`allocate_per_layer` on the router rows (a few KB per layer, no forward)."""
        assert self.adapter is not None
        E, G = self.num_experts, self.n_group
        n_uniform = grouped_keep(E, self.config.target, G)
        if G > 1 and n_uniform != n_keep_for_target(E, self.config.target):
            log.warning(
                "experts: n_group = %d routing groups: experts kept per MoE layer rounded from %d to %d (%d per group)",
                G,
                n_keep_for_target(E, self.config.target),
                n_uniform,
                n_uniform // G,
            )
        if self.config.per_layer:
            D = {i: router_distance(_router_rows(reader, self.adapter, i)) for i in self.moe_layers}
            self.n_keep, self.allocation = allocate_per_layer(D, (E - n_uniform) * len(self.moe_layers), G)
        clipped = sorted(i for i, n in self.n_keep.items() if self.top_k_for(n) < self.top_k)
        if clipped:
            log.warning(
                "experts: layers %s keep fewer experts than num_experts_per_tok = %d can pick%s; top_k is clipped "
                "to %s there",
                clipped,
                self.top_k,
                f" (topk_group x experts per group with n_group = {G})" if G > 1 else "",
                sorted({self.top_k_for(self.n_keep[i]) for i in clipped}),
            )
        log.info(
            "experts: %s similarity, %s representative; experts kept per MoE layer %s (of %d)",
            self.config.similarity,
            self.config.representative,
            [self.n_keep[i] for i in self.moe_layers],
            E,
        )

    def top_k_for(self, n: int) -> int:
        """`num_experts_per_tok` of a layer keeping `n` routed experts (`routed_top_k`)."""
        assert self.adapter is not None
        return routed_top_k(self.adapter.config, n)

    def layer_fields(self, n: int) -> dict[str, int]:
        """Config fields of a layer keeping `n` routed experts: the count and its top-k (`top_k_for`)."""
        return {self.count_field: n, TOP_K_FIELD: self.top_k_for(n)}

    def layer_shape(self, i: int, target=None) -> LayerShape:
        """MoE layers: their expert count; dense layers (which the count does not change) the largest count, so that
        a uniform run's layers all have one shape (a stock config)."""
        return LayerShape.of(self.layer_fields(self.n_keep.get(i, max(self.n_keep.values()))))

    def solve_bytes(self, visit: BlockVisit, target=None) -> int:
        """The kept experts' tensors, copied into the rebuilt block (and, for `average`, their merged copies)."""
        block = visit.block
        if not num_experts_of(block):
            return 0
        experts = sum(
            t.numel() * t.element_size() for t in (block.mlp.experts.gate_up_proj, block.mlp.experts.down_proj)
        )
        kept = self.n_keep.get(visit.i, self.num_experts) / max(self.num_experts, 1)
        return int(experts * kept * (2 if self.config.representative == "average" else 1))

    @contextlib.contextmanager
    def observe(self, visit: BlockVisit) -> Iterator[None]:
        with routing_stats(visit.block) as routing:
            visit.scratch[self.key] = routing
            yield

    def apply(self, visit: BlockVisit, target=None) -> StageResult:
        """Decide and apply the experts of the block (module docstring): the block of `visit.out_adapter`, its input
        statistics renumbered. Dense blocks pass through."""
        routing = visit.scratch.pop(self.key, {})
        if routing:  # plain sums: every rank gets the routing counts of all calibration tokens
            dist.all_reduce_sum([routing[k] for k in sorted(routing)], visit.rt.dist)
        i, block = visit.i, visit.block
        if i not in self.n_keep:
            return StageResult()
        t0 = time.perf_counter()
        E, n, cfg = num_experts_of(block), self.n_keep[i], self.config
        D = expert_distance(cfg, visit.adapter.router(block).weight.detach(), routing)
        clusters = cluster_experts_grouped(D, n, self.n_group)
        keep = choose_representatives(clusters, None, "centroid", D=expert_weight_distance(block.mlp.experts)).keep
        t1 = time.perf_counter()
        tokens = routing["coactivation"].diagonal()
        before = sum(p.numel() for p in block.parameters())
        if n < E:
            replace = cluster_averages(block, clusters, keep, tokens) if cfg.representative == "average" else None
            visit.block = select_experts(visit.adapter, block, i, keep, visit.out_adapter, replace)
            visit.stats = remap_stats(visit.stats, clusters, keep)
        rec = {
            "before": E,
            "after": n,
            "kept": keep,
            "clusters": clusters.tolist(),
            "top_k": self.top_k_for(n),
            **({"top_k_clipped_from": self.top_k} if self.top_k_for(n) < self.top_k else {}),
            "tokens": int(routing["tokens"]),
            "tokens_per_expert": tokens.tolist(),
            **_spread(D, clusters),
        }
        log.debug("block %d experts: keep %s of %d (clusters %s)", i, keep, E, rec["clusters"])
        removed = before - sum(p.numel() for p in visit.block.parameters())
        times = {"experts_decide": t1 - t0, "experts_surgery": time.perf_counter() - t1}
        return StageResult(removed=removed, section=rec, time_s=times)

    def output(self) -> OutputChanges:
        """The `experts` section of `blockprune_report.json`."""
        kept = sum(self.n_keep.values())
        total = self.num_experts * len(self.moe_layers)
        clipped = sorted(i for i, n in self.n_keep.items() if self.top_k_for(n) < self.top_k)
        section = {
            "target": self.config.target,
            "similarity": self.config.similarity,
            "representative": self.config.representative,
            "per_layer": self.config.per_layer,
            "experts_before": self.num_experts,
            "experts_after": {str(i): self.n_keep[i] for i in self.moe_layers},
            "achieved": round(1 - kept / total, 6),
            "top_k": self.top_k,
            **({"top_k_clipped_layers": clipped} if clipped else {}),
            **(self._groups_section() if self.n_group > 1 else {}),
            **({"allocation": {"threshold": self.allocation["threshold"]}} if self.allocation else {}),
        }
        return OutputChanges(report={"experts": section})

    def _groups_section(self) -> dict:
        """Report entries of group-limited routing: groups, the rounding of the kept count, top-k's cap."""
        E, G = self.num_experts, self.n_group
        assert self.adapter is not None
        return {
            "n_group": G,
            "topk_group": expert_groups(self.adapter.config)[1],
            "experts_per_group_after": {str(i): self.n_keep[i] // G for i in self.moe_layers},
            "rounded_from": n_keep_for_target(E, self.config.target),
        }

    def plan_summary(self) -> tuple[dict[int, str], str]:
        """For `blockprune plan` (no tensor read): {MoE layer: "E->n"} ("E->?" with per-layer counts, decided from
        the router rows when the run starts) and one summary line."""
        E, cfg, layers, G = self.num_experts, self.config, len(self.moe_layers), self.n_group
        n = grouped_keep(E, cfg.target, G)
        per_block = {i: f"{E}->{'?' if cfg.per_layer else n}" for i in self.moe_layers}
        counts = "per-layer counts from the router rows at run time, " if cfg.per_layer else ""
        top_k = "clipped per layer to the experts kept" if cfg.per_layer else f"-> {self.top_k_for(n)}"
        rounded = f", rounded from {n_keep_for_target(E, cfg.target)}" if n != n_keep_for_target(E, cfg.target) else ""
        groups = f" ({n // G} in each of {G} routing groups{rounded})" if G > 1 else ""
        line = (
            f"experts ({cfg.similarity} similarity, {cfg.representative} representative): {counts}"
            f"{n * layers} of {E * layers} routed experts kept in {layers} MoE layers{groups}; "
            f"num_experts_per_tok {self.top_k} {top_k}"
        )
        return per_block, line


register_stage("experts", ExpertsConfig, ExpertsStage)
