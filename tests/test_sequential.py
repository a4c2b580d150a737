"""The one-pass true-sequential block path (engine.sequential) against an independent reference on stock modules."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import sequential as seq_mod
from engine.calibration import load_calibration
from engine.config import config_from_dict
from engine.pipeline import run
from solvers.masks import wanda_prune
from solvers.sparsegpt import sparsegpt_prune
from tests.test_arch import block_tensors, load
from tests.test_pipeline import all_tensors
from tests.tiny_models import DENSE_ARCHS, MOE_ARCHS, recipe

GROUPS = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]


@pytest.mark.parametrize("arch", DENSE_ARCHS)
def test_pieces_compose_to_the_block_forward(arch, tiny_ckpt):
    adapter, tensors = load(tiny_ckpt(arch))
    block = adapter.build_block(1, block_tensors(adapter, tensors, 1), device="cpu", dtype=torch.float32)
    x = torch.randn(3, 16, adapter.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ctx = adapter.forward_context(3, 16, device="cpu", dtype=torch.float32)
    parts = seq_mod.parts_of(adapter, block)
    assert parts is not None
    ref = adapter.block_forward(block, x, ctx)
    assert torch.equal(seq_mod.composed_forward(adapter, block, parts, x, ctx), ref)  # the same ops, bit for bit
    assert seq_mod.decomposition_matches(adapter, block, x, ctx)
    assert isinstance(block.self_attn.o_proj, torch.nn.Linear) and isinstance(block.mlp.down_proj, torch.nn.Linear)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_blocks_take_the_two_forward_path(arch, tiny_ckpt):
    adapter, tensors = load(tiny_ckpt(arch))
    moe_layer = adapter.num_layers - 1  # (DeepSeek's first layers are dense; the last is MoE in every tiny config)
    block = adapter.build_block(
        moe_layer, block_tensors(adapter, tensors, moe_layer), device="cpu", dtype=torch.float32
    )
    assert seq_mod.parts_of(adapter, block) is None


def _reference_true_sequential(src, cfg, method: str, sparsity: float) -> dict[str, torch.Tensor]:
    """True-sequential pruning with the stock model's own layers and float64 statistics: for each layer, for each
    group (q/k/v, o, gate/up, down), run the layer over every sample with the earlier groups pruned, gather the
    group's input, prune; then feed the pruned layer's outputs to the next layer."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = load_calibration(cfg.calibration, _tokenizer(src))
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        pe = model.model.rotary_emb(h, pos)
        out = {}
        for li, layer in enumerate(model.model.layers):
            for group in GROUPS:
                first = layer.get_submodule(group[0])
                xs: list[torch.Tensor] = []
                handle = first.register_forward_pre_hook(
                    lambda m, a, xs=xs: xs.append(a[0].reshape(-1, a[0].shape[-1]))
                )
                layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)  # causal sdpa without a mask
                handle.remove()
                X = torch.cat(xs).double()
                for name in group:
                    lin = layer.get_submodule(name)
                    W = lin.weight.double()
                    if method == "sparsegpt":
                        W2 = sparsegpt_prune(W, X.T @ X, sparsity, n_tokens=X.shape[0]).weight
                    else:
                        W2 = wanda_prune(W, X.square().sum(0), sparsity).weight
                    lin.weight.copy_(W2.float())
                    out[f"model.layers.{li}.{name}.weight"] = lin.weight.detach().clone()
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
    return out


def _tokenizer(src):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(src)


@pytest.mark.parametrize("arch,method", [("llama", "sparsegpt"), ("qwen3", "sparsegpt"), ("llama", "wanda")])
def test_matches_a_stock_true_sequential_reference(arch, method, tiny_ckpt, calib_file, tmp_path):
    src = tiny_ckpt(arch)
    cfg = config_from_dict(recipe(src, tmp_path / "o", calib_file, [{"method": method, "sparsity": 0.5}]))
    rep = run(cfg)
    assert all(b.get("true_sequential") for b in rep["blocks"])
    got = all_tensors(tmp_path / "o")
    ref = _reference_true_sequential(src, cfg, method, 0.5)
    agree = total = 0
    for name, R in ref.items():
        G = got[name]
        agree += int(((G == 0) == (R == 0)).sum())
        total += R.numel()
        rel = float((G - R).norm() / R.norm())
        assert rel < 1e-3, (name, rel)
    assert agree / total > 0.999, agree / total


def test_two_forward_path_still_available_and_differs(tiny_ckpt, calib_file, tmp_path):
    src = tiny_ckpt("llama")
    stage = [{"method": "sparsegpt", "sparsity": 0.5}]
    one = run(config_from_dict(recipe(src, tmp_path / "one", calib_file, stage)))
    two = run(config_from_dict(recipe(src, tmp_path / "two", calib_file, stage, true_sequential=False)))
    assert all(b.get("true_sequential") for b in one["blocks"])
    assert not any(b.get("true_sequential") for b in two["blocks"])
    a, b = all_tensors(tmp_path / "one"), all_tensors(tmp_path / "two")
    q0, o0 = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    torch.testing.assert_close(a[q0], b[q0], rtol=1e-5, atol=1e-7)  # the first group sees the dense input either way
    assert not torch.allclose(a[o0], b[o0], rtol=1e-3, atol=1e-5)  # o_proj's statistics: pruned q/k/v only here
    for r in (one, two):
        assert all(0 < blk["output_error"] < 1 for blk in r["blocks"])


def test_recomputing_the_mlp_hidden_gives_the_same_bytes(tiny_ckpt, calib_file, tmp_path, monkeypatch):
    """When the MLP hidden does not fit beside the cache it is recomputed: same output bytes; when even the
    attention core does not fit, the block takes the two-forward path."""
    from engine import pipeline

    src = tiny_ckpt("llama")
    stage = [{"method": "sparsegpt", "sparsity": 0.5}]
    run(config_from_dict(recipe(src, tmp_path / "kept", calib_file, stage)))
    adapter, _ = load(src)
    inter = adapter.config.intermediate_size
    tokens = 8 * 32
    core = tokens * adapter.config.num_attention_heads * adapter.config.head_dim * 4
    assert tokens * inter * 4 > core
    monkeypatch.setattr(pipeline.BlockLoop, "_side_budget", lambda self: core)
    rep = run(config_from_dict(recipe(src, tmp_path / "recomputed", calib_file, stage)))
    assert all(b.get("true_sequential") for b in rep["blocks"])
    a, b = all_tensors(tmp_path / "kept"), all_tensors(tmp_path / "recomputed")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    monkeypatch.setattr(pipeline.BlockLoop, "_side_budget", lambda self: core - 1)
    rep = run(config_from_dict(recipe(src, tmp_path / "fallback", calib_file, stage)))
    assert not any(b.get("true_sequential") for b in rep["blocks"])


def test_report_says_where_the_output_error_was_measured(tiny_ckpt, calib_file, tmp_path):
    src = tiny_ckpt("mistral")
    run(config_from_dict(recipe(src, tmp_path / "o", calib_file, [{"method": "magnitude", "sparsity": 0.3}])))
    rep = json.loads((tmp_path / "o" / "blockprune_report.json").read_text())
    assert all(b["output_error_on"] == "first sample" for b in rep["blocks"])
