"""Validated, lazy, byte-counting reader of Hugging Face checkpoints.

A safetensors file (huggingface/safetensors, "format"):

    bytes [0, 8)        N = header length, little-endian u64 (2 <= N <= 100 MB, 8 + N <= file size)
    bytes [8, 8+N)      UTF-8 JSON object {"__metadata__": {str: str} (optional),
                                           name: {"dtype": "F32", "shape": [d0, ...], "data_offsets": [b, e]}, ...}
    bytes [8+N, size)   data section: tensor `name` is bytes [8+N+b, 8+N+e), row-major, little-endian,
                        with e - b = prod(shape) * itemsize(dtype)

The byte ranges of the tensors must tile the data section exactly: no overlaps, no holes, no trailing bytes.
A checkpoint directory holds `config.json` and either `model.safetensors` or `model.safetensors.index.json`
(`{"weight_map": {tensor name: shard file}}`) plus its shards. Every header is parsed and checked (and checked
against the index) when the reader is built, reading only the 8 + N header bytes of each file; tensor data is
read later, per tensor, by `CheckpointReader.read`. Pickle checkpoints are refused unless asked for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import stat
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import torch

from sharding.errors import CheckpointError

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Pickled files a training run leaves next to the weights; never taken for weights.
_NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state")
PICKLE_ADVICE = (
    "unpickling can run code, so only safetensors checkpoints are read; convert it once, e.g. python -c "
    "\"from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; d, o = 'IN_DIR', 'OUT_DIR'; "
    'M.from_pretrained(d).save_pretrained(o); T.from_pretrained(d).save_pretrained(o)" '
    "(transformers loads .bin files with torch.load(weights_only=True)), then use OUT_DIR"
)
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit; a longer header is a "header bomb"
_HASH_CHUNK = 1 << 20
_STREAM_CHUNK = 16 << 20
_CHANGED_ADVICE = (
    ": the output was made from other weights; restore the input checkpoint, or start over with a new output or "
    "overwrite"
)


def _dtype_table() -> dict[str, torch.dtype]:
    table = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
    }
    for code, attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
        if hasattr(torch, attr):
            table[code] = getattr(torch, attr)
    return table


DTYPES: dict[str, torch.dtype] = _dtype_table()
"""safetensors dtype code -> torch dtype (the codes this reader accepts)."""
_CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: bytes [start, end) of `file`, absolute offsets (safetensors: 8 + N + data_offsets).

    nbytes = end - start = prod(shape) * itemsize(dtype). For pickle checkpoints torch's zip container exposes no
    offsets: there start = 0 and end = nbytes.
    """

    name: str
    file: Path
    dtype: str  # safetensors code, e.g. "F32", "BF16"
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class SafetensorsHeader:
    """The validated header of one safetensors file; `header_bytes` = 8 + N, the bytes read to get it."""

    path: Path
    header_bytes: int
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]


# ---------------------------------------------------------------------------------------------- header validation


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file `path`, reading only its first 8 + N bytes.

    Raises CheckpointError naming the file (and tensor) for: a length < 2, > MAX_HEADER_BYTES or past the end of
    the file; a header that is not a UTF-8 JSON object (duplicate keys included); `__metadata__` not {str: str};
    an entry with an unknown dtype, a shape that is not a list of non-negative ints, data_offsets that are not a
    pair of ints, negative or reversed, or that span a byte count other than prod(shape) * itemsize; offsets past
    the end of the data section (truncated file); overlapping tensors; holes or trailing bytes in the data section.
    """
    path = Path(path)
    try:
        with _open_regular(path) as f:  # unbuffered: read the header bytes and not one more
            size = os.fstat(f.fileno()).st_size
            n = _header_length(_read_upto(f, 8), size, path)
            raw = _read_upto(f, n)
    except OSError as e:
        raise CheckpointError(f"cannot read the file ({e.strerror or e})", path) from e
    if len(raw) != n:
        raise CheckpointError(f"file ended inside the {n}-byte header", path)
    header = _parse_header_json(raw, path)
    metadata = _check_metadata(header.pop("__metadata__", None), path)
    base = 8 + n
    tensors = {name: _tensor_info(name, entry, path, base) for name, entry in header.items()}
    _check_layout(tensors, base, size, path)
    return SafetensorsHeader(path=path, header_bytes=base, metadata=metadata, tensors=tensors)


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _not_regular(path: Path) -> str | None:
    """None if `path` is a regular file (symlinks followed), "missing" if nothing is there, else what it is:
    ``a character device (symlink to '/dev/zero')``, ``a dangling symlink to 'x'``."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"a dangling symlink to {os.readlink(path)!r}" if os.path.islink(path) else "missing"
    except OSError as e:
        return f"not accessible ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    link = f" (symlink to {os.readlink(path)!r})" if os.path.islink(path) else ""
    return _kind(mode) + link


def _open_regular(path: Path) -> BinaryIO:
    """Open `path` for unbuffered reading, refusing anything but a regular file. O_NONBLOCK: opening a FIFO must
    not hang (it has no effect on regular files); the type is checked on the open descriptor (no race)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CheckpointError(f"is {_kind(mode)}, not a regular file", path)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def _read_upto(f: BinaryIO, n: int) -> bytes:
    """Up to `n` bytes from an unbuffered file (a raw read may return fewer than asked before the end)."""
    chunks, left = [], n
    while left > 0 and (chunk := f.read(left)):
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _header_length(prefix: bytes, size: int, path: Path) -> int:
    if len(prefix) < 8:
        raise CheckpointError(f"truncated: {size} bytes, fewer than the 8-byte header length", path)
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit (header bomb)", path)
    if n < 2:
        raise CheckpointError(f"header length {n} is too small to hold a JSON object", path)
    if 8 + n > size:
        raise CheckpointError(f"header length {n} runs past the end of the file ({size} bytes)", path)
    return n


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _parse_header_json(raw: bytes, path: Path) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"header is not valid JSON ({e})", path) from e
    if not isinstance(header, dict):
        raise CheckpointError(f"header is a JSON {type(header).__name__}, not an object", path)
    return header


def _check_metadata(metadata: Any, path: Path) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"'__metadata__' must map strings to strings, got {metadata!r:.200}", path)
    return metadata


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)  # bool and float are not ints here


def _tensor_info(name: str, entry: Any, path: Path, base: int) -> TensorInfo:
    """Check one header entry on its own (dtype, shape, offsets, size) and return it with absolute offsets."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"header entry {entry!r:.200} lacks dtype, shape or data_offsets", path, name)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r:.50} (known: {', '.join(DTYPES)})", path, name)
    if not _is_int_list(shape) or any(d < 0 for d in shape):
        raise CheckpointError(f"shape {shape!r:.200} is not a list of non-negative integers", path, name)
    if not _is_int_list(offsets) or len(offsets) != 2:
        raise CheckpointError(f"data_offsets {offsets!r:.200} is not a pair of integers", path, name)
    begin, end = offsets
    if begin < 0 or end < 0:
        raise CheckpointError(f"data_offsets {offsets} are negative", path, name)
    if end < begin:
        raise CheckpointError(f"data_offsets {offsets} are reversed (end before begin)", path, name)
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != expected:
        raise CheckpointError(
            f"shape {shape} of {dtype} needs {expected} bytes but data_offsets {offsets} span {end - begin}",
            path,
            name,
        )
    return TensorInfo(name=name, file=path, dtype=dtype, shape=tuple(shape), start=base + begin, end=base + end)


def _check_layout(tensors: dict[str, TensorInfo], base: int, size: int, path: Path) -> None:
    """The tensors' byte ranges must lie inside the data section [base, size) and tile it: no overlap, no hole."""
    if tensors:
        last = max(tensors.values(), key=lambda t: t.end)
        if last.end > size:
            raise CheckpointError(
                f"data_offsets [{last.start - base}, {last.end - base}] out of range: the data section holds only "
                f"{size - base} bytes (truncated file?)",
                path,
                last.name,
            )
    ordered = sorted(tensors.values(), key=lambda t: (t.start, t.end))
    for prev, cur in zip(ordered, ordered[1:]):  # sorted by start: any overlap shows between neighbours
        if cur.start < prev.end:
            raise CheckpointError(f"bytes overlap those of tensor {prev.name!r}", path, cur.name)
    pos = base
    for cur in ordered:
        if cur.start > pos:
            raise CheckpointError(
                f"hole: data bytes [{pos - base}, {cur.start - base}) before it hold no tensor", path, cur.name
            )
        pos = cur.end
    if pos < size:
        raise CheckpointError(f"{size - pos} trailing bytes after the last tensor's data", path)


# -------------------------------------------------------------------------------------------- checkpoint layout


def _load_json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{what} is not valid JSON ({e})", path) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} is a JSON {type(obj).__name__}, not an object", path)
    return obj


def _load_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / CONFIG_NAME
    what = _not_regular(path)
    if what == "missing":
        raise CheckpointError(f"missing {CONFIG_NAME} (a checkpoint needs its model config)", path)
    if what is not None:
        raise CheckpointError(f"{CONFIG_NAME} is {what}, not a regular file", path)
    return _load_json_object(path, CONFIG_NAME)


def _is_weight_pickle(path: Path) -> bool:
    return path.suffix in PICKLE_SUFFIXES and path.is_file() and not path.name.startswith(_NOT_WEIGHTS)


def _discover(model_dir: Path) -> tuple[str, Path | None, list[Path]]:
    """(format, index file or None, the weight files when there is no index). Follows transformers' order."""
    for name in (SAFETENSORS_SINGLE, SAFETENSORS_INDEX):
        what = _not_regular(model_dir / name)
        if what not in (None, "missing"):
            raise CheckpointError(f"{name} is {what}, not a regular file", model_dir / name)
    if (model_dir / SAFETENSORS_SINGLE).is_file():
        if (model_dir / SAFETENSORS_INDEX).exists():
            logger.warning(
                "%s: has both %s and %s; reading %s",
                model_dir,
                SAFETENSORS_SINGLE,
                SAFETENSORS_INDEX,
                SAFETENSORS_SINGLE,
            )
        return "safetensors", None, [model_dir / SAFETENSORS_SINGLE]
    if (model_dir / SAFETENSORS_INDEX).is_file():
        return "safetensors", model_dir / SAFETENSORS_INDEX, []
    stray = sorted(model_dir.glob("*.safetensors"))
    if stray:
        raise CheckpointError(
            f"has {stray[0].name} but neither {SAFETENSORS_SINGLE} nor {SAFETENSORS_INDEX}", model_dir
        )
    if (model_dir / PICKLE_INDEX).is_file():
        return "pickle", model_dir / PICKLE_INDEX, []
    if (model_dir / PICKLE_SINGLE).is_file():
        return "pickle", None, [model_dir / PICKLE_SINGLE]
    pickles = sorted(p for p in model_dir.iterdir() if _is_weight_pickle(p))
    if pickles:
        return "pickle", None, pickles
    raise CheckpointError(
        f"no weights: no {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {PICKLE_SINGLE} or *.bin/*.pt/*.pth", model_dir
    )


def _is_plain_relative(rel: str) -> bool:
    parts = PurePosixPath(rel).parts
    return bool(parts) and not rel.startswith(("/", "\\")) and ".." not in parts and "\\" not in rel


def _load_index(index_path: Path, model_dir: Path) -> dict[str, Path]:
    """{tensor name: shard path} from an index file `{"weight_map": {name: relative file}}`."""
    weight_map = _load_json_object(index_path, "index").get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError("index has no 'weight_map' object", index_path)
    if not weight_map:
        raise CheckpointError("no weights: the index's weight_map is empty", index_path)
    out: dict[str, Path] = {}
    for name, rel in weight_map.items():
        if not isinstance(rel, str) or not _is_plain_relative(rel):
            raise CheckpointError(
                f"index maps it to {rel!r:.200}, not a relative path inside the checkpoint", index_path, name
            )
        out[name] = model_dir / rel
    return out


def _index_files(weight_map: dict[str, Path], index_path: Path) -> list[Path]:
    """The shards the index names, sorted; each must exist. Other *.safetensors files beside it are ignored."""
    files = sorted(set(weight_map.values()))
    unlisted = sorted(set(index_path.parent.glob("*.safetensors")) - set(files))
    if unlisted:
        logger.warning(
            "%s: ignoring %d *.safetensors file(s) it does not name, e.g. %s",
            index_path,
            len(unlisted),
            unlisted[0].name,
        )
    for file in files:
        what = _not_regular(file)
        if what is not None:
            example = next(name for name, f in weight_map.items() if f == file)
            problem = "missing shard" if what == "missing" else f"shard is {what}, not a regular file"
            raise CheckpointError(f"{problem}, named by {index_path.name} (e.g. for {example!r})", file)
    return files


def _check_unique(contents: dict[Path, dict[str, TensorInfo]]) -> None:
    owner: dict[str, Path] = {}
    for file, infos in contents.items():
        for name in infos:
            if name in owner:
                raise CheckpointError(f"stored in two shards: {owner[name].name} and {file.name}", file, name)
            owner[name] = file


def _check_index(weight_map: dict[str, Path], contents: dict[Path, dict[str, TensorInfo]], index_path: Path) -> None:
    """Every index entry must be in the shard it names, and every tensor of a shard must be listed for it."""
    owner = {name: file for file, infos in contents.items() for name in infos}
    for name, file in weight_map.items():
        if owner.get(name) != file:
            where = f" (it is in {owner[name].name})" if name in owner else ""
            raise CheckpointError(f"{index_path.name} maps it to this shard, which lacks it{where}", file, name)
    for name, file in owner.items():
        if name not in weight_map:
            raise CheckpointError(f"shard holds a tensor that {index_path.name} does not list", file, name)


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict from a pickle file, through torch's restricted unpickler only (weights_only=True): no
    code in the file runs. mmap=True: tensor data stays in the file's pages until read."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # any failure of the restricted unpickler means the file is refused
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(
            f"torch.load(weights_only=True, mmap=True) refused it: {type(e).__name__}: {first:.300}", path
        ) from e
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError("not a flat state dict {str: Tensor}", path)
    for name, tensor in obj.items():
        if tensor.dtype not in _CODES:
            raise CheckpointError(f"unsupported dtype {tensor.dtype}", path, name)
    return obj


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with _open_regular(path) as f:
        while chunk := _read_upto(f, _HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _readinto_exact(f: BinaryIO, info: TensorInfo, out: memoryview) -> None:
    """Fill `out` with bytes [info.start, info.end) of `f` (a read may return fewer bytes than asked)."""
    f.seek(info.start)
    done = 0
    while done < len(out):
        n = f.readinto(out[done:])  # type: ignore[attr-defined]
        if not n:
            raise CheckpointError(
                f"file ended at byte {info.start + done} inside the tensor's bytes "
                f"[{info.start}, {info.end}) (changed since it was opened?)",
                info.file,
                info.name,
            )
        done += n


# ---------------------------------------------------------------------------------------------------- the reader


class SourceChangedError(CheckpointError):
    """The input checkpoint's tensors differ from those an earlier (interrupted) run read for a committed unit."""


class CheckpointReader:
    """Lazy reader of a Hugging Face checkpoint directory, validated before any tensor data is read.

    Building it parses `config.json`, the index (if any) and every shard header (8 + N bytes per file) and checks
    them (see `read_safetensors_header` and docs/formats-reader.md); any failure raises CheckpointError naming the
    file and tensor. `read(names)` then reads exactly those tensors' byte ranges, one open per file per call.

    Counters: `bytes_read` = tensor data bytes read by `read` and by digest streaming; `header_bytes_read` = 8 + N
    summed over the shard headers. They are plain ints (not thread-safe). `hash_reads` (default on): `read` also
    takes the sha256 of every tensor's bytes as they stream in (about 1.2 s/GB on one core), so `digest` of what
    was read costs nothing more; off, `digest` reads the bytes again. Pickle checkpoints (`pytorch_model.bin`,
    `*.bin`, `*.pt`, `*.pth`, only when there is no safetensors file) are refused unless `allow_pickle=True`
    (library use only; the CLI never unpickles); then each file is loaded with
    `torch.load(weights_only=True, map_location="cpu", mmap=True)` and the reader holds those
    memory-mapped tensors for its lifetime (start/end in TensorInfo are then 0 and nbytes).
    """

    def __init__(self, model_dir: str | Path, *, allow_pickle: bool = False, hash_reads: bool = True) -> None:
        self.model_dir = Path(model_dir)
        self.allow_pickle = allow_pickle
        self.hash_reads = hash_reads
        self.bytes_read = 0
        self.header_bytes_read = 0
        self.metadata: dict[Path, dict[str, str]] = {}  # safetensors `__metadata__` per file
        self._pickled: dict[str, torch.Tensor] = {}
        self._digests: dict[str, str] = {}  # name -> sha256 of the tensor's bytes as last read or streamed
        if not self.model_dir.is_dir():
            raise CheckpointError("not a checkpoint directory", self.model_dir)
        self.config: dict[str, Any] = _load_config(self.model_dir)
        self.format, index_path, files = _discover(self.model_dir)
        weight_map = _load_index(index_path, self.model_dir) if index_path else None
        self.files: list[Path] = _index_files(weight_map, index_path) if weight_map and index_path else files
        contents = self._open_safetensors() if self.format == "safetensors" else self._open_pickles()
        _check_unique(contents)
        if weight_map:
            assert index_path is not None
            _check_index(weight_map, contents, index_path)
        self._infos = {name: info for infos in contents.values() for name, info in infos.items()}
        if not self._infos:
            raise CheckpointError("no weights: the checkpoint holds no tensor", self.files[0])
        self._names = sorted(self._infos)
        self.total_bytes = sum(info.nbytes for info in self._infos.values())
        logger.info(
            "%s: %d tensors, %.1f MB in %d %s file(s)",
            self.model_dir,
            len(self._names),
            self.total_bytes / 1e6,
            len(self.files),
            self.format,
        )

    def _open_safetensors(self) -> dict[Path, dict[str, TensorInfo]]:
        contents = {}
        for file in self.files:
            header = read_safetensors_header(file)
            self.header_bytes_read += header.header_bytes
            self.metadata[file] = header.metadata
            contents[file] = header.tensors
        return contents

    def _open_pickles(self) -> dict[Path, dict[str, TensorInfo]]:
        if not self.allow_pickle:
            raise CheckpointError(f"pickle checkpoint refused: {PICKLE_ADVICE}", self.files[0])
        contents = {}
        for file in self.files:
            tensors = _load_pickle(file)
            contents[file] = {
                name: TensorInfo(name, file, _CODES[t.dtype], tuple(t.shape), 0, t.numel() * t.element_size())
                for name, t in tensors.items()
            }
            self._pickled.update(tensors)
        return contents

    def fingerprint(self, sample_bytes: int = 65536) -> str:
        """A cheap identity of the input checkpoint for resume checks (hex sha256): `config.json`'s parsed content,
        and per weight file its name, size, every tensor's name/dtype/shape/offsets and the first and last
        `sample_bytes` of its data section. Reads O(files x sample_bytes), never the whole model; a change of
        values in the middle of a large tensor is not seen (docs/distributed.md says so)."""
        h = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        for file in self.files:
            infos = sorted((i for i in self._infos.values() if i.file == file), key=lambda i: i.start)
            h.update(f"{file.name}:{file.stat().st_size}".encode())
            h.update(json.dumps([[i.name, i.dtype, list(i.shape), i.start, i.end] for i in infos]).encode())
            if self.format != "safetensors" or not infos:
                continue
            start, end = infos[0].start, infos[-1].end
            with _open_regular(file) as f:
                for pos in sorted({start, max(start, end - sample_bytes)}):
                    f.seek(pos)
                    h.update(_read_upto(f, min(sample_bytes, end - pos)))
        return h.hexdigest()

    # ------------------------------------------------------------------------------------------------ lookup

    def names(self) -> list[str]:
        """All tensor names, sorted."""
        return list(self._names)

    def names_with_prefix(self, prefix: str) -> list[str]:
        """Sorted names starting with `prefix` (e.g. "model.layers.1." for one block)."""
        return [name for name in self._names if name.startswith(prefix)]

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in checkpoint {self.model_dir}") from None

    def torch_dtype(self, name: str) -> torch.dtype:
        return self.info(name).torch_dtype

    def nbytes(self, names: str | Iterable[str]) -> int:
        """Tensor bytes of `names` (sum of prod(shape) * itemsize)."""
        return sum(self.info(name).nbytes for name in _as_names(names))

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.model_dir)!r}, {len(self)} tensors, {len(self.files)} {self.format} files)"

    # ------------------------------------------------------------------------------------------------ reading

    def read(
        self, names: str | Iterable[str], *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """{name: tensor} for `names` (in that order), converted to `dtype` if given and moved to `device`.

        Reads exactly the tensors' bytes, grouped by file (each file opened once per call, tensors in file order).
        Returned tensors own their memory (writable, independent of the file).
        """
        infos = [self.info(name) for name in _as_names(names)]  # unknown names fail before any read
        by_file: dict[Path, list[TensorInfo]] = {}
        for info in infos:
            by_file.setdefault(info.file, []).append(info)
        out: dict[str, torch.Tensor] = {}
        for file, group in by_file.items():
            for info, tensor in self._read_file(file, sorted(group, key=lambda i: i.start)):
                out[info.name] = tensor.to(device=device, dtype=dtype)  # one tensor at a time: bounded staging
        return {info.name: out[info.name] for info in infos}

    def read_prefix(self, prefix: str, **kwargs: Any) -> dict[str, torch.Tensor]:
        """`read(names_with_prefix(prefix), **kwargs)`; KeyError if no name has that prefix."""
        names = self.names_with_prefix(prefix)
        if not names:
            raise KeyError(f"no tensor name starts with {prefix!r} in checkpoint {self.model_dir}")
        return self.read(names, **kwargs)

    def _read_file(self, file: Path, group: list[TensorInfo]) -> Iterable[tuple[TensorInfo, torch.Tensor]]:
        if self.format == "pickle":
            for info in group:
                self.bytes_read += info.nbytes
                tensor = self._pickled[info.name].clone(memory_format=torch.contiguous_format)
                if self.hash_reads:
                    self._digests[info.name] = hashlib.sha256(_tensor_bytes(tensor)).hexdigest()
                yield info, tensor
            return
        with _open_regular(file) as f:
            for info in group:
                buf = torch.empty(info.nbytes, dtype=torch.uint8)
                view = memoryview(buf.numpy())  # type: ignore[arg-type]
                if info.nbytes:
                    _readinto_exact(f, info, view)
                self.bytes_read += info.nbytes
                if self.hash_reads:  # the digest of exactly the bytes this read returns
                    self._digests[info.name] = hashlib.sha256(view).hexdigest()
                yield info, buf.view(info.torch_dtype).reshape(info.shape)

    # ------------------------------------------------------------------------------------------------ digests

    def tensor_digests(self, names: str | Iterable[str]) -> dict[str, str]:
        """{name: sha256 hex of the tensor's stored bytes}, sorted by name.

        `read` hashes every tensor as its bytes stream in (the digest is of exactly the bytes it returned, before any
        dtype conversion), so for tensors this object has read nothing is read again. Others are streamed in 16 MiB
        chunks, counted in `bytes_read`: no tensor is built, memory stays at one chunk."""
        infos = sorted((self.info(name) for name in _as_names(names)), key=lambda i: i.name)
        todo: dict[Path, list[TensorInfo]] = {}
        for info in infos:
            if info.name not in self._digests:
                todo.setdefault(info.file, []).append(info)
        for file, group in todo.items():
            self._stream_digests(file, sorted(group, key=lambda i: i.start))
        return {info.name: self._digests[info.name] for info in infos}

    def digest(self, names: str | Iterable[str]) -> str:
        """One sha256 hex over `names` in sorted order: each tensor's name, dtype, shape and `tensor_digests` value.

        What the engine stores with each unit it writes (the unit's source tensors) and checks with
        `verify_digest` on resume: it covers every byte that was read, unlike the cheap `fingerprint`."""
        h = hashlib.sha256()
        for name, hexdigest in self.tensor_digests(names).items():
            info = self._infos[name]
            h.update(f"{name}\0{info.dtype}\0{list(info.shape)}\0{hexdigest}\n".encode())
        return h.hexdigest()

    def verify_digest(self, names: str | Iterable[str], expected: str | Mapping[str, str], *, what: str) -> None:
        """Raise SourceChangedError unless the tensors `names` still hold the bytes `expected` describes.

        `expected`: a `digest` string (the mismatch then names `what`, e.g. "unit 'model.layers.3.'", and the
        tensors it covers), or a `tensor_digests` mapping (values may be truncated to >= 16 hex digits; the
        mismatch then names the first tensor that changed, appeared or disappeared)."""
        names = sorted(_as_names(names))
        if isinstance(expected, str):
            got = self.digest(names)
            if got != expected:
                example = f", e.g. {names[0]!r}" if names else ""
                raise SourceChangedError(
                    f"the source tensors of {what} ({len(names)} tensors{example}) changed since it was written "
                    f"(sha256 {expected[:12]}... then, {got[:12]}... now){_CHANGED_ADVICE}",
                    self.model_dir,
                )
            return
        for name in sorted(set(names) ^ set(expected)):
            change = "is new in" if name in names else "is no longer in"
            raise SourceChangedError(
                f"source tensor of {what} {change} the checkpoint{_CHANGED_ADVICE}", self.model_dir, name
            )
        digests = self.tensor_digests(names)
        for name in names:
            want = str(expected[name])
            if len(want) < 16 or not digests[name].startswith(want):
                raise SourceChangedError(
                    f"source tensor of {what} changed since it was written (sha256 {want[:12]}... then, "
                    f"{digests[name][:12]}... now){_CHANGED_ADVICE}",
                    self.info(name).file,
                    name,
                )

    def _stream_digests(self, file: Path, group: list[TensorInfo]) -> None:
        if self.format == "pickle":
            for info in group:
                self._digests[info.name] = hashlib.sha256(_tensor_bytes(self._pickled[info.name])).hexdigest()
                self.bytes_read += info.nbytes
            return
        with _open_regular(file) as f:
            for info in group:
                h, pos = hashlib.sha256(), info.start
                f.seek(pos)
                while pos < info.end:
                    chunk = _read_upto(f, min(_STREAM_CHUNK, info.end - pos))
                    if not chunk:
                        raise CheckpointError(
                            f"file ended at byte {pos} inside the tensor's bytes [{info.start}, {info.end}) "
                            "(changed since it was opened?)",
                            file,
                            info.name,
                        )
                    h.update(chunk)
                    pos += len(chunk)
                self.bytes_read += info.nbytes
                self._digests[info.name] = h.hexdigest()

    def verify_sha256(self, files: Iterable[str | Path] | None = None) -> dict[str, str]:
        """{file (relative to model_dir when inside it): SHA-256 hex digest}, streamed in 1 MiB chunks.

        `files` default to the weight files; relative paths are taken from model_dir. Not counted in bytes_read.
        """
        paths = self.files if files is None else [self.model_dir / f for f in files]
        return {self._relative(path): _sha256(path) for path in paths}

    def _relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.model_dir).as_posix()
        except ValueError:
            return str(path)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor (any dtype, 0-d included), as stored in a file."""
    flat = tensor.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")  # type: ignore[arg-type]


def _as_names(names: str | Iterable[str]) -> list[str]:
    """One name or many, duplicates dropped, order kept (a bare string is one name, not its characters)."""
    return [names] if isinstance(names, str) else list(dict.fromkeys(names))
