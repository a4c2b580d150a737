"""FP8 source checkpoints (issue 15 item 4): block-scaled e4m3 weights with `weight_scale_inv`, dequantized as they
are read, pruned, written as bfloat16 (or the recipe's float32 / float16) without `quantization_config`.

`fp8_checkpoint` turns a tiny float checkpoint into one laid out as DeepSeek-V3 / Qwen3-FP8 are (every matrix weight
of the blocks FP8 with its scales; embeddings, norms, lm_head and routers left as they are), optionally with a
multi-token-prediction layer after the last block. Block sizes [16, 16] on the tiny models leave partial blocks
(MLA's 24-wide latents), [8, 32] non-square ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from engine.config import config_from_dict
from engine.fp8 import (
    DequantizingReader,
    dequantize,
    fp8_format,
    fp8_pairs,
    output_dtype,
    quantize,
    scale_name,
    source_reader,
)
from engine.model_check import check_model, open_checked
from engine.pipeline import run
from engine.runtime import checkpoint_dtype
from sharding.errors import CheckpointError
from sharding.reader import CheckpointReader
from tests.tiny_models import recipe

FP8 = torch.float8_e4m3fn
INDEX = "model.safetensors.index.json"


# --------------------------------------------------------------------------------------------- building FP8 inputs


def _fp8_target(name: str, t: torch.Tensor) -> bool:
    """What the FP8 releases quantize: the matrix weights inside the layers, except routers and norms."""
    return (
        name.startswith("model.layers.")
        and name.endswith(".weight")
        and t.dim() == 2
        and not name.endswith("mlp.gate.weight")
        and "norm" not in name
        and not name.endswith(("embed_tokens.weight", "shared_head.head.weight"))
    )


def _mtp_layer(tensors: dict[str, torch.Tensor], config: dict, seed: int = 7) -> dict[str, torch.Tensor]:
    """DeepSeek-V3's multi-token-prediction layer `model.layers.{n}.*` as its checkpoints store it: a copy of the last
    decoder layer plus `enorm`, `hnorm`, `eh_proj [H, 2H]`, `embed_tokens`, `shared_head.norm` and `.head`."""
    n, H, V = config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    last = f"model.layers.{n - 1}."
    out = {f"model.layers.{n}." + k[len(last) :]: v.clone() for k, v in tensors.items() if k.startswith(last)}
    p = f"model.layers.{n}."
    out.update(
        {
            p + "enorm.weight": torch.ones(H),
            p + "hnorm.weight": torch.ones(H),
            p + "eh_proj.weight": torch.randn(H, 2 * H, generator=g) / (2 * H) ** 0.5,
            p + "embed_tokens.weight": torch.randn(V, H, generator=g),
            p + "shared_head.norm.weight": torch.ones(H),
            p + "shared_head.head.weight": torch.randn(V, H, generator=g) / H**0.5,
        }
    )
    return out


def fp8_checkpoint(src: Path, dst: Path, block: list[int] | None = (16, 16), mtp: bool = False) -> Path:
    """A copy of the float checkpoint `src` as a fine-grained FP8 one (module docstring): FP8 weights and float32
    `weight_scale_inv` in the same shards, the index and config.json (`quantization_config`) updated. With `mtp`, a
    multi-token-prediction layer is added (its own shard, `num_nextn_predict_layers: 1`)."""
    shutil.copytree(src, dst)
    index = json.loads((dst / INDEX).read_text())
    config = json.loads((dst / "config.json").read_text())
    weight_map = index["weight_map"]
    blk = None if block is None else tuple(block)
    shards = sorted(set(weight_map.values()))
    every = {}
    for shard in shards:
        every.update(load_file(dst / shard))
    if mtp:
        extra = _mtp_layer(every, config)
        shards.append("model-mtp.safetensors")
        weight_map.update({k: "model-mtp.safetensors" for k in extra})
        every.update(extra)
        config["num_nextn_predict_layers"] = 1
    for shard in shards:
        tensors = {k: every[k] for k, f in weight_map.items() if f == shard}
        for name in list(tensors):
            if _fp8_target(name, tensors[name]):
                tensors[name], tensors[scale_name(name)] = quantize(tensors[name], blk)
                weight_map[scale_name(name)] = shard
        save_file(tensors, dst / shard, metadata={"format": "pt"})
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        **({"weight_block_size": list(block)} if block is not None else {}),
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    (dst / INDEX).write_text(json.dumps(index, indent=2))
    return dst


def reference_dequantized(path: Path, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Every tensor of an FP8 checkpoint as the output must hold it: FP8 weights dequantized by the float32 loop
    reference, cast to `dtype`; scales dropped; everything else as stored."""
    reader = CheckpointReader(path)
    block = (reader.config["quantization_config"] or {}).get("weight_block_size")
    out = {}
    for name in reader.names():
        if name.endswith("_scale_inv"):
            continue
        t = reader.read([name])[name]
        if t.dtype == FP8:
            t = loop_reference(t, reader.read([scale_name(name)])[scale_name(name)], block).to(dtype)
        out[name] = t
    return out


def loop_reference(W_q: torch.Tensor, S: torch.Tensor, block) -> torch.Tensor:
    """Block by block: ``W[r0:r1, c0:c1] = float32(W_q[r0:r1, c0:c1]) * S[i, j]`` (float32 products)."""
    W = W_q.to(torch.float32)
    if block is None:
        return W * S.reshape(()).float()
    out = torch.empty_like(W)
    b0, b1 = block
    for i in range(S.shape[-2]):
        for j in range(S.shape[-1]):
            r, c = slice(i * b0, (i + 1) * b0), slice(j * b1, (j + 1) * b1)
            out[..., r, c] = W[..., r, c] * S[..., i, j, None, None].float()
    return out


# --------------------------------------------------------------------------------------------- the math


def test_worked_example_of_the_docstring():
    W_q = torch.tensor([[1, 2, 4], [1, 1, 1], [2, 2, 2.0]]).to(FP8)
    S = torch.tensor([[0.5, 2], [3, 1]])
    want = torch.tensor([[0.5, 1, 8], [0.5, 0.5, 2], [6, 6, 2.0]])
    assert torch.equal(dequantize(W_q, S, (2, 2), torch.float32), want)


@pytest.mark.parametrize(
    ("shape", "block"),
    [((64, 96), (16, 16)), ((24, 64), (16, 16)), ((40, 27), (16, 8)), ((3, 40, 27), (8, 32)), ((7, 5), (128, 128))],
)
def test_dequantize_exact_against_float32_and_float64_references(shape, block):
    """Bit-exact against the block loop (float32) and against the exact float64 product rounded to float32 (an FP8
    value has 4 significant bits and a float32 scale 24, so the float64 product is exact); partial blocks, leading
    expert dimensions, non-square blocks and a block larger than the matrix included. bfloat16 is that cast."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(shape, generator=g) * 3
    W_q, S = quantize(W, block)
    S = S * torch.exp(torch.randn(S.shape, generator=g))  # arbitrary float32 scales, not only amax / 448
    got = dequantize(W_q, S, block, torch.float32)
    assert torch.equal(got, loop_reference(W_q, S, block))
    exact = (
        W_q.to(torch.float64)
        * S.double().repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)[..., : shape[-2], : shape[-1]]
    )
    assert torch.equal(got, exact.to(torch.float32))
    assert torch.equal(dequantize(W_q, S, block, torch.bfloat16), got.to(torch.bfloat16))
    # quantize is the inverse up to FP8 rounding (3 mantissa bits: relative error <= 2^-4 of the block's max)
    err = (dequantize(*quantize(W, block), block, torch.float32) - W).abs().max()
    assert err <= W.abs().max() / 16


def test_per_tensor_scale():
    W_q, S = quantize(torch.randn(9, 5), None)
    assert S.shape == ()
    assert torch.equal(dequantize(W_q, S, None, torch.float32), W_q.float() * S)
    assert torch.equal(dequantize(W_q, S.reshape(1), None, torch.float32), W_q.float() * S)


def test_output_dtype_rule():
    assert output_dtype("auto") == torch.bfloat16 and output_dtype("bfloat16") == torch.bfloat16
    assert output_dtype("float32") == torch.float32 and output_dtype("float16") == torch.float16


# --------------------------------------------------------------------------------------------- checks (headers only)

QC = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16]}
W8, S8 = "model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight_scale_inv"


def _pairs_fail(config, shapes, dtypes, match):
    with pytest.raises(CheckpointError) as info:
        fp8_pairs(config, shapes, dtypes, "/m")
    msg = str(info.value)
    assert "\n" not in msg and match in msg, msg
    return msg


def test_fp8_pairs_and_their_refusals():
    shapes, dtypes = {W8: (64, 40), S8: (4, 3)}, {W8: "F8_E4M3", S8: "F32"}
    assert fp8_pairs({"quantization_config": QC}, shapes, dtypes) == {W8: S8}
    assert fp8_pairs({}, {"a.weight": (2, 2)}, {"a.weight": "BF16"}) == {}
    assert fp8_pairs({"quantization_config": {"quant_method": "gptq"}}, {"a": (2,)}, {"a": "F32"}) == {}  # not ours
    msg = _pairs_fail({}, shapes, dtypes, "has no quantization_config")
    assert f"tensor {W8!r}" in msg and "F8_E4M3" in msg
    _pairs_fail({"quantization_config": QC}, {W8: (64, 40)}, {W8: "F8_E4M3"}, f"without its scale tensor {S8!r}")
    msg = _pairs_fail({"quantization_config": QC}, {**shapes, S8: (4, 2)}, dtypes, "needs scales [4, 3]")
    assert f"tensor {S8!r}: shape [4, 2]" in msg
    _pairs_fail({"quantization_config": QC}, shapes, {**dtypes, S8: "I32"}, "must be F32, BF16 or F16")
    _pairs_fail({"quantization_config": QC}, shapes, {**dtypes, W8: "BF16"}, f"whose weight {W8!r} is BF16, not FP8")
    _pairs_fail({"quantization_config": QC}, {S8: (4, 3)}, {S8: "F32"}, "is missing, not FP8")
    bias = "model.layers.0.mlp.down_proj.bias"
    _pairs_fail({"quantization_config": QC}, {bias: (64,)}, {bias: "F8_E4M3"}, "only matrix weights")
    for qc, match in [
        ({**QC, "quant_method": "fbgemm_fp8"}, "quant_method = 'fbgemm_fp8'"),
        ({**QC, "activation_scheme": "static"}, "activation_scheme = 'static'"),
        ({**QC, "weight_block_size": [128]}, "weight_block_size = [128]"),
        ({**QC, "weight_block_size": [0, 128]}, "weight_block_size = [0, 128]"),
        ("fp8", "quantization_config must be an object"),
    ]:
        assert "config.json" in _pairs_fail({"quantization_config": qc}, shapes, dtypes, match)
    assert fp8_format({"quantization_config": {**QC, "weight_block_size": None}}).block is None


def test_model_check_accepts_fp8_with_scales_and_refuses_the_rest(tiny_ckpt, tmp_path):
    src = fp8_checkpoint(tiny_ckpt("llama"), tmp_path / "fp8")
    reader = open_checked(src)  # what run, plan and submit call
    assert reader.bytes_read == 0
    infos = {n: reader.info(n) for n in reader.names()}
    shapes, dtypes = {n: i.shape for n, i in infos.items()}, {n: i.dtype for n, i in infos.items()}
    no_scale = {n: d for n, d in dtypes.items() if n != S8}
    with pytest.raises(CheckpointError, match="without its scale tensor"):
        check_model(reader.config, shapes, no_scale)
    check_model(reader.config, shapes, no_scale, require_float=False)  # inspect, eval
    with pytest.raises(CheckpointError, match="integer weights are not supported"):
        check_model(reader.config, shapes, {**dtypes, "model.norm.weight": "I8"})


# --------------------------------------------------------------------------------------------- the reader


def test_dequantizing_reader(tiny_ckpt, tmp_path):
    src = fp8_checkpoint(tiny_ckpt("llama"), tmp_path / "fp8", block=[16, 32])
    raw = CheckpointReader(src)
    reader = source_reader(raw, "auto")
    assert isinstance(reader, DequantizingReader)
    assert type(source_reader(CheckpointReader(tiny_ckpt("llama")))) is CheckpointReader  # float: itself
    scales = [n for n in raw.names() if n.endswith("_scale_inv")]
    assert (
        scales and not any(n.endswith("_scale_inv") for n in reader.names()) and len(reader) == len(raw) - len(scales)
    )
    assert "quantization_config" not in reader.config and "quantization_config" in raw.config
    assert reader.torch_dtype(W8) == torch.bfloat16 and reader.info(W8).nbytes == 2 * raw.info(W8).numel
    assert reader.torch_dtype("model.norm.weight") == torch.float32 and S8 not in reader and W8 in reader
    with pytest.raises(KeyError, match="is a scale"):
        reader.read([S8])
    ref = reference_dequantized(src)
    got = reader.read_prefix("model.layers.0.")
    assert set(got) == {n for n in ref if n.startswith("model.layers.0.")}
    assert all(torch.equal(got[n], ref[n]) for n in got)
    f32 = reader.read([W8, "model.norm.weight"], dtype=torch.float32)
    assert torch.equal(f32[W8], loop_reference(raw.read([W8])[W8], raw.read([S8])[S8], (16, 32)))
    assert f32["model.norm.weight"].dtype == torch.float32
    assert reader.fingerprint() == raw.fingerprint() and reader.model_dir == raw.model_dir
    assert checkpoint_dtype(reader) == torch.bfloat16  # runtime.dtype auto on CUDA: never an FP8 compute dtype


# --------------------------------------------------------------------------------------------- end to end


def _out_tensors(path: Path) -> dict[str, torch.Tensor]:
    r = CheckpointReader(path)
    return r.read(r.names())


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_zero_percent_equals_the_exact_dequantization_and_loads_stock(arch, tiny_ckpt, calib_file, tmp_path):
    """Magnitude 0%: the output holds the float32-reference dequantization in bfloat16 (the other tensors as
    stored), no scales, no quantization_config; stock transformers loads it and computes what it holds."""
    src = fp8_checkpoint(tiny_ckpt(arch), tmp_path / "fp8")
    rec = recipe(src, tmp_path / "out", calib_file, [{"method": "magnitude", "sparsity": 0.0}])
    rec["runtime"]["dtype"] = "auto"  # CPU: float32 compute, bfloat16 output
    run(config_from_dict(rec))
    got, ref = _out_tensors(tmp_path / "out"), reference_dequantized(src)
    assert set(got) == set(ref)
    assert all(torch.equal(got[n], ref[n]) for n in ref), [n for n in ref if not torch.equal(got[n], ref[n])]
    assert got[W8].dtype == torch.bfloat16
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert torch.equal(model.state_dict()[W8], ref[W8].float())


def test_sparsegpt_with_float32_recipe_writes_float32(tiny_ckpt, calib_file, tmp_path):
    """A recipe naming float32 computes and writes the dequantized weights in float32 (at sparsity 0 exactly the
    float32 dequantization); SparseGPT 50% then prunes them."""
    src = fp8_checkpoint(tiny_ckpt("llama"), tmp_path / "fp8", block=[8, 32])
    run(config_from_dict(recipe(src, tmp_path / "o0", calib_file, [{"method": "sparsegpt", "sparsity": 0.0}])))
    got, ref = _out_tensors(tmp_path / "o0"), reference_dequantized(src, torch.float32)
    assert all(torch.equal(got[n], ref[n]) for n in ref)
    rep = run(config_from_dict(recipe(src, tmp_path / "o50", calib_file, [{"method": "sparsegpt", "sparsity": 0.5}])))
    W = _out_tensors(tmp_path / "o50")[W8]
    assert W.dtype == torch.float32 and abs(float((W == 0).float().mean()) - 0.5) < 0.01
    assert abs(rep["pruned_linear_sparsity"] - 0.5) < 0.01


def test_stock_transformers_dequantizes_the_same(tiny_ckpt, calib_file, tmp_path):
    """transformers' own FP8 loader (on a CPU it dequantizes to the model's dtype) gives the bfloat16 weights our
    0% output holds, bit for bit (block [8, 8]: transformers needs dimensions that are multiples of the block)."""
    src = fp8_checkpoint(tiny_ckpt("llama"), tmp_path / "fp8", block=[8, 8])
    rec = recipe(src, tmp_path / "out", calib_file, [{"method": "magnitude", "sparsity": 0.0}])
    rec["runtime"]["dtype"] = "bfloat16"
    run(config_from_dict(rec))
    theirs = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).state_dict()
    ours = _out_tensors(tmp_path / "out")
    fp8 = [n for n in CheckpointReader(src).names() if n.endswith("_scale_inv")]
    assert fp8 and all(torch.equal(theirs[n[: -len("_scale_inv")]], ours[n[: -len("_scale_inv")]]) for n in fp8)
    assert all(torch.equal(theirs[n], ours[n].to(torch.bfloat16)) for n in ours)  # the float32 tensors, rounded
