"""Modeling code shipped inside non-uniform blockprune checkpoints (needs only torch and transformers).

A checkpoint whose layers differ from one another (removed attention or MLP sublayers, per-layer widths or
per-layer expert counts such as `{"num_local_experts": 6, "num_experts_per_tok": 2}`) keeps the stock `config.json`
fields plus::

    "blockprune": {"version": 1, "layers": [{"attention": true, "mlp": false, "config": {"intermediate_size": 80}},
                                             ...]}          # one entry per layer, in order
    "auto_map": {"AutoModelForCausalLM": "modeling_blockprune.BlockpruneForCausalLM"}

`BlockpruneForCausalLM` subclasses the stock `<Arch>ForCausalLM` and, after the stock constructor, rebuilds layer
i as the stock decoder layer of `config` with `layers[i]["config"]` set; a removed sublayer becomes an identity on
the residual stream (its module returns zeros and its input norm is dropped, so the checkpoint holds no tensor for
it). A removed attention sublayer still advances the KV cache by the sequence length with zero-width keys and
values, so cache positions stay right during `generate`.

When this file is copied into a checkpoint, one line is appended: `BlockpruneForCausalLM = make_causal_lm("<type>")`.
"""

from __future__ import annotations

import copy
import importlib

import torch
from torch import nn

SECTION = "blockprune"
FORMAT_VERSION = 1


class RemovedAttention(nn.Module):
    """An attention sublayer that was pruned away: adds nothing to the residual stream."""

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, past_key_values=None, **kwargs):
        if past_key_values is not None:  # keep the cache's sequence length in step with the other layers
            b, n = hidden_states.shape[0], hidden_states.shape[1]
            empty = hidden_states.new_zeros(b, 0, n, 1)
            past_key_values.update(empty, empty, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class RemovedMLP(nn.Module):
    """An MLP (or MoE) sublayer that was pruned away: adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def remove_sublayers(layer: nn.Module, *, attention: bool, mlp: bool) -> nn.Module:
    """Replace the removed sublayers of a stock decoder layer (in place; returns it). `attention` / `mlp`: keep."""
    if not attention:
        layer.self_attn = RemovedAttention(layer.self_attn.layer_idx)
        layer.input_layernorm = nn.Identity()
    if not mlp:
        layer.mlp = RemovedMLP()
        layer.post_attention_layernorm = nn.Identity()
    return layer


def layer_config(config, entry: dict):
    """`config` with the per-layer fields of `entry["config"]` set (a copy)."""
    out = copy.deepcopy(config)
    for k, v in (entry.get("config") or {}).items():
        setattr(out, k, v)
    return out


def build_layer(layer_cls: type, config, i: int, entry: dict) -> nn.Module:
    """Stock decoder layer `i` for a `blockprune.layers[i]` entry."""
    layer = layer_cls(layer_config(config, entry), i)
    return remove_sublayers(layer, attention=entry.get("attention", True), mlp=entry.get("mlp", True))


def _section(config) -> dict:
    sec = getattr(config, SECTION, None)
    if not isinstance(sec, dict) or not isinstance(sec.get("layers"), list):
        raise ValueError(f"config has no `{SECTION}.layers` list: not a non-uniform blockprune checkpoint")
    if int(sec.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{SECTION} format version {sec.get('version')} is newer than this file's {FORMAT_VERSION}")
    if len(sec["layers"]) != config.num_hidden_layers:
        raise ValueError(
            f"{SECTION}.layers has {len(sec['layers'])} entries, num_hidden_layers is {config.num_hidden_layers}"
        )
    return sec


def resize_layers(decoder: nn.Module, config) -> None:
    """Rebuild every layer of the stock decoder (`model.model`) from the `blockprune` section of `config`."""
    sec = _section(config)
    layer_cls = type(decoder.layers[0])
    for i, entry in enumerate(sec["layers"]):
        decoder.layers[i] = build_layer(layer_cls, config, i, entry)


def stock_causal_lm(model_type: str) -> type:
    """The stock `<Arch>ForCausalLM` class of `model_type`."""
    mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    names = [n for n in dir(mod) if n.endswith("ForCausalLM") and not n.startswith("_")]
    if len(names) != 1:
        raise ValueError(f"transformers.models.{model_type}: expected one *ForCausalLM class, found {names}")
    return getattr(mod, names[0])


def make_causal_lm(model_type: str) -> type:
    """`BlockpruneForCausalLM` for `model_type`: the stock causal LM with layers resized from the config. The class
    carries the stock class's name (e.g. `LlamaForCausalLM`): clients such as `pipeline("text-generation")` check the
    model class by name against the architectures they support."""
    base = stock_causal_lm(model_type)

    def __init__(self, config):  # noqa: N807 (a method of the class built below)
        base.__init__(self, config)
        resize_layers(self.model, config)

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": __name__})
