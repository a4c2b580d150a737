"""The padded layout (engine/padded.py): non-uniform outputs rewritten as the stock architecture with zeros, the
function unchanged, loadable without remote code; the recipe's `export.layout`, `blockprune export`, refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.config import ConfigError, config_from_dict
from engine.loader import load_pruned
from engine.padded import PaddingError, export_padded, plan_padding
from engine.pipeline import run
from launch.cli import main
from sharding.reader import CheckpointReader
from sharding.writer import CheckpointWriter
from tests.tiny_models import recipe

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
# every layer pruned (min 0.1), unevenly (softmax, low temperature): per-layer KV groups and channels
SOFTMAX = {
    "method": "structured",
    "target": 0.3,
    "score": "wanda",
    "solver": "closed_form",
    "allocation": {"rule": "softmax", "temperature": 0.5, "min": 0.1, "max": 0.7},
}
ARCHS = ["llama", "qwen2", "qwen3", "mixtral"]  # qwen2: q/k/v biases; all GQA (8 query heads over 4 KV groups)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _layers4(tiny_ckpt, arch: str) -> Path:
    kw = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4}
    if arch in ("qwen3", "qwen3_moe"):
        kw["head_dim"] = 8
    return tiny_ckpt(arch, **kw)


@torch.no_grad()
def _native_logits(path: Path) -> torch.Tensor:
    return load_pruned(path, dtype=torch.float32)(IDS).logits


@pytest.fixture(scope="module")
def exported(tiny_ckpt, calib_file, tmp_path_factory):
    """{arch: (native output, padded export, export summary)} for softmax-allocated structured runs."""
    d = tmp_path_factory.mktemp("padded")
    out = {}
    for arch in ARCHS:
        native = d / f"{arch}-native"
        run(config_from_dict(recipe(_layers4(tiny_ckpt, arch), native, calib_file, [SOFTMAX])))
        summary = export_padded(native, d / f"{arch}-padded")
        out[arch] = (native, d / f"{arch}-padded", summary)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_gives_the_native_logits(exported, arch):
    native, padded, summary = exported[arch]
    cfg = json.loads((padded / "config.json").read_text())
    assert "blockprune" not in cfg and "auto_map" not in cfg and not list(padded.glob("*.py"))
    layers = json.loads((native / "config.json").read_text())["blockprune"]["layers"]
    assert len({json.dumps(e["config"], sort_keys=True) for e in layers}) > 1  # really non-uniform
    assert summary["zero_params"] > 0
    for key, width in summary["widths"].items():
        assert cfg[key] == width
        if isinstance(width, int):
            assert all(e["config"].get(key, width) <= width for e in layers), key
    model = AutoModelForCausalLM.from_pretrained(padded, dtype=torch.float32).eval()
    assert type(model).__name__.endswith("ForCausalLM") and "Blockprune" not in type(model).__name__
    with torch.no_grad():
        got = model(IDS).logits
    torch.testing.assert_close(got, _native_logits(native), rtol=0, atol=1e-5)
    index = json.loads((padded / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_parameters"] == model.num_parameters() == summary["total_parameters"]
    native_params = sum(r.info(n).numel for r in [CheckpointReader(native)] for n in r.names())
    assert summary["total_parameters"] == native_params + summary["zero_params"]


def test_padding_puts_each_tensor_in_the_leading_slices_and_zeros_elsewhere(exported):
    native, padded, _ = exported["llama"]
    a, b = CheckpointReader(native), CheckpointReader(padded)
    for i in range(4):
        prefix = f"model.layers.{i}."
        src, out = a.read(a.names_with_prefix(prefix)), b.read(b.names_with_prefix(prefix))
        assert set(src) == set(out)
        for name, t in src.items():
            p = out[name]
            lead = tuple(slice(0, s) for s in t.shape)
            assert torch.equal(p[lead], t), name
            rest = p.clone()
            rest[lead] = 0
            assert not rest.any(), name


def test_padded_loads_in_stock_transformers_without_blockprune(exported, tmp_path):
    """`python -I` without blockprune on the path, no remote code: stock classes, the native model's logits, and
    generate with and without the KV cache agree."""
    paths = [exported[a][1] for a in ARCHS]
    script = tmp_path / "stock.py"
    script.write_text(STOCK)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    out = tmp_path / "logits.pt"
    p = subprocess.run(
        [sys.executable, "-I", str(script), str(out), *map(str, paths)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0 and "STOCK OK" in p.stdout, p.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    for k, arch in enumerate(ARCHS):
        torch.testing.assert_close(got[str(k)], _native_logits(exported[arch][0]), rtol=0, atol=1e-5)


STOCK = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path_importer_cache.clear()
import torch
from transformers import AutoModelForCausalLM
try:
    import engine
    raise SystemExit("blockprune's engine is importable")
except ImportError:
    pass
ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
out = {}
for k, path in enumerate(sys.argv[2:]):
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert type(m).__module__.startswith("transformers.models."), type(m)
    with torch.no_grad():
        out[str(k)] = m(ids).logits
        a = m.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
        b = m.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(a, b), (a, b)
torch.save(out, sys.argv[1])
print("STOCK OK")
"""


def test_recipe_layout_padded_with_bias_compensation(tiny_ckpt, calib_file, tmp_path):
    """`export: {layout: padded}` in the recipe (the pipeline's finalize): per-layer bias flags become one flag with
    zero biases where a layer had none; the native run of the same recipe gives the same logits."""
    src = _layers4(tiny_ckpt, "llama")
    stage = {**SOFTMAX, "score": "fluctuation", "solver": "none", "bias_compensation": True}
    native, padded = tmp_path / "native", tmp_path / "padded"
    run(config_from_dict(recipe(src, native, calib_file, [stage])))
    rep = run(config_from_dict(recipe(src, padded, calib_file, [stage], export={"layout": "padded"})))
    layers = json.loads((native / "config.json").read_text())["blockprune"]["layers"]
    assert len({e["config"].get("attention_bias", False) for e in layers}) == 2  # some layers have it, some not
    cfg = json.loads((padded / "config.json").read_text())
    assert cfg["attention_bias"] is True and cfg["mlp_bias"] is True and "blockprune" not in cfg
    assert rep["export"]["layout"] == "padded" and rep["export"]["zero_params"] > 0
    assert not (padded.parent / "padded.padded-tmp").exists() and not (padded.parent / "padded.native-tmp").exists()
    saved = json.loads((padded / "blockprune_report.json").read_text())
    assert saved["export"]["widths"] == rep["export"]["widths"]
    assert "padded" in (padded / "README.md").read_text()
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(padded, dtype=torch.float32)(IDS).logits
    torch.testing.assert_close(got, _native_logits(native), rtol=0, atol=1e-5)
    assert CheckpointReader(padded)  # headers and index valid
    assert main(["inspect", str(padded)]) == 0  # the export's own manifest verifies


def test_removed_sublayers_pad_to_zero_sublayers(tiny_ckpt, calib_file, tmp_path):
    """Depth by sublayer on a MoE model with a shared expert: removed attention / MLP sublayers come back as
    full-width zeros (router, experts, shared expert and its gate), which add exactly nothing."""
    src = _layers4(tiny_ckpt, "qwen2_moe")
    native = tmp_path / "native"
    run(config_from_dict(recipe(src, native, calib_file, [{"method": "depth", "remove": 3, "by": "sublayer"}])))
    summary = export_padded(native, tmp_path / "padded")
    assert summary["widths"] == {} and summary["zero_params"] > 0
    removed = [e for e in summary["layers"] if not (e["attention"] and e["mlp"])]
    assert removed
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "padded", dtype=torch.float32).eval()
    ref = load_pruned(native, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=0, atol=1e-5)
        a = model.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
        b = ref.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_per_layer_expert_counts_are_refused():
    cfg = {
        "model_type": "mixtral",
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "blockprune": {
            "version": 1,
            "layers": [
                {"attention": True, "mlp": True, "config": {"num_local_experts": 3}},
                {"attention": True, "mlp": True, "config": {"num_local_experts": 4}},
            ],
        },
    }
    with pytest.raises(PaddingError, match="router"):
        plan_padding(cfg)
    experts = {"method": "experts", "target": 0.25, "per_layer": True}
    with pytest.raises(ConfigError, match="per_layer"):
        config_from_dict(recipe("m", "o", "c", [experts], export={"layout": "padded"}))
    config_from_dict(recipe("m", "o", "c", [{**experts, "per_layer": False}], export={"layout": "padded"}))
    with pytest.raises(ConfigError, match="export.layout"):
        config_from_dict(recipe("m", "o", "c", [SOFTMAX], export={"layout": "wide"}))


def test_plan_rounds_to_align_and_refuses_mixed_head_groups():
    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 4}
    layers = [{"config": {"intermediate_size": w}} for w in (70, 90)]
    cfg = {**base, "intermediate_size": 96, "blockprune": {"version": 1, "layers": layers}}
    assert plan_padding(cfg, align=8).widths == {"intermediate_size": 96}  # 90 -> 96
    assert plan_padding(cfg, align=1).widths == {"intermediate_size": 90}
    assert plan_padding(cfg, align=64).widths == {"intermediate_size": 96}  # never wider than the source
    bad = [{"config": {"num_attention_heads": 6, "num_key_value_heads": 3}}, {"config": {"num_key_value_heads": 2}}]
    with pytest.raises(PaddingError, match="per KV group"):
        plan_padding({**base, "blockprune": {"version": 1, "layers": bad}})


def test_cli_export_and_resume(exported, tmp_path, monkeypatch, capsys):
    """`blockprune export`: the same bytes as the library call; a killed export continues where it stopped; the
    output may not be the input."""
    native, padded, _ = exported["qwen3"]
    out = tmp_path / "cli"
    real = CheckpointWriter.write_unit

    def dying(self, name, tensors, metadata=None):
        if name == "block.00002":
            raise KeyboardInterrupt("simulated kill")
        return real(self, name, tensors, metadata)

    monkeypatch.setattr(CheckpointWriter, "write_unit", dying)
    assert main(["export", str(native), str(out)]) == 130
    monkeypatch.setattr(CheckpointWriter, "write_unit", real)
    assert main(["export", str(native), str(out), "--layout", "padded"]) == 0
    assert "zero parameters added" in capsys.readouterr().out
    for f in sorted(padded.glob("*.safetensors")):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert main(["export", str(native), str(native)]) == 2
    assert "is the input checkpoint" in capsys.readouterr().err


def test_in_place_swap_never_removes_a_foreign_sibling(exported, tmp_path):
    """`export.layout: padded` swaps directories through `<out>.native-tmp`; a directory of that name that is not a
    blockprune output (no manifest) is refused before anything is written, and left as it was."""
    from engine.padded import pad_in_place

    native = tmp_path / "out"
    shutil.copytree(exported["llama"][0], native)
    sibling = tmp_path / "out.native-tmp"
    sibling.mkdir()
    (sibling / "notes.txt").write_text("mine")
    with pytest.raises(PaddingError, match="not a blockprune output"):
        pad_in_place(native)
    assert (sibling / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "out.padded-tmp").exists() and (native / "config.json").is_file()
