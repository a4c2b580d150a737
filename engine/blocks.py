"""One decoder block in and out of its on-disk form: names, expert fusion, meta build and `assign=True` load.

On disk (what `save_pretrained` of transformers 5.x writes) every expert is its own set of 2-D tensors::

    Mixtral:       model.layers.{i}.block_sparse_moe.experts.{e}.w1|w3|w2.weight    (gate | up | down)
                   model.layers.{i}.block_sparse_moe.gate.weight                    (router)
    Qwen/DeepSeek: model.layers.{i}.mlp.experts.{e}.gate_proj|up_proj|down_proj.weight

In memory the stock decoder layer holds the experts fused (gate first)::

    mlp.experts.gate_up_proj [E, 2I, H] = stack_e(cat(W_gate[e], W_up[e], dim=0))
    mlp.experts.down_proj    [E, H, I]  = stack_e(W_down[e])

Checkpoints that already store the fused tensors under the in-memory names are read and written back fused.
"""

from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

GATE, UP, DOWN = "gate_proj", "up_proj", "down_proj"
FUSED_GATE_UP = "mlp.experts.gate_up_proj"
FUSED_DOWN = "mlp.experts.down_proj"
# Old checkpoints carry per-layer rotary caches; the stock loader ignores them and so do we.
_IGNORED_RE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(\w+)\.weight$")

# Attribute set on a built block: the `DiskLayout` it was read from, so it is written back the same way.
DISK_LAYOUT_ATTR = "_blockprune_disk_layout"


@dataclass(frozen=True)
class ArchSpec:
    """What differs between architectures: where the classes live and how the MoE tensors are named on disk.

    `mask_rule`: "causal" (one causal mask), "sliding_if_set" (sliding-window mask for every layer when
    `config.sliding_window` is set, as Mistral/Mixtral/Qwen3-MoE do), "layer_types" (per `config.layer_types`).
    """

    model_type: str
    class_prefix: str  # "Llama" -> LlamaDecoderLayer, LlamaRotaryEmbedding, LlamaRMSNorm, LlamaPreTrainedModel
    mask_rule: str = "causal"
    moe_disk_prefix: str = "mlp."  # Mixtral: "block_sparse_moe."
    expert_disk_names: tuple[str, str, str] = (GATE, UP, DOWN)  # Mixtral: ("w1", "w3", "w2")
    shared_expert: str | None = None  # in-memory path of the always-on shared expert MLP
    attention: str = "gqa"  # "gqa" or "mla" (DeepSeek multi-head latent attention)

    @cached_property
    def module(self):
        """The installed `transformers.models.<type>.modeling_<type>` module."""
        return importlib.import_module(f"transformers.models.{self.model_type}.modeling_{self.model_type}")

    def cls(self, suffix: str) -> type[nn.Module]:
        """The stock class `<prefix><suffix>`, e.g. `cls("DecoderLayer")`."""
        return getattr(self.module, f"{self.class_prefix}{suffix}")

    @cached_property
    def keep_fp32_patterns(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(`_keep_in_fp32_modules_strict`, `_keep_in_fp32_modules`) of the model class: names kept in float32."""
        pre = self.cls("PreTrainedModel")
        return tuple(pre._keep_in_fp32_modules_strict or ()), tuple(pre._keep_in_fp32_modules or ())


@dataclass(frozen=True)
class DiskLayout:
    """How one block was stored: `fused` experts (in-memory names on disk) and the disk name (relative to the
    block prefix) of each non-expert tensor, keyed by its in-memory name."""

    fused: bool
    names: dict[str, str]


def _disk_to_memory_name(rel: str, spec: ArchSpec) -> str:
    """Rename a block-relative disk name to its in-memory path (Mixtral `block_sparse_moe.` -> `mlp.`)."""
    if spec.moe_disk_prefix != "mlp." and rel.startswith(spec.moe_disk_prefix):
        return "mlp." + rel[len(spec.moe_disk_prefix) :]
    return rel


def _memory_to_disk_name(rel: str, spec: ArchSpec, is_moe: bool) -> str:
    if is_moe and spec.moe_disk_prefix != "mlp." and rel.startswith("mlp."):
        return spec.moe_disk_prefix + rel[len("mlp.") :]
    return rel


def expert_disk_name(prefix: str, spec: ArchSpec, e: int, part: str) -> str:
    """On-disk name of expert `e`'s `part` (gate_proj/up_proj/down_proj) in the block at `prefix`."""
    disk_part = spec.expert_disk_names[(GATE, UP, DOWN).index(part)]
    return f"{prefix}{spec.moe_disk_prefix}experts.{e}.{disk_part}.weight"


def build_meta_block(spec: ArchSpec, config: PretrainedConfig, i: int) -> nn.Module:
    """The stock decoder layer `i` with every tensor on the `meta` device (no memory, no init)."""
    with torch.device("meta"):
        return spec.cls("DecoderLayer")(config, i)


def _split_experts(
    rel_tensors: dict[str, Tensor], spec: ArchSpec
) -> tuple[dict[str, Tensor], dict[tuple[int, str], Tensor], list[str], dict[str, str]]:
    """Memory-named tensors, per-expert tensors keyed (e, part), names to ignore, {memory name: disk name}."""
    dense: dict[str, Tensor] = {}
    names: dict[str, str] = {}
    experts: dict[tuple[int, str], Tensor] = {}
    ignored: list[str] = []
    part_of = dict(zip(spec.expert_disk_names, (GATE, UP, DOWN)))
    for rel in list(rel_tensors):  # consumed: the caller's renamed dict lets go of each tensor
        t = rel_tensors.pop(rel)
        if _IGNORED_RE.search(rel):
            ignored.append(rel)
            continue
        name = _disk_to_memory_name(rel, spec)
        m = _EXPERT_RE.match(name)
        if m and m.group(2) in part_of:
            experts[(int(m.group(1)), part_of[m.group(2)])] = t
        else:
            dense[name] = t
            names[name] = rel
    return dense, experts, ignored, names


def _fuse_experts(
    experts: dict[tuple[int, str], Tensor], meta_block: nn.Module, prefix: str, spec: ArchSpec
) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Stack per-expert tensors into the fused layout; returns (fused, missing disk names, unexpected disk names).
    Raises ValueError naming the first expert tensor whose shape is not gate/up `[I, H]`, down `[H, I]`."""
    num_experts, two_inter, hidden = meta_block.mlp.experts.gate_up_proj.shape
    want = {(e, p) for e in range(num_experts) for p in (GATE, UP, DOWN)}
    missing = sorted(expert_disk_name(prefix, spec, e, p) for e, p in want - experts.keys())
    unexpected = sorted(expert_disk_name(prefix, spec, e, p) for e, p in experts.keys() - want)
    if missing or unexpected:
        return {}, missing, unexpected
    shapes = {GATE: (two_inter // 2, hidden), UP: (two_inter // 2, hidden), DOWN: (hidden, two_inter // 2)}
    for (e, part), t in sorted(experts.items()):
        if tuple(t.shape) != shapes[part]:
            name = expert_disk_name(prefix, spec, e, part)
            raise ValueError(f"tensor {name}: shape {tuple(t.shape)} does not match the config's {shapes[part]}")
    # filled expert by expert, each per-expert tensor dropped once copied: no second copy of all experts at once
    # (when the caller hands its tensors over, `disk_to_memory_state(consume=True)`)
    ref = experts[(0, GATE)]
    gate_up = torch.empty((num_experts, two_inter, hidden), dtype=ref.dtype, device=ref.device)
    down = torch.empty((num_experts, hidden, two_inter // 2), dtype=ref.dtype, device=ref.device)
    for e in range(num_experts):
        gate_up[e, : two_inter // 2].copy_(experts.pop((e, GATE)))
        gate_up[e, two_inter // 2 :].copy_(experts.pop((e, UP)))
        down[e].copy_(experts.pop((e, DOWN)))
    return {FUSED_GATE_UP: gate_up, FUSED_DOWN: down}, [], []


def num_experts_of(block: nn.Module) -> int:
    """Number of routed experts of a block (0 for a dense MLP), read from the fused tensor's shape."""
    experts = getattr(getattr(block, "mlp", None), "experts", None)
    return 0 if experts is None else int(experts.gate_up_proj.shape[0])


def disk_to_memory_state(
    disk_tensors: dict[str, Tensor], prefix: str, meta_block: nn.Module, spec: ArchSpec, *, consume: bool = False
) -> tuple[dict[str, Tensor], DiskLayout]:
    """Rename and fuse the disk tensors of one block into the meta block's state-dict names.

    Returns (state dict, its disk layout). Raises ValueError naming every missing or unexpected tensor.
    `consume`: take the tensors out of `disk_tensors` (the caller's dict is emptied), so that fusing the experts
    never holds them twice.
    """
    rel = {}
    outside = sorted(n for n in disk_tensors if not n.startswith(prefix))
    for name in [n for n in disk_tensors if n.startswith(prefix)]:
        rel[name[len(prefix) :]] = disk_tensors.pop(name) if consume else disk_tensors[name]
    dense, experts, ignored, names = _split_experts(rel, spec)
    if ignored:
        logger.debug("block %s: ignoring %s", prefix, ignored)
    want = meta_block.state_dict().keys()
    num_e = num_experts_of(meta_block)
    fused_on_disk = num_e > 0 and FUSED_GATE_UP in dense
    missing_e: list[str] = []
    unexpected_e: list[str] = []
    if num_e and not fused_on_disk:
        fused, missing_e, unexpected_e = _fuse_experts(experts, meta_block, prefix, spec)
        dense.update(fused)
    else:
        unexpected_e = sorted(expert_disk_name(prefix, spec, e, p) for e, p in experts)
    is_moe = num_e > 0
    # Per-expert tensors that failed to fuse are already reported (by their disk names) in missing_e/unexpected_e.
    skip = {FUSED_GATE_UP, FUSED_DOWN} if is_moe and not fused_on_disk else set()
    missing = missing_e + sorted(prefix + _memory_to_disk_name(n, spec, is_moe) for n in want - dense.keys() - skip)
    unexpected = outside + unexpected_e + sorted(prefix + names.get(n, n) for n in dense.keys() - want)
    if missing or unexpected:
        raise ValueError(
            f"block {prefix!r} ({spec.model_type}): missing tensors {missing}; unexpected tensors {unexpected}"
        )
    return dense, DiskLayout(fused_on_disk, names)


def check_shapes(state: dict[str, Tensor], meta_block: nn.Module, prefix: str, layout: DiskLayout) -> None:
    """Raise ValueError naming (on disk) the first tensor whose shape differs from the stock layer's."""
    want = meta_block.state_dict()
    for name, t in state.items():
        if tuple(t.shape) != tuple(want[name].shape):
            raise ValueError(
                f"tensor {prefix}{layout.names.get(name, name)}: shape {tuple(t.shape)} does not match the config's {tuple(want[name].shape)}"
            )


def cast_state(
    state: dict[str, Tensor], spec: ArchSpec, *, device: torch.device | str, dtype: torch.dtype | None
) -> dict[str, Tensor]:
    """Move every tensor to `device` and floating ones to `dtype` (None keeps the disk dtype). Consumes `state`
    (emptied as its tensors are moved).

    Tensors the model class keeps in float32 (`_keep_in_fp32_modules_strict` for fp16/bf16, `_keep_in_fp32_modules`
    for fp16, e.g. DeepSeek's router) stay float32, as in `from_pretrained`.
    """
    strict, loose = spec.keep_fp32_patterns
    keep = strict if dtype in (torch.float16, torch.bfloat16) else ()
    keep = keep + (loose if dtype == torch.float16 else ())
    out = {}
    for name in list(state):  # each source tensor dropped once cast: never the whole block in both dtypes
        t = state.pop(name)
        target = dtype if dtype is not None and t.is_floating_point() else t.dtype
        if keep and t.is_floating_point() and any(re.search(re.escape(k), name) for k in keep):
            target = torch.float32
        out[name] = t.to(device=device, dtype=target)
    return out


def load_assign(block: nn.Module, state: dict[str, Tensor], prefix: str) -> nn.Module:
    """`load_state_dict(state, strict=True, assign=True)`; no tensor may stay on `meta`. Returns `block.eval()`."""
    block.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*block.named_parameters(), *block.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"block {prefix!r}: tensors left on the meta device after loading: {left}")
    block.requires_grad_(False)
    return block.eval()


def memory_to_disk_state(block: nn.Module, prefix: str, spec: ArchSpec) -> dict[str, Tensor]:
    """The block's state dict under on-disk full names, as recorded in its `DiskLayout` when it has one: experts
    unfused (fused if they were fused on disk), other tensors under the names they were read from.

    Dense tensors are detached CPU tensors (they share memory with a CPU block); expert slices are copies.
    """
    num_e = num_experts_of(block)
    layout = getattr(block, DISK_LAYOUT_ATTR, None) or DiskLayout(False, {})
    out: dict[str, Tensor] = {}
    for name, t in block.state_dict().items():
        t = t.detach()
        if num_e and not layout.fused and name in (FUSED_GATE_UP, FUSED_DOWN):
            out.update(_unfuse(name, t, prefix, spec))
        else:
            rel = layout.names.get(name) or _memory_to_disk_name(name, spec, num_e > 0)
            out[prefix + rel] = t.to("cpu").contiguous()
    return out


def _unfuse(name: str, t: Tensor, prefix: str, spec: ArchSpec) -> dict[str, Tensor]:
    """Per-expert 2-D copies of a fused tensor: gate_up [E, 2I, H] -> gate [I, H], up [I, H]; down [E, H, I]."""
    out = {}
    for e in range(t.shape[0]):
        if name == FUSED_DOWN:
            out[expert_disk_name(prefix, spec, e, DOWN)] = _copy_cpu(t[e])
        else:
            inter = t.shape[1] // 2
            out[expert_disk_name(prefix, spec, e, GATE)] = _copy_cpu(t[e, :inter])
            out[expert_disk_name(prefix, spec, e, UP)] = _copy_cpu(t[e, inter:])
    return out


def _copy_cpu(t: Tensor) -> Tensor:
    """A contiguous CPU copy that owns its storage (safetensors refuses tensors sharing one)."""
    return t.to("cpu", copy=True).contiguous()
