"""What a checkpoint says about itself (engine/report/card.py): `sparsity_config` in config.json, its check in
`blockprune inspect`, the README.md model card in every output, `total_parameters` in the index."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from engine.config import config_from_dict
from engine.pipeline import run
from engine.report.card import (
    EVAL_FILE,
    module_patterns,
    module_selected,
    nm_violations,
    refresh_card,
    sparsity_structure,
)
from engine.report.inspect_ckpt import format_inspection, inspect_checkpoint
from sharding.reader import CheckpointReader
from tests.tiny_models import recipe

NM = {"method": "sparsegpt", "pattern": "2:4", "ignore": ["*o_proj"]}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def outputs(tiny_ckpt, calib_file, tmp_path_factory):
    """Tiny outputs of every kind: 2:4 (llama; Mixtral experts), unstructured (tied embeddings), uniform
    structured, non-uniform structured (native and padded)."""
    d = tmp_path_factory.mktemp("card")
    runs = {
        "nm": (tiny_ckpt("llama"), [NM], {}),
        "nm_moe": (tiny_ckpt("mixtral"), [NM], {}),
        "unstructured_tied": (tiny_ckpt("llama", tie_word_embeddings=True), [{"method": "wanda", "sparsity": 0.5}], {}),
        "uniform": (tiny_ckpt("llama"), [{"method": "structured", "target": 0.2}], {}),
    }
    softmax = {"method": "structured", "target": 0.3, "allocation": {"rule": "softmax", "temperature": 0.5}}
    layers4 = tiny_ckpt("llama", num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
    runs["native"] = (layers4, [softmax], {})
    runs["padded"] = (layers4, [softmax], {"export": {"layout": "padded"}})
    out = {}
    for name, (src, stages, extra) in runs.items():
        out[name] = d / name
        run(config_from_dict(recipe(src, out[name], calib_file, stages, **extra)))
    return out


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("kind", ["nm", "nm_moe"])
def test_nm_output_says_its_pattern_and_inspect_checks_it(outputs, kind):
    path = outputs[kind]
    sc = _config(path)["sparsity_config"]
    assert sc["format"] == "dense" and sc["sparsity_structure"] == "2:4"
    assert "lm_head" in sc["ignore"] and any("o_proj" in p for p in sc["ignore"])
    info = inspect_checkpoint(path)
    t = info["totals"]
    assert sc["global_sparsity"] == pytest.approx(t["sparsity"], abs=1e-6)  # zeros over all parameters
    check = info["sparsity_config"]
    selected = {
        x["name"].removesuffix(".weight")
        for layer in info["layers"]
        for x in layer["tensors"]
        if len(x["shape"]) == 2 and x["sparsity"] >= 0.5 - 1e-9 and "embed" not in x["name"]
    }
    # the targets select exactly the pruned linears: every 2-D weight at 50% (the routers and o_proj are dense)
    assert {x for x in selected if module_selected(x, sc["targets"], sc["ignore"])} == selected
    assert check["linears_checked"] == len(selected) > 0
    assert check["ok"] and info["ok"] and not check["violations"]
    assert "OK: " in format_inspection(info)


def test_inspect_counts_nm_violations_per_linear(outputs, tmp_path):
    """Break the pattern in 3 groups of one linear (as a LoRA merge would): inspect counts exactly those."""
    src = outputs["nm"]
    dst = tmp_path / "broken"
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name != "blockprune_manifest.json":
            (dst / f.name).write_bytes(f.read_bytes())
    name = "model.layers.1.mlp.down_proj.weight"
    shard = dst / json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    W = tensors[name].clone()
    for row, group in ((0, 0), (3, 2), (7, 5)):
        W[row, 4 * group : 4 * group + 4] = 1.0
    tensors[name] = W
    save_file(tensors, str(shard), metadata={"format": "pt"})
    info = inspect_checkpoint(dst, verify=False)
    assert info["sparsity_config"]["violations"] == {name: 3}
    assert info["ok"] is False
    assert "FAILED: 1 of" in format_inspection(info)


def test_unstructured_and_structured_metadata(outputs):
    sc = _config(outputs["unstructured_tied"])["sparsity_config"]
    assert sc["sparsity_structure"] == "unstructured" and sc["targets"]
    info = inspect_checkpoint(outputs["unstructured_tied"], verify=False)
    assert info["sparsity_config"]["linears_checked"] == 0 and info["ok"]  # nothing to check for unstructured
    for kind in ("uniform", "native", "padded"):  # physically smaller: no zeros to describe
        assert "sparsity_config" not in _config(outputs[kind])


@pytest.mark.parametrize("kind", ["nm", "unstructured_tied", "uniform", "native", "padded"])
def test_total_parameters_as_transformers_writes_it(outputs, kind):
    path = outputs[kind]
    meta = json.loads((path / "model.safetensors.index.json").read_text())["metadata"]
    reader = CheckpointReader(path)
    assert meta["total_parameters"] == sum(reader.info(n).numel for n in reader.names())
    if kind != "native":  # stock classes; the native one needs the shipped model class
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        assert meta["total_parameters"] == model.num_parameters()  # tied embeddings counted once


def test_every_output_has_a_card_that_says_how_to_load_it(outputs):
    cards = {k: (p / "README.md").read_text() for k, p in outputs.items()}
    for kind, text in cards.items():
        assert text.startswith("---\nlibrary_name: transformers\n"), kind
        assert "## Recipe" in text and "## How to load" in text and "Base model:" in text, kind
        assert re.search(r"parameters of this checkpoint \| [\d,]+ \|", text), kind
    assert "trust_remote_code=True" in cards["native"] and "--layout padded" in cards["native"]
    assert "trust_remote_code" not in cards["uniform"].split("## How to load")[1].split("## Recipe")[0]
    assert "**padded** layout" in cards["padded"] and "zeros added by padding" in cards["padded"]
    for kind in ("nm", "unstructured_tied"):
        assert "merge_and_unload" in cards[kind] and "blockprune distill" in cards[kind], kind
        assert "`2:4`" in cards["nm"]
    assert "merge_and_unload" not in cards["uniform"]


def test_recorded_evaluation_goes_into_the_card(outputs, tmp_path):
    path = tmp_path / "ckpt"
    path.mkdir()
    for f in outputs["nm"].iterdir():
        if f.is_file():
            (path / f.name).write_bytes(f.read_bytes())
    result = {"model": str(path), "ppl": 12.345, "windows": 4, "seq_len": 32, "params": 10, "nonzero": 5}
    text = refresh_card(path, evaluation=result)
    assert json.loads((path / EVAL_FILE).read_text())["ppl"] == 12.345
    assert "## Evaluation" in text and "12.345" in text
    assert refresh_card(path) == text  # read back from blockprune_eval.json


def test_nm_violations_and_patterns():
    W = torch.tensor([[1.0, 0, 2, 0, 0, 0, 3, 4], [1.0, 1, 1, 0, 5, 0, 0, 0]])
    assert nm_violations(W, 2, 4) == (1, 4)  # row 1, first group: 3 nonzeros
    assert nm_violations(torch.ones(2, 6), 2, 4) == (2, 4)  # a ragged tail of 2 follows 2:4
    assert nm_violations(torch.ones(2, 7), 2, 4) == (4, 4)  # one of 3 does not (a group per row)
    pruned = {f"model.layers.{i}.self_attn.q_proj" for i in range(3)} | {"model.layers.0.mlp.up_proj"}
    linears = pruned | {f"model.layers.{i}.mlp.up_proj" for i in range(3)}
    targets, ignore = module_patterns(pruned, linears)
    assert targets == ["model.layers.0.mlp.up_proj", r"re:^model\.layers\.\d+\.self_attn\.q_proj$"]
    assert ignore == ["lm_head", "model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj"]
    assert module_selected("model.layers.7.self_attn.q_proj", targets, ignore)
    assert not module_selected("model.layers.1.mlp.up_proj", targets, ignore)
    assert sparsity_structure([{"sparsity": 0.5, "pattern": "2:4"}]) == "2:4"
    assert sparsity_structure([{"sparsity": 0.5, "pattern": "2:4"}, {"sparsity": 0.3, "pattern": "unstructured"}]) == (
        "unstructured"
    )
    assert sparsity_structure([{"target": 0.2, "units": ["heads"]}]) is None
