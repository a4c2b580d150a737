"""MoE expert pruning (STUN, Lee et al. 2024) inside the block loop: routing statistics, the decision, the surgery.

Per MoE block, in the one dense statistics forward the pipeline already does (no extra forward):

- a pre-hook on the fused experts module sums, over calibration tokens, the top-k co-activation counts
  ``a_ij`` (``a_ii`` = tokens routed to ``i``), the routing weight each expert received and the token count: plain
  tensors in one dict (:func:`routing_stats`), so ranks combine them by summing;
- the adapter's input hooks already give each expert's input statistics on its routed tokens (``expert{e}_in``:
  gate/up input, ``expert{e}_out``: down_proj input), Grams for SparseGPT and column norms for Wanda.

Then, with no further forward (:func:`prune_experts`)::

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
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform
from torch import Tensor, nn
from transformers import PretrainedConfig

from engine.arch import ArchAdapter
from engine.blocks import DISK_LAYOUT_ATTR, FUSED_DOWN, FUSED_GATE_UP, build_meta_block, load_assign, num_experts_of
from engine.config import ConfigError, ExpertsStage, RunConfig
from engine.stages.structured import shrunk_config
from sharding.reader import CheckpointReader
from solvers.clustering import (
    choose_representatives,
    cluster_experts,
    coactivation_counts,
    coactivation_distance,
    merge_average,
    mixed_distance,
    n_keep_for_target,
    router_distance,
)
from solvers.stats import InputStats, merge

log = logging.getLogger(__name__)

COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")  # as serialised by transformers 5
TOP_K_FIELD = "num_experts_per_tok"
ROUTER_WEIGHT = "mlp.gate.weight"
_EXPERT_KEY = re.compile(r"^expert(\d+)_(in|out)$")


@dataclass
class ExpertsJob:
    """What the experts stage does to the whole model: the stage, the source adapter, the config field holding the
    routed-expert count, `E` and `top_k` of the source, the MoE layers and the experts each keeps (`n_keep`, set by
    :func:`allocate`)."""

    stage: ExpertsStage
    adapter: ArchAdapter
    count_field: str
    num_experts: int
    top_k: int
    moe_layers: list[int]
    n_keep: dict[int, int] = field(default_factory=dict)
    allocation: dict = field(default_factory=dict)
    _adapters: dict[int, ArchAdapter] = field(default_factory=dict, repr=False)

    def layer_fields(self, i: int) -> dict[str, int]:
        """Config fields of MoE layer `i` in the output: its expert count and `top_k ≤` that count."""
        n = self.n_keep[i]
        return {self.count_field: n, TOP_K_FIELD: min(self.top_k, n)}

    def layer_adapter(self, i: int) -> ArchAdapter:
        """The adapter that builds output block `i` (the source's for dense layers)."""
        if i not in self.n_keep:
            return self.adapter
        n = self.n_keep[i]
        if n not in self._adapters:
            self._adapters[n] = adapter_with_experts(self.adapter, n)
        return self._adapters[n]


def expert_count_field(config: PretrainedConfig) -> str:
    """The config field that holds the routed-expert count in config.json: `num_local_experts` (Mixtral, Qwen3-MoE),
    `num_experts` (Qwen2-MoE) or `n_routed_experts` (DeepSeek-V3). ConfigError when the config has none."""
    names = config.to_dict()
    found = next((f for f in COUNT_FIELDS if f in names), None)
    if found is None:
        raise ConfigError(f"experts stage: {config.model_type} config has none of {', '.join(COUNT_FIELDS)}")
    return found


def adapter_with_experts(adapter: ArchAdapter, n: int) -> ArchAdapter:
    """`adapter` for the config with `n` routed experts and `num_experts_per_tok` clipped to `n`."""
    top_k = min(int(getattr(adapter.config, TOP_K_FIELD)), n)
    return ArchAdapter(
        adapter.spec, shrunk_config(adapter.config, {expert_count_field(adapter.config): n, TOP_K_FIELD: top_k})
    )


# ------------------------------------------------------------------------------------------------ planning


def make_experts_job(cfg: RunConfig, adapter: ArchAdapter) -> ExpertsJob | None:
    """The job of the recipe's experts stage (None without one). ConfigError, before any weight is read, when the
    model has no MoE block, routes by expert groups (DeepSeek `n_group > 1`: removing experts would regroup them), or
    routes top-1 under `similarity: coactivation` (no co-activations to compare)."""
    stage = next((s for s in cfg.prune if isinstance(s, ExpertsStage)), None)
    if stage is None:
        return None
    config = adapter.config
    counts = {i: num_experts_of(build_meta_block(adapter.spec, config, i)) for i in range(adapter.num_layers)}
    moe_layers = [i for i, n in counts.items() if n]
    if not moe_layers:
        raise ConfigError(f"experts stage: the {adapter.model_type} model has no MoE block")
    if int(getattr(config, "n_group", None) or 1) > 1:
        raise ConfigError(
            f"experts stage: {adapter.model_type} with n_group = {config.n_group} routes by expert "
            "groups; removing experts would regroup them (only n_group = 1 is supported)"
        )
    if stage.similarity == "coactivation" and int(getattr(config, TOP_K_FIELD)) < 2:
        raise ConfigError(
            "experts stage: similarity coactivation needs num_experts_per_tok >= 2 (with top-1 routing "
            "no two experts share a token); use router or both"
        )
    return ExpertsJob(
        stage=stage,
        adapter=adapter,
        count_field=expert_count_field(config),
        num_experts=counts[moe_layers[0]],
        top_k=int(getattr(config, TOP_K_FIELD)),
        moe_layers=moe_layers,
    )


def allocate(job: ExpertsJob | None, reader: CheckpointReader) -> None:
    """Set `job.n_keep`: `E − round(target·E)` in every MoE layer, or with `per_layer` the counts of
    :func:`allocate_per_layer` on the router rows (read from `reader`; a few KB per layer, no forward)."""
    if job is None:
        return
    E, stage = job.num_experts, job.stage
    n_uniform = n_keep_for_target(E, stage.target)
    if stage.per_layer:
        D = {i: router_distance(_router_rows(reader, job.adapter, i)) for i in job.moe_layers}
        job.n_keep, job.allocation = allocate_per_layer(D, (E - n_uniform) * len(job.moe_layers))
    else:
        job.n_keep = {i: n_uniform for i in job.moe_layers}
    clipped = sorted(i for i, n in job.n_keep.items() if n < job.top_k)
    if clipped:
        log.warning(
            "experts: layers %s keep fewer experts than num_experts_per_tok = %d; top_k is clipped to the "
            "experts kept there",
            clipped,
            job.top_k,
        )
    log.info(
        "experts: %s similarity, %s representative; experts kept per MoE layer %s (of %d)",
        stage.similarity,
        stage.representative,
        [job.n_keep[i] for i in job.moe_layers],
        E,
    )


def _router_rows(reader: CheckpointReader, adapter: ArchAdapter, i: int) -> Tensor:
    prefix = adapter.block_prefix(i)
    names = set(reader.names_with_prefix(prefix))
    for name in (f"{prefix}{adapter.spec.moe_disk_prefix}gate.weight", f"{prefix}{ROUTER_WEIGHT}"):
        if name in names:
            return reader.read([name])[name].float()
    raise ValueError(
        f"block {prefix!r}: no router weight ({adapter.spec.moe_disk_prefix}gate.weight) in the checkpoint"
    )


def allocate_per_layer(distances: dict[int, Tensor], n_remove: int) -> tuple[dict[int, int], dict]:
    """Experts kept per layer when `n_remove` experts are removed in all: the `n_remove` lowest complete-linkage
    merge heights over all layers, each layer's distances divided by its mean off-diagonal entry.

    A layer's merge heights never decrease, so taking the globally smallest ones is one threshold `t`: layer l keeps
    the number of clusters its dendrogram has at height `t` (ties: lower layer, earlier merge). Every layer keeps at
    least one expert. Returns ({layer: kept}, {"threshold", "scale"}) for the report."""
    heights, scale, sizes = [], {}, {}
    for i, D in distances.items():
        E = D.shape[0]
        sizes[i] = E
        if E < 2:
            continue
        off = D[~torch.eye(E, dtype=torch.bool)]
        scale[i] = float(off.mean()) if float(off.mean()) > 0 else 1.0
        Z = linkage(squareform((D / scale[i]).numpy(), checks=False), method="complete")
        heights += [(float(h), i, s) for s, h in enumerate(Z[:, 2])]
    if not 0 <= n_remove <= len(heights):
        raise ValueError(
            f"allocate_per_layer: cannot remove {n_remove} of {sum(sizes.values())} experts "
            f"(at most {len(heights)}: every layer keeps one)"
        )
    chosen = sorted(heights)[:n_remove]
    removed = Counter(i for _, i, _ in chosen)
    threshold = chosen[-1][0] if chosen else 0.0
    return {i: E - removed[i] for i, E in sizes.items()}, {"threshold": threshold, "scale": scale}


# ------------------------------------------------------------------------------------------------ statistics


@contextlib.contextmanager
def routing_stats(job: ExpertsJob | None, block: nn.Module) -> Iterator[dict[str, Tensor]]:
    """While active, every forward of `block` adds its routing to the yielded dict (CPU tensors, sums over tokens):
    "coactivation" int64 `[E, E]` (`a_ij`, tokens whose top-k holds i and j; `a_ii` tokens routed to i),
    "routing_weight" float64 `[E]` (sum of the routing weights each expert received), "tokens" int64 `[]`.
    Empty (no hook) without a job or for a dense block. The hook is removed on exit, also on error."""
    stats: dict[str, Tensor] = {}
    E = num_experts_of(block)
    if job is None or not E:
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


def expert_distance(stage: ExpertsStage, W_gate: Tensor, routing: dict[str, Tensor]) -> Tensor:
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


def _members(clusters: Tensor, e: int) -> list[int]:
    return torch.nonzero(clusters == clusters[e]).reshape(-1).tolist()


def cluster_averages(block: nn.Module, clusters: Tensor, keep: list[int], counts: Tensor) -> dict[str, Tensor]:
    """The fused expert tensors and router rows of the kept slots replaced by their clusters' averages, weighted
    by `counts [E]` (tokens per expert; plain mean where a cluster got none): `{state name: [n_keep, ...]}`."""
    tensors = {
        FUSED_GATE_UP: block.mlp.experts.gate_up_proj,
        FUSED_DOWN: block.mlp.experts.down_proj,
        ROUTER_WEIGHT: block.mlp.gate.weight,
    }
    out = {}
    for name, T in tensors.items():
        rows = []
        for e in keep:
            m = torch.tensor(_members(clusters, e))
            rows.append(merge_average(T.detach()[m.to(T.device)], torch.zeros(len(m), dtype=torch.int64), counts[m])[0])
        out[name] = torch.stack(rows)
    return out


# ------------------------------------------------------------------------------------------------ surgery


def select_experts(
    adapter: ArchAdapter,
    block: nn.Module,
    i: int,
    keep: list[int],
    out_adapter: ArchAdapter,
    replace: dict[str, Tensor] | None = None,
) -> nn.Module:
    """Block `i` with only the routed experts `keep` (ascending source indices), as the stock decoder layer of
    `out_adapter.config` (which must have `len(keep)` experts): every tensor of the adapter's "expert" unit group
    (router rows, score-correction bias, fused expert tensors) indexed along its expert axis; `replace`
    ({state name: tensor}) then overrides tensors (cluster averages). The old block is not modified.
    ValueError for a bad `keep` or a tensor whose shape the output config does not take."""
    group = next((g for g in adapter.units(block, i) if g.kind == "expert"), None)
    if group is None:
        raise ValueError(f"select_experts: block {i} has no routed experts")
    if not keep or keep != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= group.count:
        raise ValueError(
            f"select_experts: block {i}: keep must be ascending distinct ids in [0, {group.count}), got {keep}"
        )
    state = {n: t.detach() for n, t in block.state_dict().items()}
    idx = torch.tensor(keep, dtype=torch.int64)
    for name, axis, _ in group.members:
        state[name] = state[name].index_select(axis, idx.to(state[name].device))
    state.update(replace or {})
    meta = build_meta_block(out_adapter.spec, out_adapter.config, i)
    want = meta.state_dict()
    for name, t in want.items():
        if name not in state or tuple(state[name].shape) != tuple(t.shape):
            got = tuple(state[name].shape) if name in state else None
            raise ValueError(
                f"select_experts: block {i}: {name} has shape {got}, the output config needs {tuple(t.shape)}"
            )
    new = load_assign(meta, {n: state[n].contiguous() for n in want}, out_adapter.block_prefix(i))
    layout = getattr(block, DISK_LAYOUT_ATTR, None)
    if layout is not None:
        setattr(new, DISK_LAYOUT_ATTR, layout)
    return new


def remap_stats(stats: dict[str, InputStats], clusters: Tensor, keep: list[int]) -> dict[str, InputStats]:
    """Input statistics of the pruned block: non-expert inputs as they are; kept expert j (source `keep[j]`):
    "expert{j}_in" = the sum of its cluster members' input statistics (the tokens it receives once they are gone),
    "expert{j}_out" = its own down_proj input statistics (or the members' sum when it got no token)."""
    out = {k: v for k, v in stats.items() if not _EXPERT_KEY.match(k)}
    for j, r in enumerate(keep):
        members = _members(clusters, r)
        ins = [stats[f"expert{m}_in"] for m in members if f"expert{m}_in" in stats]
        outs = [stats[f"expert{m}_out"] for m in members if f"expert{m}_out" in stats]
        if ins:
            out[f"expert{j}_in"] = functools.reduce(merge, ins)
        if f"expert{r}_out" in stats:
            out[f"expert{j}_out"] = stats[f"expert{r}_out"]
        elif outs:
            out[f"expert{j}_out"] = functools.reduce(merge, outs)
    return out


def prune_experts(
    job: ExpertsJob,
    adapter: ArchAdapter,
    block: nn.Module,
    i: int,
    stats: dict[str, InputStats],
    routing: dict[str, Tensor],
) -> tuple[nn.Module, dict[str, InputStats], dict]:
    """Decide and apply the experts of block `i` (formulas in the module docstring): returns (the pruned block of
    `job.layer_adapter(i)`, the renumbered input statistics, the report record). Dense blocks pass through."""
    if i not in job.n_keep:
        return block, stats, {}
    t0 = time.perf_counter()
    E, n, stage = num_experts_of(block), job.n_keep[i], job.stage
    D = expert_distance(stage, adapter.router(block).weight.detach(), routing)
    clusters = cluster_experts(D, n)
    keep = choose_representatives(clusters, None, "centroid", D=expert_weight_distance(block.mlp.experts)).keep
    t1 = time.perf_counter()
    tokens = routing["coactivation"].diagonal()
    replace = cluster_averages(block, clusters, keep, tokens) if stage.representative == "average" else None
    new = select_experts(adapter, block, i, keep, job.layer_adapter(i), replace) if n < E else block
    rec = {
        "before": E,
        "after": n,
        "kept": keep,
        "clusters": clusters.tolist(),
        "top_k": min(job.top_k, n),
        **({"top_k_clipped_from": job.top_k} if n < job.top_k else {}),
        "tokens": int(routing["tokens"]),
        "tokens_per_expert": tokens.tolist(),
        **_spread(D, clusters),
        "time_s": {"decide": round(t1 - t0, 4), "surgery": round(time.perf_counter() - t1, 4)},
    }
    log.debug("block %d experts: keep %s of %d (clusters %s)", i, keep, E, rec["clusters"])
    return new, remap_stats(stats, clusters, keep), rec


def _spread(D: Tensor, clusters: Tensor) -> dict[str, float]:
    """Largest distance inside a cluster ("diameter") and smallest between clusters ("separation")."""
    same = clusters[:, None] == clusters[None, :]
    off = ~torch.eye(D.shape[0], dtype=torch.bool)
    diameter = float(D[same & off].max()) if bool((same & off).any()) else 0.0
    separation = float(D[~same].min()) if bool((~same).any()) else 0.0
    return {"diameter": round(diameter, 8), "separation": round(separation, 8)}


# ------------------------------------------------------------------------------------------------ output


def output_overrides(job: ExpertsJob | None) -> dict:
    """Stock config fields of the output: the expert count (per layer: the largest; the layers carry their own) and
    `num_experts_per_tok` clipped to it."""
    if job is None or not job.n_keep:
        return {}
    n = max(job.n_keep.values())
    return {job.count_field: n, TOP_K_FIELD: min(job.top_k, n)}


def is_nonuniform(job: ExpertsJob | None) -> bool:
    """True when layers keep different numbers of experts (a `per_layer` run): the output needs the checkpoint's
    own model class."""
    return job is not None and job.stage.per_layer and bool(job.n_keep)


def layer_entries(job: ExpertsJob | None, entries: list[dict]) -> list[dict]:
    """`blockprune.layers` entries (one per output layer, source numbering: no depth removal with this stage) with
    each MoE layer's expert count and top-k in its `config`."""
    if not is_nonuniform(job):
        return entries
    return [
        {**e, "config": {**e.get("config", {}), **(job.layer_fields(i) if i in job.n_keep else {})}}
        for i, e in enumerate(entries)
    ]


def report_section(job: ExpertsJob | None) -> dict:
    """The `experts` section of `blockprune_report.json`."""
    if job is None:
        return {}
    kept = sum(job.n_keep.values())
    total = job.num_experts * len(job.moe_layers)
    clipped = sorted(i for i, n in job.n_keep.items() if n < job.top_k)
    return {
        "target": job.stage.target,
        "similarity": job.stage.similarity,
        "representative": job.stage.representative,
        "per_layer": job.stage.per_layer,
        "experts_before": job.num_experts,
        "experts_after": {str(i): job.n_keep[i] for i in job.moe_layers},
        "achieved": round(1 - kept / total, 6),
        "top_k": job.top_k,
        **({"top_k_clipped_layers": clipped} if clipped else {}),
        **({"allocation": {"threshold": job.allocation["threshold"]}} if job.allocation else {}),
    }


def plan_summary(job: ExpertsJob | None) -> tuple[dict[int, str], str | None]:
    """For `blockprune plan` (no tensor read): {MoE layer: "E->n"} ("E->?" with per-layer counts, decided from the
    router rows when the run starts) and one summary line; ({}, None) without an experts stage."""
    if job is None:
        return {}, None
    E, stage, layers = job.num_experts, job.stage, len(job.moe_layers)
    n = n_keep_for_target(E, stage.target)
    per_block = {i: f"{E}->{'?' if stage.per_layer else n}" for i in job.moe_layers}
    counts = "per-layer counts from the router rows at run time, " if stage.per_layer else ""
    top_k = "clipped per layer to the experts kept" if stage.per_layer else f"-> {min(job.top_k, n)}"
    line = (
        f"experts ({stage.similarity} similarity, {stage.representative} representative): {counts}"
        f"{n * layers} of {E * layers} routed experts kept in {layers} MoE layers; "
        f"num_experts_per_tok {job.top_k} {top_k}"
    )
    return per_block, line
