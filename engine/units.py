"""Structured units of a layer and the plans that remove them: inventories, the split of a budget between KV
groups and channels, the uniform plan, and the output config fields a plan gives. No weight is read: everything
here comes from the config (meta blocks).

Units (from `ArchAdapter.units`): "heads" = whole KV groups (a KV head with its query heads: q/k/v rows and the
o_proj columns of the group); "channels" = MLP intermediate channels (gate/up rows and the down_proj column), in
MoE blocks the intermediate channels of every routed expert and of the shared expert.

Uniform allocation (`plan_uniform`; the global rules give each layer its own budget and apply the same split to it
per layer, `split_units`, see engine/budget.py and docs/allocation.md): every layer removes the
same number of KV groups and, in every MLP / expert, the same number of channels, so the output is the stock
architecture with smaller `num_attention_heads`, `num_key_value_heads`, `intermediate_size`
(`moe_intermediate_size`, `shared_expert_intermediate_size`). With `P` the prunable (non-embedding, all block)
parameters and `R_k` the parameters held by units of kind k, the split is::

    f      = target·P / Σ_k R_k                       # the same fraction of every selected kind's parameters
    r_head = round(f · n_kv)                          # whole KV groups, at most n_kv − 1
    f_ch   = (target·P − removed by heads) / R_ch     # channels absorb the heads' rounding
    keep_k = align · round(n_k (1 − f_ch) / align)    # kept channel counts are multiples of `align` (>= align)

Routed experts' kept widths are also multiples of 8 (`EXPERT_ALIGN`): the fused expert tensors run through torch's
grouped matmul, which needs 16-byte strides.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn
from transformers import PretrainedConfig

from engine.align import EXPERT_ALIGN, resolve_align  # noqa: F401 (EXPERT_ALIGN re-exported)
from engine.arch import ArchAdapter, LinearSpec, UnitGroup, adapter_for, shrunk_config
from engine.blocks import build_meta_block
from engine.schema import ConfigError

log = logging.getLogger(__name__)

CHANNEL_GRID: tuple[float, ...] = tuple(k / 32 for k in range(33))  # channel fractions of a layer's error curve

UNIT_KINDS: dict[str, tuple[str, ...]] = {
    "heads": ("kv_group",),
    "channels": ("channel", "expert_channel", "shared_channel"),
}
CHANNEL_KINDS = UNIT_KINDS["channels"]
# EXPERT_ALIGN (engine.align): fused experts run through torch's grouped matmul, which needs 16-byte strides, so
# kept expert widths are multiples of 8.


@dataclass
class StructuredPlan:
    """Units removed per layer (per expert for expert channels) and the shrunk config they give.

    remove: {unit kind: units removed from each group of that kind}. overrides: config fields of the output
    (`num_attention_heads`, `num_key_value_heads`, `head_dim`, `intermediate_size`, ...). params_before/after:
    block parameters (all layers) of the input and of the planned output (exact, from meta builds).
    """

    remove: dict[str, int]
    overrides: dict[str, int | bool]
    params_before: int
    params_after: int
    target: float
    info: dict = field(default_factory=dict)

    @property
    def achieved(self) -> float:
        return 1.0 - self.params_after / self.params_before


# ------------------------------------------------------------------------------------------------ planning


def _member_params(specs: dict[str, LinearSpec], name: str, axis: int, width: int) -> int:
    s = specs[name]
    other = s.d_in if axis == 0 else s.d_out
    return width * other + (width if axis == 0 and s.bias else 0)


def layer_inventory(adapter: ArchAdapter, i: int, config: PretrainedConfig | None = None) -> dict[str, dict]:
    """{kind: {"count": units per group, "groups": groups in layer `i`, "params": parameters of one unit}} of the
    KV-group and channel kinds of layer `i` of `config` (default the adapter's), from a meta block."""
    meta = build_meta_block(adapter.spec, config or adapter.config, i)
    specs = {s.name: s for s in adapter.linears(meta, i)}
    inv: dict[str, dict] = {}
    for g in adapter.units(meta, i):
        if g.kind not in UNIT_KINDS["heads"] + CHANNEL_KINDS:
            continue
        p = sum(_member_params(specs, *m) for m in g.members)
        cur = inv.setdefault(g.kind, {"count": g.count, "groups": 0, "params": p})
        if (cur["count"], cur["params"]) != (g.count, p):
            raise ConfigError(f"structured: layer {i} has {g.kind} groups of different sizes")
        cur["groups"] += 1
    return inv


def unit_inventory(adapter: ArchAdapter) -> dict[str, dict]:
    """{kind: {"count": units per group, "groups": groups over all layers, "params": parameters of one unit}}
    from meta blocks (no weight read). Raises ConfigError when layers disagree on a kind's unit size."""
    inv: dict[str, dict] = {}
    for i in range(adapter.num_layers):
        for kind, lay in layer_inventory(adapter, i).items():
            cur = inv.setdefault(kind, {"count": lay["count"], "groups": 0, "params": lay["params"]})
            if (cur["count"], cur["params"]) != (lay["count"], lay["params"]):
                raise ConfigError(
                    f"structured: layer {i} has {lay['count']} {kind} units of {lay['params']} "
                    f"parameters, other layers {cur['count']} of {cur['params']}; uniform allocation "
                    "needs equal layers"
                )
            cur["groups"] += lay["groups"]
    return inv


def layer_params(adapter: ArchAdapter, config: PretrainedConfig, i: int) -> int:
    """Parameters of decoder block `i` of `config` (a meta build)."""
    return sum(p.numel() for p in build_meta_block(adapter.spec, config, i).parameters())


def selected_kinds(inv: dict[str, dict], units: list[str]) -> list[str]:
    """The unit kinds of `inv` that the stage's `units` select (KV groups first, then channel kinds)."""
    return [k for u in units for k in UNIT_KINDS[u] if k in inv]


def kv_removals(config: PretrainedConfig) -> tuple[int, ...]:
    """The numbers of KV groups a layer of `config` may lose and still have a config its own class accepts: some
    stock classes validate their shapes (transformers' Llama config requires `hidden_size % num_attention_heads ==
    0`, even with `head_dim` set), so a uniform output with any other head count would not load. Always includes 0."""
    n_kv = int(getattr(config, "num_key_value_heads", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    if not n_kv or not heads or heads % n_kv:
        return (0,)
    key = (type(config), config.to_json_string(use_diff=False))
    if key not in _KV_CACHE:
        per = heads // n_kv
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        ok = []
        for r in range(n_kv):
            keep = n_kv - r
            try:
                type(config).from_dict(
                    {
                        **config.to_dict(),
                        "num_key_value_heads": keep,
                        "num_attention_heads": keep * per,
                        "head_dim": head_dim,
                    }
                )
            except Exception:  # the class's own validation (huggingface_hub strict dataclasses raise their own type)
                continue
            ok.append(r)
        _KV_CACHE[key] = tuple(ok) or (0,)
    return _KV_CACHE[key]


_KV_CACHE: dict[tuple, tuple[int, ...]] = {}


def nearest_allowed(r: int, allowed: Sequence[int] | None) -> int:
    """`r` snapped to the nearest value of `allowed` (ties: fewer removed); `r` itself without a restriction."""
    if not allowed:
        return r
    return min(allowed, key=lambda a: (abs(a - r), a))


def split_units(
    inv: dict[str, dict],
    kinds: list[str],
    goal: float,
    align: int | str,
    heads: int | None = None,
    allowed_heads: Sequence[int] | None = None,
) -> dict[str, int]:
    """Units removed per group of each kind so that about `goal` parameters go (the split of the module docstring).

    `inv` is per layer or summed over layers (`unit_inventory`). KV groups first: `heads` when given, else the same
    share of their parameters as the whole goal (rounded, at most n_kv − 1); then the channel kinds, coarsest
    (routed experts) first, each absorbing the rounding of the ones before; kept channel counts are multiples of
    `align` (`engine.align.resolve_align`: "auto" per width; routed experts: lcm with 8); `allowed_heads`
    (`kv_removals`) restricts the KV-group count. ConfigError when the goal needs more than all channels."""
    held = {k: inv[k]["groups"] * inv[k]["count"] * inv[k]["params"] for k in kinds}
    per_unit = {k: inv[k]["groups"] * inv[k]["params"] for k in kinds}  # removing one unit from every group
    remove: dict[str, int] = {}
    if "kv_group" in kinds:
        n = inv["kv_group"]["count"]
        if heads is None:
            share = goal / sum(held.values()) if len(kinds) > 1 else goal / held["kv_group"]
            heads = round(share * n)
        remove["kv_group"] = nearest_allowed(int(min(max(heads, 0), n - 1)), allowed_heads)
        goal -= remove["kv_group"] * per_unit["kv_group"]
    ch = sorted((k for k in kinds if k in CHANNEL_KINDS), key=lambda k: k != "expert_channel")  # coarsest first
    for idx, k in enumerate(ch):
        frac = max(goal, 0.0) / sum(held[x] for x in ch[idx:])  # later kinds absorb earlier rounding
        if frac >= 1.0:
            raise ConfigError(f"structured: removing {goal:.0f} more parameters needs more than all MLP channels")
        n = inv[k]["count"]
        a = resolve_align(align, n, k)
        remove[k] = n - _round_keep(n, frac, a)
        goal -= remove[k] * per_unit[k]
    return remove


def block_params(adapter: ArchAdapter, config: PretrainedConfig) -> int:
    """Parameters of all decoder blocks of `config` (meta builds)."""
    return sum(
        sum(p.numel() for p in build_meta_block(adapter.spec, config, i).parameters())
        for i in range(adapter.num_layers)
    )


def _round_keep(n: int, frac_remove: float, align: int) -> int:
    keep = align * round(n * (1.0 - frac_remove) / align)
    return int(min(max(keep, align if align <= n else n), n))


def plan_uniform(adapter: ArchAdapter, stage) -> StructuredPlan:
    """The uniform plan of a `StructuredStage` (formulas in the module docstring)."""
    inv = unit_inventory(adapter)
    kinds = selected_kinds(inv, stage.units)
    if not kinds:
        raise ConfigError(f"structured.units = {stage.units}: the {adapter.model_type} blocks have no such units")
    P = block_params(adapter, adapter.config)
    try:
        remove = split_units(inv, kinds, stage.target * P, stage.align, allowed_heads=kv_removals(adapter.config))
    except ConfigError:
        raise ConfigError(f"structured.target = {stage.target}: needs more than all MLP channels") from None
    overrides = config_overrides(adapter.config, inv, remove, stage.bias_compensation)
    out_cfg = shrunk_config(adapter.config, overrides)
    plan = StructuredPlan(
        remove=remove,
        overrides=overrides,
        params_before=P,
        params_after=block_params(adapter, out_cfg),
        target=stage.target,
    )
    log.info(
        "structured plan: remove %s per layer -> %s (%.4f of block parameters removed, target %.4f)",
        remove,
        overrides,
        plan.achieved,
        stage.target,
    )
    if abs(plan.achieved - stage.target) > 0.02:
        log.warning(
            "structured: whole units give %.4f of the block parameters, not the target %.4f (units %s, align %s)",
            plan.achieved,
            stage.target,
            stage.units,
            stage.align,
        )
    return plan


def config_overrides(config: PretrainedConfig, inv: dict, remove: dict[str, int], bias: bool) -> dict:
    """Output config fields for `remove` (units removed per group) applied to every layer."""
    out: dict = {}
    if remove.get("kv_group"):
        n_kv = int(config.num_key_value_heads)
        per = int(config.num_attention_heads) // n_kv
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        keep = n_kv - remove["kv_group"]
        out.update(num_key_value_heads=keep, num_attention_heads=keep * per, head_dim=int(head_dim))
    fields = {
        "channel": "intermediate_size",
        "expert_channel": _expert_field(config),
        "shared_channel": "shared_expert_intermediate_size",
    }
    for k in CHANNEL_KINDS:
        if remove.get(k):
            out[fields[k]] = inv[k]["count"] - remove[k]
    if bias:
        out.update(bias_flags(config, inv, remove))
    return out


def _expert_field(config: PretrainedConfig) -> str:
    return "moe_intermediate_size" if getattr(config, "moe_intermediate_size", None) else "intermediate_size"


def bias_flags(config: PretrainedConfig, inv: dict, remove: dict[str, int]) -> dict[str, bool]:
    """`attention_bias` / `mlp_bias` to turn on for bias compensation; ConfigError where the architecture's config
    has no such flag (its consumer linear cannot carry a bias in the stock model)."""
    out = {}
    wants = {"attention_bias": bool(remove.get("kv_group")), "mlp_bias": any(remove.get(k) for k in CHANNEL_KINDS)}
    for flag, needed in wants.items():
        if needed:
            if not _flag_gives_consumer_bias(config, flag):
                raise ConfigError(
                    f"structured.bias_compensation: {config.model_type} has no `{flag}` config flag "
                    f"that gives its {'o_proj' if flag == 'attention_bias' else 'down_proj'} a bias"
                )
            out[flag] = True
    return out


def _flag_gives_consumer_bias(config: PretrainedConfig, flag: str) -> bool:
    if not hasattr(config, flag):
        return False
    adapter = adapter_for(shrunk_config(config, {flag: True}))
    meta = build_meta_block(adapter.spec, adapter.config, 0)
    consumer = "self_attn.o_proj" if flag == "attention_bias" else "mlp.down_proj"
    try:
        return meta.get_submodule(consumer).bias is not None
    except AttributeError:
        return False


def consumer_inputs(adapter: ArchAdapter, block: nn.Module, i: int, units: list[str]) -> set[str]:
    """Input ids of the consumer linears (o_proj, down_proj, experts' down) whose units `units` selects."""
    specs = {s.name: s for s in adapter.linears(block, i)}
    kinds = {k for u in units for k in UNIT_KINDS[u]}
    out = set()
    for g in adapter.units(block, i):
        if g.kind in kinds:
            out.add(specs[consumer(g)].input_id)
    return out


def consumer(g: UnitGroup) -> str:
    return next(name for name, axis, _ in g.members if axis == 1)
