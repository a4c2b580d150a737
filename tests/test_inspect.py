"""`blockprune inspect`: per-layer shapes and sparsity, shard hashes against the writer's manifest, the CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import config_from_dict
from engine.pipeline import run
from engine.report.inspect_ckpt import count_nonzero, format_inspection, inspect_checkpoint
from sharding.errors import CheckpointError
from sharding.reader import CheckpointReader
from tests.tiny_models import recipe, tiny_text

REPO = Path(__file__).resolve().parents[1]
BLOCKS = ["model.layers.0", "model.layers.1", "model.layers.2"]


@pytest.fixture(scope="module")
def pruned(tiny_ckpt, tmp_path_factory) -> Path:
    """Wanda 50% of the tiny llama: a finalized pipeline output with its manifest."""
    d = tmp_path_factory.mktemp("inspect")
    calib = d / "calib.txt"
    calib.write_text(tiny_text(3000, seed=0))
    run(config_from_dict(recipe(tiny_ckpt("llama"), d / "out", calib, [{"method": "wanda", "sparsity": 0.5}])))
    return d / "out"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _flip_last_byte(path: Path) -> None:
    """Change one byte of the data section (the last byte of the last tensor): the header stays valid."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch", *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=300
    )


# ------------------------------------------------------------------------------------------ layers


def test_pruned_output_layers_sparsity_and_hashes(pruned):
    info = inspect_checkpoint(pruned)
    report = json.loads((pruned / "blockprune_report.json").read_text())
    assert info["ok"] is True and info["model_type"] == "llama" and info["arch_supported"]
    assert [x["name"] for x in info["layers"]] == [*BLOCKS, "other"]
    for layer, block in zip(info["layers"], report["blocks"]):
        assert layer["linear_sparsity"] == pytest.approx(0.5, abs=0.01), layer["name"]
        assert (layer["params"], layer["nonzero"]) == (block["params"], block["nonzero"])  # the engine's own count
        for t in layer["tensors"]:
            if len(t["shape"]) == 2:
                linear = t["name"].removeprefix(layer["prefix"]).removesuffix(".weight")
                assert t["sparsity"] == pytest.approx(block["linears"][linear]["sparsity"])
    other = info["layers"][-1]
    assert other["sparsity"] == 0.0 and {t["name"] for t in other["tensors"]} >= {"model.embed_tokens.weight"}
    reader = CheckpointReader(pruned)
    assert info["totals"]["params"] == report["total_params"]
    assert info["totals"]["bytes"] == reader.total_bytes and info["totals"]["tensors"] == len(reader)
    shapes = {t["name"]: (t["shape"], t["dtype"]) for x in info["layers"] for t in x["tensors"]}
    assert shapes == {n: (list(reader.info(n).shape), reader.info(n).dtype) for n in reader.names()}
    v = info["verification"]
    assert v["manifest"] is True and v["problems"] == []
    assert [f["file"] for f in v["files"]] == info["files"] and len(v["files"]) == len(reader.files)
    for f in v["files"]:
        assert f["status"] == "ok" and f["sha256"] == f["expected_sha256"]
        assert f["sha256"] == hashlib.sha256((pruned / f["file"]).read_bytes()).hexdigest()


def test_source_without_manifest_reports_hashes(tiny_ckpt):
    src = tiny_ckpt("llama")
    info = inspect_checkpoint(src)
    assert info["ok"] is True and info["verification"]["manifest"] is False
    for f in info["verification"]["files"]:
        assert f["status"] == "unverified" and f["expected_sha256"] is None
        assert f["sha256"] == hashlib.sha256((src / f["file"]).read_bytes()).hexdigest()
    assert all(x["linear_sparsity"] == 0.0 for x in info["layers"])  # dense random weights
    text = format_inspection(info)
    assert "no blockprune_manifest.json" in text and info["verification"]["files"][0]["sha256"] in text


def test_no_verify_skips_hashing(pruned):
    info = inspect_checkpoint(pruned, verify=False)
    assert info["verification"] is None and info["ok"] is True
    assert "verify: skipped" in format_inspection(info)


def test_unsupported_arch_groups_by_layer_name(tiny_ckpt, tmp_path):
    src = tiny_ckpt("llama")
    model = tmp_path / "gpt2ish"
    model.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (model / f.name).symlink_to(f)
    config = json.loads((src / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "not_a_model"}))
    info = inspect_checkpoint(model, verify=False)
    assert info["arch_supported"] is False and info["model_type"] == "not_a_model"
    assert [x["name"] for x in info["layers"]] == [*BLOCKS, "other"]


def test_format_table_one_line_per_layer(pruned, tiny_ckpt):
    text = format_inspection(inspect_checkpoint(pruned))
    lines = text.splitlines()
    for name in [*BLOCKS, "other", "total"]:
        (line,) = [ln for ln in lines if ln.split()[:1] == [name]]
        if name in BLOCKS:
            assert "0.5000" in line and "self_attn.{k_proj,v_proj} 32x64" in line and "mlp.down_proj 64x96" in line
    assert "verify: OK, 4 shard(s) match" in text
    moe = format_inspection(inspect_checkpoint(tiny_ckpt("mixtral"), verify=False))
    assert "block_sparse_moe.experts.*.{w1,w3} 96x64 ×4" in moe and "block_sparse_moe.gate 4x64" in moe


# ------------------------------------------------------------------------------------------ verification


def test_tampered_shard_fails_and_is_named(pruned, tmp_path):
    bad = _copy(pruned, tmp_path / "bad")
    shard = "model-00002-of-00004.safetensors"
    _flip_last_byte(bad / shard)
    info = inspect_checkpoint(bad)
    assert info["ok"] is False
    status = {f["file"]: f["status"] for f in info["verification"]["files"]}
    assert status.pop(shard) == "mismatch" and set(status.values()) == {"ok"}
    (problem,) = info["verification"]["problems"]
    assert problem.startswith(f"{shard}: sha256")
    assert f"verify: FAILED (1 problem(s))\n  {shard}: sha256" in format_inspection(info)


def test_manifest_disagreements_fail(pruned, tmp_path):
    bad = _copy(pruned, tmp_path / "bad")
    manifest = json.loads((bad / "blockprune_manifest.json").read_text())
    manifest["units"][-1]["shards"][0]["size"] += 1  # the last unit's shard: model-00004-of-00004
    manifest["units"].pop(1)  # model-00002-of-00004 no longer recorded
    (bad / "blockprune_manifest.json").write_text(json.dumps(manifest))
    info = inspect_checkpoint(bad)
    assert info["ok"] is False
    status = {f["file"]: f["status"] for f in info["verification"]["files"]}
    assert status == {
        "model-00001-of-00004.safetensors": "ok",
        "model-00002-of-00004.safetensors": "unrecorded",
        "model-00003-of-00004.safetensors": "ok",
        "model-00004-of-00004.safetensors": "mismatch",
    }
    (bad / "blockprune_manifest.json").write_text("{not json")
    info = inspect_checkpoint(bad)
    assert info["ok"] is False and "blockprune_manifest.json: unreadable" in info["verification"]["problems"][0]


def _bump_total_size(model: Path) -> None:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["metadata"]["total_size"] += 4
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


def test_index_total_size_problem_for_ours_note_for_others(pruned, tiny_ckpt, tmp_path):
    ours = _copy(pruned, tmp_path / "ours")
    _bump_total_size(ours)
    info = inspect_checkpoint(ours)
    assert info["ok"] is False and "total_size" in info["verification"]["problems"][0]
    other = _copy(tiny_ckpt("llama"), tmp_path / "other")
    _bump_total_size(other)
    info = inspect_checkpoint(other)
    assert info["ok"] is True and "total_size" in info["verification"]["notes"][0]
    assert "note: model.safetensors.index.json: total_size" in format_inspection(info)


def test_malformed_checkpoint_raises(pruned, tmp_path):
    bad = _copy(pruned, tmp_path / "bad")
    shard = bad / "model-00003-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])  # truncated: the last tensor runs past the end
    with pytest.raises(CheckpointError, match="model-00003-of-00004.safetensors"):
        inspect_checkpoint(bad)


def test_count_nonzero_every_dtype():
    values = torch.tensor([0.0, -0.0, 1.0, 2.0, 0.0, 3.0])
    for dtype in (
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.int8,
        torch.uint8,
        torch.int64,
        torch.uint16,
        torch.uint32,
        torch.uint64,
        torch.bool,
    ):
        src = values if dtype.is_floating_point else values.abs()  # -0.0 only exists in floats
        assert count_nonzero(src.to(dtype)) == 3, dtype


# ------------------------------------------------------------------------------------------ CLI


def test_cli_inspect_prints_the_table(pruned):
    """`python -m launch inspect PATH`: exit 0 and the table on stdout."""
    p = _cli("inspect", pruned)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "sparsity" in p.stdout and "verify: OK" in p.stdout
    assert all(any(ln.startswith(name) for ln in p.stdout.splitlines()) for name in BLOCKS)


def test_cli_inspect_tampered_exit_1_malformed_exit_2(pruned, tmp_path, capsys):
    """The same entry point in-process (launch.cli.main), saving two interpreter starts."""
    from launch.cli import main

    tampered = _copy(pruned, tmp_path / "tampered")
    _flip_last_byte(tampered / "model-00001-of-00004.safetensors")
    assert main(["inspect", str(tampered), "--json"]) == 1
    out = capsys.readouterr().out
    assert json.loads(out)["verification"]["problems"][0].startswith("model-00001-of-00004.safetensors")

    broken = _copy(pruned, tmp_path / "broken")
    (broken / "model-00004-of-00004.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{]}xx")
    assert main(["inspect", str(broken)]) == 2
    captured = capsys.readouterr()
    errors = [ln for ln in captured.err.splitlines() if ln.startswith("blockprune: error")]
    assert len(errors) == 1 and "model-00004-of-00004.safetensors" in errors[0] and "JSON" in errors[0], captured.err
    assert "Traceback" not in captured.err and captured.out == ""
