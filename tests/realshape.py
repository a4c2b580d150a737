"""Header-only checkpoints of real large models: the published `config.json`, tensor names, dtypes and shapes,
sharded as the published safetensors checkpoints are, with a SPARSE data region (no tensor byte is written).

Each shard is a valid safetensors file: `[u64 N][N bytes of JSON header, space-padded to a multiple of 8][data]`
where the data section is made by `truncate` to its full length (a hole: reads give zeros, no disk is used), so
`sharding.CheckpointReader` validates every header, byte range and file size, and `blockprune plan` reads every
header, without a real model on disk. Real disk per model = its headers, index and config (a few kB for the dense
models; the MoE models' headers themselves are MBs: DeepSeek-V3 has 91,991 tensors).

    from tests.realshape import REALSHAPE_MODELS, build_realshape, realshape_params
    path = build_realshape("DeepSeek-V3", tmp_path / "dsv3")      # config.json, index, 163 sparse shards

Sources (config.json as published on the Hugging Face Hub, copied into tests/realshape_configs/<name>.json):
- Llama-3.1-70B:  https://huggingface.co/meta-llama/Llama-3.1-70B/blob/main/config.json (30 shards)
- Llama-3.1-405B: https://huggingface.co/meta-llama/Llama-3.1-405B/blob/main/config.json (191 shards; 8 KV heads)
- Mixtral-8x22B-v0.1: https://huggingface.co/mistralai/Mixtral-8x22B-v0.1/blob/main/config.json (59 shards)
- Qwen3-235B-A22B: https://huggingface.co/Qwen/Qwen3-235B-A22B/blob/main/config.json (118 shards)
- Qwen3-Coder-480B-A35B-Instruct: https://huggingface.co/Qwen/Qwen3-Coder-480B-A35B-Instruct/blob/main/config.json
  (241 shards)
- DeepSeek-V3: https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json (163 shards named
  `model-0000k-of-000163.safetensors`) and its README_WEIGHTS.md (the MTP layer `model.layers.61.*`: `embed_tokens`,
  `enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, `shared_head.head`, plus a full MoE block). Dtypes and shapes as
  the checkpoint's headers list them (e.g. the `model-inspect` README, simpx/model-inspect, which prints every
  header of deepseek-ai/DeepSeek-V3: 91,991 tensors, 688,574,839,360 bytes): every Linear of a block in F8_E4M3
  with an F32 `weight_scale_inv` of shape [ceil(out/128), ceil(in/128)] (`quantization_config.weight_block_size`),
  the router `mlp.gate.weight` in BF16 and `mlp.gate.e_score_correction_bias` in F32, norms, embeddings, heads and
  the MTP `eh_proj` in BF16.
Tensor names follow transformers' own modeling code (models/{llama,mixtral,qwen3_moe,deepseek_v3}) with experts per
expert as the Hub checkpoints store them (Mixtral `block_sparse_moe.experts.K.w1|w2|w3`, Qwen3-MoE and DeepSeek
`mlp.experts.K.gate_proj|up_proj|down_proj`).
"""

from __future__ import annotations

import json
import math
import struct
from functools import cache
from pathlib import Path
from typing import NamedTuple

CONFIG_DIR = Path(__file__).parent / "realshape_configs"

# name -> (published shard count, shard file name pattern). The patterns are the published ones (DeepSeek-V3 writes
# its total with 6 digits).
_SHARDS: dict[str, tuple[int, str]] = {
    "Llama-3.1-70B": (30, "model-{i:05d}-of-{n:05d}.safetensors"),
    "Llama-3.1-405B": (191, "model-{i:05d}-of-{n:05d}.safetensors"),
    "Mixtral-8x22B-v0.1": (59, "model-{i:05d}-of-{n:05d}.safetensors"),
    "Qwen3-235B-A22B": (118, "model-{i:05d}-of-{n:05d}.safetensors"),
    "Qwen3-Coder-480B-A35B-Instruct": (241, "model-{i:05d}-of-{n:05d}.safetensors"),
    "DeepSeek-V3": (163, "model-{i:05d}-of-{n:06d}.safetensors"),
}
REALSHAPE_MODELS: tuple[str, ...] = tuple(_SHARDS)

# Published parameter counts (model cards / papers), main model only: Llama 3.1 paper and model card (70.6B, 405.9B
# as the Hub's safetensors count rounds them), Mixtral-8x22B (140.6B; Mistral announces "141B"), Qwen3 technical
# report / model cards (235B total, 480B total), DeepSeek-V3 README_WEIGHTS.md: 671B main model and the MTP module
# (README: "14B" in its total of 685B; "11.5B unique parameters excluding the shared 0.9B embedding and 0.9B head").
PUBLISHED_PARAMS: dict[str, float] = {
    "Llama-3.1-70B": 70.6e9,
    "Llama-3.1-405B": 405.9e9,
    "Mixtral-8x22B-v0.1": 140.6e9,
    "Qwen3-235B-A22B": 235.1e9,
    "Qwen3-Coder-480B-A35B-Instruct": 480.2e9,
    "DeepSeek-V3": 671e9,
}
# The MTP module's published "14B" is rounded: counted from the shapes it is 13.46B (a MoE block 11.51B, eh_proj 0.10B,
# its own embedding and head 0.93B each; README_WEIGHTS.md's parts, 11.5B + 0.9B + 0.9B, give 13.3B). The tests check
# the main model and the total (685B) to 1%; the MTP module alone is 3.8% under the rounded 14B.
PUBLISHED_MTP_PARAMS: dict[str, float] = {"DeepSeek-V3": 14e9}  # README_WEIGHTS.md / model card (685B = 671B + 14B)
PUBLISHED_TOTAL_PARAMS: dict[str, float] = {"DeepSeek-V3": 685e9}  # the Hub's model card: "685B params"

ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1}
SCALE_SUFFIX = "weight_scale_inv"


class Tensor(NamedTuple):
    """One tensor of a checkpoint: name, safetensors dtype code, shape, byte size."""

    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]
    nbytes: int


def _tensor(name: str, dtype: str, shape: tuple[int, ...]) -> Tensor:
    return Tensor(name, dtype, shape, math.prod(shape) * ITEMSIZE[dtype])


def load_config(name: str, *, dequantized: bool = False) -> dict:
    """The published config.json of `name` (a dict). `dequantized`: without `quantization_config`, as DeepSeek's
    own `inference/fp8_cast_bf16.py` conversion leaves it (every weight in the model's dtype, no scales)."""
    if name not in _SHARDS:
        raise KeyError(f"unknown real-shape model {name!r}; known: {', '.join(REALSHAPE_MODELS)}")
    config = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    if dequantized:
        config.pop("quantization_config", None)
    return config


# ---------------------------------------------------------------------------------------------- tensors per model


def _linear(name: str, out: int, inp: int, fp8_block: tuple[int, int] | None, dtype: str) -> list[Tensor]:
    """One Linear weight `[out, in]`; FP8 (block-quantized) adds its F32 `weight_scale_inv` of one scale per block."""
    if fp8_block is None:
        return [_tensor(f"{name}.weight", dtype, (out, inp))]
    bo, bi = fp8_block
    return [
        _tensor(f"{name}.weight", "F8_E4M3", (out, inp)),
        _tensor(f"{name}.{SCALE_SUFFIX}", "F32", (-(-out // bo), -(-inp // bi))),
    ]


def _norm(name: str, width: int, dtype: str) -> Tensor:
    return _tensor(f"{name}.weight", dtype, (width,))


def _gqa_attention(p: str, c: dict, dt: str, qk_norm: bool = False) -> list[Tensor]:
    h, nh = c["hidden_size"], c["num_attention_heads"]
    hd = c.get("head_dim") or h // nh
    kv = c.get("num_key_value_heads") or nh
    out = []
    for proj, o, i in (("q_proj", nh * hd, h), ("k_proj", kv * hd, h), ("v_proj", kv * hd, h), ("o_proj", h, nh * hd)):
        out += _linear(f"{p}self_attn.{proj}", o, i, None, dt)
    if qk_norm:  # Qwen3: RMSNorm over each head's dimensions of q and k
        out += [_norm(f"{p}self_attn.q_norm", hd, dt), _norm(f"{p}self_attn.k_norm", hd, dt)]
    return out


def _mla_attention(p: str, c: dict, dt: str, fp8: tuple[int, int] | None) -> list[Tensor]:
    """DeepSeek-V3 multi-head latent attention (transformers' DeepseekV3Attention names)."""
    h, nh = c["hidden_size"], c["num_attention_heads"]
    qk_head = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    out = []
    if c.get("q_lora_rank"):
        out += _linear(f"{p}self_attn.q_a_proj", c["q_lora_rank"], h, fp8, dt)
        out += [_norm(f"{p}self_attn.q_a_layernorm", c["q_lora_rank"], dt)]
        out += _linear(f"{p}self_attn.q_b_proj", nh * qk_head, c["q_lora_rank"], fp8, dt)
    else:
        out += _linear(f"{p}self_attn.q_proj", nh * qk_head, h, fp8, dt)
    out += _linear(f"{p}self_attn.kv_a_proj_with_mqa", c["kv_lora_rank"] + c["qk_rope_head_dim"], h, fp8, dt)
    out += [_norm(f"{p}self_attn.kv_a_layernorm", c["kv_lora_rank"], dt)]
    kv_b_out = nh * (c["qk_nope_head_dim"] + c["v_head_dim"])
    out += _linear(f"{p}self_attn.kv_b_proj", kv_b_out, c["kv_lora_rank"], fp8, dt)
    out += _linear(f"{p}self_attn.o_proj", h, nh * c["v_head_dim"], fp8, dt)
    return out


def _swiglu(p: str, h: int, inter: int, dt: str, fp8: tuple[int, int] | None = None) -> list[Tensor]:
    out = []
    for proj, o, i in (("gate_proj", inter, h), ("up_proj", inter, h), ("down_proj", h, inter)):
        out += _linear(f"{p}{proj}", o, i, fp8, dt)
    return out


def _block_norms(p: str, h: int, dt: str) -> list[Tensor]:
    return [_norm(f"{p}input_layernorm", h, dt), _norm(f"{p}post_attention_layernorm", h, dt)]


def _llama_block(p: str, c: dict, dt: str) -> list[Tensor]:
    return (
        _block_norms(p, c["hidden_size"], dt)
        + _gqa_attention(p, c, dt)
        + _swiglu(f"{p}mlp.", c["hidden_size"], c["intermediate_size"], dt)
    )


def _mixtral_block(p: str, c: dict, dt: str) -> list[Tensor]:
    h, inter, e = c["hidden_size"], c["intermediate_size"], c["num_local_experts"]
    out = _block_norms(p, h, dt) + _gqa_attention(p, c, dt)
    out += _linear(f"{p}block_sparse_moe.gate", e, h, None, dt)
    for k in range(e):
        q = f"{p}block_sparse_moe.experts.{k}."
        out += _linear(f"{q}w1", inter, h, None, dt) + _linear(f"{q}w2", h, inter, None, dt)
        out += _linear(f"{q}w3", inter, h, None, dt)
    return out


def _qwen3_moe_block(i: int, p: str, c: dict, dt: str) -> list[Tensor]:
    h = c["hidden_size"]
    out = _block_norms(p, h, dt) + _gqa_attention(p, c, dt, qk_norm=True)
    sparse = i not in c.get("mlp_only_layers", []) and c["num_experts"] > 0 and (i + 1) % c["decoder_sparse_step"] == 0
    if not sparse:
        return out + _swiglu(f"{p}mlp.", h, c["intermediate_size"], dt)
    out += _linear(f"{p}mlp.gate", c["num_experts"], h, None, dt)
    for k in range(c["num_experts"]):
        out += _swiglu(f"{p}mlp.experts.{k}.", h, c["moe_intermediate_size"], dt)
    return out


def _deepseek_block(i: int, p: str, c: dict, dt: str, fp8: tuple[int, int] | None) -> list[Tensor]:
    h = c["hidden_size"]
    out = _block_norms(p, h, dt) + _mla_attention(p, c, dt, fp8)
    if i < c["first_k_dense_replace"] or i % c.get("moe_layer_freq", 1):
        return out + _swiglu(f"{p}mlp.", h, c["intermediate_size"], dt, fp8)
    e, inter = c["n_routed_experts"], c["moe_intermediate_size"]
    out += [_tensor(f"{p}mlp.gate.weight", dt, (e, h)), _tensor(f"{p}mlp.gate.e_score_correction_bias", "F32", (e,))]
    for k in range(e):
        out += _swiglu(f"{p}mlp.experts.{k}.", h, inter, dt, fp8)
    out += _swiglu(f"{p}mlp.shared_experts.", h, inter * c["n_shared_experts"], dt, fp8)
    return out


def _deepseek_mtp(i: int, c: dict, dt: str, fp8: tuple[int, int] | None) -> list[Tensor]:
    """Multi-token-prediction layer `model.layers.{i}.*` (i >= num_hidden_layers): a full MoE block plus its own
    embedding, the two input norms, the 2H -> H projection and the shared head (README_WEIGHTS.md)."""
    p, h, v = f"model.layers.{i}.", c["hidden_size"], c["vocab_size"]
    out = _deepseek_block(i, p, c, dt, fp8)
    out += [
        _tensor(f"{p}embed_tokens.weight", dt, (v, h)),
        _norm(f"{p}enorm", h, dt),
        _norm(f"{p}hnorm", h, dt),
        _tensor(f"{p}eh_proj.weight", dt, (h, 2 * h)),
        _norm(f"{p}shared_head.norm", h, dt),
        _tensor(f"{p}shared_head.head.weight", dt, (v, h)),
    ]
    return out


def _dtype_code(c: dict) -> str:
    return {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[c.get("torch_dtype") or c.get("dtype")]


def _fp8_block(c: dict) -> tuple[int, int] | None:
    q = c.get("quantization_config")
    if not q:
        return None
    if q.get("quant_method") != "fp8" or q.get("fmt") != "e4m3":
        raise ValueError(f"unsupported quantization_config {q}")
    return tuple(q["weight_block_size"])


@cache
def realshape_tensors(name: str, *, dequantized: bool = False) -> tuple[Tensor, ...]:
    """Every tensor of the published checkpoint of `name`, in checkpoint order (embedding, blocks, extra layers,
    final norm, head). `dequantized`: FP8 weights in the model's dtype and no `weight_scale_inv` (`load_config`)."""
    c = load_config(name, dequantized=dequantized)
    dt, mt = _dtype_code(c), c["model_type"]
    h, v, n = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    out = [_tensor("model.embed_tokens.weight", dt, (v, h))]
    for i in range(n):
        p = f"model.layers.{i}."
        if mt == "llama":
            out += _llama_block(p, c, dt)
        elif mt == "mixtral":
            out += _mixtral_block(p, c, dt)
        elif mt == "qwen3_moe":
            out += _qwen3_moe_block(i, p, c, dt)
        elif mt == "deepseek_v3":
            out += _deepseek_block(i, p, c, dt, _fp8_block(c))
        else:
            raise ValueError(f"no tensor layout for model_type {mt!r}")
    if mt == "deepseek_v3":
        for i in range(n, n + c.get("num_nextn_predict_layers", 0)):
            out += _deepseek_mtp(i, c, dt, _fp8_block(c))
    out.append(_norm("model.norm", h, dt))
    if not c.get("tie_word_embeddings", False):
        out.append(_tensor("lm_head.weight", dt, (v, h)))
    return tuple(out)


def _is_mtp(t: Tensor, num_layers: int) -> bool:
    parts = t.name.split(".")
    return parts[:2] == ["model", "layers"] and int(parts[2]) >= num_layers


def realshape_params(name: str, *, mtp: bool = False) -> int:
    """Parameters of `name` computed from the tensor shapes: every tensor except the FP8 block scales
    (`weight_scale_inv`). `mtp=False`: the main model (blocks < num_hidden_layers); `mtp=True`: only the
    multi-token-prediction layers (0 for models without one)."""
    n = load_config(name)["num_hidden_layers"]
    return sum(
        math.prod(t.shape)
        for t in realshape_tensors(name)
        if not t.name.endswith(SCALE_SUFFIX) and _is_mtp(t, n) == mtp
    )


# ---------------------------------------------------------------------------------------------- writing


def _shard_assignment(tensors: tuple[Tensor, ...], num_shards: int) -> list[int]:
    """Shard index per tensor: contiguous runs of about total/num_shards bytes each, in checkpoint order."""
    total = sum(t.nbytes for t in tensors)
    out, pos = [], 0
    for t in tensors:
        out.append(min(num_shards - 1, pos * num_shards // total))
        pos += t.nbytes
    return out


def _write_sparse_shard(path: Path, tensors: list[Tensor]) -> int:
    """A safetensors file with the real header and a sparse (never written) data section; returns its size.

    Data order as the safetensors library writes it: by dtype size, largest first, then by name (keeps every
    tensor aligned to its itemsize)."""
    ordered = sorted(tensors, key=lambda t: (-ITEMSIZE[t.dtype], t.name))
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for t in ordered:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the safetensors library pads the header to 8 bytes with spaces
    size = 8 + len(raw) + pos
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(size)  # the data section is a hole: no block is allocated, reads give zeros
    return size


def build_realshape(name: str, path: str | Path, *, dequantized: bool = False) -> Path:
    """Write the header-only checkpoint of `name` into directory `path` (created; existing files of the same name
    are replaced): `config.json` as published, `model.safetensors.index.json` (`metadata.total_size`, `weight_map`)
    and its shards with sparse data sections. Returns `path`. No tokenizer (plan needs none).

    `dequantized` (matters for DeepSeek-V3 only): the checkpoint as DeepSeek's `fp8_cast_bf16.py` converts it,
    every weight BF16 without `weight_scale_inv` and the config without `quantization_config`."""
    config = load_config(name, dequantized=dequantized)  # KeyError for an unknown name
    num_shards, pattern = _SHARDS[name]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = realshape_tensors(name, dequantized=dequantized)
    shard_of = _shard_assignment(tensors, num_shards)
    files = [pattern.format(i=k + 1, n=num_shards) for k in range(num_shards)]
    groups: list[list[Tensor]] = [[] for _ in range(num_shards)]
    for t, k in zip(tensors, shard_of):
        groups[k].append(t)
    for file, group in zip(files, groups):
        _write_sparse_shard(path / file, group)
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors)},
        "weight_map": {t.name: files[k] for t, k in zip(tensors, shard_of)},
    }
    # one line (the published indexes are indented; the same JSON, and the C encoder is 10x faster)
    (path / "model.safetensors.index.json").write_text(json.dumps(index) + "\n")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def disk_usage(path: str | Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of the files in directory `path` (allocated: `st_blocks * 512`)."""
    apparent = allocated = 0
    for f in Path(path).iterdir():
        st = f.stat()
        apparent += st.st_size
        allocated += st.st_blocks * 512
    return apparent, allocated
