"""`blockprune plan`: per-block shapes, parameter counts and the estimated peak memory, from the checkpoint's
headers only (no tensor data is read)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.align import alignment_note
from engine.arch import adapter_for
from engine.blocks import build_meta_block
from engine.budget import ERROR_GRID, SCORES_FILE
from engine.config import RunConfig
from engine.model_check import check_reader
from engine.stage import BlockVisit, StatsRequest
from sharding.reader import CheckpointReader


@dataclass
class Plan:
    model: str
    model_type: str
    dtype: str
    blocks: list[dict] = field(default_factory=list)
    non_block_params: int = 0
    activations_bytes: int = 0
    peak_bytes: int = 0
    bytes_read: int = 0
    allocation: str | None = None  # the global allocation's scoring pass, in words (None without one)
    experts: str | None = None  # the experts stage's counts, in words (None without one)
    alignment: str | None = None  # structured channel alignment and its cost in parameters (engine.align)


def make_plan(cfg: RunConfig) -> Plan:
    from engine.pipeline import check_input, make_stages

    reader = CheckpointReader(cfg.model)
    check_reader(reader)
    check_input(reader.config)
    adapter = adapter_for(reader.config)
    stages, _ = make_stages(cfg, adapter, dict(reader.config))  # the run's own checks
    one_pass_stages = cfg.sequential and cfg.true_sequential and bool(stages) and all(s.linear_wise for s in stages)
    dtype = torch.float32 if cfg.runtime.dtype == "auto" else getattr(torch, cfg.runtime.dtype)
    item = torch.empty((), dtype=dtype).element_size()
    c = cfg.calibration
    hidden = adapter.config.hidden_size
    plan = Plan(cfg.model, adapter.model_type, str(dtype).replace("torch.", ""))
    # inputs + outputs of the activation cache
    plan.activations_bytes = 2 * c.samples * c.seq_len * hidden * item
    names = reader.names()
    block_names = set()
    for i in range(adapter.num_layers):
        own = reader.names_with_prefix(adapter.block_prefix(i))
        block_names.update(own)
        params = sum(_numel(reader.info(n).shape) for n in own)
        meta = build_meta_block(adapter.spec, adapter.config, i)
        specs = adapter.linears(meta, i)
        visit = BlockVisit(i, i, adapter, adapter, meta, rt=None, run_sharded=None)  # type: ignore[arg-type]
        request = StatsRequest.union([s.stats(visit, None) for s in stages])
        widths = {s.input_id: s.d_in for s in specs}
        gram_bytes = sum(4 * widths[k] * widths[k] for k in request.gram)
        widest = max([hidden] + [s.d_out for s in specs])
        heads = getattr(adapter.config, "num_attention_heads", 1)
        mb = min(cfg.runtime.micro_batch, c.samples)
        transient = mb * c.seq_len * (4 * widest + heads * c.seq_len) * item
        block_bytes = params * item
        # the one-pass true-sequential path holds o_proj's and then down_proj's inputs of all tokens (engine.sequential;
        # down_proj's only where it fits the budget, else it is recomputed: counted here as held)
        one_pass = one_pass_stages and not any(s.expert is not None for s in specs) and adapter.spec.attention == "gqa"
        side = (
            c.samples
            * c.seq_len
            * max((s.d_in for s in specs if s.input_id in ("attn_out", "mlp_out")), default=0)
            * item
            if one_pass
            else 0
        )
        plan.blocks.append(
            {
                "block": i,
                "params": params,
                "linears": {s.name: [s.d_out, s.d_in] for s in specs},
                "gram_mb": gram_bytes / 2**20,
                "weights_mb": block_bytes / 2**20,
                "held_mb": side / 2**20,
                "peak_mb": (block_bytes * 2 + gram_bytes + transient + side) / 2**20,
            }
        )
    plan.non_block_params = sum(_numel(reader.info(n).shape) for n in names if n not in block_names)
    embed = _numel(reader.info(adapter.embed_key).shape) * item
    plan.peak_bytes = int(max(b["peak_mb"] for b in plan.blocks) * 2**20 + plan.activations_bytes + embed)
    plan.bytes_read = reader.bytes_read
    plan.alignment = alignment_note(cfg, adapter)
    plan.allocation = _allocation_note(cfg, int(getattr(adapter.config, "num_key_value_heads", 1) or 1))
    for st in stages:
        if hasattr(st, "plan_summary"):
            per_block, plan.experts = st.plan_summary()
            for b in plan.blocks:
                if b["block"] in per_block:
                    b["experts"] = per_block[b["block"]]  # routed experts before -> after
    return plan


def _allocation_note(cfg: RunConfig, n_kv: int) -> str | None:
    """What a global allocation adds to the run (engine/budget.py, engine/prepass.py): a scoring pass over every
    block before the main pass (same peak: one block, its statistics, the activation cache), cached in the output."""
    for k, st in enumerate(cfg.prune):
        alloc = getattr(st, "allocation", None) or {}
        if alloc.get("rule", "uniform") == "uniform":
            continue
        masked = len(ERROR_GRID) + 1 if alloc["rule"] == "softmax" and alloc["energy"] == "error" else 0
        if st.method == "structured" and "heads" in st.units:
            masked += n_kv - 1  # the KV-group error curve
        return (
            f"prune[{k}] allocation {alloc['rule']}: a scoring pass first (1 dense + up to {masked} masked "
            f"forwards per block, no solve; reused from {SCORES_FILE} in the output when present); per-layer "
            "budgets are decided during the run"
        )
    return None


def format_plan(plan: Plan) -> str:
    lines = [
        f"model {plan.model} ({plan.model_type}), compute dtype {plan.dtype}",
        f"{'block':>5} {'params':>12} {'weights MB':>11} {'Gram MB':>9} {'peak MB':>9}  linears",
    ]
    for b in plan.blocks:
        lin = ", ".join(f"{k.split('.')[-1]}{v[0]}x{v[1]}" for k, v in list(b["linears"].items())[:8])
        more = len(b["linears"]) - 8
        lin += f", +{more} more" if more > 0 else ""
        lin = f"experts {b['experts']}; {lin}" if "experts" in b else lin
        lines.append(
            f"{b['block']:>5} {b['params']:>12,} {b['weights_mb']:>11.1f} {b['gram_mb']:>9.1f} "
            f"{b['peak_mb']:>9.1f}  {lin}"
        )
    total = sum(b["params"] for b in plan.blocks)
    lines.append(f"block params {total:,}; non-block params {plan.non_block_params:,}")
    lines.append(
        f"activation cache {plan.activations_bytes / 2**20:.1f} MB; "
        f"estimated peak memory {plan.peak_bytes / 2**20:.1f} MB; tensor bytes read: {plan.bytes_read}"
    )
    if plan.allocation:
        lines.append(plan.allocation)
    if plan.experts:
        lines.append(plan.experts)
    if plan.alignment:
        lines.append(plan.alignment)
    return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
