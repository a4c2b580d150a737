"""The hand-off to llm-compressor (issue 18, item 4).

Pure (always run): `engine.report.llmc_recipe` names SparseGPTModifier / WandaPruningModifier with the stage's
arguments; its module-name regexes select exactly the linears blockprune's `targets` / `ignore` select (compared
name by name under compressed-tensors' matching rule, `re.match` on the full name); allocation rules become the
decided per-layer sparsities when the report is given; stages without an equivalent say why.

Marked `llmc` (skipped unless llm-compressor's own venv exists: `.bench/llmc-venv` of this checkout or of the main
checkout of a git worktree, or `LLMC_PYTHON`): `tests/llmc_client.py` runs in that python as a subprocess:
- `oneshot` W4A16 and FP8_DYNAMIC quantization of a tiny 2:4 output (hidden 128, so W4A16's group of 128 fits):
  every zero survives, every 2:4 matrix stays 2:4, the compressed checkpoint loads and gives finite logits close
  to the pruned model's;
- the YAML that `llmc_recipe_yaml` writes is parsed by llm-compressor and run with `oneshot` on the dense model:
  SparseGPT 2:4 gives 2:4 matrices; a softmax allocation with narrowed targets gives blockprune's per-layer
  sparsities on exactly the selected linears.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

import engine
from engine.config import name_selected
from engine.report.llmc_recipe import ALWAYS_IGNORE, LAYERS, llmc_recipe, llmc_recipe_yaml, stage_modifier
from tests.tiny_models import build_tiny_checkpoint, recipe, tiny_text

REPO = Path(__file__).resolve().parents[1]
CLIENT = REPO / "tests" / "llmc_client.py"

LLAMA_INNER = [f"self_attn.{n}_proj" for n in "qkvo"] + [f"mlp.{n}_proj" for n in ("gate", "up", "down")]
MIXTRAL_INNER = [f"self_attn.{n}_proj" for n in "qkvo"] + [
    f"block_sparse_moe.experts.{e}.w{k}" for e in range(2) for k in (1, 2, 3)
]


# ------------------------------------------------------------------------------------------------------ pure


def _match(name: str, target: str) -> bool:
    """compressed-tensors' `match_name` (a class name never matches these names)."""
    return re.match(target[3:], name) is not None if target.startswith("re:") else target in (name, "Linear")


def llmc_selects(args: dict, layer: str, inner: str) -> bool:
    """Whether llm-compressor's Wanda/SparseGPT prune linear `layer.inner` with these modifier args: either the
    targets name the linear, or (per-layer lists) the layer, and no ignore matches the linear's full name."""
    full = f"{layer}.{inner}"
    hit = any(_match(full, t) for t in args["targets"]) or any(_match(layer, t) for t in args["targets"])
    return hit and not any(_match(full, i) for i in args["ignore"])


@pytest.mark.parametrize(
    ("targets", "ignore"),
    [
        (["*"], []),
        (["mlp.*"], []),
        (["*proj"], ["self_attn.o_proj"]),
        (["re:self_attn\\.(q|k)"], []),
        (["mlp.*", "re:self_attn\\.q"], ["*gate_proj", "block_sparse_moe.experts.1.*"]),
        (["block_sparse_moe.*"], ["*w2"]),
    ],
)
@pytest.mark.parametrize("per_layer", [False, True])
def test_targets_select_the_same_linears(targets, ignore, per_layer):
    stage = {"method": "wanda", "sparsity": 0.5, "targets": targets, "ignore": ignore}
    report = None
    if per_layer:
        stage["allocation"] = {"rule": "softmax"}
        report = {"allocation": {"stage": 0, "kind": "unstructured", "layers": [{"decided": 0.4}, {"decided": 0.6}]}}
    args = stage_modifier(stage, 0, report)["args"]
    assert (args["targets"] == [LAYERS]) == per_layer
    for inner in LLAMA_INNER + MIXTRAL_INNER:
        for layer in ("model.layers.0", "model.layers.11"):
            assert llmc_selects(args, layer, inner) == name_selected(inner, targets, ignore), (layer, inner, args)
    for never in ("lm_head", "model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert_gate"):
        assert any(_match(never, i) for i in args["ignore"]), never


def test_sparsegpt_and_wanda_arguments():
    r = {
        "prune": [
            {"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4", "blocksize": 64, "percdamp": 0.05},
            {"method": "wanda", "sparsity": 0.6, "pattern": "unstructured"},
        ]
    }
    res = llmc_recipe(r)
    assert res["complete"] is True and res["version"] == 1
    sgpt = res["recipe"]["blockprune_0_stage"]["pruning_modifiers"]["SparseGPTModifier"]
    assert sgpt == {
        "sparsity": 0.5,
        "mask_structure": "2:4",
        "targets": ["Linear"],
        "ignore": ALWAYS_IGNORE,
        "block_size": 64,
        "dampening_frac": 0.05,
    }
    wanda = res["recipe"]["blockprune_1_stage"]["pruning_modifiers"]["WandaPruningModifier"]
    assert wanda["sparsity"] == 0.6 and wanda["mask_structure"] == "0:0" and "block_size" not in wanda
    assert res["stages"][0]["equivalent"].startswith("SparseGPTModifier(sparsity=0.5, mask_structure='2:4'")
    # the text: comments, then YAML that loads back to the same recipe; llm-compressor reads `<name>_stage` keys
    # holding `<group>_modifiers` mappings
    text = llmc_recipe_yaml(r)
    assert text.startswith("# llm-compressor equivalent") and "# stage 1 (wanda): WandaPruningModifier(" in text
    assert yaml.safe_load(text) == res["recipe"]
    assert all(k.endswith("_stage") and list(v) == ["pruning_modifiers"] for k, v in res["recipe"].items())


def test_allocation_rules():
    report = {"allocation": {"stage": 0, "kind": "unstructured", "layers": [{"decided": 0.31}, {"decided": 0.69}]}}
    owl = {"method": "wanda", "sparsity": 0.5, "allocation": {"rule": "owl", "m": 7.0, "lambda": 0.1}}
    args = stage_modifier(owl, 0)["args"]
    assert (args["sparsity_profile"], args["owl_m"], args["owl_lmbda"], args["sparsity"]) == ("owl", 7.0, 0.1, 0.5)
    args = stage_modifier(owl, 0, report)["args"]
    assert args["sparsity"] == [0.31, 0.69] and "owl_m" not in args and args["targets"] == [LAYERS]
    soft = {"method": "sparsegpt", "sparsity": 0.5, "allocation": {"rule": "softmax"}}
    s = stage_modifier(soft, 0)
    assert s["modifier"] is None and "softmax" in s["note"] and "report" in s["note"]
    assert stage_modifier(soft, 0, report)["args"]["sparsity"] == [0.31, 0.69]
    assert stage_modifier(soft, 1, report)["modifier"] is None  # the report's allocation belongs to stage 0


def test_stages_without_equivalent():
    r = {
        "prune": [
            {"method": "experts", "target": 0.25},
            {"method": "magnitude", "sparsity": 0.5},
            {"method": "structured", "target": 0.2},
            {"method": "depth", "remove": 2},
        ]
    }
    res = llmc_recipe(r)
    assert res["recipe"] is None and res["complete"] is False
    notes = [s["note"] for s in res["stages"]]
    assert "REAPPruningModifier" in notes[0] and "training" in notes[1] and "heads" in notes[2] and "blocks" in notes[3]
    text = llmc_recipe_yaml(r)
    assert "INCOMPLETE" in text and yaml.safe_load(text) == {}
    assert llmc_recipe({"prune": []})["complete"] is False


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny llama with hidden 128 / intermediate 256 (W4A16's group size is 128), dense and pruned: SparseGPT 2:4,
    Wanda with softmax allocation on `mlp.*` and q_proj, gate_proj ignored."""
    d = tmp_path_factory.mktemp("llmc")
    calib = d / "calib.txt"
    calib.write_text(tiny_text(20000, seed=0))
    src = build_tiny_checkpoint(
        "llama", d / "dense", num_hidden_layers=2, hidden_size=128, intermediate_size=256, max_shard_size="100KB"
    )
    stages = {
        "nm": [{"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"}],
        "softmax": [
            {
                "method": "wanda",
                "sparsity": 0.5,
                "targets": ["mlp.*", "re:self_attn\\.q"],
                "ignore": ["*gate_proj"],
                "allocation": {"rule": "softmax", "temperature": 0.5},
            }
        ],
    }
    torch.set_num_threads(1)
    out = {"dense": src}
    for name, st in stages.items():
        engine.prune(src, recipe(src, d / name, calib, st))
        out[name] = d / name
    return out


def _written_recipe(out: Path) -> str:
    """What the lead's finalize will write: llmc_recipe_yaml(blockprune_recipe.yaml, blockprune_report.json)."""
    r = yaml.safe_load((out / "blockprune_recipe.yaml").read_text())
    return llmc_recipe_yaml(r, json.loads((out / "blockprune_report.json").read_text()))


def test_recipe_of_real_runs(runs):
    assert "SparseGPTModifier" in _written_recipe(runs["nm"])
    text = _written_recipe(runs["softmax"])
    layers = json.loads((runs["softmax"] / "blockprune_report.json").read_text())["allocation"]["layers"]
    args = yaml.safe_load(text)["blockprune_0_stage"]["pruning_modifiers"]["WandaPruningModifier"]
    assert args["sparsity"] == pytest.approx([row["decided"] for row in layers], abs=1e-6)
    assert len(set(args["sparsity"])) == 2


# ------------------------------------------------------------------------------------- llm-compressor's venv


def llmc_python() -> str | None:
    """llm-compressor's own python: $LLMC_PYTHON, else `.bench/llmc-venv` here or in the main checkout."""
    candidates = [os.environ.get("LLMC_PYTHON"), str(REPO / ".bench" / "llmc-venv" / "bin" / "python")]
    try:
        common = subprocess.run(
            ["git", "rev-parse", "--git-common-dir"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if common:
            candidates.append(str((REPO / common).resolve().parent / ".bench" / "llmc-venv" / "bin" / "python"))
    except (OSError, subprocess.SubprocessError):
        pass
    for c in candidates:
        if c and Path(c).is_file():
            return c
    return None


@pytest.fixture(scope="module")
def llmc() -> str:
    py = llmc_python()
    if py is None:
        pytest.skip("llm-compressor's venv not found (.bench/llmc-venv or LLMC_PYTHON; docs/guide.md says how)")
    p = subprocess.run([py, "-c", "import llmcompressor"], capture_output=True, text=True, timeout=120)
    if p.returncode:
        pytest.skip(f"{py} cannot import llmcompressor: {p.stderr.strip().splitlines()[-1:]}")
    return py


def run_client(py: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    p = subprocess.run([py, str(CLIENT), *args], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.llmc
@pytest.mark.parametrize(
    ("scheme", "fmt", "max_weight_err", "max_logit_err"),
    [("W4A16", "pack-quantized", 0.15, 0.5), ("FP8_DYNAMIC", "float-quantized", 0.05, 0.25)],
)
def test_quantize_pruned_output_keeps_zeros(scheme, fmt, max_weight_err, max_logit_err, runs, llmc, tmp_path):
    res = run_client(llmc, "quantize", str(runs["nm"]), str(tmp_path / scheme), scheme)
    assert (res["quant_method"], res["format"], res["same_names"], res["linears"]) == (
        "compressed-tensors",
        fmt,
        True,
        14,
    )
    assert res["zeros_before"] >= res["params"] // 2  # 2:4 everywhere
    assert res["zeros_kept"] == res["zeros_before"], res  # every zero survives quantization
    assert res["2of4_before"] == res["2of4_after"] == res["linears"], res
    assert res["weight_rel_err"] < max_weight_err and res["logits_finite"] and res["logits_rel_err"] < max_logit_err
    assert res["sparsity_config"] == {}  # compressed-tensors 0.19 writes no sparsity metadata: the zeros are plain


@pytest.mark.llmc
def test_llmc_runs_the_written_recipe(runs, llmc, tmp_path):
    path = tmp_path / "nm.yaml"
    path.write_text(_written_recipe(runs["nm"]))
    res = run_client(llmc, "recipe", str(runs["dense"]), str(tmp_path / "nm_out"), str(path))
    assert [m["class"] for m in res["modifiers"]] == ["SparseGPTModifier"]
    assert res["modifiers"][0]["mask_structure"] == "2:4"
    assert all(res["is_2of4"].values()) and all(v == pytest.approx(0.5) for v in res["sparsity"].values())

    path = tmp_path / "softmax.yaml"
    path.write_text(_written_recipe(runs["softmax"]))
    planned = yaml.safe_load(path.read_text())["blockprune_0_stage"]["pruning_modifiers"]["WandaPruningModifier"]
    res = run_client(llmc, "recipe", str(runs["dense"]), str(tmp_path / "softmax_out"), str(path))
    assert [m["class"] for m in res["modifiers"]] == ["WandaPruningModifier"]
    for name, sparsity in res["sparsity"].items():
        layer = int(name.split(".")[2])
        inner = name.split(".", 3)[3]
        if name_selected(inner, ["mlp.*", "re:self_attn\\.q"], ["*gate_proj"]):
            assert sparsity == pytest.approx(planned["sparsity"][layer], abs=1 / 128), name  # rounding per row
        else:
            assert sparsity == 0.0, name
