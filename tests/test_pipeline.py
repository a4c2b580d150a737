"""The block loop end to end on tiny random models of every architecture."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from engine.config import ConfigError, config_from_dict
from engine.pipeline import run
from tests.tiny_models import ARCHS, MOE_ARCHS, peak_rss_by_depth, recipe, run_killed_before

REPO = Path(__file__).resolve().parents[1]


def all_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            for n in fh.keys():  # noqa: SIM118 (safe_open is not iterable)
                out[n] = fh.get_tensor(n)
    return out


def logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_sparsity_is_byte_identical(arch, tiny_ckpt, calib_file, tmp_path):
    src = tiny_ckpt(arch)
    out = tmp_path / "out"
    method = "sparsegpt" if arch in ("llama", "mixtral") else "magnitude"
    report = run(config_from_dict(recipe(src, out, calib_file, [{"method": method, "sparsity": 0.0}])))
    a, b = all_tensors(src), all_tensors(out)
    assert sorted(a) == sorted(b)
    for n in a:
        assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), n
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(src, ids), logits(out, ids))
    assert (out / "blockprune_recipe.yaml").is_file() and (out / "tokenizer.json").is_file()
    rep = json.loads((out / "blockprune_report.json").read_text())
    assert len(rep["blocks"]) == report["num_layers"] == 3


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "admm"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_half_sparsity_every_linear(method, pattern, tiny_ckpt, calib_file, tmp_path):
    src = tiny_ckpt("llama")
    out = tmp_path / "out"
    stage = {"method": method, "sparsity": 0.5, "pattern": pattern}
    if method == "admm":
        stage.update(iterations=8, schedule_iterations=6)
    report = run(config_from_dict(recipe(src, out, calib_file, [stage])))
    t = all_tensors(out)
    for name, W in t.items():
        if not name.endswith("proj.weight"):
            assert torch.equal(W, all_tensors(src)[name]) if "layers" not in name else True
            continue
        assert abs(float((W == 0).float().mean()) - 0.5) < 0.01, name
        if pattern == "2:4" or method == "wanda":
            rows = (W == 0).float().mean(dim=1)
            assert torch.allclose(rows, torch.full_like(rows, 0.5)), f"{name}: per-row sparsity"
        if pattern == "2:4":
            groups = (W != 0).reshape(W.shape[0], -1, 4).sum(-1)
            assert torch.all(groups == 2), name
    assert report["pruned_linear_sparsity"] == pytest.approx(0.5, abs=0.01)
    for b in report["blocks"]:
        assert b["output_error"] is not None and b["output_error"] > 0
        if method in ("sparsegpt", "admm"):  # Gram solvers record each linear's reconstruction error
            assert all(0 < rec["error"] < 1 for rec in b["linears"].values()), b["linears"]
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(logits(out, ids)).all()


@pytest.mark.parametrize(
    "arch,extra,options",
    [
        ("llama", {"allocation": {"rule": "owl"}}, {}),  # per-layer sparsities from the global rule
        ("llama", {"reconstruct": {"steps": 2}}, {}),  # the two-forward path with block reconstruction
        ("llama", {}, {"sequential": False}),
        ("mixtral", {}, {}),  # experts: one task per expert input
    ],
)
def test_admm_runs_on_every_path(arch, extra, options, tiny_ckpt, calib_file, tmp_path):
    """`{method: admm}` through the real loop: one-pass (the engine lets the solver take the Gram), allocation,
    reconstruction, non-sequential and MoE blocks; the written zeros match the plan."""
    src = tiny_ckpt(arch)
    stage = {"method": "admm", "sparsity": 0.5, "iterations": 6, "schedule_iterations": 4, **extra}
    rep = run(config_from_dict(recipe(src, tmp_path / "out", calib_file, [stage], **options)))
    assert rep["pruned_linear_sparsity"] == pytest.approx(0.5, abs=0.02)
    files = all_tensors(tmp_path / "out")
    for b in rep["blocks"]:
        if options.get("sequential", True):  # sequential: false never runs the pruned block
            assert b["output_error"] is not None and b["output_error"] > 0
        matched = 0
        for lin, rec in b["linears"].items():
            assert rec["error"] >= 0 and rec["sparsity"] == pytest.approx(rec["planned"], abs=0.02), (b["block"], lin)
            W = files.get(f"model.layers.{b['output_block']}.{lin}.weight")  # experts are stored fused
            if W is not None:
                assert int((W == 0).sum()) == rec["zeros"], (b["block"], lin)
                matched += 1
        assert matched >= 4  # attention linears at least


def test_block_error_orders_solvers(tiny_ckpt, calib_file, tmp_path):
    """Block output error after pruning: SparseGPT <= Wanda <= magnitude (summed over blocks)."""
    src = tiny_ckpt("llama")
    errs = {}
    for m in ("magnitude", "wanda", "sparsegpt"):
        rep = run(config_from_dict(recipe(src, tmp_path / m, calib_file, [{"method": m, "sparsity": 0.5}])))
        errs[m] = sum(b["output_error"] for b in rep["blocks"])
    assert errs["sparsegpt"] <= errs["wanda"] <= errs["magnitude"], errs


def test_targets_ignore_and_sequential(tiny_ckpt, calib_file, tmp_path):
    src = tiny_ckpt("qwen3")
    stage = {"method": "wanda", "sparsity": 0.5, "ignore": ["mlp.*"]}
    run(config_from_dict(recipe(src, tmp_path / "a", calib_file, [stage])))
    a, s = all_tensors(tmp_path / "a"), all_tensors(src)
    for n in a:
        if ".mlp." in n:
            assert torch.equal(a[n], s[n]), n
        elif n.endswith("q_proj.weight"):
            assert float((a[n] == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    run(config_from_dict(recipe(src, tmp_path / "b", calib_file, [stage], sequential=False)))
    b = all_tensors(tmp_path / "b")
    # block 0 sees the same inputs either way; later blocks see dense inputs when sequential is off
    q0 = "model.layers.0.self_attn.q_proj.weight"
    q2 = "model.layers.2.self_attn.q_proj.weight"
    torch.testing.assert_close(a[q0], b[q0], rtol=1e-5, atol=1e-7)  # two code paths: equal up to rounding
    assert float(((a[q0] == 0) == (b[q0] == 0)).double().mean()) >= 0.999
    assert not torch.allclose(a[q2], b[q2], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_experts_pruned(arch, tiny_ckpt, calib_file, tmp_path):
    src = tiny_ckpt(arch)
    out = tmp_path / "out"
    rep = run(config_from_dict(recipe(src, out, calib_file, [{"method": "sparsegpt", "sparsity": 0.5}])))
    t = all_tensors(out)
    experts = [n for n in t if ".experts." in n and n.endswith("weight")]
    assert experts
    for n in experts:
        assert float((t[n] == 0).float().mean()) == pytest.approx(0.5, abs=0.02), n
    assert all(b["output_error"] < 1.0 for b in rep["blocks"])
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(logits(out, ids)).all()


def test_bf16_runtime(tiny_ckpt, calib_file, tmp_path):
    src = tiny_ckpt("llama")
    r = recipe(src, tmp_path / "o", calib_file, [{"method": "sparsegpt", "sparsity": 0.5}])
    r["runtime"]["dtype"] = "bfloat16"
    rep = run(config_from_dict(r))
    assert rep["dtype"] == "bfloat16"
    t = all_tensors(tmp_path / "o")
    assert t["model.layers.0.mlp.down_proj.weight"].dtype == torch.float32  # written in the source dtype


# ------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.update(bogus=1), "unknown key(s) bogus"),
        (lambda r: r["prune"][0].update(sparsity=1.0), "must be in [0, 1)"),
        (lambda r: r["prune"][0].update(pattern="4:2"), "0 < N < M"),
        (lambda r: r["prune"][0].update(pattern="two:four"), "expected 'unstructured' or 'N:M'"),
        (lambda r: r["prune"][0].update(method="obd"), "unknown; choose from"),
        (lambda r: r["prune"][0].update(colour="red"), "unknown key(s) colour"),
        (lambda r: r["runtime"].update(dtype="int8"), "runtime.dtype"),
        (lambda r: r["calibration"].pop("data"), "calibration.data is required"),
    ],
)
def test_config_errors(mutate, message, tmp_path):
    r = recipe(tmp_path / "m", tmp_path / "o", tmp_path / "c.txt", [{"method": "wanda", "sparsity": 0.5}])
    mutate(r)
    with pytest.raises(ConfigError) as e:
        config_from_dict(r)
    assert message in str(e.value)


def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch", *map(str, args)], capture_output=True, text=True, cwd=cwd or REPO, timeout=300
    )


@pytest.mark.slow
def test_cli_errors_are_one_line(tiny_ckpt, calib_file, tmp_path):
    src = tiny_ckpt("llama")
    cases = {
        "unsupported": ({"model_type": "gpt2"}, "unsupported"),
        "nm": ({"pattern": "3:7"}, "divisible by 7"),
        "exists": ({}, "not empty"),
    }
    for key, (change, needle) in cases.items():
        model = src
        if key == "unsupported":
            model = tmp_path / "gpt2"
            model.mkdir()
            for f in src.iterdir():
                (model / f.name).symlink_to(f)
            (model / "config.json").unlink()
            cfg = json.loads((src / "config.json").read_text())
            cfg.update(change)
            (model / "config.json").write_text(json.dumps(cfg))
        out = tmp_path / f"out_{key}"
        if key == "exists":
            out.mkdir()
            (out / "keep.txt").write_text("x")
        stage = {"method": "wanda", "sparsity": 0.5, **({k: v for k, v in change.items() if k == "pattern"})}
        rec = tmp_path / f"{key}.yaml"
        rec.write_text(yaml.safe_dump(recipe(model, out, calib_file, [stage])))
        p = _cli("run", rec)
        assert p.returncode == 2, (key, p.stderr[-2000:])
        err = [ln for ln in p.stderr.splitlines() if ln.startswith("blockprune: error")]
        assert len(err) == 1 and needle in err[0].lower(), (key, p.stderr[-2000:])
        assert "Traceback" not in p.stderr
        if key == "exists":
            assert sorted(x.name for x in out.iterdir()) == ["keep.txt"]


@pytest.mark.slow
def test_cli_run_with_overrides_and_plan(tiny_ckpt, calib_file, tmp_path):
    src = tiny_ckpt("mistral")
    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump(recipe(src, tmp_path / "out", calib_file, [{"method": "wanda", "sparsity": 0.5}])))
    p = _cli("plan", rec)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "estimated peak memory" in p.stdout and "tensor bytes read: 0" in p.stdout
    p = _cli("run", rec, "prune.0.sparsity=0.25", "calibration.samples=4")
    assert p.returncode == 0, p.stderr[-3000:]
    saved = yaml.safe_load((tmp_path / "out" / "blockprune_recipe.yaml").read_text())
    assert saved["prune"][0]["sparsity"] == 0.25 and saved["calibration"]["samples"] == 4
    rep = json.loads((tmp_path / "out" / "blockprune_report.json").read_text())
    assert rep["pruned_linear_sparsity"] == pytest.approx(0.25, abs=0.01)


def test_library_verb(tiny_ckpt, calib_file, tmp_path):
    import engine

    src = tiny_ckpt("qwen2")
    rep = engine.prune(
        src,
        {
            "output": str(tmp_path / "o"),
            "calibration": {"data": str(calib_file), "samples": 4, "seq_len": 16},
            "runtime": {"progress": False},
            "prune": [{"method": "magnitude", "sparsity": 0.3}],
        },
    )
    assert rep["pruned_linear_sparsity"] == pytest.approx(0.3, abs=0.01)


@pytest.mark.slow
def test_peak_rss_flat_in_depth(tmp_path, calib_file):
    """A 24-layer and a 4-layer llama of equal width (hidden 768), SparseGPT 50%: peak RSS ratio <= 1.15."""
    peaks = peak_rss_by_depth(
        tmp_path,
        calib_file,
        "llama",
        (4, 24),
        [{"method": "sparsegpt", "sparsity": 0.5}],
        hidden_size=768,
        intermediate_size=1024,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_shard_size="10MB",
    )
    ratio = peaks[24] / peaks[4]
    print(f"peak RSS 4 layers {peaks[4] / 1024:.0f} MB, 24 layers {peaks[24] / 1024:.0f} MB, ratio {ratio:.3f}")
    assert ratio <= 1.15, peaks


def test_resume_after_crash_is_byte_identical(tiny_ckpt, calib_file, tmp_path, monkeypatch):
    """A run that dies after two blocks, rerun with resume, equals an uninterrupted run byte for byte (shards,
    index, config); a resume with a changed recipe is refused."""
    from sharding.writer import WriterError

    src = tiny_ckpt("llama")
    stages = [{"method": "sparsegpt", "sparsity": 0.5}]
    run(config_from_dict(recipe(src, tmp_path / "full", calib_file, stages)))

    run_killed_before("block.00002", config_from_dict(recipe(src, tmp_path / "part", calib_file, stages)), monkeypatch)
    assert not (tmp_path / "part" / "model.safetensors.index.json").exists()

    changed = recipe(src, tmp_path / "part", calib_file, [{"method": "sparsegpt", "sparsity": 0.4}], resume=True)
    with pytest.raises(WriterError, match="different recipe"):
        run(config_from_dict(changed))
    rep = run(config_from_dict(recipe(src, tmp_path / "part", calib_file, stages, resume=True)))
    assert [b.get("resumed", False) for b in rep["blocks"]] == [True, True, False]
    for f in sorted((tmp_path / "full").iterdir()):
        if f.suffix in (".safetensors", ".json") and f.name not in (
            "blockprune_report.json",  # timings, `resumed` flags
            "blockprune_measurements.json",  # timings and memory readings: the only file two runs write differently
        ):
            assert f.read_bytes() == (tmp_path / "part" / f.name).read_bytes(), f.name  # the manifest included


def test_plan_with_structured_and_depth_stages(tiny_ckpt, calib_file, tmp_path):
    from engine.planning import format_plan, make_plan

    stages = [{"method": "structured", "target": 0.2}, {"method": "depth", "remove": 1, "by": "block"}]
    plan = make_plan(config_from_dict(recipe(tiny_ckpt("llama"), tmp_path / "o", calib_file, stages)))
    assert plan.bytes_read == 0 and len(plan.blocks) == 3
    assert all(b["gram_mb"] > 0 for b in plan.blocks)  # the o_proj / down_proj input Grams for reconstruction
    assert "estimated peak memory" in format_plan(plan)


def test_nonuniform_blockprune_output_is_refused_as_input(tiny_ckpt, calib_file, tmp_path):
    from engine.config import ConfigError

    first = tmp_path / "first"
    run(
        config_from_dict(
            recipe(tiny_ckpt("llama"), first, calib_file, [{"method": "depth", "remove": 1, "by": "sublayer"}])
        )
    )
    again = recipe(first, tmp_path / "again", calib_file, [{"method": "magnitude", "sparsity": 0.5}])
    with pytest.raises(ConfigError, match="non-uniform blockprune checkpoint"):
        run(config_from_dict(again))
