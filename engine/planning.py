"""`blockprune plan`: what a run will do and whether it fits, from the checkpoint's headers only (no tensor data is
read). It validates the recipe against the model exactly as `run` does (the same `engine.pipeline.make_stages`:
every refusal happens here) and budgets memory with the same code the run uses (`engine.memory_plan`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from engine.align import resolve_align
from engine.arch import adapter_for
from engine.budget import ERROR_GRID, SCORES_FILE
from engine.config import RunConfig
from engine.fp8 import source_reader
from engine.memory_plan import GiB, MemoryPlan, plan_for_run
from engine.model_check import check_reader
from engine.units import plan_uniform, unit_inventory
from sharding.reader import CheckpointReader


@dataclass
class Plan:
    model: str
    model_type: str
    dtype: str
    memory: MemoryPlan
    blocks: list[dict] = field(default_factory=list)
    non_block_params: int = 0
    activations_bytes: int = 0
    peak_bytes: int = 0
    bytes_read: int = 0
    allocation: str | None = None  # the global allocation's scoring pass, in words (None without one)
    experts: str | None = None  # the experts stage's counts, in words (None without one)
    alignment: str | None = None  # structured channel alignment and its cost in parameters (engine.align)

    def to_json(self) -> dict:
        """`blockprune plan --json`: the memory plan (`device_peak_gb`, `host_peak_gb`, `fits`, `device_memory_gb`,
        per-block budgets) with the model, its block shapes and the notes of the text form."""
        return {
            "model": self.model,
            "model_type": self.model_type,
            **self.memory.to_json(),
            "non_block_params": self.non_block_params,
            "block_params": sum(b["params"] for b in self.blocks),
            "bytes_read": self.bytes_read,
            "allocation": self.allocation,
            "experts": self.experts,
            "linears": {b["block"]: b["linears"] for b in self.blocks},
        }


def make_plan(cfg: RunConfig) -> Plan:
    from engine.pipeline import check_input, make_stages

    reader = CheckpointReader(cfg.model)
    check_reader(reader)
    reader = source_reader(reader, cfg.runtime.dtype)  # an FP8 source is planned as the float model it stands for
    check_input(reader.config)
    adapter = adapter_for(reader.config)
    stages, _ = make_stages(cfg, adapter, dict(reader.config))  # the run's own checks
    memory = plan_for_run(cfg, reader, adapter, stages)
    plan = Plan(cfg.model, adapter.model_type, memory.dtype, memory)
    plan.activations_bytes = memory.cache_bytes
    block_names: set[str] = set()
    for b in memory.blocks:
        own = reader.names_with_prefix(adapter.block_prefix(b.block))
        block_names.update(own)
        specs = adapter.meta_linears(b.block)
        plan.blocks.append(
            {
                "block": b.block,
                "params": sum(_numel(reader.info(n).shape) for n in own),
                "linears": {s.name: [s.d_out, s.d_in] for s in specs},
                "gram_mb": b.stats / 2**20,
                "weights_mb": b.weights / 2**20,
                "held_mb": b.side / 2**20,
                "peak_mb": (b.device_peak if memory.device.startswith("cuda") else b.host_peak) / 2**20,
                "chunks": b.stats_chunks,
            }
        )
    plan.non_block_params = sum(_numel(reader.info(n).shape) for n in reader.names() if n not in block_names)
    plan.peak_bytes = memory.device_peak if memory.device.startswith("cuda") else memory.host_peak
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
    m = plan.memory
    cuda = m.device.startswith("cuda")
    where = "device" if cuda else "host"
    lines = [
        f"model {plan.model} ({plan.model_type}), compute dtype {plan.dtype} on {m.device}",
        f"{'block':>5} {'params':>14} {'weights MB':>11} {'stats MB':>9} {'chunks':>6} {'peak MB':>10}  linears",
    ]
    for b in plan.blocks:
        lin = ", ".join(f"{k.split('.')[-1]}{v[0]}x{v[1]}" for k, v in list(b["linears"].items())[:6])
        more = len(b["linears"]) - 6
        lin += f", +{more} more" if more > 0 else ""
        lin = f"experts {b['experts']}; {lin}" if "experts" in b else lin
        lines.append(
            f"{b['block']:>5} {b['params']:>14,} {b['weights_mb']:>11.1f} {b['gram_mb']:>9.1f} {b['chunks']:>6} "
            f"{b['peak_mb']:>10.1f}  {lin}"
        )
    total = sum(b["params"] for b in plan.blocks)
    lines.append(f"block params {total:,}; non-block params {plan.non_block_params:,}")
    lines.append(
        f"activation cache {plan.activations_bytes / 2**20:.1f} MB ({m.cache_tier}); "
        f"estimated peak memory {plan.peak_bytes / 2**20:.1f} MB ({where}); tensor bytes read: {plan.bytes_read}"
    )
    dev = f"device peak {m.device_peak / GiB:.2f} GiB of {m.device_memory / GiB:.1f} GiB; " if cuda else ""
    lines.append(
        f"{dev}host peak {m.host_peak / GiB:.2f} GiB of {m.host_memory / GiB:.1f} GiB available "
        f"(process baseline {m.baseline / GiB:.2f} GiB): {'fits' if m.fits else 'DOES NOT FIT'}"
    )
    lines += [f"note: {a}" for a in m.advice]
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


def alignment_note(cfg, adapter) -> str | None:
    """One line for `blockprune plan`: each structured stage's channel alignment and what it costs in parameters.

    Uniform allocation: the exact difference between the planned output and the same plan with `align: 1` (positive:
    alignment keeps more parameters than the target asks for). A global budget: the largest rounding per layer (the
    coordinator moves it to other layers, the total stays on target). None without a structured stage."""
    for k, st in enumerate(cfg.prune):
        if getattr(st, "method", None) != "structured" or "channels" not in st.units:
            continue
        inv = unit_inventory(adapter)
        kinds = {kd: resolve_align(st.align, v["count"], kd) for kd, v in inv.items() if kd != "kv_group"}
        which = ", ".join(f"{kd} {inv[kd]['count']} -> multiples of {a}" for kd, a in kinds.items())
        head = f"prune[{k}] align {st.align}: {which}"
        if all(a == 1 for a in kinds.values()):
            return f"{head} (exact widths; GPU GEMMs prefer multiples of 64: align auto)"
        if st.allocation.get("rule", "uniform") != "uniform":
            per_layer = sum(a // 2 * inv[kd]["params"] * inv[kd]["groups"] for kd, a in kinds.items())
            per_layer //= max(adapter.num_layers, 1)
            return f"{head}; rounding moves up to {per_layer:,} parameters per layer (the budget absorbs it)"
        aligned = plan_uniform(adapter, st)
        exact = plan_uniform(adapter, dataclasses.replace(st, align=1))
        cost = aligned.params_after - exact.params_after
        share = cost / aligned.params_before if aligned.params_before else 0.0
        return (
            f"{head}; costs {cost:+,} block parameters against align 1 ({share:+.2%} of the blocks; "
            f"achieved {aligned.achieved:.4f} for target {st.target})"
        )
    return None
