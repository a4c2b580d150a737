"""Structured and depth stages end to end: surgery, plan, export to the stock architecture, logits, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.arch import adapter_for, embed, final_hidden_to_logits
from engine.config import ConfigError, config_from_dict
from engine.loader import load_pruned
from engine.modeling_blockprune import remove_sublayers
from engine.pipeline import run
from sharding.reader import CheckpointReader
from tests.tiny_models import build_tiny_checkpoint, peak_rss_by_depth, recipe, run_killed_before

STRUCT = {
    "method": "structured",
    "target": 0.3,
    "units": ["heads", "channels"],
    "score": "obs",
    "solver": "closed_form",
    "allocation": {"rule": "uniform"},
    "bias_compensation": False,
    "align": 1,
}


def ids_for_test() -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))


def stock_logits(path: Path, ids: torch.Tensor) -> tuple[torch.Tensor, AutoModelForCausalLM]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits, model


@torch.no_grad()
def adapter_logits(
    path: Path, ids: torch.Tensor, layers: list[int] | None = None, sublayers: dict[int, dict] | None = None
) -> torch.Tensor:
    """blockprune's own in-memory model: the blocks of `path` built by the adapter and run one after another
    (`layers`: which blocks, default all; `sublayers`: {block: kept sublayers} made identities)."""
    reader = CheckpointReader(path)
    adapter = adapter_for(reader.config)
    x = embed(ids, reader.read([adapter.embed_key])[adapter.embed_key].float())
    ctx = adapter.forward_context(ids.shape[0], ids.shape[1], device="cpu", dtype=torch.float32)
    for i in range(adapter.num_layers) if layers is None else layers:
        disk = reader.read(reader.names_with_prefix(adapter.block_prefix(i)))
        block = adapter.build_block(i, disk, device="cpu", dtype=torch.float32)
        if sublayers and i in sublayers:
            remove_sublayers(block, **sublayers[i])
        x = adapter.block_forward(block, x, ctx)
    head = adapter.embed_key if adapter.lm_head_key is None else adapter.lm_head_key
    t = reader.read([adapter.final_norm_key, head])
    return final_hidden_to_logits(x, t[adapter.final_norm_key].float(), t[head].float(), adapter.config)


def block_param_count(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)


def test_surgery_keeps_whole_units(tiny_ckpt, calib_file, tmp_path):
    """Without reconstruction every written tensor is a sub-matrix of the source: the same KV groups in q/k/v rows
    and o_proj columns, the same channels in gate/up rows and down_proj columns."""
    src, out = tiny_ckpt("llama"), tmp_path / "out"
    stage = {**STRUCT, "score": "magnitude", "solver": "none"}
    run(config_from_dict(recipe(src, out, calib_file, [stage])))
    a, b = CheckpointReader(src), CheckpointReader(out)
    hd, per_group = 16, 2
    for i in range(3):
        p = f"model.layers.{i}."
        s, o = a.read(a.names_with_prefix(p)), b.read(b.names_with_prefix(p))
        k_src, k_out = s[p + "self_attn.k_proj.weight"], o[p + "self_attn.k_proj.weight"]
        g = [j for j in range(2) if torch.equal(k_src[j * hd : (j + 1) * hd], k_out)]
        assert len(g) == 1
        q_rows = slice(g[0] * per_group * hd, (g[0] + 1) * per_group * hd)
        assert torch.equal(o[p + "self_attn.q_proj.weight"], s[p + "self_attn.q_proj.weight"][q_rows])
        assert torch.equal(o[p + "self_attn.o_proj.weight"], s[p + "self_attn.o_proj.weight"][:, q_rows])
        up_src, up_out = s[p + "mlp.up_proj.weight"], o[p + "mlp.up_proj.weight"]
        keep = [next(c for c in range(up_src.shape[0]) if torch.equal(up_src[c], row)) for row in up_out]
        assert keep == sorted(keep) and len(keep) == 80
        assert torch.equal(o[p + "mlp.gate_proj.weight"], s[p + "mlp.gate_proj.weight"][keep])
        assert torch.equal(o[p + "mlp.down_proj.weight"], s[p + "mlp.down_proj.weight"][:, keep])


def test_reconstruction_lowers_block_error(tiny_ckpt, calib_file, tmp_path):
    src = tiny_ckpt("qwen3")
    errs = {}
    for solver in ("none", "closed_form"):
        stage = {**STRUCT, "score": "wanda", "solver": solver}
        rep = run(config_from_dict(recipe(src, tmp_path / solver, calib_file, [stage])))
        errs[solver] = sum(b["output_error"] for b in rep["blocks"])
    assert errs["closed_form"] < errs["none"], errs


def test_bias_compensation_and_align(tiny_ckpt, calib_file, tmp_path):
    src, out = tiny_ckpt("llama"), tmp_path / "out"
    stage = {**STRUCT, "score": "fluctuation", "solver": "none", "bias_compensation": True, "align": 32}
    rep = run(config_from_dict(recipe(src, out, calib_file, [stage])))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["attention_bias"] is True and cfg["mlp_bias"] is True
    assert cfg["intermediate_size"] % 32 == 0
    t = CheckpointReader(out)
    biases = t.read([n for n in t.names() if n.endswith("bias")])
    assert len(biases) == 3 * 7
    for n, v in biases.items():
        assert bool(v.abs().sum() > 0) == n.endswith(("o_proj.bias", "down_proj.bias")), n
    ids = ids_for_test()
    got, model = stock_logits(out, ids)
    torch.testing.assert_close(got, adapter_logits(out, ids), rtol=1e-5, atol=1e-5)
    assert block_param_count(model) == rep["structured_plan"]["block_params_after"]


def test_structured_resume_is_byte_identical(tiny_ckpt, calib_file, tmp_path, monkeypatch):
    src = tiny_ckpt("llama")
    stages = [{**STRUCT, "solver": "closed_form", "score": "wanda"}]
    run(config_from_dict(recipe(src, tmp_path / "full", calib_file, stages)))
    run_killed_before("block.00002", config_from_dict(recipe(src, tmp_path / "part", calib_file, stages)), monkeypatch)
    rep = run(config_from_dict(recipe(src, tmp_path / "part", calib_file, stages, resume=True)))
    assert [b.get("resumed", False) for b in rep["blocks"]] == [True, True, False]
    for f in sorted((tmp_path / "full").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "part" / f.name).read_bytes(), f.name


def test_depth_removes_lowest_influence_block(tiny_ckpt, calib_file, tmp_path):
    src, out = tiny_ckpt("llama"), tmp_path / "out"
    rep = run(config_from_dict(recipe(src, out, calib_file, [{"method": "depth", "remove": 1, "by": "block"}])))
    bi = rep["depth"]["block_influence"]
    removed = rep["depth"]["removed"]
    assert removed == [min(range(3), key=lambda i: bi[i])] and all(0 < v < 2 for v in bi)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2
    kept = [i for i in range(3) if i not in removed]
    ids = ids_for_test()
    got, model = stock_logits(out, ids)
    torch.testing.assert_close(got, adapter_logits(src, ids, layers=kept), rtol=1e-5, atol=1e-5)
    assert len(model.model.layers) == 2
    assert [b["output_block"] for b in rep["blocks"]] == [0, 1]


def test_depth_renumbers_layer_lists(tmp_path, calib_file):
    src = build_tiny_checkpoint(
        "qwen2",
        tmp_path / "src",
        num_hidden_layers=4,
        layer_types=["full_attention", "sliding_attention", "full_attention", "full_attention"],
        use_sliding_window=True,
        sliding_window=8,
    )
    out = tmp_path / "out"
    rep = run(config_from_dict(recipe(src, out, calib_file, [{"method": "depth", "remove": 2}])))
    kept = [i for i in range(4) if i not in rep["depth"]["removed"]]
    src_cfg = json.loads((src / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["layer_types"] == [src_cfg["layer_types"][i] for i in kept]
    ids = ids_for_test()
    got, _ = stock_logits(out, ids)
    torch.testing.assert_close(got, adapter_logits(src, ids, layers=kept), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({**STRUCT, "allocation": {"rule": "bogus"}}, "rule = .bogus.: choose from"),
        ({**STRUCT, "score": "taylor"}, "score = 'taylor'"),
        ({**STRUCT, "units": ["experts"]}, "units = 'experts'"),
        ({**STRUCT, "target": 1.2}, "target = 1.2"),
        ({"method": "depth", "remove": 1, "by": "layer"}, "by = 'layer'"),
    ],
)
def test_stage_config_errors(stage, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(recipe(tmp_path, tmp_path / "o", tmp_path / "c", [stage]))


def test_model_dependent_errors(tiny_ckpt, calib_file, tmp_path):
    mix = [STRUCT, {"method": "wanda", "sparsity": 0.5}]
    with pytest.raises(ConfigError, match="cannot share a run"):
        config_from_dict(recipe(tmp_path, tmp_path / "o", calib_file, mix))
    with pytest.raises(ConfigError, match="qwen2 has no `attention_bias`"):
        run(
            config_from_dict(
                recipe(tiny_ckpt("qwen2"), tmp_path / "a", calib_file, [{**STRUCT, "bias_compensation": True}])
            )
        )
    with pytest.raises(ConfigError, match="only 3 blocks"):
        run(
            config_from_dict(recipe(tiny_ckpt("llama"), tmp_path / "b", calib_file, [{"method": "depth", "remove": 3}]))
        )
    with pytest.raises(ConfigError, match="MLA attention"):
        run(config_from_dict(recipe(tiny_ckpt("deepseek_v3"), tmp_path / "c", calib_file, [STRUCT])))
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


REMOTE = """
import sys
# a Python where blockprune is not installed: drop an editable install's import hooks (`pip install -e .`, as
# `make setup` does) and any path to the repository
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path_importer_cache.clear()
import torch
def assert_same_greedy(m, ids, a, b):
    # cached and uncached greedy generation agree, up to a near-tie: where they differ, the token the cached one
    # chose is within 1e-4 (relative) of the best logit of an uncached forward over it (different matmul shapes)
    if torch.equal(a, b):
        return
    with torch.no_grad():
        logits = m(a[:, :-1]).logits[:, ids.shape[1] - 1 :]
    chosen = logits.gather(-1, a[:, ids.shape[1] :, None])[..., 0]
    gap = logits.max(-1).values - chosen
    assert bool((gap <= 1e-4 * logits.abs().max()).all()), (a, b, gap)

from transformers import AutoModelForCausalLM
assert "{repo}" not in [p.rstrip("/") for p in sys.path], sys.path
try:
    import engine
    raise SystemExit("blockprune's engine is importable")
except ImportError:
    pass
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
with torch.no_grad():
    torch.save(m(ids).logits, sys.argv[2])
    a = m.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    b = m.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
assert type(m).__module__.endswith("modeling_blockprune") and type(m).__name__.endswith("ForCausalLM"), type(m)
assert_same_greedy(m, ids, a, b) and a.shape == (2, 22), (a, b)
print("REMOTE OK")
"""


def remote_logits(path: Path, tmp_path: Path) -> torch.Tensor:
    """Load `path` with trust_remote_code in a Python where blockprune is not importable (-I, no PYTHONPATH, cwd
    elsewhere); checks that cached and uncached greedy generation agree; returns the logits of ids_for_test()."""
    repo = str(Path(__file__).resolve().parents[1])
    script = tmp_path / "remote.py"
    script.write_text(REMOTE.replace("{repo}", repo))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    p = subprocess.run(
        [sys.executable, "-I", str(script), str(path), str(tmp_path / "logits.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0 and "REMOTE OK" in p.stdout, p.stderr[-3000:]
    return torch.load(tmp_path / "logits.pt", weights_only=True)


def test_sublayer_removal_nonuniform_checkpoint(tiny_ckpt, calib_file, tmp_path):
    src, out = tiny_ckpt("qwen2"), tmp_path / "out"
    rep = run(config_from_dict(recipe(src, out, calib_file, [{"method": "depth", "remove": 4, "by": "sublayer"}])))
    changes = rep["depth"]["output_change"]
    removed = {tuple(r) for r in rep["depth"]["removed_sublayers"]}
    ranked = sorted((changes[i][p], i, p) for i in range(3) for p in ("attention", "mlp"))
    assert removed == {(i, p) for _, i, p in ranked[:4]}
    assert any(p == "attention" for _, p in removed)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_blockprune.BlockpruneForCausalLM"
    keep = {i: {"attention": (i, "attention") not in removed, "mlp": (i, "mlp") not in removed} for i in range(3)}
    assert [{k: e[k] for k in ("attention", "mlp")} for e in cfg["blockprune"]["layers"]] == [keep[i] for i in range(3)]
    names = CheckpointReader(out).names()
    for i, p in removed:
        part = "self_attn." if p == "attention" else "mlp."
        assert not any(n.startswith(f"model.layers.{i}.{part}") for n in names)
    ids = ids_for_test()
    ref = adapter_logits(src, ids, sublayers=keep)
    torch.testing.assert_close(remote_logits(out, tmp_path), ref, rtol=1e-5, atol=1e-5)
    model = load_pruned(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_modeling_file_first_attention_removed_generates(tmp_path):
    """Layer 0 without attention (the cache's length is read from layer 0) and a layer without MLP: the copied
    modeling file loads without blockprune; cached generation equals uncached; logits equal the adapter's blocks."""
    from safetensors.torch import save_file

    from engine.export import nonuniform_config
    from tests.tiny_models import tiny_model

    model = tiny_model("llama")
    keep = {0: {"attention": False, "mlp": True}, 2: {"attention": True, "mlp": False}}
    dead = (
        "model.layers.0.self_attn.",
        "model.layers.0.input_layernorm.",
        "model.layers.2.mlp.",
        "model.layers.2.post_attention_layernorm.",
    )
    state = {n: t for n, t in model.state_dict().items() if not n.startswith(dead)}
    model.save_pretrained(tmp_path / "src")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({n: t.contiguous() for n, t in state.items()}, ckpt / "model.safetensors")
    layers = [
        {"attention": keep.get(i, {}).get("attention", True), "mlp": keep.get(i, {}).get("mlp", True), "config": {}}
        for i in range(3)
    ]
    cfg, modeling = nonuniform_config(model.config.to_dict(), layers)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    (ckpt / "modeling_blockprune.py").write_text(modeling)
    ids = ids_for_test()
    ref = adapter_logits(tmp_path / "src", ids, sublayers=keep)
    torch.testing.assert_close(remote_logits(ckpt, tmp_path), ref, rtol=1e-5, atol=1e-5)
    loaded = load_pruned(ckpt, dtype=torch.float32)
    assert sum(p.numel() for p in loaded.parameters()) == sum(t.numel() for t in state.values())


@pytest.mark.slow
def test_structured_peak_rss_flat_in_depth(tmp_path, calib_file):
    """Structured 30% (Wanda, closed form) plus depth removal of one block on a 24-layer and a 4-layer llama of equal
    width: peak RSS ratio <= 1.15 (the scoring pass and the shrunk blocks keep memory flat in depth)."""
    stage = {**STRUCT, "score": "wanda"}  # closed form needs the Grams; the OBS search is slow at width 1024
    peaks = peak_rss_by_depth(
        tmp_path,
        calib_file,
        "llama",
        (4, 24),
        [stage, {"method": "depth", "remove": 1}],
        hidden_size=768,
        intermediate_size=1024,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_shard_size="10MB",
    )
    assert peaks[24] / peaks[4] <= 1.15, peaks
