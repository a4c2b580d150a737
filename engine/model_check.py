"""Checks of an input checkpoint's config against its tensors, from the headers only (no weight is read).

Why: a config that lies about the tensors makes a run fail late or, worse, succeed wrongly. A missing
`num_hidden_layers` used to default to 32 and fail after two blocks were written; a `num_hidden_layers` smaller than
the blocks on disk copied the extra block unpruned while the report claimed the target; a `vocab_size` that
disagrees with the embedding gave an output stock transformers cannot load; a string `hidden_size` or FP8 weights
gave a traceback. Each is one line here, naming the key or tensor, before anything is read or written.

Not here: NaN/Inf in the weights (that needs the data; the block loop checks what it reads).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.fp8 import fp8_pairs
from sharding.errors import CheckpointError
from sharding.reader import CONFIG_NAME, PICKLE_SUFFIXES, CheckpointReader

# config.json fields every supported architecture needs, each a positive integer
REQUIRED_INTS: tuple[str, ...] = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
)
OPTIONAL_INTS: tuple[str, ...] = ("num_key_value_heads", "head_dim")
MTP_LAYERS = "num_nextn_predict_layers"  # DeepSeek-V3: multi-token-prediction blocks after the last block (>= 0)
FLOAT_DTYPES: frozenset[str] = frozenset({"F64", "F32", "F16", "BF16"})  # safetensors codes blockprune prunes
EMBED_KEY = "model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"
NORM_KEY = "model.norm.weight"
_BLOCK_RE = re.compile(r"^model\.layers\.(\d+)\.")
_MLP_RE = re.compile(r"^model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")


def check_model(
    config: Mapping[str, Any],
    tensor_shapes: Mapping[str, tuple[int, ...]],
    tensor_dtypes: Mapping[str, str],
    *,
    source: str | Path | None = None,
    require_float: bool = True,
) -> None:
    """CheckpointError (one line naming the key or tensor) unless `config` (a config.json dict) agrees with the
    tensors (`name -> shape`, `name -> safetensors dtype code` such as "BF16"):

    - `num_hidden_layers`, `hidden_size`, `num_attention_heads`, `intermediate_size`, `vocab_size` are positive
      integers (`num_key_value_heads`, `head_dim` too when present; KV heads divide the query heads);
    - blocks `model.layers.{i}.*` exist for exactly i < num_hidden_layers (DeepSeek-V3's multi-token-prediction
      layers, `num_nextn_predict_layers` of them after the last block, are allowed);
    - the embedding is `[vocab_size, hidden_size]`, as are `lm_head` (when present) and the final norm `[hidden]`;
    - dense MLP projections match `intermediate_size` (stock configs; non-uniform blockprune outputs, which carry
      a `blockprune` section, have per-layer widths and may lack whole blocks);
    - every tensor is float64/32/16 or bfloat16, or an FP8 weight with its block scales (`engine.fp8.fp8_pairs`:
      a fine-grained FP8 checkpoint, dequantized as it is read); FP8 without scales, FP6/FP4 and integer
      weights are refused unless `require_float` is False (inspect and eval read such checkpoints fine).

    `source` (the checkpoint directory) prefixes the messages."""
    where = Path(source) / CONFIG_NAME if source is not None else Path(CONFIG_NAME)
    ints = _check_ints(config, where)
    uniform = not config.get("blockprune")
    _check_blocks(ints, tensor_shapes, where, uniform=uniform)
    _check_embedding(config, ints, tensor_shapes, where, source)
    if uniform:
        _check_mlp(ints["intermediate_size"], tensor_shapes, where, source)
    if require_float:
        pairs = fp8_pairs(config, tensor_shapes, tensor_dtypes, source)  # FP8 weights with their scales
        _check_dtypes(tensor_dtypes, source, read_as_float={*pairs, *pairs.values()})


def check_reader(reader: CheckpointReader, *, require_float: bool = True) -> None:
    """`check_model` of a reader's config and headers (reads no tensor data)."""
    infos = {name: reader.info(name) for name in reader.names()}
    check_model(
        reader.config,
        {n: i.shape for n, i in infos.items()},
        {n: i.dtype for n, i in infos.items()},
        source=reader.model_dir,
        require_float=require_float,
    )


def open_checked(
    model_dir: str | Path, *, require_supported: bool = True, require_float: bool = True
) -> CheckpointReader:
    """A validated `CheckpointReader` of `model_dir` whose config passed `check_model`.

    A pickle-only directory is refused in words that fit the CLI (convert it; there is no flag to unpickle).
    The defaults are for checkpoints about to be pruned (run, plan, submit; distill's student and teacher).
    Read-only commands (inspect, eval) pass `require_supported=False`, which skips the config checks for a
    `model_type` blockprune does not prune (its config may name its fields differently; the headers are still
    validated), and `require_float=False`, which lets FP8 and integer weights through."""
    from engine.arch import SUPPORTED_ARCHS

    try:
        reader = CheckpointReader(model_dir)
    except CheckpointError as e:
        if e.file is not None and e.file.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(
                "pickle checkpoint refused: unpickling can run code; convert it to safetensors first "
                "(transformers: from_pretrained, then save_pretrained)",
                e.file,
            ) from None
        raise
    model_type = reader.config.get("model_type")
    if model_type not in SUPPORTED_ARCHS:
        if require_supported:
            raise CheckpointError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_ARCHS)}",
                reader.model_dir / CONFIG_NAME,
            )
        return reader
    check_reader(reader, require_float=require_float)
    return reader


def _check_ints(config: Mapping[str, Any], where: Path) -> dict[str, int]:
    out = {}
    for key in (*REQUIRED_INTS, *OPTIONAL_INTS, MTP_LAYERS):
        value = config.get(key)
        if value is None and key not in REQUIRED_INTS:
            continue
        if value is None:
            raise CheckpointError(f"{key} is missing (a positive integer; it is not guessed)", where)
        least = 0 if key == MTP_LAYERS else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise CheckpointError(f"{key} = {_short(value)}: must be an integer >= {least}", where)
        out[key] = value
    kv = out.get("num_key_value_heads")
    if kv is not None and out["num_attention_heads"] % kv:
        raise CheckpointError(
            f"num_key_value_heads = {kv} does not divide num_attention_heads = {out['num_attention_heads']}", where
        )
    return out


def _check_blocks(ints: dict[str, int], shapes: Mapping[str, tuple[int, ...]], where: Path, *, uniform: bool) -> None:
    n = ints["num_hidden_layers"]
    first: dict[int, str] = {}
    for name in sorted(shapes):
        m = _BLOCK_RE.match(name)
        if m:
            first.setdefault(int(m.group(1)), name)
    mtp = ints.get(MTP_LAYERS, 0)
    extra = sorted(i for i in first if i >= n + mtp)
    if extra:
        i = extra[0]
        raise CheckpointError(
            f"num_hidden_layers = {n}, but the checkpoint has block {i} (tensor {first[i]!r}"
            f"{f', and {len(extra) - 1} more block(s)' if len(extra) > 1 else ''}); fix num_hidden_layers",
            where,
        )
    if not uniform:
        return  # a non-uniform output may have removed every sublayer of a block
    missing = next((i for i in range(n) if i not in first), None)  # stops at len(first) + 1 at most
    if missing is not None:
        have = sum(1 for i in first if i < n)
        raise CheckpointError(
            f"num_hidden_layers = {n}, but the checkpoint has no tensor of block {missing} "
            f"('model.layers.{missing}.*'; {have} of {n} blocks present)",
            where,
        )


def _check_embedding(
    config: Mapping[str, Any],
    ints: dict[str, int],
    shapes: Mapping[str, tuple[int, ...]],
    where: Path,
    source: str | Path | None,
) -> None:
    vocab, hidden = ints["vocab_size"], ints["hidden_size"]
    if EMBED_KEY not in shapes:
        raise CheckpointError(f"no embedding tensor {EMBED_KEY!r}", source)
    rows, cols = _matrix(EMBED_KEY, shapes[EMBED_KEY], source)
    if rows != vocab:
        raise CheckpointError(f"vocab_size = {vocab}, but the embedding {EMBED_KEY!r} has {rows} rows", where)
    if cols != hidden:
        raise CheckpointError(f"hidden_size = {hidden}, but the embedding {EMBED_KEY!r} is {cols} wide", where)
    if LM_HEAD_KEY in shapes and _matrix(LM_HEAD_KEY, shapes[LM_HEAD_KEY], source) != (vocab, hidden):
        raise CheckpointError(
            f"shape {list(shapes[LM_HEAD_KEY])} disagrees with [vocab_size, hidden_size] = [{vocab}, {hidden}]",
            source,
            LM_HEAD_KEY,
        )
    if LM_HEAD_KEY not in shapes and config.get("tie_word_embeddings") is False:
        raise CheckpointError(f"tie_word_embeddings is false, but there is no {LM_HEAD_KEY!r}", where)
    if NORM_KEY in shapes and tuple(shapes[NORM_KEY]) != (hidden,):
        raise CheckpointError(f"shape {list(shapes[NORM_KEY])} disagrees with hidden_size = {hidden}", source, NORM_KEY)


def _check_mlp(inter: int, shapes: Mapping[str, tuple[int, ...]], where: Path, source: str | Path | None) -> None:
    for name in sorted(shapes):
        m = _MLP_RE.match(name)
        if not m:
            continue
        rows, cols = _matrix(name, shapes[name], source)
        width = cols if m.group(1) == "down_proj" else rows
        if width != inter:
            raise CheckpointError(
                f"intermediate_size = {inter}, but {name!r} is {rows}x{cols} (its MLP width is {width})", where
            )


def _check_dtypes(dtypes: Mapping[str, str], source: str | Path | None, read_as_float: set[str]) -> None:
    for name in sorted(dtypes):
        code = dtypes[name]
        if code in FLOAT_DTYPES or name in read_as_float:
            continue
        if code.startswith(("F8", "F6", "F4")):
            raise CheckpointError(
                f"dtype {code}: only block-scaled FP8 weights are read (quant_method fp8); dequantize to "
                "bfloat16/float16/float32 first",
                source,
                name,
            )
        raise CheckpointError(
            f"dtype {code}: quantized or integer weights are not supported; blockprune prunes float32, float16 and "
            "bfloat16 checkpoints",
            source,
            name,
        )


def _matrix(name: str, shape: tuple[int, ...], source: str | Path | None) -> tuple[int, int]:
    if len(shape) != 2:
        raise CheckpointError(f"shape {list(shape)}: expected a matrix", source, name)
    return int(shape[0]), int(shape[1])


def _short(value: Any, keep: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= keep else text[: keep - 3] + "..."
