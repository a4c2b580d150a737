"""Architecture adapters: the one table that knows block names, prunable linears, units, hooks and block forwards.

Every block is the stock transformers decoder layer of the model (built on `meta`, loaded with `assign=True`);
rotary embeddings and attention masks come from the model's own classes. Nothing here forks modeling code.

Usage (streaming, one block at a time)::

    arch = adapter_for(config)
    X = embed(ids, reader.read(arch.embed_key))                         # [B, L, H]
    ctx = arch.forward_context(B, L, device=dev, dtype=dt)
    for i in range(arch.num_layers):
        block = arch.build_block(i, reader.read_prefix(arch.block_prefix(i)), device=dev, dtype=dt)
        with arch.input_hooks(block, lambda input_id, X_in: ...):       # X_in: [n_tokens, d_in]
            X = arch.block_forward(block, X, ctx)
        writer.write(arch.block_to_disk(i, block, dtypes=source_dtypes))
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from engine.blocks import (
    DISK_LAYOUT_ATTR,
    DOWN,
    GATE,
    UP,
    ArchSpec,
    build_meta_block,
    cast_state,
    check_shapes,
    disk_to_memory_state,
    load_assign,
    memory_to_disk_state,
    num_experts_of,
)
from engine.modeling_blockprune import RemovedAttention, RemovedMLP

logger = logging.getLogger(__name__)

_MIXTRAL_EXPERTS = ("w1", "w3", "w2")  # gate, up, down on disk

ARCH_TABLE: dict[str, ArchSpec] = {
    s.model_type: s
    for s in (
        ArchSpec("llama", "Llama"),
        ArchSpec("mistral", "Mistral", mask_rule="sliding_if_set"),
        ArchSpec("qwen2", "Qwen2", mask_rule="layer_types"),
        ArchSpec("qwen3", "Qwen3", mask_rule="layer_types"),
        ArchSpec(
            "mixtral",
            "Mixtral",
            mask_rule="sliding_if_set",
            moe_disk_prefix="block_sparse_moe.",
            expert_disk_names=_MIXTRAL_EXPERTS,
        ),
        ArchSpec("qwen2_moe", "Qwen2Moe", mask_rule="layer_types", shared_expert="mlp.shared_expert"),
        ArchSpec("qwen3_moe", "Qwen3Moe", mask_rule="sliding_if_set"),
        ArchSpec("deepseek_v3", "DeepseekV3", shared_expert="mlp.shared_experts", attention="mla"),
    )
}
SUPPORTED_ARCHS: tuple[str, ...] = tuple(ARCH_TABLE)

_MASK_FUNCTIONS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
_BLOCK_RE = re.compile(r"^model\.layers\.(\d+)\.")

InputCallback = Callable[[str, Tensor], None]


@dataclass(frozen=True)
class LinearSpec:
    """A prunable 2-D weight `W [d_out, d_in]` of a block (y = x Wᵀ).

    `name`: in-memory path relative to the block ("self_attn.q_proj"); experts use virtual names
    "mlp.experts.{e}.gate_proj|up_proj|down_proj" (views into the fused tensors). `input_id`: linears reading the
    same input share it ("attn_in", "attn_out", "mlp_in", "mlp_out", "expert{e}_in", "expert{e}_out",
    "shared_in", "shared_out"; DeepSeek MLA adds "q_b_in", "kv_b_in"). `bias`: the linear has a bias vector.
    """

    name: str
    input_id: str
    d_out: int
    d_in: int
    expert: int | None = None
    bias: bool = False


@dataclass(frozen=True)
class UnitGroup:
    """Structured units of a block that are removed together.

    `members`: (name, axis, width) triples; unit u spans `[u*width, (u+1)*width)` along `axis` (0 = output rows,
    1 = input columns) of that member. For kinds other than "expert", names are `LinearSpec` names (the bias rows of
    an axis-0 member follow its weight rows). Kinds:
      - "kv_group": one KV head and its query heads (GQA); q_proj/o_proj width = heads_per_group * head_dim.
      - "head": one MLA head (DeepSeek): q_b_proj (or q_proj), kv_b_proj rows, o_proj columns.
      - "channel" / "expert_channel" / "shared_channel": one MLP intermediate channel (gate, up rows; down column).
      - "expert": one routed expert; names are state-dict tensor names (router rows, fused expert tensors, axis 0).
    """

    kind: str
    count: int
    members: tuple[tuple[str, int, int], ...]
    expert: int | None = None


class ArchAdapter:
    """Names, prunable linears, units, hooks and forward of the decoder blocks of one supported architecture."""

    def __init__(self, spec: ArchSpec, config: PretrainedConfig) -> None:
        self.spec = spec
        self.model_type = spec.model_type
        self.config = copy.deepcopy(config)
        # from_pretrained's defaults; a config that names an implementation keeps it.
        if self.config._attn_implementation is None:
            self.config._attn_implementation = "sdpa"
        if self.config._experts_implementation is None:
            self.config._experts_implementation = "grouped_mm"
        self.num_layers: int = int(self.config.num_hidden_layers)
        self.embed_key = "model.embed_tokens.weight"
        self.final_norm_key = "model.norm.weight"
        self.lm_head_key: str | None = None if self.config.tie_word_embeddings else "lm_head.weight"
        self._rotary: dict[str, nn.Module] = {}

    def with_overrides(self, overrides: dict) -> ArchAdapter:
        """The adapter of this architecture for the config with `overrides` set (a shrunk or regrouped layer)."""
        return ArchAdapter(self.spec, shrunk_config(self.config, overrides)) if overrides else self

    # ---- names -------------------------------------------------------------------------------------------------
    def block_prefix(self, i: int) -> str:
        """On-disk name prefix of block `i`: "model.layers.{i}."."""
        return f"model.layers.{i}."

    def block_keys(self, i: int, all_names: Iterable[str]) -> list[str]:
        """The names in `all_names` that belong to block `i`."""
        prefix = self.block_prefix(i)
        return sorted(n for n in all_names if n.startswith(prefix))

    def non_block_keys(self, all_names: Iterable[str]) -> list[str]:
        """Every name outside blocks 0..num_layers-1: embeddings, final norm, lm_head, rotary buffers, and
        extra layers such as DeepSeek's multi-token-prediction layer `model.layers.{num_layers}.*` (copied as is)."""
        out = []
        for n in all_names:
            m = _BLOCK_RE.match(n)
            if m is None or int(m.group(1)) >= self.num_layers:
                out.append(n)
        return sorted(out)

    # ---- build and write ---------------------------------------------------------------------------------------
    def build_block(
        self,
        i: int,
        disk_tensors: dict[str, Tensor],
        *,
        device: torch.device | str,
        dtype: torch.dtype | None,
        consume: bool = False,
    ) -> nn.Module:
        """Block `i` from its on-disk tensors (full names): meta build, rename, fuse experts, `assign=True` load.

        `dtype` None keeps each tensor's disk dtype. `consume`: the tensors are taken out of `disk_tensors` as they are
        renamed, fused and cast, so the block is never held twice. Parameters have `requires_grad=False`; the block is in eval mode.
        Raises ValueError naming missing/unexpected tensors or a shape that does not match the config.
        """
        prefix = self.block_prefix(i)
        meta = build_meta_block(self.spec, self.config, i)
        state, layout = disk_to_memory_state(disk_tensors, prefix, meta, self.spec, consume=consume)
        check_shapes(state, meta, prefix, layout)
        block = load_assign(meta, cast_state(state, self.spec, device=device, dtype=dtype), prefix)
        setattr(block, DISK_LAYOUT_ATTR, layout)
        return block

    def block_to_disk(
        self, i: int, block: nn.Module, dtypes: dict[str, torch.dtype] | None = None
    ) -> dict[str, Tensor]:
        """Block `i`'s tensors under on-disk full names, experts unfused, contiguous on CPU, each cast to
        `dtypes[name]` when given. Dense tensors of a CPU block share its memory; expert tensors are copies."""
        out = memory_to_disk_state(block, self.block_prefix(i), self.spec)
        if dtypes:
            out = {n: t.to(dtypes[n]) if n in dtypes else t for n, t in out.items()}
        return out

    # ---- prunable linears --------------------------------------------------------------------------------------
    def linears(self, block: nn.Module, i: int) -> list[LinearSpec]:
        """The prunable 2-D weights of block `i` (attention, MLP or each expert's three, shared expert), with shapes
        read from the block itself. Routers and the shared-expert gate are not included; a removed sublayer
        (depth pruning) has none."""
        attention = [] if isinstance(block.self_attn, RemovedAttention) else self._attention_linears(block)
        return attention + ([] if isinstance(block.mlp, RemovedMLP) else self._mlp_linears(block))

    def meta_linears(self, i: int) -> list[LinearSpec]:
        """`linears()` of block `i` from the config alone (a `meta` block; no weight is read)."""
        return self.linears(build_meta_block(self.spec, self.config, i), i)

    def _dense(self, block: nn.Module, name: str, input_id: str) -> LinearSpec:
        lin = block.get_submodule(name)
        return LinearSpec(name, input_id, lin.out_features, lin.in_features, bias=lin.bias is not None)

    def _attention_linears(self, block: nn.Module) -> list[LinearSpec]:
        if self.spec.attention == "gqa":
            names = [("q_proj", "attn_in"), ("k_proj", "attn_in"), ("v_proj", "attn_in"), ("o_proj", "attn_out")]
        elif block.self_attn.q_lora_rank is None:
            names = [
                ("q_proj", "attn_in"),
                ("kv_a_proj_with_mqa", "attn_in"),
                ("kv_b_proj", "kv_b_in"),
                ("o_proj", "attn_out"),
            ]
        else:
            names = [
                ("q_a_proj", "attn_in"),
                ("kv_a_proj_with_mqa", "attn_in"),
                ("q_b_proj", "q_b_in"),
                ("kv_b_proj", "kv_b_in"),
                ("o_proj", "attn_out"),
            ]
        return [self._dense(block, f"self_attn.{n}", g) for n, g in names]

    def _mlp_linears(self, block: nn.Module) -> list[LinearSpec]:
        if not num_experts_of(block):
            return [self._dense(block, f"mlp.{p}", g) for p, g in ((GATE, "mlp_in"), (UP, "mlp_in"), (DOWN, "mlp_out"))]
        fused = block.mlp.experts
        num_e, inter, hidden = (
            fused.gate_up_proj.shape[0],
            fused.gate_up_proj.shape[1] // 2,
            fused.gate_up_proj.shape[2],
        )
        out = []
        for e in range(num_e):
            base = f"mlp.experts.{e}."
            out += [
                LinearSpec(base + GATE, f"expert{e}_in", inter, hidden, expert=e),
                LinearSpec(base + UP, f"expert{e}_in", inter, hidden, expert=e),
                LinearSpec(base + DOWN, f"expert{e}_out", hidden, inter, expert=e),
            ]
        if self.spec.shared_expert:
            s = self.spec.shared_expert
            out += [
                self._dense(block, f"{s}.{p}", g)
                for p, g in ((GATE, "shared_in"), (UP, "shared_in"), (DOWN, "shared_out"))
            ]
        return out

    def get_weight(self, block: nn.Module, spec: LinearSpec) -> Tensor:
        """`W [d_out, d_in]` of `spec`: the parameter itself (detached) or, for an expert, a view of the fused tensor
        (gate = gate_up_proj[e, :I], up = gate_up_proj[e, I:], down = down_proj[e])."""
        if spec.expert is None:
            return block.get_submodule(spec.name).weight.detach()
        fused = block.mlp.experts
        part = spec.name.rsplit(".", 1)[1]
        if part == DOWN:
            return fused.down_proj.detach()[spec.expert]
        inter = fused.gate_up_proj.shape[1] // 2
        rows = slice(0, inter) if part == GATE else slice(inter, 2 * inter)
        return fused.gate_up_proj.detach()[spec.expert, rows]

    def set_weight(self, block: nn.Module, spec: LinearSpec, W: Tensor) -> None:
        """Copy `W` into the weight of `spec` in place (same shape; cast to the weight's dtype and device)."""
        target = self.get_weight(block, spec)
        if tuple(W.shape) != tuple(target.shape):
            raise ValueError(f"set_weight {spec.name}: shape {tuple(W.shape)} != weight shape {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(W)

    def get_bias(self, block: nn.Module, spec: LinearSpec) -> Tensor | None:
        """Bias `[d_out]` of a dense linear (detached parameter), None when it has none (experts never do)."""
        if spec.expert is not None:
            return None
        b = block.get_submodule(spec.name).bias
        return None if b is None else b.detach()

    def router(self, block: nn.Module) -> nn.Module | None:
        """The router (`mlp.gate`, weight `[E, H]`) of a MoE block; None for a dense block."""
        return block.mlp.gate if num_experts_of(block) else None

    # ---- structured units --------------------------------------------------------------------------------------
    def units(self, block: nn.Module, i: int) -> list[UnitGroup]:
        """Structured unit groups of block `i`: attention heads/KV groups, MLP channels, experts (see `UnitGroup`)."""
        groups = [self._attention_units(block)]
        num_e = num_experts_of(block)
        if not num_e:
            groups.append(_channel_group("channel", "mlp", block.mlp.down_proj.in_features))
            return groups
        inter = block.mlp.experts.down_proj.shape[2]
        groups += [_channel_group("expert_channel", f"mlp.experts.{e}", inter, expert=e) for e in range(num_e)]
        if self.spec.shared_expert:
            shared = block.get_submodule(self.spec.shared_expert)
            groups.append(_channel_group("shared_channel", self.spec.shared_expert, shared.down_proj.in_features))
        groups.append(self._expert_units(block, num_e))
        return groups

    def _attention_units(self, block: nn.Module) -> UnitGroup:
        attn = block.self_attn
        if self.spec.attention == "mla":
            q = "self_attn.q_proj" if attn.q_lora_rank is None else "self_attn.q_b_proj"
            members = (
                (q, 0, attn.qk_head_dim),
                ("self_attn.kv_b_proj", 0, attn.qk_nope_head_dim + attn.v_head_dim),
                ("self_attn.o_proj", 1, attn.v_head_dim),
            )
            return UnitGroup("head", attn.o_proj.in_features // attn.v_head_dim, members)
        hd = attn.head_dim
        n_kv = attn.k_proj.out_features // hd
        per_group = attn.q_proj.out_features // n_kv
        members = (
            ("self_attn.q_proj", 0, per_group),
            ("self_attn.k_proj", 0, hd),
            ("self_attn.v_proj", 0, hd),
            ("self_attn.o_proj", 1, per_group),
        )
        return UnitGroup("kv_group", n_kv, members)

    def _expert_units(self, block: nn.Module, num_e: int) -> UnitGroup:
        names = [n for n, _ in block.mlp.gate.named_parameters()] + [n for n, _ in block.mlp.gate.named_buffers()]
        members = tuple((f"mlp.gate.{n}", 0, 1) for n in names)
        members += (("mlp.experts.gate_up_proj", 0, 1), ("mlp.experts.down_proj", 0, 1))
        return UnitGroup("expert", num_e, members)

    # ---- hooks -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def input_hooks(self, block: nn.Module, callback: InputCallback) -> Iterator[None]:
        """While active, each forward calls `callback(input_id, X [n_tokens, d_in])` once per input of `linears()`.

        Dense groups: a forward pre-hook on the group's first linear. Experts: one pre-hook on the experts module
        that, for each expert e hit by the router, passes the routed rows `X_e = x[top_k_index == e]` as
        "expert{e}_in" and the down_proj input `act(X_e W_gateᵀ) ⊙ (X_e W_upᵀ)` as "expert{e}_out".
        Hooks are removed on exit, also when the forward raises.
        """
        handles = []
        try:
            first: dict[str, str] = {}
            for s in self.linears(block, block.self_attn.layer_idx):
                if s.expert is None:
                    first.setdefault(s.input_id, s.name)
            for input_id, name in first.items():
                handles.append(block.get_submodule(name).register_forward_pre_hook(_dense_hook(input_id, callback)))
            if num_experts_of(block):
                hook = _experts_hook(callback)
                handles.append(block.mlp.experts.register_forward_pre_hook(hook, with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    # ---- forward -----------------------------------------------------------------------------------------------
    def layer_type(self, i: int) -> str:
        """The mask kind of layer `i` ("full_attention" or "sliding_attention"), as the stock model chooses its mask."""
        rule = self.spec.mask_rule
        if rule == "layer_types":
            return self.config.layer_types[i]
        if rule == "sliding_if_set" and getattr(self.config, "sliding_window", None) is not None:
            return "sliding_attention"
        return "full_attention"

    def rotary(self, device: torch.device | str) -> nn.Module:
        """The model's own rotary embedding, built from the config on CPU (as the stock model is) and moved to
        `device`; cached per device."""
        key = str(torch.device(device))
        if key not in self._rotary:
            with torch.device("cpu"):
                self._rotary[key] = self.spec.cls("RotaryEmbedding")(self.config).to(device)
        return self._rotary[key]

    def forward_context(
        self,
        batch: int,
        seq_len: int,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        attention_mask: Tensor | None = None,
    ) -> dict:
        """Inputs shared by every block forward of a `[batch, seq_len]` window starting at position 0:
        "position_ids" `[1, L]`, "position_embeddings" (cos, sin) from the model's rotary class, and
        "attention_masks" {layer type: mask} from transformers' own mask helpers (causal; sliding-window where the
        config asks). `attention_mask`: optional `[B, L]` padding mask (1 = token). Pass it to `block_forward`."""
        position_ids = torch.arange(seq_len, device=device).unsqueeze(0)
        # Shape, dtype and device are all the helpers read from inputs_embeds: a zero-stride view costs nothing.
        dummy = torch.zeros((), device=device, dtype=dtype).expand(batch, seq_len, self.config.hidden_size)
        position_embeddings = self.rotary(device)(dummy, position_ids)
        masks = {}
        for t in sorted({self.layer_type(i) for i in range(self.num_layers)}):
            masks[t] = _MASK_FUNCTIONS[t](
                config=self.config,
                inputs_embeds=dummy,
                attention_mask=attention_mask,
                cache=None,
                position_ids=position_ids,
            )
        return {"position_ids": position_ids, "position_embeddings": position_embeddings, "attention_masks": masks}

    def block_forward(self, block: nn.Module, hidden: Tensor, ctx: dict) -> Tensor:
        """`block(hidden)` with the context of `forward_context`: `[B, L, H] -> [B, L, H]`."""
        mask = ctx["attention_masks"][self.layer_type(block.self_attn.layer_idx)]
        return block(
            hidden,
            attention_mask=mask,
            position_ids=ctx["position_ids"],
            position_embeddings=ctx["position_embeddings"],
        )


def _channel_group(kind: str, base: str, count: int, expert: int | None = None) -> UnitGroup:
    members = ((f"{base}.{GATE}", 0, 1), (f"{base}.{UP}", 0, 1), (f"{base}.{DOWN}", 1, 1))
    return UnitGroup(kind, count, members, expert=expert)


def _dense_hook(input_id: str, callback: InputCallback) -> Callable:
    def hook(module: nn.Module, args: tuple) -> None:
        X = args[0]
        callback(input_id, X.reshape(-1, X.shape[-1]))

    return hook


def _experts_hook(callback: InputCallback) -> Callable:
    """Pre-hook on a fused experts module: forward(hidden_states [T, H], top_k_index [T, k], top_k_weights)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        num_e, inter = module.gate_up_proj.shape[0], module.gate_up_proj.shape[1] // 2
        with torch.no_grad():
            for e in torch.unique(top_k_index).tolist():
                if e >= num_e:  # expert-parallel sentinel index: not a local expert
                    continue
                X = hidden[(top_k_index == e).any(dim=-1)]
                callback(f"expert{e}_in", X)
                gate_up = F.linear(X, module.gate_up_proj[e])
                callback(f"expert{e}_out", module.act_fn(gate_up[:, :inter]) * gate_up[:, inter:])

    return hook


def shrunk_config(config: PretrainedConfig, overrides: dict) -> PretrainedConfig:
    """A deep copy of `config` with `overrides` set."""
    out = copy.deepcopy(config)
    for k, v in overrides.items():
        setattr(out, k, v)
    return out


def _spec_for(model_type: str) -> ArchSpec:
    if model_type not in ARCH_TABLE:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
    return ARCH_TABLE[model_type]


def adapter_for(config: PretrainedConfig | dict) -> ArchAdapter:
    """The adapter of `config` (a transformers config or a config.json dict). ValueError when unsupported."""
    if isinstance(config, dict):
        fields = dict(config)
        spec = _spec_for(fields.pop("model_type", None))
        config = AutoConfig.for_model(spec.model_type, **fields)
    return ArchAdapter(_spec_for(config.model_type), config)


def embed(ids: Tensor, embed_weight: Tensor) -> Tensor:
    """`X = E[ids]` (`[B, L] -> [B, L, H]`); none of the supported architectures scales embeddings."""
    return F.embedding(ids, embed_weight)


def final_hidden_to_logits(
    hidden: Tensor, norm_weight: Tensor, lm_head_weight: Tensor, config: PretrainedConfig
) -> Tensor:
    """`logits = RMSNorm(hidden) W_lmᵀ` with the model's own RMSNorm class (eps = config.rms_norm_eps).
    For tied embeddings pass the embedding matrix as `lm_head_weight`."""
    spec = _spec_for(config.model_type)
    with torch.device("meta"):
        norm = spec.cls("RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)
    norm.load_state_dict({"weight": norm_weight}, assign=True)
    return F.linear(norm(hidden), lm_head_weight)
