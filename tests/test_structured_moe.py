"""Structured pruning on every tiny architecture, MoE included: the stock-loaded output equals blockprune's
in-memory pruned model, parameter counts equal the plan, and per-expert / shared-expert channel surgery keeps
exactly the right rows and columns."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from engine.arch import adapter_for, embed, final_hidden_to_logits
from engine.config import ConfigError, config_from_dict
from engine.pipeline import run
from engine.stages import structured as st_mod
from engine.units import EXPERT_ALIGN
from sharding.reader import CheckpointReader
from tests.test_structured_pipeline import STRUCT, adapter_logits, block_param_count, ids_for_test, stock_logits
from tests.tiny_models import ARCHS, recipe, save_tiny, tiny_model

STRUCT_ARCHS = [a for a in ARCHS if a != "deepseek_v3"]
MAGNITUDE = {**STRUCT, "score": "magnitude", "solver": "none"}


@pytest.fixture
def pruned_blocks(monkeypatch) -> dict[int, nn.Module]:
    """Copies of the blocks `engine.stages.structured.prune_block` returns during a run (the in-memory pruned model), by
    source layer index. The real function runs; only its results are recorded."""
    blocks: dict[int, nn.Module] = {}
    real = st_mod.prune_block

    def recording(adapter, block, i, *args, **kwargs):
        new, records = real(adapter, block, i, *args, **kwargs)
        blocks[i] = copy.deepcopy(new)
        return new, records

    monkeypatch.setattr(st_mod, "prune_block", recording)
    return blocks


@torch.no_grad()
def memory_logits(out: Path, blocks: dict[int, nn.Module], ids: torch.Tensor) -> torch.Tensor:
    """Logits of the in-memory pruned blocks, with the embeddings, final norm and lm_head of `out` (copied through
    unchanged from the source)."""
    reader = CheckpointReader(out)
    adapter = adapter_for(reader.config)
    x = embed(ids, reader.read([adapter.embed_key])[adapter.embed_key].float())
    ctx = adapter.forward_context(ids.shape[0], ids.shape[1], device="cpu", dtype=torch.float32)
    for i in sorted(blocks):
        x = adapter.block_forward(blocks[i].eval(), x, ctx)
    head = adapter.embed_key if adapter.lm_head_key is None else adapter.lm_head_key
    t = reader.read([adapter.final_norm_key, head])
    return final_hidden_to_logits(x, t[adapter.final_norm_key].float(), t[head].float(), adapter.config)


def stock(path: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def check_stock_equals_memory(out: Path, rep: dict, blocks: dict[int, nn.Module]) -> nn.Module:
    """Stock `from_pretrained` of `out`: its config has the plan's fields, its logits equal the in-memory pruned
    model's (1e-5) and its block parameters equal the plan's count exactly. Returns the stock model."""
    plan = rep["structured_plan"]
    cfg = json.loads((out / "config.json").read_text())
    assert "auto_map" not in cfg and "blockprune" not in cfg
    assert {k: cfg[k] for k in plan["config"]} == plan["config"]
    model = stock(out)
    ids = ids_for_test()
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, memory_logits(out, blocks, ids), rtol=1e-5, atol=1e-5)
    assert block_param_count(model) == plan["block_params_after"]
    assert sum(p.numel() for b in blocks.values() for p in b.parameters()) == plan["block_params_after"]
    return model


@pytest.mark.parametrize("arch", STRUCT_ARCHS)
def test_structured_30_every_arch_stock_equals_in_memory(arch, tiny_ckpt, calib_file, tmp_path, pruned_blocks):
    """OBS + closed form, 30% of the block parameters: stock output equal to the in-memory pruned model, exact
    parameter counts (blocks and whole model), one KV group of two removed, one solve per consumer."""
    src, out = tiny_ckpt(arch), tmp_path / "out"
    rep = run(config_from_dict(recipe(src, out, calib_file, [STRUCT])))
    plan = rep["structured_plan"]
    assert sorted(pruned_blocks) == [0, 1, 2]
    assert plan["achieved"] == pytest.approx(0.3, abs=0.035)  # whole units; routed experts keep multiples of 8
    model = check_stock_equals_memory(out, rep, pruned_blocks)
    torch.testing.assert_close(
        stock_logits(out, ids_for_test())[0], adapter_logits(out, ids_for_test()), rtol=1e-5, atol=1e-5
    )  # blockprune's own loader of the output agrees too
    dense = stock(src)
    assert block_param_count(dense) == plan["block_params_before"]
    assert sum(p.numel() for p in model.parameters()) == (
        sum(p.numel() for p in dense.parameters()) - plan["block_params_before"] + plan["block_params_after"]
    )
    assert model.config.num_key_value_heads == 1 and model.config.num_attention_heads == 2
    for b in rep["blocks"]:
        assert 0 < b["output_error"] < 1
        assert b["structured"]["self_attn.o_proj"]["kept_units"] == 1
    if arch in ("mixtral", "qwen2_moe", "qwen3_moe"):
        assert plan["remove_per_layer"]["expert_channel"] > 0
        kept = model.model.layers[0].mlp.experts.down_proj.shape[-1]
        assert kept % EXPERT_ALIGN == 0 and kept < dense.model.layers[0].mlp.experts.down_proj.shape[-1]
        for b in rep["blocks"]:  # one solve per routed expert
            assert sum(".experts." in name for name in b["structured"]) == 4
    if arch == "qwen2_moe":
        assert plan["remove_per_layer"]["shared_channel"] > 0
        assert cfg_value(out, "shared_expert_intermediate_size") == 48 - plan["remove_per_layer"]["shared_channel"]


def cfg_value(path: Path, key: str):
    return json.loads((path / "config.json").read_text())[key]


def top_channels(down: torch.Tensor, keep: int) -> list[int]:
    """Sorted ids of the `keep` channels (columns of `down`) of largest squared norm: the magnitude selection."""
    return sorted(torch.sort(down.square().sum(0), descending=True, stable=True).indices[:keep].tolist())


def check_expert_channels(src: nn.Module, out: nn.Module, layer: int) -> list[list[int]]:
    """Without reconstruction every routed expert of `out` is a sub-matrix of the same expert of `src`: its own
    top-magnitude channels (gate and up rows, down columns). Returns the kept channels per expert."""
    a, b = src.model.layers[layer].mlp.experts, out.model.layers[layer].mlp.experts
    inter, keep = a.down_proj.shape[-1], b.down_proj.shape[-1]
    kept = []
    for e in range(a.down_proj.shape[0]):
        ch = top_channels(a.down_proj[e], keep)
        assert torch.equal(b.down_proj[e], a.down_proj[e][:, ch])
        assert torch.equal(b.gate_up_proj[e], a.gate_up_proj[e][ch + [inter + c for c in ch]])
        kept.append(ch)
    return kept


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])  # both on-disk expert layouts (w1/w2/w3, *_proj)
def test_expert_and_shared_channels_are_each_experts_own(arch, tiny_ckpt, calib_file, tmp_path, pruned_blocks):
    """Magnitude without reconstruction: each expert (and Qwen2-MoE's shared expert) keeps its own top channels;
    the router and the shared expert's gate are copied unchanged."""
    src, out = tiny_ckpt(arch), tmp_path / "out"
    rep = run(config_from_dict(recipe(src, out, calib_file, [MAGNITUDE])))
    model, dense = check_stock_equals_memory(out, rep, pruned_blocks), stock(src)
    for i in range(3):
        kept = check_expert_channels(dense, model, i)
        assert len({tuple(k) for k in kept}) > 1  # experts choose differently
        a, b = dense.model.layers[i].mlp, model.model.layers[i].mlp
        assert torch.equal(a.gate.weight, b.gate.weight)
        if arch == "qwen2_moe":
            sa, sb = a.shared_expert, b.shared_expert
            ch = top_channels(sa.down_proj.weight, sb.down_proj.in_features)
            assert sb.down_proj.in_features == 48 - rep["structured_plan"]["remove_per_layer"]["shared_channel"]
            assert torch.equal(sb.down_proj.weight, sa.down_proj.weight[:, ch])
            assert torch.equal(sb.gate_proj.weight, sa.gate_proj.weight[ch])
            assert torch.equal(sb.up_proj.weight, sa.up_proj.weight[ch])
            assert torch.equal(a.shared_expert_gate.weight, b.shared_expert_gate.weight)


def routed_to_two(tmp_path: Path) -> Path:
    """A tiny Mixtral whose routers send every token to experts 0 and 1: hidden coordinate 0 is a large positive
    constant (embeddings + 100) and each router row reads only that coordinate, with weights 3, 2, 1, −5."""
    model = tiny_model("mixtral")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] += 100.0
        for layer in model.model.layers:
            layer.mlp.gate.weight.zero_()
            layer.mlp.gate.weight[:, 0] = torch.tensor([3.0, 2.0, 1.0, -5.0])
    return save_tiny(model, tmp_path / "src")


def test_unrouted_experts_fall_back_to_magnitude(tmp_path, calib_file, pruned_blocks, caplog):
    """Experts that get no calibration token are pruned by magnitude without reconstruction (warned); routed ones
    by the stage's score and solver; the output still equals the in-memory model."""
    src, out = routed_to_two(tmp_path), tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="engine.stages.structured"):
        rep = run(config_from_dict(recipe(src, out, calib_file, [STRUCT])))
    warned = [r.getMessage() for r in caplog.records if "no calibration tokens" in r.getMessage()]
    assert len(warned) == 3 * 2 and all(".experts.2." in m or ".experts.3." in m for m in warned)
    model, dense = check_stock_equals_memory(out, rep, pruned_blocks), stock(src)
    for b in rep["blocks"]:
        recs = {name: r for name, r in b["structured"].items() if ".experts." in name}
        assert {r["score"] for name, r in recs.items() if ".experts.2." in name or ".experts.3." in name} == {
            "magnitude"
        }
        assert {r["score"] for name, r in recs.items() if ".experts.0." in name or ".experts.1." in name} == {"obs"}
    for i in range(3):
        a, b = dense.model.layers[i].mlp.experts, model.model.layers[i].mlp.experts
        keep = b.down_proj.shape[-1]
        for e in (2, 3):
            ch = top_channels(a.down_proj[e], keep)
            assert torch.equal(b.down_proj[e], a.down_proj[e][:, ch])


def test_mixed_dense_and_moe_layers(tmp_path, calib_file, pruned_blocks):
    """Qwen3-MoE with a dense MLP layer (`mlp_only_layers`): the dense layer's channels and the experts' channels
    are planned separately (`intermediate_size` and `moe_intermediate_size`), stock output."""
    from tests.tiny_models import build_tiny_checkpoint

    src, out = build_tiny_checkpoint("qwen3_moe", tmp_path / "src", mlp_only_layers=[1]), tmp_path / "out"
    rep = run(config_from_dict(recipe(src, out, calib_file, [STRUCT])))
    remove = rep["structured_plan"]["remove_per_layer"]
    assert remove["channel"] > 0 and remove["expert_channel"] > 0
    model = check_stock_equals_memory(out, rep, pruned_blocks)
    assert model.model.layers[1].mlp.down_proj.in_features == 96 - remove["channel"]
    assert model.model.layers[0].mlp.experts.down_proj.shape[-1] == 32 - remove["expert_channel"]


def test_moe_attention_bias_compensation(tiny_ckpt, calib_file, tmp_path, pruned_blocks):
    """Qwen3-MoE, heads only, FLAP bias compensation: `attention_bias` turns on, o_proj gets the bias, experts
    untouched."""
    src, out = tiny_ckpt("qwen3_moe"), tmp_path / "out"
    stage = {**STRUCT, "units": ["heads"], "score": "fluctuation", "solver": "none", "bias_compensation": True}
    rep = run(config_from_dict(recipe(src, out, calib_file, [stage])))
    assert cfg_value(out, "attention_bias") is True
    model, dense = check_stock_equals_memory(out, rep, pruned_blocks), stock(src)
    for i in range(3):
        assert float(model.model.layers[i].self_attn.o_proj.bias.detach().abs().sum()) > 0
        assert torch.equal(model.model.layers[i].mlp.experts.down_proj, dense.model.layers[i].mlp.experts.down_proj)


def test_deepseek_v3_structured_is_refused(tiny_ckpt, calib_file, tmp_path):
    with pytest.raises(ConfigError, match="deepseek_v3 \\(MLA attention\\) is not supported"):
        run(config_from_dict(recipe(tiny_ckpt("deepseek_v3"), tmp_path / "out", calib_file, [STRUCT])))
    assert not (tmp_path / "out").exists()
