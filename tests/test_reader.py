"""sharding.CheckpointReader against safetensors' own reader, and on malformed copies of real tiny checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sharding import DTYPES, CheckpointError, CheckpointReader, read_safetensors_header
from sharding.reader import SourceChangedError
from tests.tiny_models import save_tiny, tiny_model

ARCHS = ["llama", "qwen3", "mixtral", "qwen3_moe"]
INDEX = "model.safetensors.index.json"
HAS_PROC_IO = Path("/proc/self/io").exists()


# ------------------------------------------------------------------------------------------------------ helpers


def _safe_open_all(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, read by safetensors itself (the reference)."""
    out = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118 (safe_open is not a dict)
    return out


def _rchar() -> int:
    """Bytes this process has read through read() syscalls so far (Linux /proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def _load_shard(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_shard(path: Path, header: dict, data: bytes, length: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def _edit_header(path: Path, edit: Callable[[dict], None]) -> None:
    header, data = _load_shard(path)
    edit(header)
    _write_shard(path, header, data)


def _tensors_by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def _index(d: Path) -> dict:
    return json.loads((d / INDEX).read_text())


def _write_index(d: Path, index: dict) -> None:
    (d / INDEX).write_text(json.dumps(index))


def _multi_tensor_shard(d: Path) -> Path:
    """The first shard holding at least three tensors (tiny llama: a layer's two norms and o_proj)."""
    for file in sorted(d.glob("model-*.safetensors")):
        if len(_tensors_by_offset(_load_shard(file)[0])) >= 3:
            return file
    raise AssertionError(f"no shard with 3 tensors in {d}")


@pytest.fixture
def llama_copy(tiny_ckpt, tmp_path) -> Path:
    """A private copy of the tiny llama checkpoint, free to corrupt."""
    return Path(shutil.copytree(tiny_ckpt("llama"), tmp_path / "ckpt"))


# ------------------------------------------------------------------------------------------- reading real files


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_safe_open(tiny_ckpt, arch):
    d = tiny_ckpt(arch)
    ref = _safe_open_all(d)
    r = CheckpointReader(d)
    assert len(r.files) >= 5 and r.format == "safetensors"
    assert r.bytes_read == 0 and r.header_bytes_read == sum(read_safetensors_header(f).header_bytes for f in r.files)
    assert r.names() == sorted(ref)
    for name, t in ref.items():
        info = r.info(name)
        assert info.shape == tuple(t.shape) and r.torch_dtype(name) == t.dtype and DTYPES[info.dtype] == t.dtype
        assert info.nbytes == t.numel() * t.element_size()
    got = r.read(r.names())
    for name, t in ref.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert r.bytes_read == r.total_bytes == sum(t.numel() * t.element_size() for t in ref.values())
    assert r.config["model_type"] == arch


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_one_block_reads_only_its_bytes(tiny_ckpt, arch):
    d = tiny_ckpt(arch)
    r = CheckpointReader(d)
    ref = {k: v for k, v in _safe_open_all(d).items() if k.startswith("model.layers.1.")}
    block_bytes = sum(t.numel() * t.element_size() for t in ref.values())
    before = _rchar() if HAS_PROC_IO else 0
    got = r.read_prefix("model.layers.1.")
    os_read = _rchar() - before if HAS_PROC_IO else block_bytes
    assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert r.bytes_read == block_bytes <= 1.05 * block_bytes
    assert r.bytes_read < 0.5 * r.total_bytes  # the block is a small part of the model
    # What the OS saw, independent of the reader's own counter (+1 KiB for the /proc/self/io read itself).
    assert block_bytes <= os_read <= 1.05 * block_bytes + 1024


@pytest.mark.skipif(not HAS_PROC_IO, reason="needs /proc/self/io")
def test_construction_reads_only_headers(tiny_ckpt):
    d = tiny_ckpt("qwen3_moe")
    small = (d / INDEX).stat().st_size + (d / "config.json").stat().st_size
    before = _rchar()
    r = CheckpointReader(d)
    os_read = _rchar() - before
    assert r.bytes_read == 0
    assert os_read <= r.header_bytes_read + small + 1024
    assert r.header_bytes_read < 0.05 * r.total_bytes


def test_bf16_checkpoint(tmp_path):
    d = save_tiny(tiny_model("llama").to(torch.bfloat16), tmp_path / "bf16")
    ref = _safe_open_all(d)
    r = CheckpointReader(d)
    assert len(r.files) >= 5 and {r.info(n).dtype for n in r.names()} == {"BF16"}
    got = r.read(r.names())
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], v) for k, v in ref.items())
    as_f32 = r.read_prefix("model.layers.0.", dtype=torch.float32)
    assert all(v.dtype == torch.float32 and torch.equal(v, ref[k].float()) for k, v in as_f32.items())


def test_dtype_conversion_device_and_order(tiny_ckpt):
    d = tiny_ckpt("qwen3")
    ref = _safe_open_all(d)
    r = CheckpointReader(d)
    names = ["model.norm.weight", "model.embed_tokens.weight", "model.layers.2.mlp.up_proj.weight"]
    got = r.read(names, device=torch.device("cpu"), dtype=torch.float64)
    assert list(got) == names  # the caller's order, not the file order
    for name in names:
        assert got[name].dtype == torch.float64 and got[name].device.type == "cpu"
        assert torch.equal(got[name], ref[name].double())
    one = r.read("model.norm.weight", device="cpu", dtype=torch.bfloat16)  # a bare string is one name
    assert list(one) == ["model.norm.weight"] and torch.equal(
        one["model.norm.weight"], ref["model.norm.weight"].bfloat16()
    )
    assert r.bytes_read == r.nbytes(names) + r.nbytes("model.norm.weight")


def test_tensors_are_writable_and_independent_of_the_file(tiny_ckpt):
    d = tiny_ckpt("llama")
    r = CheckpointReader(d)
    digests = r.verify_sha256()
    name = "model.layers.0.self_attn.q_proj.weight"
    first = r.read([name])[name]
    original = first.clone()
    first.add_(1.0)  # must neither fail nor reach the file or a later read
    assert torch.equal(r.read([name])[name], original)
    assert r.verify_sha256() == digests


def test_single_file_checkpoint_and_metadata(tiny_ckpt, tmp_path):
    src = CheckpointReader(tiny_ckpt("llama"))
    tensors = src.read(src.names())
    d = tmp_path / "single"
    d.mkdir()
    shutil.copy(src.model_dir / "config.json", d)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt", "note": "single"})
    r = CheckpointReader(d)
    assert r.files == [d / "model.safetensors"] and r.metadata[d / "model.safetensors"] == {
        "format": "pt",
        "note": "single",
    }
    assert r.names() == src.names() and r.total_bytes == src.total_bytes
    got = r.read_prefix("model.layers.2.")
    assert all(torch.equal(v, tensors[k]) for k, v in got.items()) and r.bytes_read == r.nbytes(list(got))


def test_lookup_helpers_and_unknown_names(tiny_ckpt):
    r = CheckpointReader(tiny_ckpt("mixtral"))
    block = r.names_with_prefix("model.layers.0.")
    assert block and all(n.startswith("model.layers.0.") for n in block) and block == sorted(block)
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in block
    assert r.nbytes(block) == sum(r.info(n).end - r.info(n).start for n in block)
    with pytest.raises(KeyError, match="model.nope"):
        r.read(["model.norm.weight", "model.nope"])
    with pytest.raises(KeyError, match="model.layers.9."):
        r.read_prefix("model.layers.9.")
    assert r.bytes_read == 0  # unknown names fail before any byte is read


def test_verify_sha256(tiny_ckpt):
    d = tiny_ckpt("llama")
    r = CheckpointReader(d)
    digests = r.verify_sha256()
    assert sorted(digests) == sorted(f.name for f in d.glob("*.safetensors"))
    shard = r.files[3]
    assert digests[shard.name] == hashlib.sha256(shard.read_bytes()).hexdigest()
    assert r.verify_sha256(["config.json"]) == {
        "config.json": hashlib.sha256((d / "config.json").read_bytes()).hexdigest()
    }
    assert r.bytes_read == 0


def test_dtype_codes_match_safetensors(tmp_path):
    for code, dtype in DTYPES.items():
        path = tmp_path / f"{code}.safetensors"
        save_file({"x": torch.zeros(2, 3, dtype=dtype)}, path)
        info = read_safetensors_header(path).tensors["x"]
        assert (info.dtype, info.shape, info.nbytes) == (code, (2, 3), 6 * dtype.itemsize)


def test_pickle_allowed_loads_with_weights_only(tiny_ckpt, tmp_path):
    src = CheckpointReader(tiny_ckpt("llama"))
    tensors = src.read(src.names())
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(src.model_dir / "config.json", d)
    torch.save(tensors, d / "pytorch_model.bin")
    r = CheckpointReader(d, allow_pickle=True)
    assert r.format == "pickle" and r.files == [d / "pytorch_model.bin"] and r.names() == src.names()
    got = r.read(r.names(), dtype=None)
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in tensors.items())
    assert r.bytes_read == r.total_bytes == src.total_bytes
    name = "model.norm.weight"
    got[name].mul_(0)  # independent of the memory-mapped file
    assert torch.equal(r.read([name])[name], tensors[name])


class _Payload:
    """Unpickling this would create a file: proof that a checkpoint ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickle_never_runs(tiny_ckpt, tmp_path):
    d = tmp_path / "evil"
    d.mkdir()
    shutil.copy(tiny_ckpt("llama") / "config.json", d)
    marker = tmp_path / "code_ran"
    torch.save({"model.norm.weight": torch.ones(4), "x": _Payload(marker)}, d / "pytorch_model.bin")
    for allow in (False, True):
        with pytest.raises(CheckpointError, match="pytorch_model.bin"):
            CheckpointReader(d, allow_pickle=allow)
    assert not marker.exists()


def test_error_is_one_line_and_survives_pickling(llama_copy):
    (llama_copy / "config.json").unlink()
    with pytest.raises(CheckpointError) as info:
        CheckpointReader(llama_copy)
    err = info.value
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.file == err.file and isinstance(again, ValueError)
    assert str(CheckpointError("a\nb", "f.safetensors", "t")) == "f.safetensors: tensor 't': a b"


# ------------------------------------------------------------------------------------------- malformed checkpoints
# Each case corrupts a copy of the tiny llama checkpoint and returns (file name, tensor name or None, message part)
# that the CheckpointError must carry.

Case = tuple[str, "str | None", str]


def _shard_of(d: Path, name: str) -> Path:
    return d / _index(d)["weight_map"][name]


def case_missing_config(d: Path) -> Case:
    (d / "config.json").unlink()
    return "config.json", None, "missing config.json"


def case_config_not_json(d: Path) -> Case:
    (d / "config.json").write_text("{'model_type': llama")
    return "config.json", None, "not valid JSON"


def case_no_weights(d: Path) -> Case:
    for f in [*d.glob("*.safetensors"), d / INDEX]:
        f.unlink()
    return d.name, None, "no weights"


def case_stray_safetensors_without_index(d: Path) -> Case:
    (d / INDEX).unlink()
    return d.name, None, "neither model.safetensors nor"


def case_index_not_json(d: Path) -> Case:
    (d / INDEX).write_text('{"weight_map": {')
    return INDEX, None, "not valid JSON"


def case_index_without_weight_map(d: Path) -> Case:
    _write_index(d, {"metadata": _index(d)["metadata"]})
    return INDEX, None, "no 'weight_map'"


def case_index_names_missing_shard(d: Path) -> Case:
    shard = _shard_of(d, "model.norm.weight")
    shard.unlink()
    return shard.name, None, "missing shard"


def case_index_path_escapes_checkpoint(d: Path) -> Case:
    index = _index(d)
    index["weight_map"]["model.norm.weight"] = "../model-00020-of-00020.safetensors"
    _write_index(d, index)
    return INDEX, "model.norm.weight", "not a relative path inside"


def case_index_names_tensor_its_shard_lacks(d: Path) -> Case:
    index = _index(d)
    index["weight_map"]["model.layers.0.self_attn.ghost.weight"] = index["weight_map"]["model.norm.weight"]
    _write_index(d, index)
    return _shard_of(d, "model.norm.weight").name, "model.layers.0.self_attn.ghost.weight", "which lacks it"


def case_index_maps_tensor_elsewhere(d: Path) -> Case:
    index = _index(d)
    name = "model.layers.0.input_layernorm.weight"  # its shard stays in the index through o_proj
    real = index["weight_map"][name]
    index["weight_map"][name] = index["weight_map"]["model.norm.weight"]
    _write_index(d, index)
    return index["weight_map"]["model.norm.weight"], name, f"lacks it (it is in {real})"


def case_shard_tensor_missing_from_index(d: Path) -> Case:
    index = _index(d)
    shard = index["weight_map"].pop("model.layers.1.input_layernorm.weight")
    _write_index(d, index)
    return shard, "model.layers.1.input_layernorm.weight", "does not list"


def case_tensor_in_two_shards(d: Path) -> Case:
    name = "model.norm.weight"
    first, second = _shard_of(d, name), _shard_of(d, "lm_head.weight")
    src_header, src_data = _load_shard(first)
    begin, end = src_header[name]["data_offsets"]
    header, data = _load_shard(second)
    header[name] = {**src_header[name], "data_offsets": [len(data), len(data) + end - begin]}
    _write_shard(second, header, data + src_data[begin:end])
    a, b = sorted([first, second])  # the reader meets the files in sorted order; the later one is reported
    return b.name, name, f"stored in two shards: {a.name} and {b.name}"


def case_truncated_shard(d: Path) -> Case:
    shard = _multi_tensor_shard(d)
    header, _ = _load_shard(shard)
    shard.write_bytes(shard.read_bytes()[:-100])
    return shard.name, _tensors_by_offset(header)[-1], "truncated"


def case_header_length_past_file(d: Path) -> Case:
    shard = _multi_tensor_shard(d)
    raw = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    return shard.name, None, "past the end of the file"


def case_header_bomb(d: Path) -> Case:
    shard = _multi_tensor_shard(d)
    shard.write_bytes(struct.pack("<Q", 1 << 40) + shard.read_bytes()[8:])
    return shard.name, None, "header bomb"


def case_header_length_too_small(d: Path) -> Case:
    shard = _multi_tensor_shard(d)
    shard.write_bytes(struct.pack("<Q", 1) + shard.read_bytes()[8:])
    return shard.name, None, "too small"


def case_file_shorter_than_length_field(d: Path) -> Case:
    shard = _multi_tensor_shard(d)
    shard.write_bytes(b"\x10\x00\x00")
    return shard.name, None, "fewer than the 8-byte header length"


def case_header_not_json(d: Path) -> Case:
    shard = _multi_tensor_shard(d)
    header, data = _load_shard(shard)
    raw = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(raw)) + b"#" + raw[1:] + data)
    return shard.name, None, "not valid JSON"


def case_header_not_object(d: Path) -> Case:
    shard = _multi_tensor_shard(d)
    header, data = _load_shard(shard)
    raw = json.dumps([header]).encode()
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return shard.name, None, "not an object"


def case_header_duplicate_key(d: Path) -> Case:
    shard = _multi_tensor_shard(d)
    header, data = _load_shard(shard)
    first = _tensors_by_offset(header)[0]
    raw = json.dumps(header).encode()
    extra = json.dumps({first: header[first]}).encode()[1:-1]
    raw = raw[:-1] + b", " + extra + b"}"
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return shard.name, None, f"duplicate key '{first}'"


def case_metadata_not_str_dict(d: Path) -> Case:
    shard = _multi_tensor_shard(d)
    _edit_header(shard, lambda h: h.update({"__metadata__": {"format": "pt", "step": 3}}))
    return shard.name, None, "'__metadata__' must map strings to strings"


def case_entry_lacks_offsets(d: Path) -> Case:
    shard = _multi_tensor_shard(d)
    name = _tensors_by_offset(_load_shard(shard)[0])[0]
    _edit_header(shard, lambda h: h[name].pop("data_offsets"))
    return shard.name, name, "lacks dtype, shape or data_offsets"


def _set_offsets(d: Path, which: int, offsets: Callable[[list[int], int], list[int]]) -> Case:
    """Replace the data_offsets of the `which`-th tensor (in file order) of the multi-tensor shard."""
    shard = _multi_tensor_shard(d)
    header, data = _load_shard(shard)
    name = _tensors_by_offset(header)[which]
    header[name]["data_offsets"] = offsets(header[name]["data_offsets"], len(data))
    _write_shard(shard, header, data)
    return shard.name, name, ""


def case_negative_offsets(d: Path) -> Case:
    file, name, _ = _set_offsets(d, 1, lambda o, n: [-4, o[1] - o[0] - 4])
    return file, name, "negative"


def case_reversed_offsets(d: Path) -> Case:
    file, name, _ = _set_offsets(d, 1, lambda o, n: [o[1], o[0]])
    return file, name, "reversed"


def case_offsets_out_of_range(d: Path) -> Case:
    file, name, _ = _set_offsets(d, 2, lambda o, n: [o[0] + n, o[1] + n])
    return file, name, "out of range"


def case_overlapping_offsets(d: Path) -> Case:
    file, name, _ = _set_offsets(d, 1, lambda o, n: [o[0] - 4, o[1] - 4])
    first = _tensors_by_offset(_load_shard(d / file)[0])[0]
    return file, name, f"overlap those of tensor '{first}'"


def case_hole_in_data(d: Path) -> Case:
    shard = _multi_tensor_shard(d)
    header, data = _load_shard(shard)
    first, second, *rest = _tensors_by_offset(header)
    cut = header[first]["data_offsets"][1]
    for name in (second, *rest):
        header[name]["data_offsets"] = [o + 8 for o in header[name]["data_offsets"]]
    _write_shard(shard, header, data[:cut] + bytes(8) + data[cut:])
    return shard.name, second, "hole"


def case_trailing_bytes(d: Path) -> Case:
    shard = _multi_tensor_shard(d)
    shard.write_bytes(shard.read_bytes() + bytes(16))
    return shard.name, None, "16 trailing bytes"


def case_unknown_dtype(d: Path) -> Case:
    shard = _multi_tensor_shard(d)
    name = _tensors_by_offset(_load_shard(shard)[0])[0]
    _edit_header(shard, lambda h: h[name].update(dtype="Q4_K"))
    return shard.name, name, "unknown dtype 'Q4_K'"


def case_negative_dim(d: Path) -> Case:
    shard = _multi_tensor_shard(d)
    name = _tensors_by_offset(_load_shard(shard)[0])[0]
    _edit_header(shard, lambda h: h[name].update(shape=[-64]))
    return shard.name, name, "not a list of non-negative integers"


def case_shape_not_list(d: Path) -> Case:
    shard = _multi_tensor_shard(d)
    name = _tensors_by_offset(_load_shard(shard)[0])[0]
    _edit_header(shard, lambda h: h[name].update(shape="64"))
    return shard.name, name, "not a list of non-negative integers"


def case_shape_size_mismatch(d: Path) -> Case:
    shard = _multi_tensor_shard(d)
    name = _tensors_by_offset(_load_shard(shard)[0])[-1]
    _edit_header(shard, lambda h: h[name].update(shape=[h[name]["shape"][0] + 1, *h[name]["shape"][1:]]))
    return shard.name, name, "bytes but data_offsets"


def case_pickle_refused(d: Path) -> Case:
    tensors = _safe_open_all(d)
    for f in [*d.glob("*.safetensors"), d / INDEX]:
        f.unlink()
    torch.save(tensors, d / "pytorch_model.bin")
    return "pytorch_model.bin", None, "pickle checkpoint refused"


def _some_shard(d: Path) -> tuple[Path, str]:
    name = "model.layers.1.mlp.down_proj.weight"
    return _shard_of(d, name), name


def case_shard_symlink_to_dev_zero(d: Path) -> Case:
    shard, name = _some_shard(d)
    shard.unlink()
    shard.symlink_to("/dev/zero")
    return (
        shard.name,
        None,
        f"shard is a character device (symlink to '/dev/zero'), not a regular file, named by {INDEX}",
    )


def case_shard_is_a_fifo(d: Path) -> Case:  # opening it must not hang
    shard, _ = _some_shard(d)
    shard.unlink()
    os.mkfifo(shard)
    return shard.name, None, "shard is a FIFO (named pipe), not a regular file"


def case_shard_is_a_directory(d: Path) -> Case:
    shard, _ = _some_shard(d)
    shard.unlink()
    shard.mkdir()
    return shard.name, None, "shard is a directory, not a regular file"


def case_shard_dangling_symlink(d: Path) -> Case:
    shard, _ = _some_shard(d)
    shard.unlink()
    shard.symlink_to(d / "gone.safetensors")
    return shard.name, None, "shard is a dangling symlink to"


def case_config_symlink_to_dev_zero(d: Path) -> Case:
    (d / "config.json").unlink()
    (d / "config.json").symlink_to("/dev/zero")
    return "config.json", None, "config.json is a character device (symlink to '/dev/zero'), not a regular file"


def case_single_file_is_a_fifo(d: Path) -> Case:
    os.mkfifo(d / "model.safetensors")
    return "model.safetensors", None, "model.safetensors is a FIFO (named pipe), not a regular file"


CASES = {name[len("case_") :]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}


def test_malformed_case_count():
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_checkpoint_is_refused(llama_copy, case):
    file, tensor, fragment = CASES[case](llama_copy)
    with pytest.raises(CheckpointError) as info:
        CheckpointReader(llama_copy)
    err, message = info.value, str(info.value)
    assert isinstance(err, ValueError) and "\n" not in message
    assert err.file is not None and err.file.name == file and file in message, message
    assert err.tensor == tensor and (tensor is None or repr(tensor) in message), message
    assert fragment in message, message


def test_valid_copy_is_accepted(llama_copy):
    """The corruption cases start from a checkpoint that is itself valid."""
    r = CheckpointReader(llama_copy)
    assert len(r.files) >= 5 and r.bytes_read == 0


def test_header_validation_reads_no_tensor_data(llama_copy):
    shard = _multi_tensor_shard(llama_copy)
    header, data = _load_shard(shard)
    name = _tensors_by_offset(header)[0]
    header[name]["dtype"] = "F99"
    _write_shard(shard, header, data)
    if HAS_PROC_IO:
        before = _rchar()
    with pytest.raises(CheckpointError, match="F99"):
        read_safetensors_header(shard)
    if HAS_PROC_IO:
        assert _rchar() - before <= 8 + len(json.dumps(header)) + 1024 < len(data)


def test_header_of_a_device_is_refused_without_reading_it():
    with pytest.raises(CheckpointError, match="/dev/zero: is a character device, not a regular file"):
        read_safetensors_header("/dev/zero")


def test_pickle_refusal_says_how_to_convert(llama_copy):
    case_pickle_refused(llama_copy)
    with pytest.raises(CheckpointError) as info:
        CheckpointReader(llama_copy)
    msg = str(info.value)
    assert "only safetensors checkpoints are read" in msg and "save_pretrained" in msg and "allow_pickle" not in msg


# ------------------------------------------------------------------------------------------------------- digests


def test_digest_is_of_the_bytes_read(llama_copy):
    r = CheckpointReader(llama_copy)
    names = r.names_with_prefix("model.layers.1.")
    got = r.read(names, dtype=torch.float64)  # conversion after hashing: the digest is of the stored bytes
    read_bytes = r.bytes_read
    digests = r.tensor_digests(names)
    assert r.bytes_read == read_bytes  # already hashed while reading: nothing read again
    for name in names:
        info = r.info(name)
        with open(info.file, "rb") as f:
            f.seek(info.start)
            raw = f.read(info.nbytes)
        assert digests[name] == hashlib.sha256(raw).hexdigest()
        assert got[name].dtype == torch.float64
    fresh = CheckpointReader(llama_copy)
    assert fresh.digest(names) == r.digest(names)  # streamed instead of read: the same
    assert fresh.bytes_read == read_bytes and fresh.digest(reversed(names)) == r.digest(names)
    assert CheckpointReader(llama_copy, hash_reads=False).digest(names) == r.digest(names)
    assert r.digest(names) != r.digest(names[1:])


def test_mid_shard_change_is_seen_by_digest_not_by_fingerprint(llama_copy):
    """The issue-16 case: a block changed in the middle of a shard between an interrupted run and its resume."""
    r = CheckpointReader(llama_copy)
    names = r.names_with_prefix("model.layers.1.")
    stored = r.digest(names)
    per_tensor = {k: v[:16] for k, v in r.tensor_digests(names).items()}
    fingerprint = r.fingerprint(sample_bytes=16)
    victim = "model.layers.1.mlp.down_proj.weight"
    info = r.info(victim)
    with open(info.file, "r+b") as f:
        f.seek((info.start + info.end) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    r2 = CheckpointReader(llama_copy)
    assert r2.fingerprint(sample_bytes=16) == fingerprint  # the cheap run id misses it
    r2.verify_digest(
        r2.names_with_prefix("model.layers.0."), r.digest(r.names_with_prefix("model.layers.0.")), what="x"
    )
    with pytest.raises(SourceChangedError) as e:
        r2.verify_digest(names, stored, what="unit 'model.layers.1.'")
    assert "source tensors of unit 'model.layers.1.'" in str(e.value) and "changed since it was written" in str(e.value)
    assert isinstance(e.value, CheckpointError) and "\n" not in str(e.value)
    with pytest.raises(SourceChangedError) as e:
        r2.verify_digest(names, per_tensor, what="unit 'model.layers.1.'")
    assert e.value.tensor == victim and e.value.file == info.file
    again = pickle.loads(pickle.dumps(e.value))
    assert type(again) is SourceChangedError and str(again) == str(e.value)
    with pytest.raises(SourceChangedError, match="is no longer in the checkpoint"):
        r2.verify_digest(names[1:], per_tensor, what="unit 'model.layers.1.'")


def test_digests_of_a_pickle_checkpoint(tiny_ckpt, tmp_path):
    src = CheckpointReader(tiny_ckpt("llama"))
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(src.model_dir / "config.json", d)
    torch.save(src.read(src.names()), d / "pytorch_model.bin")
    r = CheckpointReader(d, allow_pickle=True)
    assert r.digest(r.names()) == src.digest(src.names())
    r.read(["model.norm.weight"])
    assert r.tensor_digests("model.norm.weight") == src.tensor_digests("model.norm.weight")
