"""Silent wrong results (issue 16 item 5): an input that makes the achieved result differ from the recipe fails the
run with a message naming the culprit, before the block it concerns is committed — never a success whose report
disagrees with the files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import config_from_dict
from engine.pipeline import run
from engine.schema import PruningError
from engine.stages.unstructured import UnstructuredStage
from sharding.errors import BlockpruneError, CheckpointError
from tests.tiny_models import recipe


def _poisoned(src: Path, dst: Path, name: str, fill: float, index=(0, 0)) -> Path:
    """A copy of checkpoint `src` with one entry of tensor `name` set to `fill` (NaN / Inf)."""
    shutil.copytree(src, dst)
    index_map = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    shard = dst / index_map[name]
    tensors = load_file(shard)
    t = tensors[name].clone()
    t[index[: t.dim()]] = fill
    tensors[name] = t
    save_file(tensors, shard, metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    "name,fill",
    [
        ("model.embed_tokens.weight", float("nan")),  # one embedding row: every block's inputs at that token
        ("model.layers.1.input_layernorm.weight", float("nan")),  # one RMSNorm weight
        ("model.layers.0.mlp.down_proj.weight", float("inf")),
    ],
)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_non_finite_weights_fail_naming_the_tensor(name, fill, method, tiny_ckpt, calib_file, tmp_path):
    src = _poisoned(tiny_ckpt("llama"), tmp_path / "model", name, fill)
    cfg = config_from_dict(recipe(src, tmp_path / "out", calib_file, [{"method": method, "sparsity": 0.5}]))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        run(cfg)
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()  # never a finished output


def test_a_solver_that_prunes_less_than_planned_fails_before_the_commit(tiny_ckpt, calib_file, tmp_path, monkeypatch):
    """A block whose linears end with fewer zeros than planned (here: a solver that silently skips its work) is a
    PruningError naming the linear; the block is not written and the run does not report success."""
    real = UnstructuredStage._solve

    def lazy(self, group, Ws, st, s, consume):
        originals = [W.clone() for W in Ws]
        weights, errors = real(self, group, Ws, st, s, consume)
        return (originals if group[0].name == "mlp.down_proj" else weights), errors

    monkeypatch.setattr(UnstructuredStage, "_solve", lazy)
    cfg = config_from_dict(recipe(tiny_ckpt("llama"), tmp_path / "out", calib_file, [{"method": "wanda"}]))
    with pytest.raises(PruningError, match=r"mlp\.down_proj: 0 zeros .* the plan is 0\.5000"):
        run(cfg)
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    manifest = json.loads((tmp_path / "out" / "blockprune_manifest.json").read_text())
    assert [u["name"] for u in manifest["units"]] == ["non_block"]  # block 0 was never committed


def test_non_finite_dense_outputs_are_refused(tiny_ckpt, calib_file, tmp_path):
    """Huge (finite) weights that overflow the forward in float16 give inf activations: refused, naming the block."""
    src = tiny_ckpt("llama")
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    index_map = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.mlp.down_proj.weight"
    tensors = load_file(dst / index_map[name])
    tensors[name] = tensors[name] * 1e37
    save_file(tensors, dst / index_map[name], metadata={"format": "pt"})
    cfg = config_from_dict(recipe(dst, tmp_path / "out", calib_file, [{"method": "wanda"}]))
    with pytest.raises(BlockpruneError, match=r"block \d"):
        run(cfg)


def test_every_finished_block_meets_its_plan(tiny_ckpt, calib_file, tmp_path):
    """The positive side: a normal run's report agrees with its files linear by linear."""
    cfg = config_from_dict(recipe(tiny_ckpt("qwen3"), tmp_path / "out", calib_file, [{"method": "sparsegpt"}]))
    rep = run(cfg)
    files = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        files.update(load_file(f))
    for b in rep["blocks"]:
        for lin, rec in b["linears"].items():
            W = files[f"model.layers.{b['output_block']}.{lin}.weight"]
            assert int((W == 0).sum()) == rec["zeros"]
            assert rec["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert torch.isfinite(torch.tensor([b["output_error"] for b in rep["blocks"]])).all()


@pytest.mark.parametrize(
    "stages,ours",
    [
        ([{"method": "wanda"}], False),  # a stock output
        ([{"method": "structured", "target": 0.3, "allocation": {"rule": "softmax"}}], True),  # trust_remote_code
    ],
)
def test_no_foreign_auto_map_survives(stages, ours, tiny_ckpt, calib_file, tmp_path):
    """An input config.json whose auto_map names a foreign module: the output references only our own
    modeling_blockprune.py (non-uniform) or no code at all (stock) — loading it never runs the input's code."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_ckpt("llama"), dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.EvilForCausalLM", "AutoConfig": "evil.EvilConfig"}
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "evil.py").write_text("raise SystemExit('foreign code ran')\n")
    tok_cfg = json.loads((dst / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(
        json.dumps({**tok_cfg, "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}})
    )
    run(config_from_dict(recipe(dst, tmp_path / "out", calib_file, stages)))
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    if ours:
        assert out["auto_map"] == {"AutoModelForCausalLM": "modeling_blockprune.BlockpruneForCausalLM"}
    else:
        assert "auto_map" not in out
    assert not (tmp_path / "out" / "evil.py").exists()
    # a custom tokenizer class named by tokenizer_config.json would run the input's code as well: the run read
    # the stock tokenizer (no prompt on stdin, no code), and the output's copy names no code
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()) == tok_cfg
