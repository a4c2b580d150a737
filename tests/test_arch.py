"""engine.arch: streaming block-by-block forward == the stock model, byte-exact disk round trip, linears, hooks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.activations import ACT2FN

from engine.arch import SUPPORTED_ARCHS, LinearSpec, adapter_for, embed, final_hidden_to_logits
from tests.tiny_models import ARCHS, DENSE_ARCHS, MOE_ARCHS, save_tiny, tiny_model

# linears per block: attention + MLP (dense: 3; MoE: 3 per expert + 3 per shared expert). Tiny configs: 4 experts.
_ATTN = {"deepseek_v3": 5}
_SHARED = {"qwen2_moe": 3, "deepseek_v3": 3}


def read_ckpt(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint, by name (plain safe_open over the index's shards)."""
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(path / shard, framework="pt") as f:
            out.update({name: f.get_tensor(name) for name, s in weight_map.items() if s == shard})
    return out


def block_tensors(arch, tensors: dict, i: int) -> dict:
    return {n: tensors[n] for n in arch.block_keys(i, tensors)}


def load(path: Path):
    return adapter_for(AutoConfig.from_pretrained(path)), read_ckpt(path)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def no_hooks(block: torch.nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in block.modules())


def streaming_logits(path: Path, ids: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    arch, tensors = load(path)
    X = embed(ids.to(device), tensors[arch.embed_key].to(device))
    ctx = arch.forward_context(*ids.shape, device=device, dtype=torch.float32)
    for i in range(arch.num_layers):
        block = arch.build_block(i, block_tensors(arch, tensors, i), device=device, dtype=torch.float32)
        X = arch.block_forward(block, X, ctx)
    lm_head = tensors[arch.lm_head_key or arch.embed_key].to(device)
    return final_hidden_to_logits(X, tensors[arch.final_norm_key].to(device), lm_head, arch.config).cpu()


def stock_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def random_ids(vocab: int, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


# ---- forward -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch_name", ARCHS)
def test_streaming_forward_matches_stock_model(tiny_ckpt, arch_name):
    path = tiny_ckpt(arch_name)
    ids = random_ids(128)
    with torch.no_grad():
        got = streaming_logits(path, ids)
    ref = stock_logits(path, ids)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "arch_name,overrides",
    [
        ("mistral", {"sliding_window": 4}),  # every layer sliding
        ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),  # full, sliding, sliding
        ("llama", {"tie_word_embeddings": True}),
    ],
)
def test_streaming_forward_masks_and_tied_head(tiny_ckpt, arch_name, overrides):
    path = tiny_ckpt(arch_name, **overrides)
    arch, tensors = load(path)
    if overrides.get("tie_word_embeddings"):
        assert arch.lm_head_key is None and "lm_head.weight" not in tensors
    else:
        assert "sliding_attention" in {arch.layer_type(i) for i in range(arch.num_layers)}
    ids = random_ids(128)
    with torch.no_grad():
        got = streaming_logits(path, ids)
    torch.testing.assert_close(got, stock_logits(path, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch_name", ["qwen2", "qwen2_moe", "deepseek_v3"])
def test_streaming_forward_on_cuda(tiny_ckpt, arch_name):
    path = tiny_ckpt(arch_name)
    ids = random_ids(128)
    with torch.no_grad():
        got = streaming_logits(path, ids, device="cuda")
    torch.testing.assert_close(got, stock_logits(path, ids), atol=1e-4, rtol=1e-4)


def test_sliding_window_changes_the_output(tiny_ckpt):
    """The sliding-window case above is only a test if the window matters for these inputs."""
    ids = random_ids(128)
    with torch.no_grad():
        full = streaming_logits(tiny_ckpt("mistral"), ids)
        sliding = streaming_logits(tiny_ckpt("mistral", sliding_window=4), ids)
    assert (full[:, :4] - sliding[:, :4]).abs().max() < 1e-5
    assert (full[:, 8:] - sliding[:, 8:]).abs().max() > 1e-3


# ---- disk round trip -----------------------------------------------------------------------------------------------
def assert_round_trip(arch, tensors, *, dtype):
    for i in range(arch.num_layers):
        disk = block_tensors(arch, tensors, i)
        block = arch.build_block(i, disk, device="cpu", dtype=dtype)
        back = arch.block_to_disk(i, block, dtypes={n: t.dtype for n, t in disk.items()})
        assert sorted(back) == sorted(disk)
        for name, t in disk.items():
            assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
            assert back[name].is_contiguous() and back[name].device.type == "cpu", name
            assert torch.equal(as_bytes(back[name]), as_bytes(t)), name


@pytest.mark.parametrize("arch_name", ARCHS)
def test_block_round_trip_is_byte_identical(tiny_ckpt, arch_name):
    arch, tensors = load(tiny_ckpt(arch_name))
    assert arch.non_block_keys(tensors) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    assert_round_trip(arch, tensors, dtype=None)
    assert_round_trip(arch, tensors, dtype=torch.float32)


@pytest.mark.parametrize("arch_name", ARCHS)
def test_bf16_checkpoint_round_trip(tmp_path, arch_name):
    path = save_tiny(tiny_model(arch_name).to(torch.bfloat16), tmp_path / arch_name)
    arch, tensors = load(path)
    assert tensors["model.layers.0.input_layernorm.weight"].dtype == torch.bfloat16
    assert_round_trip(arch, tensors, dtype=torch.float32)  # upcast for the solver, written back as bf16
    block = arch.build_block(1, block_tensors(arch, tensors, 1), device="cpu", dtype=None)
    assert block.self_attn.o_proj.weight.dtype == torch.bfloat16
    back = arch.block_to_disk(1, block)
    assert all(torch.equal(as_bytes(back[n]), as_bytes(tensors[n])) for n in back)


def test_deepseek_router_stays_float32_in_bf16(tiny_ckpt):
    """DeepSeek's `_keep_in_fp32_modules_strict`: the router weight and bias stay float32, as in from_pretrained."""
    arch, tensors = load(tiny_ckpt("deepseek_v3"))
    block = arch.build_block(1, block_tensors(arch, tensors, 1), device="cpu", dtype=torch.bfloat16)
    assert block.mlp.gate.weight.dtype == torch.float32
    assert block.mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert block.mlp.experts.gate_up_proj.dtype == torch.bfloat16


@pytest.mark.parametrize("arch_name", ["mixtral", "qwen3_moe"])
def test_fused_experts_on_disk_are_read_and_written_fused(tiny_ckpt, arch_name):
    arch, tensors = load(tiny_ckpt(arch_name))
    block = arch.build_block(1, block_tensors(arch, tensors, 1), device="cpu", dtype=None)
    fused_disk = {"model.layers.1." + n: t.clone() for n, t in block.state_dict().items()}
    block2 = arch.build_block(1, fused_disk, device="cpu", dtype=None)
    back = arch.block_to_disk(1, block2)
    assert sorted(back) == sorted(fused_disk)
    assert all(torch.equal(back[n], fused_disk[n]) for n in back)
    assert torch.equal(block2.mlp.experts.gate_up_proj, block.mlp.experts.gate_up_proj)


def test_build_block_errors_name_the_tensors(tiny_ckpt):
    arch, tensors = load(tiny_ckpt("mixtral"))
    disk = block_tensors(arch, tensors, 1)
    gone = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    with pytest.raises(ValueError, match=r"missing tensors \[.*experts\.2\.w3\.weight"):
        arch.build_block(1, {n: t for n, t in disk.items() if n != gone}, device="cpu", dtype=None)
    with pytest.raises(ValueError, match=r"missing tensors \[.*self_attn\.q_proj\.weight"):
        arch.build_block(1, {n: t for n, t in disk.items() if "q_proj" not in n}, device="cpu", dtype=None)
    extra = {**disk, "model.layers.1.self_attn.extra.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"unexpected tensors \[.*self_attn\.extra\.weight"):
        arch.build_block(1, extra, device="cpu", dtype=None)
    extra = {**disk, "model.layers.1.block_sparse_moe.experts.4.w1.weight": torch.zeros(96, 64)}
    with pytest.raises(ValueError, match=r"unexpected tensors \[.*experts\.4\.w1\.weight"):
        arch.build_block(1, extra, device="cpu", dtype=None)
    with pytest.raises(ValueError, match=r"unexpected tensors \[.*layers\.2\.input_layernorm"):
        arch.build_block(1, {**disk, "model.layers.2.input_layernorm.weight": torch.ones(64)}, device="cpu", dtype=None)
    bad = {**disk, "model.layers.1.block_sparse_moe.gate.weight": torch.zeros(5, 64)}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.block_sparse_moe\.gate\.weight: shape \(5, 64\)"):
        arch.build_block(1, bad, device="cpu", dtype=None)
    bad = {**disk, "model.layers.1.block_sparse_moe.experts.3.w2.weight": torch.zeros(64, 95)}
    with pytest.raises(ValueError, match=r"experts\.3\.w2\.weight: shape \(64, 95\) does not match .* \(64, 96\)"):
        arch.build_block(1, bad, device="cpu", dtype=None)
    bad = {**disk, "model.layers.1.self_attn.o_proj.weight": torch.zeros(64, 32)}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight: shape \(64, 32\)"):
        arch.build_block(1, bad, device="cpu", dtype=None)


def test_non_block_keys_keep_extra_layers_and_buffers(tiny_ckpt):
    arch, tensors = load(tiny_ckpt("deepseek_v3"))
    names = [*tensors, "model.layers.3.eh_proj.weight", "model.rotary_emb.inv_freq"]  # an MTP layer (index 3)
    assert arch.non_block_keys(names) == [
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.layers.3.eh_proj.weight",
        "model.norm.weight",
        "model.rotary_emb.inv_freq",
    ]
    assert all(n.startswith("model.layers.2.") for n in arch.block_keys(2, names))


# ---- linears and units ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch_name", ARCHS)
def test_linears_count_and_shapes(tiny_ckpt, arch_name):
    arch, tensors = load(tiny_ckpt(arch_name))
    cfg = arch.config
    for i in range(arch.num_layers):
        block = arch.build_block(i, block_tensors(arch, tensors, i), device="cpu", dtype=None)
        specs = arch.linears(block, i)
        moe = arch_name in MOE_ARCHS and not (arch_name == "deepseek_v3" and i < cfg.first_k_dense_replace)
        n_mlp = 3 * 4 + _SHARED.get(arch_name, 0) if moe else 3
        assert len(specs) == _ATTN.get(arch_name, 4) + n_mlp
        assert len({s.name for s in specs}) == len(specs)
        for s in specs:
            assert tuple(arch.get_weight(block, s).shape) == (s.d_out, s.d_in), s.name
            b = arch.get_bias(block, s)
            assert (b is not None) == s.bias and (b is None or tuple(b.shape) == (s.d_out,)), s.name
            if s.expert is None:
                assert tuple(tensors[arch.block_prefix(i) + s.name + ".weight"].shape) == (s.d_out, s.d_in)
        by_name = {s.name: s for s in specs}
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if arch_name != "deepseek_v3":
            assert by_name["self_attn.k_proj"] == LinearSpec(
                "self_attn.k_proj",
                "attn_in",
                cfg.num_key_value_heads * hd,
                cfg.hidden_size,
                bias=arch_name in ("qwen2", "qwen2_moe"),
            )
        if moe:
            inter = cfg.intermediate_size if arch_name == "mixtral" else cfg.moe_intermediate_size
            assert by_name["mlp.experts.3.down_proj"] == LinearSpec(
                "mlp.experts.3.down_proj", "expert3_out", cfg.hidden_size, inter, expert=3
            )
            assert by_name["mlp.experts.1.up_proj"].input_id == "expert1_in"


@pytest.mark.parametrize("arch_name", ARCHS)
def test_units_tile_their_members(tiny_ckpt, arch_name):
    arch, tensors = load(tiny_ckpt(arch_name))
    i = arch.num_layers - 1
    block = arch.build_block(i, block_tensors(arch, tensors, i), device="cpu", dtype=None)
    specs = {s.name: s for s in arch.linears(block, i)}
    state = block.state_dict()
    kinds = set()
    for group in arch.units(block, i):
        kinds.add(group.kind)
        for name, axis, width in group.members:
            size = state[name].shape[axis] if group.kind == "expert" else (specs[name].d_out, specs[name].d_in)[axis]
            assert group.count * width == size, (group.kind, name)
    assert ("kv_group" if arch_name != "deepseek_v3" else "head") in kinds
    assert ("expert" in kinds) == (arch_name in MOE_ARCHS)


@pytest.mark.parametrize("arch_name", ARCHS)
def test_get_set_weight(tiny_ckpt, arch_name):
    arch, tensors = load(tiny_ckpt(arch_name))
    i = arch.num_layers - 1
    block = arch.build_block(i, block_tensors(arch, tensors, i), device="cpu", dtype=None)
    before = {n: t.clone() for n, t in block.state_dict().items()}
    specs = arch.linears(block, i)
    for s in specs:  # get -> set is the identity
        arch.set_weight(block, s, arch.get_weight(block, s).clone())
    assert all(torch.equal(before[n], t) for n, t in block.state_dict().items())
    target = next(s for s in specs if s.name.endswith("o_proj"))
    arch.set_weight(block, target, torch.zeros(target.d_out, target.d_in))
    assert block.get_submodule(target.name).weight.abs().sum() == 0
    with pytest.raises(ValueError, match="o_proj"):
        arch.set_weight(block, target, torch.zeros(target.d_out + 1, target.d_in))
    if arch_name not in MOE_ARCHS:
        return
    for part in ("gate_proj", "up_proj", "down_proj"):
        block.load_state_dict(before)
        W_before = {t.name: arch.get_weight(block, t).clone() for t in specs}
        s = next(x for x in specs if x.name == f"mlp.experts.2.{part}")
        arch.set_weight(block, s, torch.full((s.d_out, s.d_in), 7.0))
        for t in specs:
            assert torch.equal(arch.get_weight(block, t), W_before[t.name]) == (t != s), (s.name, t.name)
        assert (arch.get_weight(block, s) == 7.0).all()
        assert torch.equal(block.mlp.gate.weight, before["mlp.gate.weight"])


# ---- input hooks ---------------------------------------------------------------------------------------------------
def capture(arch, block, hidden, ctx) -> dict[str, list[torch.Tensor]]:
    got: dict[str, list[torch.Tensor]] = {}
    with arch.input_hooks(block, lambda input_id, X: got.setdefault(input_id, []).append(X.clone())):
        arch.block_forward(block, hidden, ctx)
    return got


@pytest.mark.parametrize("arch_name", [*DENSE_ARCHS, "deepseek_v3"])
def test_input_hooks_dense_block(tiny_ckpt, arch_name):
    arch, tensors = load(tiny_ckpt(arch_name))
    block = arch.build_block(0, block_tensors(arch, tensors, 0), device="cpu", dtype=None)  # deepseek: dense layer
    hidden = torch.randn(2, 16, arch.config.hidden_size, generator=torch.Generator().manual_seed(1))
    ctx = arch.forward_context(2, 16, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        got = capture(arch, block, hidden, ctx)
        assert no_hooks(block)
        specs = arch.linears(block, 0)
        assert sorted(got) == sorted({s.input_id for s in specs})
        for s in specs:
            assert len(got[s.input_id]) == 1 and got[s.input_id][0].shape == (32, s.d_in), s.name
        torch.testing.assert_close(got["attn_in"][0], block.input_layernorm(hidden).reshape(32, -1), rtol=0, atol=0)
        mask = ctx["attention_masks"][arch.layer_type(0)]
        mid = hidden + block.self_attn(block.input_layernorm(hidden), ctx["position_embeddings"], mask)[0]
        torch.testing.assert_close(got["mlp_in"][0], block.post_attention_layernorm(mid).reshape(32, -1))
        Z = got["mlp_in"][0]
        expected_down = ACT2FN[arch.config.hidden_act](Z @ block.mlp.gate_proj.weight.T) * (
            Z @ block.mlp.up_proj.weight.T
        )
        torch.testing.assert_close(got["mlp_out"][0], expected_down)


@pytest.mark.parametrize("arch_name", MOE_ARCHS)
@pytest.mark.parametrize("shape", [(2, 16), (1, 1)])
def test_input_hooks_moe_block(tiny_ckpt, arch_name, shape):
    arch, tensors = load(tiny_ckpt(arch_name))
    i = arch.num_layers - 1
    block = arch.build_block(i, block_tensors(arch, tensors, i), device="cpu", dtype=None)
    H = arch.config.hidden_size
    hidden = torch.randn(*shape, H, generator=torch.Generator().manual_seed(2))
    ctx = arch.forward_context(*shape, device="cpu", dtype=torch.float32)
    moe_in = []
    handle = block.mlp.register_forward_pre_hook(lambda m, args: moe_in.append(args[0].reshape(-1, H).clone()))
    with torch.no_grad():
        got = capture(arch, block, hidden, ctx)
        handle.remove()
        assert no_hooks(block)
        x = moe_in[0]
        _, _, top_k_index = arch.router(block)(x)  # the stock router's choice
        act = ACT2FN[arch.config.hidden_act]
        hit = sorted(set(top_k_index.flatten().tolist()))
        assert sorted(k for k in got if k.startswith("expert")) == sorted(
            [f"expert{e}_in" for e in hit] + [f"expert{e}_out" for e in hit]
        )
        if shape == (1, 1):
            assert len(hit) == arch.config.num_experts_per_tok < 4  # experts without tokens got no call
        for e in hit:
            rows = (top_k_index == e).any(dim=-1)
            X_e = x[rows]
            (gate,) = [s for s in arch.linears(block, i) if s.name == f"mlp.experts.{e}.gate_proj"]
            up = LinearSpec(f"mlp.experts.{e}.up_proj", f"expert{e}_in", gate.d_out, gate.d_in, expert=e)
            assert len(got[f"expert{e}_in"]) == 1
            torch.testing.assert_close(got[f"expert{e}_in"][0], X_e, rtol=0, atol=0)
            down_in = act(X_e @ arch.get_weight(block, gate).T) * (X_e @ arch.get_weight(block, up).T)
            torch.testing.assert_close(got[f"expert{e}_out"][0], down_in)
        if arch_name in _SHARED:
            torch.testing.assert_close(got["shared_in"][0], x, rtol=0, atol=0)


def test_hooks_removed_when_forward_raises(tiny_ckpt):
    arch, tensors = load(tiny_ckpt("qwen2_moe"))
    block = arch.build_block(1, block_tensors(arch, tensors, 1), device="cpu", dtype=None)
    ctx = arch.forward_context(1, 4, device="cpu", dtype=torch.float32)

    def boom(input_id, X):
        raise RuntimeError(f"stop at {input_id}")

    with pytest.raises(RuntimeError, match="stop at attn_in"), arch.input_hooks(block, boom):
        assert not no_hooks(block)
        arch.block_forward(block, torch.randn(1, 4, 64), ctx)
    assert no_hooks(block)


# ---- helpers and errors --------------------------------------------------------------------------------------------
def test_unsupported_model_type_lists_supported():
    assert set(SUPPORTED_ARCHS) == set(ARCHS)
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'.*llama.*deepseek_v3"):
        adapter_for({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        adapter_for(AutoConfig.for_model("gpt2"))


def test_adapter_from_config_json_dict(tiny_ckpt):
    path = tiny_ckpt("qwen3")
    arch = adapter_for(json.loads((path / "config.json").read_text()))
    assert arch.model_type == "qwen3" and arch.num_layers == 3 and arch.config.head_dim == 16
    assert arch.block_prefix(2) == "model.layers.2." and arch.lm_head_key == "lm_head.weight"


def test_embed_is_a_plain_lookup():
    W = torch.randn(10, 4)
    ids = torch.tensor([[3, 0, 9]])
    assert torch.equal(embed(ids, W), W[ids])
    assert torch.equal(F.embedding(ids, W), embed(ids, W))
