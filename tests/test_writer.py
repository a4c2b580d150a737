"""Tests of sharding.writer.CheckpointWriter: round trips of tiny checkpoints, sharding, refusal rules, resume after
in-process failures and SIGKILL (byte-identical output), disk-full and permission errors."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open

import sharding.writer as writer_mod
from sharding.lock import LOCK_NAME
from sharding.writer import (
    INDEX_NAME,
    MANIFEST_NAME,
    MEASUREMENTS_NAME,
    CheckpointWriter,
    WriterError,
    parse_size,
    plan_shards,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = 20_000  # bytes: splits every tiny llama block over several shards
RUN_ID = "recipe-hash-0"
REST = "embeddings_norm_lm_head"


# ---- helpers (also imported by the SIGKILL subprocess) ------------------------------------------------------------


def source_units(src: str | Path) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """The tensors of a saved checkpoint grouped as the engine writes them: one unit per block prefix
    ``model.layers.{i}.``, then one for embeddings, final norm and lm_head."""
    src = Path(src)
    weight_map = json.loads((src / INDEX_NAME).read_text())["weight_map"]
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, file in sorted(weight_map.items()):
        m = re.match(r"model\.layers\.(\d+)\.", name)
        unit = f"model.layers.{int(m.group(1))}." if m else REST
        with safe_open(str(src / file), framework="pt") as f:
            groups.setdefault(unit, {})[name] = f.get_tensor(name)
    layers = sorted((u for u in groups if u != REST), key=lambda u: int(u.split(".")[2]))
    return [(u, groups[u]) for u in [*layers, REST]]


def unit_report(unit: str) -> dict:
    return {"unit": unit, "sparsity": {"planned": 0.5, "achieved": 0.49}, "kept": [3, 1, 2]}


def run_write(
    src: str | Path,
    out: str | Path,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    on_stop: Callable[[], None] | None = None,
    max_shard_size: int | str = SMALL,
) -> CheckpointWriter:
    """Write every unit of `src` into `out` (skipping committed ones), then finalize; call `on_stop` after unit
    `stop_after` (to simulate a crash)."""
    w = CheckpointWriter(out, max_shard_size=max_shard_size, resume=resume, run_id=RUN_ID)
    for i, (unit, tensors) in enumerate(source_units(src)):
        if not w.is_committed(unit):
            w.write_unit(unit, tensors, metadata=unit_report(unit))
        if i == stop_after and on_stop is not None:
            on_stop()
    config = json.loads((Path(src) / "config.json").read_text())
    extra = {"blockprune_recipe.yaml": "method: wanda\nsparsity: 0.5\n", "modeling_blockprune.py": b"# code\n"}
    w.finalize(config, source_dir=src, extra_files=extra)
    return w


def tree_hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


class Crash(Exception):
    pass


def crash() -> None:
    raise Crash("simulated crash")


@pytest.fixture(scope="module")
def llama_src(tiny_ckpt) -> Path:
    return tiny_ckpt("llama")


@pytest.fixture(scope="module")
def reference(llama_src, tmp_path_factory) -> dict[str, str]:
    """sha256 of every file of an uninterrupted write of the tiny llama."""
    out = tmp_path_factory.mktemp("reference") / "out"
    run_write(llama_src, out)
    return tree_hashes(out)


def manifest_of(d: Path) -> dict:
    return json.loads((d / MANIFEST_NAME).read_text())


# ---- round trips --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mixtral", "qwen3_moe"])
def test_round_trip_tensors_and_logits(arch, tiny_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_ckpt(arch)
    out = tmp_path / "out"
    w = run_write(src, out, max_shard_size="5GB")
    units = source_units(src)
    assert w.committed_units() == [u for u, _ in units]
    index = json.loads((out / INDEX_NAME).read_text())
    n = len(units)
    assert sorted(set(index["weight_map"].values())) == [
        f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
    ]
    assert (
        index["metadata"]["total_size"]
        == w.total_size
        == sum(t.numel() * t.element_size() for _, ts in units for t in ts.values())
    )
    for _, tensors in units:
        for name, t in tensors.items():
            with safe_open(str(out / index["weight_map"][name]), framework="pt") as f:
                got = f.get_tensor(name)
            assert got.dtype == t.dtype and torch.equal(got, t), name
    for name in ["config.json", "generation_config.json", "blockprune_recipe.yaml", "modeling_blockprune.py"]:
        assert (out / name).is_file(), name
    assert (out / "generation_config.json").read_bytes() == (Path(src) / "generation_config.json").read_bytes()
    ids = torch.arange(24).view(2, 12) % 128
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(src).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert torch.equal(got, want)


def test_dtypes_views_and_read_back(tmp_path):
    base = torch.randn(6, 8)
    tensors = {
        "a.bf16": torch.randn(5, 3).to(torch.bfloat16),
        "a.f16": torch.randn(7).to(torch.float16),
        "a.i8": torch.randint(-100, 100, (4, 4), dtype=torch.int8),
        "a.bool": torch.rand(9) > 0.5,
        "a.i64": torch.arange(5),
        "a.scalar": torch.tensor(3.5, dtype=torch.float64),
        "a.empty": torch.empty(0, 4),
        "a.transposed": base.t(),  # non-contiguous view
        "a.row": base[2],  # shares storage with `base` and the view above
    }
    w = CheckpointWriter(tmp_path / "out", max_shard_size=64)
    w.write_unit("u", tensors, metadata={"k": (1, 2)})
    got = w.read_unit("u")
    assert list(got) == sorted(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name
    assert w.unit_metadata("u") == {"k": [1, 2]}  # JSON round trip
    w.write_unit("removed_block", {}, metadata={"removed": True})  # no tensors: commits with no shards
    assert w.read_unit("removed_block") == {} and w.unit_metadata("removed_block") == {"removed": True}
    units = manifest_of(tmp_path / "out")["units"]
    assert [len(u["shards"]) for u in units][1] == 0 and len(units[0]["shards"]) > 1
    assert w.bytes_written == sum(s["size"] for s in units[0]["shards"])


# ---- sharding -------------------------------------------------------------------------------------------------


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("20KB") == 20_000
    assert parse_size("1GiB") == 2**30
    assert parse_size("512mib") == 512 * 2**20
    assert parse_size(1234) == 1234
    for bad in ["five GB", "-1", 0, "10XB"]:
        with pytest.raises(WriterError, match="max_shard_size"):
            parse_size(bad)


def test_plan_shards_greedy():
    sizes = [("a", 4), ("b", 4), ("c", 3), ("d", 20), ("e", 1)]
    assert plan_shards(sizes, 10) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert plan_shards([], 10) == []


def test_multiple_shards_and_unit_split(llama_src, tmp_path):
    out = tmp_path / "out"
    w = run_write(llama_src, out, max_shard_size=SMALL)
    units = source_units(llama_src)
    manifest = manifest_of(out)
    index = json.loads((out / INDEX_NAME).read_text())
    files = [f for _, f in manifest["finalize"]["renames"]]
    n = len(files)
    assert n > len(units) and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert (
        index["metadata"]["total_size"]
        == w.total_size
        == sum(t.numel() * t.element_size() for _, ts in units for t in ts.values())
    )
    file_unit: dict[str, str] = {}
    for u in manifest["units"]:
        assert len(u["shards"]) >= 2, f"unit {u['name']} should split at {SMALL} bytes"
        for s in u["shards"]:
            assert s["tensor_bytes"] <= SMALL or len(s["tensors"]) == 1
            for t in s["tensors"]:
                file_unit.setdefault(index["weight_map"][t], u["name"])
                assert file_unit[index["weight_map"][t]] == u["name"], "a shard holds two units"
    # files are numbered in unit commit order
    assert list(dict.fromkeys(file_unit[f] for f in files)) == [u for u, _ in units]
    with safe_open(str(out / files[0]), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


# ---- refusal rules --------------------------------------------------------------------------------------------


def test_refuses_non_empty_output_and_overwrite_clears_only_ours(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "old.txt").write_text("x")
    with pytest.raises(WriterError, match=r"not empty.*not a blockprune output"):
        CheckpointWriter(out)
    with pytest.raises(WriterError, match=f"holds no {MANIFEST_NAME}"):
        CheckpointWriter(out, resume=True)
    with pytest.raises(WriterError, match="refusing to overwrite .*not a blockprune output; nothing was removed"):
        CheckpointWriter(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt", "sub"]
    (out / "old.txt").unlink()
    (out / "sub").rmdir()
    CheckpointWriter(out).close()
    with pytest.raises(WriterError, match="not empty"):  # a manifest alone still needs resume or overwrite
        CheckpointWriter(out)
    CheckpointWriter(out, overwrite=True).close()
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME]


def test_resume_on_missing_dir_or_temporaries_is_a_new_run(tmp_path):
    w = CheckpointWriter(tmp_path / "a" / "b", resume=True, run_id=RUN_ID)
    assert w.committed_units() == []
    out = tmp_path / "c"
    out.mkdir()
    (out / (MANIFEST_NAME + ".tmp")).write_text("{")  # killed while writing the very first manifest
    CheckpointWriter(out, resume=True, run_id=RUN_ID)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME]


def test_resume_refuses_other_run_id_unless_overwrite(llama_src, tmp_path):
    out = tmp_path / "out"
    units = source_units(llama_src)
    CheckpointWriter(out, run_id="a").write_unit(*units[0])
    with pytest.raises(WriterError, match="different recipe or input checkpoint.*new output or overwrite"):
        CheckpointWriter(out, resume=True, run_id="b")
    w = CheckpointWriter(out, resume=True, overwrite=True, run_id="b")
    assert w.committed_units() == [] and manifest_of(out)["run_id"] == "b"


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("finalized", [False, True])
def test_resume_refuses_damaged_shard(llama_src, tmp_path, damage, finalized):
    out = tmp_path / "out"
    if finalized:
        run_write(llama_src, out)
        victim = out / manifest_of(out)["finalize"]["renames"][1][1]
    else:
        w = CheckpointWriter(out, max_shard_size=SMALL, run_id=RUN_ID)
        for unit, tensors in source_units(llama_src)[:2]:
            w.write_unit(unit, tensors)
        victim = out / manifest_of(out)["units"][0]["shards"][1]["file"]
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(bytes(data[:-10]))
    else:
        victim.unlink()
    want = {"flip": "sha256", "truncate": "bytes", "delete": "missing"}[damage]
    with pytest.raises(WriterError, match=rf"committed shard .*{re.escape(victim.name)}.*{want}"):
        CheckpointWriter(out, resume=True, run_id=RUN_ID)


def test_invalid_writes_are_refused(llama_src, tmp_path):
    units = source_units(llama_src)
    w = CheckpointWriter(tmp_path / "out", run_id=RUN_ID)
    with pytest.raises(WriterError, match="nothing to finalize"):
        w.finalize({})
    w.write_unit(*units[0])
    with pytest.raises(WriterError, match="already committed"):
        w.write_unit(*units[0])
    name = next(iter(units[0][1]))
    with pytest.raises(WriterError, match=rf"tensor '{re.escape(name)}' was already written by unit"):
        w.write_unit("other", {name: torch.zeros(1)})
    with pytest.raises(WriterError, match="no dense data"):
        w.write_unit("other", {"x": torch.empty(2, device="meta")})
    with pytest.raises(WriterError, match="not a torch.Tensor"):
        w.write_unit("other", {"x": [1.0]})
    with pytest.raises(WriterError, match="not JSON-serialisable"):
        w.write_unit("other", {"x": torch.zeros(1)}, metadata={"t": torch.zeros(1)})
    with pytest.raises(WriterError, match="not committed"):
        w.read_unit("other")
    with pytest.raises(WriterError, match="config for .*config.json is not JSON-serialisable"):
        w.finalize({"dtype": torch.float32})
    with pytest.raises(WriterError, match="extra file name '../x'"):
        w.finalize({}, extra_files={"../x": "y"})
    with pytest.raises(WriterError, match="extra file name 'config.json'"):
        w.finalize({}, extra_files={"config.json": "y"})
    assert w.committed_units() == [units[0][0]]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [MANIFEST_NAME, LOCK_NAME] + [s["file"] for s in manifest_of(tmp_path / "out")["units"][0]["shards"]]
    )
    w.finalize({"model_type": "llama"})
    assert not (tmp_path / "out" / LOCK_NAME).exists()  # finalize releases the lock
    assert (tmp_path / "out" / "model.safetensors").is_file()  # one shard: the unsharded name
    assert json.loads((tmp_path / "out" / INDEX_NAME).read_text())["weight_map"][name] == "model.safetensors"
    with pytest.raises(WriterError, match="finalized"):
        w.write_unit(*units[1])


def test_finalize_copies_source_files_only_listed(llama_src, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ["tokenizer.json", "chat_template.jinja", "merges.txt", "notes.txt", "model.safetensors"]:
        (src / name).write_text(f"content of {name}")
    out = tmp_path / "out"
    w = CheckpointWriter(out)
    w.write_unit(*source_units(llama_src)[0])
    w.finalize({"b": 1, "a": 2}, source_dir=src, extra_files={"merges.txt": "override", "x.bin": b"\x00\x01"})
    assert (out / "tokenizer.json").read_text() == "content of tokenizer.json"
    assert (out / "chat_template.jinja").read_text() == "content of chat_template.jinja"
    assert (out / "merges.txt").read_text() == "override"
    assert (out / "x.bin").read_bytes() == b"\x00\x01"
    assert not (out / "notes.txt").exists()
    assert (out / "model.safetensors").read_bytes() != (src / "model.safetensors").read_bytes()
    assert json.loads((out / "config.json").read_text()) == {"a": 2, "b": 1}
    assert manifest_of(out)["finalized"] is True
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# ---- interruption and resume ----------------------------------------------------------------------------------


def test_in_process_crash_then_resume_is_byte_identical(llama_src, reference, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Crash):
        run_write(llama_src, out, stop_after=1, on_stop=crash)
    committed = [u["name"] for u in manifest_of(out)["units"]]
    assert committed == ["model.layers.0.", "model.layers.1."]
    # what a kill in the middle of the next unit leaves behind
    (out / "blockprune-part-00002-000.safetensors").write_bytes(b"partial")
    (out / "blockprune-part-00002-001.safetensors.tmp").write_bytes(b"partial")
    (out / ".tmpAbC123").write_bytes(b"partial")
    w = CheckpointWriter(out, max_shard_size=SMALL, resume=True, run_id=RUN_ID)
    assert w.committed_units() == committed and w.is_committed("model.layers.1.")
    assert not (out / "blockprune-part-00002-000.safetensors").exists()
    assert not (out / ".tmpAbC123").exists()
    assert w.unit_metadata("model.layers.1.") == unit_report("model.layers.1.")
    src_units = dict(source_units(llama_src))
    got = w.read_unit("model.layers.0.")
    assert all(torch.equal(got[k], v) for k, v in src_units["model.layers.0."].items())
    w2 = run_write(llama_src, out, resume=True)
    assert w2.bytes_written < sum(s["size"] for u in manifest_of(out)["units"] for s in u["shards"])
    assert tree_hashes(out) == reference


_KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from tests.test_writer import run_write

mode, src, out, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if mode == "finalize":  # die right after the k-th shard rename
    real_replace, count = os.replace, [0]
    def replace(a, b):
        real_replace(a, b)
        if Path(b).name.startswith("model-"):
            count[0] += 1
            if count[0] == k:
                die()
    os.replace = replace
    run_write(src, out)
else:
    run_write(src, out, stop_after=k, on_stop=die)
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode,k", [("unit", 1), ("finalize", 3)])
def test_sigkill_then_resume_is_byte_identical(llama_src, reference, tmp_path, mode, k):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, mode, str(llama_src), str(out), str(k)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (out / INDEX_NAME).exists()
    manifest = manifest_of(out)
    if mode == "finalize":
        renamed = [p.name for p in out.iterdir() if p.name.startswith("model-")]
        assert len(renamed) == k and manifest["finalize"] is not None and not manifest["finalized"]
    else:
        assert len(manifest["units"]) == k + 1
    run_write(llama_src, out, resume=True)
    assert tree_hashes(out) == reference


# ---- disk full and permissions --------------------------------------------------------------------------------


def _fail_save_file(exc: BaseException):
    """A save_file that writes part of the shard and then fails like the real one on a full disk."""
    real = writer_mod.save_file

    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise exc

    return save_file


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


_RUST_ENOSPC = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28) at path x")


@pytest.mark.parametrize("where", ["save_file_rust", "save_file_oserror", "fsync", "manifest_write"])
def test_disk_full_keeps_committed_units_and_resumes(llama_src, reference, tmp_path, monkeypatch, where):
    out = tmp_path / "out"
    units = source_units(llama_src)
    w = CheckpointWriter(out, max_shard_size=SMALL, run_id=RUN_ID)
    w.write_unit(*units[0], metadata=unit_report(units[0][0]))
    before = tree_hashes(out)
    with monkeypatch.context() as m:
        if where == "save_file_rust":
            m.setattr(writer_mod, "save_file", _fail_save_file(_RUST_ENOSPC))
        elif where == "save_file_oserror":
            m.setattr(writer_mod, "save_file", _fail_save_file(OSError(errno.ENOSPC, "No space left on device")))
        elif where == "fsync":
            m.setattr(os, "fsync", _enospc)
        else:
            m.setattr(os, "write", _enospc)
        with pytest.raises(WriterError) as info:
            w.write_unit(*units[1], metadata=unit_report(units[1][0]))
    msg = str(info.value)
    assert msg == f"disk full while writing unit 'model.layers.1.' to {out}: No space left on device"
    assert tree_hashes(out) == before  # committed shards and manifest untouched, no leftovers
    assert w.committed_units() == ["model.layers.0."]
    run_write(llama_src, out, resume=True)
    assert tree_hashes(out) == reference


def test_permission_error_is_reported(llama_src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    units = source_units(llama_src)
    w = CheckpointWriter(out, run_id=RUN_ID)
    w.write_unit(*units[0])
    monkeypatch.setattr(writer_mod, "save_file", _fail_save_file(PermissionError(errno.EACCES, "Permission denied")))
    with pytest.raises(
        WriterError,
        match=r"^permission denied while writing unit 'model.layers.1.' to .*: "
        r"Permission denied$",
    ):
        w.write_unit(*units[1])
    assert w.committed_units() == ["model.layers.0."]


def test_read_only_output_dir(llama_src, tmp_path):
    out = tmp_path / "out"
    units = source_units(llama_src)
    w = CheckpointWriter(out, run_id=RUN_ID)
    w.write_unit(*units[0])
    before = tree_hashes(out)
    out.chmod(0o555)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("running as root: a read-only mode does not stop writes")
        with pytest.raises(WriterError, match="permission denied while writing unit 'model.layers.1.'"):
            w.write_unit(*units[1])
    finally:
        out.chmod(0o755)
    assert tree_hashes(out) == before
    CheckpointWriter(out, resume=True, run_id=RUN_ID).write_unit(*units[1])


# ---- determinism: the manifest holds no measurements -------------------------------------------------------------


def test_manifest_is_deterministic_and_measurements_live_beside_it(llama_src, tmp_path, caplog):
    """Two uninterrupted runs whose timings differ: every file is byte-identical except the measurements file."""
    outs = [tmp_path / "a", tmp_path / "b"]
    for out, seconds in zip(outs, (1.25, 7.5)):
        with CheckpointWriter(out, run_id=RUN_ID) as w:
            for unit, tensors in source_units(llama_src)[:2]:
                w.write_unit(unit, tensors, metadata=unit_report(unit), measurements={"time_s": seconds})
            w.finalize({"model_type": "llama"})
    a, b = tree_hashes(outs[0]), tree_hashes(outs[1])
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == [MEASUREMENTS_NAME]
    assert "time_s" not in (outs[0] / MANIFEST_NAME).read_text()
    with CheckpointWriter(outs[0], resume=True, run_id=RUN_ID) as w:
        assert w.unit_measurements("model.layers.0.") == {"time_s": 1.25}
        assert w.unit_metadata("model.layers.0.") == unit_report("model.layers.0.")
    with CheckpointWriter(tmp_path / "c") as w, pytest.raises(WriterError, match="measurements is not JSON-ser"):
        w.write_unit("x", {}, measurements={"t": object()})
    (outs[0] / MEASUREMENTS_NAME).write_text("{")  # lost measurements never block a resume
    with caplog.at_level("WARNING"), CheckpointWriter(outs[0], resume=True, run_id=RUN_ID) as w:
        assert w.unit_measurements("model.layers.0.") == {}
    assert "ignoring unreadable" in caplog.text
