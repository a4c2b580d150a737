"""The padded layout: a non-uniform blockprune checkpoint rewritten as the stock architecture, function unchanged.

A non-uniform output (per-layer widths from a global budget, removed sublayers) needs its own model class
(`modeling_blockprune.py`, `trust_remote_code=True`), which many serving stacks, hubs and clients (lm-eval, PEFT's
auto classes) refuse. The padded layout gives every layer the same shape again by appending zeros:

    n_kv'  = max_l n_kv(l)                          KV groups (whole heads: q/k/v rows, o_proj columns)
    n_q'   = n_kv' · (n_q / n_kv)                   query heads per group unchanged
    I'_k   = min(⌈max_l I_k(l) / a_k⌉ · a_k, max(max_l I_k(l), I_k(source)))       per channel kind k
    bias   = attention_bias / mlp_bias on if any layer has them

with `a_k` the stage's alignment (`engine.align.resolve_align`). Layer l's tensors are copied into the leading
rows / columns of the padded ones; everything else is zero. Why the function is unchanged, exactly:

- MLP / expert channels: padded gate and up rows are zero, so the padded channels' activations are
  `act(0)·0 = 0`; the padded down_proj columns are zero as well.
- KV groups: `repeat_kv` gives query head h the KV head ⌊h / (n_q / n_kv)⌋, so heads appended at the end of q form
  new groups with the KV heads appended to k and v. Their q, k, v rows and biases are zero: scores are 0, the softmax
  is uniform over positions and the output is the mean of zero values, 0 (also with GQA, sliding windows and
  Qwen3's per-head q/k norms: RMSNorm(0) = 0). And the o_proj columns that read them are zero: nothing reaches the
  residual stream even if it were not.
- Biases a layer did not have (the flag is on because another layer has one) are zero.
- A removed sublayer becomes a full-width sublayer of zeros, norm weights included: attention with zero o_proj adds
  0; an MLP with zero down_proj (MoE: zero experts, zero shared expert) adds 0. Its parameters come back as zeros
  and its compute as well: padding trades the savings of that sublayer for a stock layout.

Refused (`PaddingError`): layers with different routed-expert counts or top-k. A padded expert would need a router
row whose logit is −∞ for every token, and the stock routers (Mixtral, Qwen-MoE) are linears without a bias, so a
zero row gives logit 0, which top-k picks whenever the real logits are negative (and Qwen2-MoE's softmax without
renormalisation would change every weight through the denominator). Such outputs stay native (`load_pruned`, or
`trust_remote_code=True`). Also refused: layers that differ in `head_dim` or heads per KV group, or in a config
field this module does not know how to pad.

`export_padded(src, out)` streams: one block in memory at a time (read, padded, written through the writer), the
non-block tensors copied; `blockprune export CKPT OUT --layout padded` calls it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine.align import AUTO, resolve_align, round_up
from engine.arch import adapter_for, shrunk_config
from engine.blocks import (
    DISK_LAYOUT_ATTR,
    FUSED_GATE_UP,
    build_meta_block,
    check_shapes,
    disk_to_memory_state,
    load_assign,
    memory_to_disk_state,
)
from engine.modeling_blockprune import SECTION, remove_sublayers
from engine.schema import ConfigError
from sharding.reader import CheckpointReader
from sharding.writer import INDEX_NAME, MANIFEST_NAME, CheckpointWriter

log = logging.getLogger(__name__)

HEAD_FIELDS = ("num_key_value_heads", "num_attention_heads")
CHANNEL_FIELDS = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")
FLAG_FIELDS = ("attention_bias", "mlp_bias")
EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok")
AUTO_CLASS_KEY = "AutoModelForCausalLM"
BLOCK_UNIT = "block.{:05d}"
NON_BLOCK_UNIT = "non_block"
# files of the source checkpoint that describe a run; copied into the padded output (the card is rewritten)
RUN_FILES = ("blockprune_recipe.yaml",)
REPORT_FILE = "blockprune_report.json"


class PaddingError(ConfigError):
    """A checkpoint that the padded layout cannot represent as the stock architecture (module docstring)."""


@dataclass
class PaddedLayout:
    """The plan of a padded export. `config`: the stock output config. `entries`: per layer the source entry
    (`{"attention", "mlp", "config"}`). `widths`: the padded value of every field that differed between layers.
    `align`: the alignment used; `zero_params`: parameters the padding adds (all zeros)."""

    config: dict
    entries: list[dict]
    widths: dict[str, Any] = field(default_factory=dict)
    align: int | str = AUTO
    zero_params: int = 0

    def to_dict(self) -> dict:
        return {
            "layout": "padded",
            "align": self.align,
            "widths": self.widths,
            "zero_params": self.zero_params,
            "layers": [
                {"attention": e.get("attention", True), "mlp": e.get("mlp", True), "config": e.get("config", {})}
                for e in self.entries
            ],
        }


def stock_fields(config: dict) -> dict:
    """`config` without the blockprune section and the `auto_map` entry that points at `modeling_blockprune.py`."""
    out = {k: v for k, v in config.items() if k != SECTION}
    auto = {k: v for k, v in (out.pop("auto_map", None) or {}).items() if "modeling_blockprune" not in str(v)}
    if auto:
        out["auto_map"] = auto
    return out


def _channel_kind(config: dict, key: str) -> str:
    if key == "shared_expert_intermediate_size":
        return "shared_channel"
    if key == "moe_intermediate_size":
        return "expert_channel"
    moe = any(config.get(f) for f in EXPERT_FIELDS[:3]) and not config.get("moe_intermediate_size")
    return "expert_channel" if moe else "channel"  # Mixtral's experts use intermediate_size


def plan_padding(config: dict, align: int | str = AUTO) -> PaddedLayout:
    """The padded layout of a checkpoint's `config.json` dict (module docstring). A config without a `blockprune`
    section is already stock: its layout has no widths. PaddingError for what padding cannot represent."""
    if SECTION not in config:
        return PaddedLayout(stock_fields(config), [], align=align)
    entries = list(config[SECTION]["layers"])
    base = stock_fields(config)
    keys = sorted({k for e in entries for k in (e.get("config") or {})})
    value = {k: [(e.get("config") or {}).get(k, _stock_value(base, k)) for e in entries] for k in keys}
    differ = [k for k in keys if len({json.dumps(v) for v in value[k]}) > 1]
    if "head_dim" in differ:
        raise PaddingError(f"padded layout: layers differ in head_dim ({value['head_dim']})")
    known = set(HEAD_FIELDS) | set(CHANNEL_FIELDS) | set(FLAG_FIELDS)
    experts = [k for k in differ if k in EXPERT_FIELDS]
    if experts:
        counts = {k: value[k] for k in experts}
        raise PaddingError(
            f"padded layout: layers differ in their routed experts ({counts}); a padded expert would need a router "
            "logit of -inf for every token, which the stock router (a linear without bias) cannot give. Keep the "
            "native layout: engine.load_pruned(path) or from_pretrained(path, trust_remote_code=True)"
        )
    other = [k for k in differ if k not in known]
    if other:
        raise PaddingError(f"padded layout: layers differ in {other}, which cannot be padded to one stock value")
    out, widths = dict(base), {}
    for k in keys:  # fields every layer sets to one value (split_shapes put them in the stock config already)
        if k not in differ:
            out[k] = value[k][0]
    attn = [i for i, e in enumerate(entries) if e.get("attention", True)]
    mlp = [i for i, e in enumerate(entries) if e.get("mlp", True)]
    if "num_key_value_heads" in differ or "num_attention_heads" in differ:
        widths.update(_pad_heads(value, base, attn))
    for k in CHANNEL_FIELDS:
        if k in differ:
            live = [value[k][i] for i in mlp] or value[k]
            widest = max(int(v) for v in live)
            a = resolve_align(align, int(base.get(k) or widest), _channel_kind(base, k))
            widths[k] = min(round_up(widest, a), max(widest, int(base.get(k) or widest)))
    for k in FLAG_FIELDS:
        if k in differ:
            widths[k] = any(bool(v) for v in value[k])
    out.update(widths)
    return PaddedLayout(out, entries, widths, align)


def _stock_value(base: dict, key: str) -> Any:
    """`key` of the stock config; `head_dim` defaults to hidden_size / num_attention_heads as in transformers, the
    bias flags to False."""
    if key in base:
        return base[key]
    if key == "head_dim" and base.get("num_attention_heads"):
        return int(base["hidden_size"]) // int(base["num_attention_heads"])
    return False if key in FLAG_FIELDS else None


def _pad_heads(value: dict, base: dict, attn: list[int]) -> dict:
    """KV groups: the widest layer's count; query heads per group must be the same in every layer."""
    n = len(value.get("num_key_value_heads") or value["num_attention_heads"])
    kv = value.get("num_key_value_heads") or [base["num_key_value_heads"]] * n
    q = value.get("num_attention_heads") or [base["num_attention_heads"]] * n
    per = {int(q[i]) // int(kv[i]) for i in range(n) if int(kv[i])}
    if len(per) > 1 or any(int(q[i]) % int(kv[i]) for i in range(n)):
        raise PaddingError(f"padded layout: query heads per KV group differ between layers ({q} over {kv})")
    live = attn or list(range(n))
    n_kv = max(int(kv[i]) for i in live)
    return {"num_key_value_heads": n_kv, "num_attention_heads": n_kv * per.pop()}


# --------------------------------------------------------------------------------------------- one block


def _pad_into(target: Tensor, src: Tensor, name: str) -> None:
    """Copy `src` into the leading slices of `target` (zeros elsewhere); the fused experts' gate_up `[E, 2I, H]`
    is padded per half (gate rows, then up rows)."""
    if any(s > t for s, t in zip(src.shape, target.shape)) or src.ndim != target.ndim:
        raise PaddingError(f"padded layout: tensor {name} {tuple(src.shape)} is wider than {tuple(target.shape)}")
    if name == FUSED_GATE_UP:
        i_src, i_t = src.shape[1] // 2, target.shape[1] // 2
        target[:, :i_src, : src.shape[2]] = src[:, :i_src]
        target[:, i_t : i_t + i_src, : src.shape[2]] = src[:, i_src:]
        return
    target[tuple(slice(0, s) for s in src.shape)] = src


def pad_block(config: dict, layout: PaddedLayout, i: int, disk: dict[str, Tensor]) -> tuple[dict[str, Tensor], int]:
    """Block `i`'s on-disk tensors (full names) as the padded stock layer: (tensors under their disk names, parameters
    added). `config` is the checkpoint's config.json dict; the block is built as its per-layer shape, each tensor
    copied into the leading slices of a zero tensor of the padded layer's shape (disk dtypes kept)."""
    entry = layout.entries[i] if layout.entries else {}
    src_adapter = adapter_for(stock_fields(config))
    spec = src_adapter.spec
    prefix = src_adapter.block_prefix(i)
    meta = build_meta_block(spec, shrunk_config(src_adapter.config, entry.get("config") or {}), i)
    remove_sublayers(meta, attention=entry.get("attention", True), mlp=entry.get("mlp", True))
    state, disk_layout = disk_to_memory_state(disk, prefix, meta, spec)
    check_shapes(state, meta, prefix, disk_layout)
    out_meta = build_meta_block(spec, shrunk_config(src_adapter.config, layout.widths), i)
    floats = [t.dtype for t in state.values() if t.is_floating_point()]
    default = max(set(floats), key=floats.count) if floats else torch.float32
    padded: dict[str, Tensor] = {}
    for name, m in out_meta.state_dict().items():
        src = state.get(name)
        t = torch.zeros(
            m.shape, dtype=src.dtype if src is not None else (default if m.is_floating_point() else m.dtype)
        )
        if src is not None:
            _pad_into(t, src, name)
        padded[name] = t
    unexpected = sorted(set(state) - set(padded))
    if unexpected:
        raise PaddingError(f"padded layout: block {i} has tensors the padded layer lacks: {unexpected}")
    block = load_assign(out_meta, padded, prefix)
    setattr(block, DISK_LAYOUT_ATTR, disk_layout)
    tensors = memory_to_disk_state(block, prefix, spec)
    added = sum(t.numel() for t in tensors.values()) - sum(t.numel() for t in disk.values())
    return tensors, added


# --------------------------------------------------------------------------------------------- a checkpoint


def recipe_align(model_dir: str | Path) -> int | str:
    """The structured stage's `align` from the checkpoint's `blockprune_recipe.yaml` ("auto" when there is none)."""
    path = Path(model_dir) / "blockprune_recipe.yaml"
    if not path.is_file():
        return AUTO
    from engine.config import read_yaml_file

    data = read_yaml_file(path) or {}
    for st in data.get("prune") or []:
        if isinstance(st, dict) and st.get("method") == "structured":
            return st.get("align", AUTO)
    return AUTO


def export_padded(
    src: str | Path,
    out: str | Path,
    *,
    align: int | str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    origin: str | None = None,
) -> dict:
    """Write `src` (a blockprune output, or any checkpoint of a supported architecture) into `out` in the padded
    layout, one block at a time; returns the padding summary (`PaddedLayout.to_dict`, plus `total_parameters`).

    `align`: channel alignment of the padded widths (default: the recipe's, else "auto"); `origin`: named in the
    card as where it was exported from (`blockprune export`). An interrupted export is
    continued by calling it again (the writer's manifest). PaddingError before anything is written when the
    checkpoint cannot be padded; a checkpoint that is already stock is copied through unchanged."""
    from engine.report.card import CARD_NAME, model_card

    if Path(out).resolve() == Path(src).resolve():
        raise ConfigError(f"export: output {out} is the input checkpoint; choose a new directory")
    reader = CheckpointReader(src)
    config = dict(reader.config)
    align = recipe_align(src) if align is None else align
    layout = plan_padding(config, align)
    adapter = adapter_for(layout.config)
    if not layout.entries:
        log.info("%s has no per-layer shapes: the stock layout already; copying it", src)
    key = f"padded:{reader.fingerprint()}:{align}"
    out_dir = Path(out)
    resume = (out_dir / MANIFEST_NAME).is_file() and not (out_dir / INDEX_NAME).is_file()
    writer = CheckpointWriter(
        out_dir,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        resume=resume,
        run_id=hashlib.sha256(key.encode()).hexdigest()[:16],
    )
    names = reader.names()
    if not writer.is_committed(NON_BLOCK_UNIT):
        writer.write_unit(NON_BLOCK_UNIT, reader.read(adapter.non_block_keys(names)))
    for i in range(adapter.num_layers):
        unit = BLOCK_UNIT.format(i)
        if writer.is_committed(unit):
            layout.zero_params += int(writer.unit_metadata(unit).get("zero_params", 0))
            continue
        disk = reader.read(reader.names_with_prefix(adapter.block_prefix(i)))
        tensors, added = pad_block(config, layout, i, disk) if layout.entries else (disk, 0)
        writer.write_unit(unit, tensors, metadata={"zero_params": added})
        layout.zero_params += added
        del disk, tensors
    summary = layout.to_dict()
    summary["total_parameters"] = sum(reader.info(n).numel for n in names) + layout.zero_params
    extra = _run_files(Path(src), summary)
    report = json.loads(extra[REPORT_FILE]) if REPORT_FILE in extra else None
    extra[CARD_NAME] = model_card(
        layout.config,
        report=report,
        recipe_text=extra.get(RUN_FILES[0]),
        total_parameters=summary["total_parameters"],
        src=origin,
    )
    writer.finalize(
        layout.config,
        source_dir=src,
        extra_files=extra,
        index_metadata={"total_parameters": summary["total_parameters"]},
    )
    log.info(
        "padded %s -> %s: %s, %d zero parameters added", src, out_dir, layout.widths or "stock", layout.zero_params
    )
    return summary


def _run_files(src: Path, summary: dict) -> dict[str, str]:
    """The source's recipe (as is) and report (with an `export` section describing the padding)."""
    extra = {name: (src / name).read_text() for name in RUN_FILES if (src / name).is_file()}
    report = json.loads((src / REPORT_FILE).read_text()) if (src / REPORT_FILE).is_file() else {}
    report["export"] = summary
    extra[REPORT_FILE] = json.dumps(report, indent=2)
    return extra


def pad_in_place(out_dir: str | Path, *, max_shard_size: int | str = "5GB") -> dict:
    """Replace the finalized native checkpoint in `out_dir` by its padded layout (`export.layout: padded`):
    `export_padded` into a sibling `<out>.padded-tmp`, then the directories are swapped by renames and the native
    one removed. Needs the disk for both while it runs. If killed before the swap, `out_dir` holds the complete
    native checkpoint (`blockprune export OUT OUT2 --layout padded` finishes the job). Returns the padding summary."""
    target = Path(out_dir)
    staging = target.with_name(target.name + ".padded-tmp")
    old = target.with_name(target.name + ".native-tmp")
    if old.exists() and not (old / MANIFEST_NAME).is_file():  # ours only if our manifest is in it
        raise PaddingError(f"{old} exists and is not a blockprune output; move it away and run again")
    summary = export_padded(target, staging, max_shard_size=max_shard_size, overwrite=True)
    if old.exists():  # an earlier swap that died after its first rename
        shutil.rmtree(old)
    target.rename(old)
    staging.rename(target)
    shutil.rmtree(old)
    return summary
