"""Model surgery: blocks rebuilt smaller as the stock decoder layer of a shrunk config.

Structured (`prune_block`): the consumer (o_proj / down_proj) of each unit group is pruned by
`solvers.group_prune.prune_groups` (score, solver, bias compensation); the producing rows (q/k/v, gate/up) of
removed units are dropped; the block is then rebuilt as the stock decoder layer of the shrunk config
(`build_meta_block` + `assign=True` load), so every module (and the attention's head bookkeeping) is exactly what
`from_pretrained` builds from the exported config. Nothing is masked.

Experts (`select_experts`): the kept routed experts' tensors and router rows, indexed along the expert axis, in the
stock layer of the config with fewer experts; `cluster_averages` gives merged representatives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from engine.arch import ArchAdapter, LinearSpec, UnitGroup
from engine.blocks import DISK_LAYOUT_ATTR, FUSED_DOWN, FUSED_GATE_UP, build_meta_block, load_assign
from engine.units import consumer
from solvers.clustering import merge_average
from solvers.group_prune import groups_contiguous, prune_groups
from solvers.stats import InputStats, init_stats

log = logging.getLogger(__name__)

ROUTER_WEIGHT = "mlp.gate.weight"


@dataclass(frozen=True)
class GroupOptions:
    """How `solvers.group_prune.prune_groups` removes units: the unit `score`, the reconstruction `solver` of the
    consumer's kept columns, FLAP's `bias_compensation` and the Gram damping `percdamp`."""

    score: str = "obs"
    solver: str = "closed_form"
    bias_compensation: bool = False
    percdamp: float = 0.01


def prune_block(
    adapter: ArchAdapter,
    block: nn.Module,
    i: int,
    options: GroupOptions,
    remove: dict[str, int],
    stats: dict[str, InputStats],
    out_adapter: ArchAdapter,
    run_all: Callable[[list, list[float], Callable], list] | None = None,
) -> tuple[nn.Module, dict[str, dict]]:
    """Remove `remove[kind]` units from every unit group of that kind in block `i` and return (the rebuilt stock block of
    `out_adapter.config`, per-consumer records). The old block's tensors are not modified.

    `run_all(tasks, costs, fn)` computes `[fn(t) for t in tasks]` (the consumers' solves, independent of one
    another); the engine passes one that shards them across ranks (engine.distributed.run_sharded)."""
    specs = {s.name: s for s in adapter.linears(block, i)}
    state = {n: t.detach() for n, t in block.state_dict().items()}
    experts: dict[int, dict[str, Tensor]] = {}
    records: dict[str, dict] = {}
    tasks = [(g, remove.get(g.kind, 0)) for g in adapter.units(block, i) if remove.get(g.kind, 0) > 0]

    def solve(task: tuple[UnitGroup, int]):
        g, k = task
        cons = specs[consumer(g)]
        return _solve(adapter, block, cons, g, k, options, stats.get(cons.input_id))

    costs = [float(specs[consumer(g)].d_out * specs[consumer(g)].d_in ** 2) for g, _ in tasks]
    results = run_all(tasks, costs, solve) if run_all is not None else [solve(t) for t in tasks]
    for (g, k), res in zip(tasks, results):
        cons = specs[consumer(g)]
        records[cons.name] = {**res.info, "shape": list(res.weight.shape), "kept_units": g.count - k}
        for name, axis, width in g.members:
            spec = specs[name]
            W = adapter.get_weight(block, spec)
            if axis == 1:
                new = res.weight.to(device=W.device, dtype=W.dtype)
            else:
                rows = groups_contiguous(g.count * width, width)
                new = W[torch.cat([rows[j] for j in res.keep_groups.tolist()]).to(W.device)]
            if spec.expert is not None:
                experts.setdefault(spec.expert, {})[name.rsplit(".", 1)[1]] = new
                continue
            state[f"{name}.weight"] = new
            if axis == 0 and f"{name}.bias" in state:
                b = state[f"{name}.bias"]
                state[f"{name}.bias"] = b[torch.cat([rows[j] for j in res.keep_groups.tolist()]).to(b.device)]
            if axis == 1 and res.bias is not None:
                old = state.get(f"{name}.bias")
                base = torch.zeros(W.shape[0], dtype=W.dtype, device=W.device) if old is None else old
                state[f"{name}.bias"] = base + res.bias.to(device=W.device, dtype=W.dtype)
    if experts:
        _fuse_into(state, experts, block)
    return _rebuild(out_adapter, block, i, state), records


def _solve(
    adapter: ArchAdapter,
    block: nn.Module,
    cons: LinearSpec,
    g: UnitGroup,
    k: int,
    options: GroupOptions,
    st: InputStats | None,
):
    W = adapter.get_weight(block, cons).float()
    width = next(w for _, axis, w in g.members if axis == 1)
    groups = groups_contiguous(W.shape[1], width)
    if st is None or st.n == 0:  # an expert that received no calibration token
        log.warning(
            "block %d %s: no calibration tokens; magnitude score, no reconstruction",
            block.self_attn.layer_idx,
            cons.name,
        )
        st = init_stats(W.shape[1], gram=False, track_moments=True)
        st.n = 1
        return prune_groups(W, st, groups, k, score="magnitude", solver="none", bias_compensation=False)
    return prune_groups(
        W,
        st,
        groups,
        k,
        score=options.score,
        solver=options.solver,
        bias_compensation=options.bias_compensation,
        percdamp=options.percdamp,
    )


def _fuse_into(state: dict[str, Tensor], experts: dict[int, dict[str, Tensor]], block: nn.Module) -> None:
    """Rebuild the fused expert tensors from per-expert (gate, up, down) pieces; experts left out keep theirs."""
    fused_gu, fused_down = block.mlp.experts.gate_up_proj.detach(), block.mlp.experts.down_proj.detach()
    inter = fused_gu.shape[1] // 2
    gu, down = [], []
    for e in range(fused_gu.shape[0]):
        parts = experts.get(e, {})
        gate = parts.get("gate_proj", fused_gu[e, :inter])
        up = parts.get("up_proj", fused_gu[e, inter:])
        gu.append(torch.cat([gate, up], dim=0))
        down.append(parts.get("down_proj", fused_down[e]))
    state[FUSED_GATE_UP] = torch.stack(gu)
    state[FUSED_DOWN] = torch.stack(down)


def _rebuild(out_adapter: ArchAdapter, old: nn.Module, i: int, state: dict[str, Tensor]) -> nn.Module:
    """Load `state` into the stock layer of the shrunk config; tensors the new config adds (biases turned on for
    compensation) are zeros. ValueError names a tensor whose shape does not fit."""
    meta = build_meta_block(out_adapter.spec, out_adapter.config, i)
    want = meta.state_dict()
    ref = next(iter(state.values()))
    for name, t in want.items():
        if name not in state:
            if not name.endswith("bias"):
                raise ValueError(f"structured surgery, block {i}: no tensor for {name}")
            state[name] = torch.zeros(t.shape, dtype=ref.dtype, device=ref.device)
        elif tuple(state[name].shape) != tuple(t.shape):
            raise ValueError(
                f"structured surgery, block {i}: {name} has shape {tuple(state[name].shape)}, the "
                f"shrunk config needs {tuple(t.shape)}"
            )
    block = load_assign(meta, {n: state[n].contiguous() for n in want}, out_adapter.block_prefix(i))
    layout = getattr(old, DISK_LAYOUT_ATTR, None)
    if layout is not None:
        setattr(block, DISK_LAYOUT_ATTR, layout)
    return block


def members(clusters: Tensor, e: int) -> list[int]:
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
            m = torch.tensor(members(clusters, e))
            rows.append(merge_average(T.detach()[m.to(T.device)], torch.zeros(len(m), dtype=torch.int64), counts[m])[0])
        out[name] = torch.stack(rows)
    return out


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
