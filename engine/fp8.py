"""FP8 source checkpoints (DeepSeek-V3, the Qwen3 "-FP8" releases): block-scaled e4m3 weights read as the float
checkpoint they stand for.

The format (transformers' `FineGrainedFP8Config`, DeepSeek's `weight_block_size`)::

    config.json        quantization_config = {quant_method: fp8, fmt: e4m3, weight_block_size: [b0, b1],
                                              activation_scheme: dynamic}
    X.weight           F8_E4M3 [..., out, in]
    X.weight_scale_inv F32     [..., ceil(out / b0), ceil(in / b1)]

    W[r, c] = float32(W_q[r, c]) · S[r // b0, c // b1]                (one scale per b0 x b1 block, the last
                                                                       row / column of blocks may be partial)

Without `weight_block_size` a tensor has one scale (shape [] or [1]). Worked example, block [2, 2], out = 3, in = 3:
``W_q = [[1, 2, 4], [1, 1, 1], [2, 2, 2]]``, ``S = [[0.5, 2], [3, 1]]`` gives
``W = [[0.5, 1, 8], [0.5, 0.5, 2], [6, 6, 2]]``.

The product of an FP8 value (4 significant bits) and a float32 scale (24) is computed in float32, which is the
correctly rounded float32 of the exact product, so any order of evaluation gives the same bits: the dequantization is
exact against a float32 reference. Weights are then cast to the output dtype (`output_dtype`: bfloat16 unless the
recipe names float32 or float16).

`DequantizingReader` wraps a `CheckpointReader`: its names, infos, dtypes and `read` are those of the dequantized
checkpoint (scale tensors hidden, FP8 weights read with their scales on the requested device, dequantized there one
tensor at a time) and its `config` has no `quantization_config`. The block loop, the non-block copy, the embedding,
the router reads and the output config all see a bfloat16 checkpoint through it; `source_reader` returns it for FP8
checkpoints and the reader itself for every other.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sharding.errors import CheckpointError
from sharding.reader import CONFIG_NAME, DTYPES, CheckpointReader, TensorInfo

QUANT_KEY = "quantization_config"
SCALE_SUFFIX = "_scale_inv"  # "X.weight" -> "X.weight_scale_inv"
FP8_CODES: frozenset[str] = frozenset({"F8_E4M3", "F8_E5M2"})
SCALE_CODES: frozenset[str] = frozenset({"F32", "BF16", "F16"})
_DTYPE_CODES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@dataclass(frozen=True)
class FP8Format:
    """A fine-grained FP8 checkpoint's `quantization_config`: the scale block `[b0, b1]` (rows, columns) or None
    (one scale per tensor)."""

    block: tuple[int, int] | None


def fp8_format(config: Mapping[str, Any], source: str | Path | None = None) -> FP8Format | None:
    """The FP8 format of a config.json dict: None without a `quantization_config`; CheckpointError (one line naming
    the key) for one blockprune cannot dequantize: another `quant_method`, `activation_scheme` other than dynamic
    (static activation scales), a malformed `weight_block_size`."""
    qc = config.get(QUANT_KEY)
    if qc is None:
        return None
    where = Path(source) / CONFIG_NAME if source is not None else Path(CONFIG_NAME)
    if not isinstance(qc, Mapping):
        raise CheckpointError(f"{QUANT_KEY} must be an object, got {type(qc).__name__}", where)
    method = qc.get("quant_method")
    if method != "fp8":
        raise CheckpointError(
            f"{QUANT_KEY}.quant_method = {method!r}: blockprune reads fine-grained FP8 checkpoints (quant_method "
            "fp8, weights with '*.weight_scale_inv' block scales); dequantize this one to bfloat16 first",
            where,
        )
    scheme = qc.get("activation_scheme", "dynamic")
    if str(scheme).lower() != "dynamic":
        raise CheckpointError(
            f"{QUANT_KEY}.activation_scheme = {scheme!r}: only dynamic activation scaling is read (static "
            "checkpoints carry activation scales blockprune does not handle)",
            where,
        )
    block = qc.get("weight_block_size")
    if block is None:
        return FP8Format(None)
    if (
        not isinstance(block, list | tuple)
        or len(block) != 2
        or not all(type(b) is int and b > 0 for b in block)  # bool is not an int here
    ):
        raise CheckpointError(f"{QUANT_KEY}.weight_block_size = {block!r}: must be two positive integers", where)
    return FP8Format((int(block[0]), int(block[1])))


def scale_name(weight: str) -> str:
    """The scale tensor of an FP8 weight: "X.weight" -> "X.weight_scale_inv"."""
    return weight + SCALE_SUFFIX


def scale_shape(shape: Iterable[int], block: tuple[int, int] | None) -> tuple[int, ...]:
    """The `weight_scale_inv` shape of a weight of `shape` ([..., out, in]): [..., ceil(out/b0), ceil(in/b1)];
    () for a per-tensor scale (block None)."""
    shape = tuple(shape)
    if block is None:
        return ()
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def fp8_pairs(
    config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, str],
    source: str | Path | None = None,
) -> dict[str, str]:
    """{FP8 weight: its scale tensor} of a checkpoint (`name -> shape`, `name -> safetensors dtype code`), from the
    headers only. CheckpointError (one line naming the tensor or key) unless every FP8 tensor is a `*.weight` of at
    least 2 dimensions with a float `*.weight_scale_inv` of the shape its block size gives, every scale tensor
    belongs to such a weight, and config.json says how to apply them (`fp8_format`). {} for a checkpoint with
    neither FP8 tensors nor scales (its `quantization_config`, if any, is not looked at)."""
    fp8 = sorted(n for n, code in dtypes.items() if code in FP8_CODES)
    scales = sorted(n for n in dtypes if n.endswith(SCALE_SUFFIX))
    if not fp8 and not scales:
        return {}
    fmt = fp8_format(config, source)
    for name in fp8:
        code, scale = dtypes[name], scale_name(name)
        if fmt is None:
            raise CheckpointError(
                f"dtype {code}: FP8 weights need the block scales of a fine-grained FP8 checkpoint (config.json "
                f"{QUANT_KEY} with quant_method fp8, and '{scale}'); this one has no {QUANT_KEY}: dequantize it to "
                "bfloat16/float16/float32 first",
                source,
                name,
            )
        if not name.endswith(".weight") or len(shapes[name]) < 2:
            raise CheckpointError(f"dtype {code}: only matrix weights ('*.weight') can be FP8", source, name)
        if scale not in dtypes:
            raise CheckpointError(
                f"dtype {code} without its scale tensor {scale!r}: FP8 weights are read only with their scales",
                source,
                name,
            )
        if dtypes[scale] not in SCALE_CODES:
            raise CheckpointError(f"dtype {dtypes[scale]}: a weight scale must be F32, BF16 or F16", source, scale)
        want, got = scale_shape(shapes[name], fmt.block), tuple(shapes[scale])
        if got != want and not (fmt.block is None and math.prod(got) == 1):
            raise CheckpointError(
                f"shape {list(got)}, but its weight {list(shapes[name])} with weight_block_size "
                f"{list(fmt.block) if fmt.block else None} needs scales {list(want)}",
                source,
                scale,
            )
    fp8_set = set(fp8)
    for scale in scales:
        weight = scale[: -len(SCALE_SUFFIX)]
        if weight not in fp8_set:
            what = f"is {dtypes[weight]}" if weight in dtypes else "is missing"
            raise CheckpointError(f"a scale tensor whose weight {weight!r} {what}, not FP8", source, scale)
    return {name: scale_name(name) for name in fp8}


# --------------------------------------------------------------------------------------------- the math


def dequantize(W_q: Tensor, scale_inv: Tensor, block: tuple[int, int] | None, dtype: torch.dtype) -> Tensor:
    """``W = float32(W_q) · S`` with ``S[r, c] = scale_inv[..., r // b0, c // b1]`` (one scale per b0 x b1 block;
    partial blocks at the ends), cast to `dtype`, on `W_q`'s device. `block` None: one scale for the tensor.

    One float32 copy of the weight is made and scaled in place: the scales are repeated over rows only and broadcast
    over each block's columns through a view (as transformers' `_dequantize_fp8_weight`, which also handles leading
    expert dimensions), so no second weight-sized tensor exists."""
    W = W_q.to(torch.float32)
    S = scale_inv.to(device=W.device, dtype=torch.float32)
    if block is None:
        return W.mul_(S.reshape(())).to(dtype)
    b0, b1 = block
    rows, cols = W.shape[-2:]
    S = S.repeat_interleave(b0, dim=-2)[..., :rows, :]  # [..., rows, ceil(cols / b1)]
    full, rem = divmod(cols, b1)
    if full:
        W[..., : full * b1].unflatten(-1, (full, b1)).mul_(S[..., :full, None])
    if rem:
        W[..., full * b1 :].mul_(S[..., full:])
    return W.to(dtype)


def quantize(
    W: Tensor, block: tuple[int, int] | None, dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[Tensor, Tensor]:
    """(W_q, scale_inv) of a float weight, the inverse of `dequantize` up to FP8 rounding: per block
    ``scale_inv = max|W_block| / fp8_max`` (1 for an all-zero block), ``W_q = fp8(W_block / scale_inv)``. For tests and
    benchmarks (building FP8 checkpoints); blockprune never writes FP8."""
    fmax = torch.finfo(dtype).max
    W = W.detach().to(torch.float32)
    rows, cols = W.shape[-2:]
    b0, b1 = block if block is not None else (rows, cols)
    nr, nc = math.ceil(rows / b0), math.ceil(cols / b1)
    pad = torch.zeros(*W.shape[:-2], nr * b0, nc * b1, dtype=torch.float32, device=W.device)
    pad[..., :rows, :cols] = W
    tiles = pad.unflatten(-1, (nc, b1)).unflatten(-3, (nr, b0))  # [..., nr, b0, nc, b1]
    amax = tiles.abs().amax(dim=(-3, -1))  # [..., nr, nc]
    S = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
    q = (tiles / S[..., :, None, :, None]).clamp(-fmax, fmax).to(dtype)
    W_q = q.flatten(-2).flatten(-3, -2)[..., :rows, :cols].contiguous()
    return W_q, (S if block is not None else S.reshape(S.shape[:-2]))


def output_dtype(recipe_dtype: str) -> torch.dtype:
    """The dtype dequantized FP8 weights are computed from and written in: the recipe's `runtime.dtype` when it names
    float32 or float16, else (`auto`, `bfloat16`) bfloat16, the precision these checkpoints were quantized from
    (and what transformers dequantizes them to)."""
    return {"float32": torch.float32, "float16": torch.float16}.get(recipe_dtype, torch.bfloat16)


# --------------------------------------------------------------------------------------------- the reader


@dataclass(frozen=True)
class DequantizedInfo(TensorInfo):
    """A dequantized FP8 weight: `dtype` is the dtype it is read as; `start` / `end` still locate its FP8 bytes."""

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize


class DequantizingReader:
    """A `CheckpointReader` of an FP8 checkpoint seen as the float checkpoint it stands for (module docstring):
    `names()` without the scale tensors, FP8 weights reported and read as `dtype`, `config` without
    `quantization_config`. Everything else (files, fingerprint, byte counters, hashes) is the raw reader's."""

    def __init__(self, raw: CheckpointReader, fmt: FP8Format, pairs: Mapping[str, str], dtype: torch.dtype) -> None:
        if dtype not in _DTYPE_CODES:
            raise ValueError(f"DequantizingReader: dtype {dtype} is not bfloat16, float16 or float32")
        self.raw, self.fmt, self.dtype = raw, fmt, dtype
        self.pairs = dict(pairs)
        self._hidden = set(self.pairs.values())
        self._names = [n for n in raw.names() if n not in self._hidden]
        self.config: dict[str, Any] = {k: v for k, v in raw.config.items() if k != QUANT_KEY}

    def __getattr__(self, name: str) -> Any:  # model_dir, files, format, fingerprint, bytes_read, ...
        if name == "raw":  # not set yet (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self.raw, name)

    def names(self) -> list[str]:
        return list(self._names)

    def names_with_prefix(self, prefix: str) -> list[str]:
        return [n for n in self._names if n.startswith(prefix)]

    def info(self, name: str) -> TensorInfo:
        if name in self._hidden:
            raise KeyError(
                f"tensor {name!r} is a scale of the FP8 checkpoint {self.raw.model_dir}, read with its weight"
            )
        info = self.raw.info(name)
        if name not in self.pairs:
            return info
        return DequantizedInfo(info.name, info.file, _DTYPE_CODES[self.dtype], info.shape, info.start, info.end)

    def torch_dtype(self, name: str) -> torch.dtype:
        return self.info(name).torch_dtype

    def nbytes(self, names: str | Iterable[str]) -> int:
        return sum(self.info(n).nbytes for n in ([names] if isinstance(names, str) else names))

    def __contains__(self, name: object) -> bool:
        return name in self.raw and name not in self._hidden

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"DequantizingReader({self.raw!r}, block {self.fmt.block}, as {self.dtype})"

    def _with_scales(self, names: str | Iterable[str]) -> list[str]:
        wanted = [names] if isinstance(names, str) else list(names)
        return wanted + [self.pairs[n] for n in wanted if n in self.pairs]

    def digest(self, names: str | Iterable[str]) -> str:
        """The raw reader's digest of `names` and their scale tensors (a changed scale changes the weights)."""
        return self.raw.digest(self._with_scales(names))

    def verify_digest(self, names: str | Iterable[str], expected: Any, *, what: str) -> None:
        self.raw.verify_digest(self._with_scales(names), expected, what=what)

    def read(
        self, names: str | Iterable[str], *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> dict[str, Tensor]:
        """{name: tensor} as `CheckpointReader.read`; FP8 weights are read with their scales onto `device` (one byte
        per weight moved) and dequantized there, one at a time, into `self.dtype` (or `dtype` when given)."""
        wanted = [names] if isinstance(names, str) else list(dict.fromkeys(names))
        for n in wanted:
            self.info(n)  # unknown or hidden names fail before any read
        raw_names = wanted + [self.pairs[n] for n in wanted if n in self.pairs]
        raw = self.raw.read(raw_names, device=device)
        out: dict[str, Tensor] = {}
        for n in wanted:
            t = raw.pop(n)
            if n in self.pairs:
                t = dequantize(t, raw.pop(self.pairs[n]), self.fmt.block, dtype or self.dtype)
            elif dtype is not None:
                t = t.to(dtype)
            out[n] = t
        return out

    def read_prefix(self, prefix: str, **kwargs: Any) -> dict[str, Tensor]:
        names = self.names_with_prefix(prefix)
        if not names:
            raise KeyError(f"no tensor name starts with {prefix!r} in checkpoint {self.raw.model_dir}")
        return self.read(names, **kwargs)


def source_reader(reader: CheckpointReader, recipe_dtype: str = "auto") -> CheckpointReader | DequantizingReader:
    """The reader a run prunes from: `reader` itself, or for an FP8 checkpoint a `DequantizingReader` that gives its
    weights in `output_dtype(recipe_dtype)`. CheckpointError as `fp8_pairs` (headers only; no weight is read)."""
    infos = {n: reader.info(n) for n in reader.names()}
    pairs = fp8_pairs(
        reader.config, {n: i.shape for n, i in infos.items()}, {n: i.dtype for n, i in infos.items()}, reader.model_dir
    )
    if not pairs:
        return reader
    fmt = fp8_format(reader.config, reader.model_dir)
    assert fmt is not None  # fp8_pairs refused FP8 tensors without a format
    return DequantizingReader(reader, fmt, pairs, output_dtype(recipe_dtype))


__all__ = [
    "DequantizingReader",
    "FP8Format",
    "dequantize",
    "fp8_format",
    "fp8_pairs",
    "output_dtype",
    "quantize",
    "scale_name",
    "scale_shape",
    "source_reader",
]
