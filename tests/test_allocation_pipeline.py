"""Global allocation end to end: scoring pass and its cache, coordinator, per-layer structured widths (non-uniform
checkpoints that load without blockprune), per-layer unstructured sparsity (dense and MoE), `of: total`, report."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine.arch import adapter_for
from engine.budget import error_at, layer_energies, model_params, outlier_ratio
from engine.config import ConfigError, config_from_dict
from engine.coordinator import Coordinator, LayerModel, UnitKind, plan_layer, removed_params
from engine.loader import load_pruned
from engine.pipeline import run
from engine.stages.structured import StructuredConfig, cumulative_error
from engine.units import CHANNEL_GRID, layer_inventory, plan_uniform, selected_kinds, split_units
from sharding.reader import CheckpointReader
from solvers.allocation import outlier_ratio as outlier_ratio_reference
from solvers.stats import accumulate, init_stats
from tests.tiny_models import recipe, run_killed_before

STRUCT = {
    "method": "structured",
    "target": 0.3,
    "units": ["heads", "channels"],
    "score": "wanda",
    "solver": "closed_form",
}
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices gain nothing from intra-op threads, and on a shared machine they cost a lot of waiting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _layers4(tiny_ckpt, arch: str) -> Path:
    """A 4-layer tiny model with 4 KV groups (so KV-group counts can differ between layers)."""
    kw = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4}
    if arch in ("qwen3", "qwen3_moe"):
        kw["head_dim"] = 8
    return tiny_ckpt(arch, **kw)


def _block_params(reader: CheckpointReader) -> int:
    return sum(math.prod(reader.info(n).shape) for n in reader.names() if ".layers." in n)


REMOTE = """
import sys
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
try:
    import engine
    raise SystemExit("blockprune's engine is importable")
except ImportError:
    pass
ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
out = {}
for k, path in enumerate(sys.argv[2:]):
    m = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(m).__module__.endswith("modeling_blockprune") and type(m).__name__.endswith("ForCausalLM"), type(m)
    with torch.no_grad():
        out[str(k)] = m(ids).logits
        a = m.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
        b = m.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert_same_greedy(m, ids, a, b)
torch.save(out, sys.argv[1])
print("REMOTE OK")
"""


def remote_logits(paths: list[Path], tmp_path: Path) -> list[torch.Tensor]:
    """Logits of IDS from each checkpoint loaded with trust_remote_code in one Python without blockprune."""
    script = tmp_path / "remote.py"
    script.write_text(REMOTE)
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
    assert p.returncode == 0 and "REMOTE OK" in p.stdout, p.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    return [got[str(k)] for k in range(len(paths))]


# --------------------------------------------------------------------------------------------- structured


@pytest.fixture(scope="module")
def structured_runs(tiny_ckpt, calib_file, tmp_path_factory):
    """softmax on a 4-layer llama and OWL on a 4-layer Qwen2-MoE (shared expert), structured 30%."""
    d = tmp_path_factory.mktemp("alloc_struct")
    out = {}
    for arch, rule in (("llama", "softmax"), ("qwen2_moe", "owl")):
        src = _layers4(tiny_ckpt, arch)
        stage = {**STRUCT, "allocation": {"rule": rule, "temperature": 0.5, "max": 0.7}}
        rep = run(config_from_dict(recipe(src, d / arch, calib_file, [stage])))
        out[arch] = (src, d / arch, rep)
    return out


def test_structured_nonuniform_checkpoints_load_and_hit_budget(structured_runs, tmp_path):
    paths, refs = [], []
    for src, out, rep in structured_runs.values():
        a = rep["allocation"]
        cfg = json.loads((out / "config.json").read_text())
        layers = cfg["blockprune"]["layers"]
        assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_blockprune.BlockpruneForCausalLM"
        assert len({json.dumps(e["config"], sort_keys=True) for e in layers}) > 1, layers  # non-uniform widths
        assert a["within_tolerance"] is True and abs(a["achieved"] - 0.3) < 0.02, a
        before, after = _block_params(CheckpointReader(src)), _block_params(CheckpointReader(out))
        assert before - after == a["removed"]  # the written checkpoint is what the coordinator recorded
        for row, e in zip(a["layers"], layers):
            assert row["achieved"] == pytest.approx(row["decided"])  # structured: rounding happens in decide
            assert 0.0 <= row["achieved"] <= 0.7 + 1e-9
            remove = row["remove"]
            if remove.get("kv_group"):
                assert e["config"]["num_key_value_heads"] == 4 - remove["kv_group"]
        assert len({r["achieved"] for r in a["layers"]}) > 1
        model = load_pruned(out, dtype=torch.float32)
        with torch.no_grad():
            refs.append(model(IDS).logits)
        assert sum(p.numel() for n, p in model.named_parameters() if ".layers." in n) == after
        paths.append(out)
    for got, ref in zip(remote_logits(paths, tmp_path), refs):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_structured_softmax_follows_energies(structured_runs):
    """Softmax: the plan is monotone in the energy (lower energy, more removed); the split uses both unit kinds."""
    a = structured_runs["llama"][2]["allocation"]
    rows = a["layers"]
    by_energy = sorted(rows, key=lambda r: r["energy"])
    assert all(x["rule"] >= y["rule"] - 1e-12 for x, y in zip(by_energy, by_energy[1:]))
    assert a["scores"]["reused"] is False and a["energy"] == "error"
    assert any(r["remove"].get("kv_group", 0) > 0 for r in rows) and all(r["remove"]["channel"] >= 0 for r in rows)


def test_owl_report_and_plots(structured_runs):
    from engine.report.render import ALLOCATION_PNG, render_report

    rep = structured_runs["qwen2_moe"][2]
    a = rep["allocation"]
    D = [r["outlier_ratio"] for r in a["layers"]]
    order_D, order_s = sorted(range(4), key=lambda k: D[k]), sorted(range(4), key=lambda k: -a["layers"][k]["rule"])
    assert order_D == order_s  # OWL: more outliers, less pruning
    files = render_report(rep)
    assert files[ALLOCATION_PNG][:8] == b"\x89PNG\r\n\x1a\n"
    md = files["report.md"].decode()
    assert "## Allocation" in md and "planned" in md


# --------------------------------------------------------------------------------------------- cache and resume


def test_scores_cached_reused_on_resume_and_retarget(tiny_ckpt, calib_file, tmp_path, monkeypatch):
    src = tiny_ckpt("qwen3")
    stage = {**STRUCT, "allocation": {"rule": "softmax"}}
    full = run(config_from_dict(recipe(src, tmp_path / "full", calib_file, [stage])))
    assert full["allocation"]["scores"]["reused"] is False and (tmp_path / "full" / "blockprune_scores.json").is_file()
    layers = next(iter(json.loads((tmp_path / "full" / "blockprune_scores.json").read_text())["entries"].values()))
    for r in layers["layers"]:  # 2 KV groups: r = 0, 1; 33 channel fractions; errors at the grid and the target
        assert r["head_error"][0] == 0.0 and len(r["head_error"]) == 2 and r["head_error"][1] > 0
        assert len(r["channel_error"]) == 33 and r["channel_error"][0] == 0.0 and r["channel_error"][-1] > 0
        assert sorted(r["errors"]) == ["0.1", "0.3", "0.5"] and all(v > 0 for v in r["errors"].values())
    run_killed_before("block.00002", config_from_dict(recipe(src, tmp_path / "part", calib_file, [stage])), monkeypatch)
    rep = run(config_from_dict(recipe(src, tmp_path / "part", calib_file, [stage], resume=True)))
    assert rep["allocation"]["scores"]["reused"] is True
    assert [b.get("resumed", False) for b in rep["blocks"]] == [True, True, False]
    for f in sorted((tmp_path / "full").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "part" / f.name).read_bytes(), f.name
    assert json.loads((tmp_path / "full" / "config.json").read_text()) == json.loads(
        (tmp_path / "part" / "config.json").read_text()
    )
    # re-targeted, re-tempered run into the same directory (overwrite clears it): the scores are reused
    again = {**stage, "target": 0.25, "allocation": {"rule": "softmax", "temperature": 2.0}}
    rep = run(config_from_dict(recipe(src, tmp_path / "full", calib_file, [again], overwrite=True)))
    assert rep["allocation"]["scores"]["reused"] is True and rep["allocation"]["within_tolerance"] is True
    scores = json.loads((tmp_path / "full" / "blockprune_scores.json").read_text())
    assert len(scores["entries"]) == 1


# --------------------------------------------------------------------------------------------- unstructured


def _zero_fraction(path: Path) -> tuple[int, int, dict[int, tuple[int, int]]]:
    """(zeros, weights) over the decoder linears of a checkpoint, and per layer."""
    zeros = total = 0
    per: dict[int, tuple[int, int]] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118
                if (
                    ".layers." in name
                    and name.endswith("proj.weight")
                    or ".w1." in name
                    or ".w2." in name
                    or ".w3." in name
                ):
                    t = st.get_tensor(name)
                    i = int(name.split(".layers.")[1].split(".")[0])
                    z, n = per.get(i, (0, 0))
                    per[i] = (z + int((t == 0).sum()), n + t.numel())
                    zeros += int((t == 0).sum())
                    total += t.numel()
    return zeros, total, per


@pytest.mark.parametrize(("arch", "rule", "method"), [("llama", "softmax", "sparsegpt"), ("qwen3_moe", "owl", "wanda")])
def test_unstructured_per_layer_sparsity(arch, rule, method, tiny_ckpt, calib_file, tmp_path):
    src = tiny_ckpt(arch)
    stage = {"method": method, "sparsity": 0.5, "allocation": {"rule": rule, "temperature": 0.5}}
    rep = run(config_from_dict(recipe(src, tmp_path / "o", calib_file, [stage])))
    a = rep["allocation"]
    zeros, total, per = _zero_fraction(tmp_path / "o")
    assert total == a["planned_params"]  # every decoder linear, experts included, is selected
    assert abs(zeros - 0.5 * total) <= max(1e-3 * 0.5 * total, 1), (zeros, total)
    assert a["removed"] == zeros and a["within_tolerance"] is True
    for row in a["layers"]:
        z, n = per[row["layer"]]
        assert row["removed"] == z and n == row["params"]
        assert abs(row["achieved"] - row["decided"]) <= 0.5 / 32 + 1e-9  # per-row rounding (inputs >= 32 wide)
    assert len({round(r["achieved"], 3) for r in a["layers"]}) > 1
    lin = rep["blocks"][0]["linears"]
    assert all(r["planned"] == pytest.approx(a["layers"][0]["decided"]) for r in lin.values())


def test_of_total_rescales_the_target(tiny_ckpt, calib_file, tmp_path):
    src = tiny_ckpt("mistral")
    stage = {"method": "magnitude", "sparsity": 0.3, "allocation": {"of": "total"}}
    rep = run(config_from_dict(recipe(src, tmp_path / "o", calib_file, [stage])))
    zeros, total, _ = _zero_fraction(tmp_path / "o")
    n_all = sum(math.prod(CheckpointReader(src).info(n).shape) for n in CheckpointReader(src).names())
    assert rep["allocation"]["total_params"] == n_all
    assert zeros == pytest.approx(0.3 * n_all, abs=0.002 * n_all)
    assert "layers" not in rep["allocation"]  # uniform: no coordinator, one sparsity everywhere


# --------------------------------------------------------------------------------------------- pure parts


def test_coordinator_is_pure_and_lands_with_rounding():
    """Random structured layers, random energies: decisions are deterministic and picklable, and whatever the layers
    report within one unit of their plan (the decided units ± half a step), the total lands within 0.1% or one
    unit."""
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        L = int(torch.randint(3, 12, (1,), generator=g))
        models = []
        for i in range(L):
            kinds = (
                UnitKind("kv_group", 4, 1, 1024),
                UnitKind("channel", int(torch.randint(64, 256, (1,), generator=g)), 1, 192, 8),
            )
            P = sum(k.held for k in kinds) + 128
            models.append(LayerModel(i, P, unit=8 * 192.0, kinds=kinds, align=8))
        S = float(torch.empty(1).uniform_(0.1, 0.5, generator=g))
        lo = [0.0] * L
        hi = [min(0.8, m.max_removed / m.params) for m in models]
        from solvers.allocation import softmax_allocation, standardize_energy

        plan = softmax_allocation(
            standardize_energy(torch.randn(L, generator=g)), [m.params for m in models], S, T=1.0, s_min=lo, s_max=hi
        )
        c = Coordinator(models, plan.tolist(), S, s_min=lo, s_max=hi, split="proportional")
        for m in models:
            d = c.decide(m.layer)
            assert d == c.decide(m.layer) and pickle.loads(pickle.dumps(d)) == d
            jitter = float(torch.empty(1).uniform_(-0.5, 0.5, generator=g)) * 8 * 192  # total within one unit
            got = min(max(d.removed + jitter, 0.0), m.max_removed)
            c.record(m.layer, got, d)
        P = sum(m.params for m in models)
        assert abs(c.final_error()) <= max(1e-3 * S * P, 8 * 192 + 1e-6)


def test_plan_layer_proportional_is_the_uniform_split(tiny_ckpt):
    """One layer's proportional plan at budget S·P_l is what the uniform plan removes per layer."""
    from engine.pipeline import make_stages

    reader = CheckpointReader(_layers4(tiny_ckpt, "llama"))
    adapter = adapter_for(reader.config)
    cfg = config_from_dict(recipe("m", "o", "c", [{**STRUCT, "allocation": {"rule": "softmax"}}]))
    _, budget = make_stages(cfg, adapter, dict(reader.config))
    for S in (0.1, 0.3, 0.5):
        uni = plan_uniform(adapter, StructuredConfig(target=S, units=["heads", "channels"], align=1))
        m = budget.models[0]
        assert plan_layer(m, S * m.params, "proportional") == uni.remove
    inv = layer_inventory(adapter, 0)
    assert split_units(inv, selected_kinds(inv, ["heads"]), 0.6 * budget.models[0].params, 1) == {"kv_group": 3}


def test_plan_layer_error_split_prefers_cheap_units():
    kinds = (UnitKind("kv_group", 4, 1, 1000), UnitKind("channel", 100, 1, 40, 1))
    cheap_heads = LayerModel(
        0, 8000, 40.0, kinds, head_error=(0.0, 0.01, 0.02, 0.03), channel_error=tuple(f * 10 for f in CHANNEL_GRID)
    )
    cheap_channels = LayerModel(
        0, 8000, 40.0, kinds, head_error=(0.0, 1.0, 2.0, 3.0), channel_error=tuple(f * 0.01 for f in CHANNEL_GRID)
    )
    assert plan_layer(cheap_heads, 2000, "error") == {"kv_group": 2, "channel": 0}
    assert plan_layer(cheap_channels, 2000, "error") == {"kv_group": 0, "channel": 50}
    assert removed_params(cheap_channels, {"kv_group": 1, "channel": 3}) == 1120
    assert plan_layer(cheap_channels, 1e9, "error") == {"kv_group": 3, "channel": 99}  # clamped to what it can


def test_cumulative_error_and_outlier_ratio_match_references():
    g = torch.Generator().manual_seed(1)
    X, W = torch.randn(50, 12, generator=g, dtype=torch.float64), torch.randn(5, 12, generator=g, dtype=torch.float64)
    order = torch.tensor([2, 0, 3, 1, 5, 4])
    cum = cumulative_error(W, X.T @ X, 2, order)
    for k in range(7):
        cols = torch.cat([torch.arange(2 * u, 2 * u + 2) for u in order[:k]]) if k else torch.zeros(0, dtype=torch.long)
        assert float(cum[k]) == pytest.approx(float((X[:, cols] @ W[:, cols].T).square().sum()), rel=1e-10, abs=1e-12)

    # row blocks of M (forced small: 1, 2 or 3 units at a time) give the same curve, for units of width 1 and 3
    import engine.stages.structured as st_mod

    for width, cap in ((1, 12 * 8 + 12 * 17), (3, 2 * (3 * 12 * 8 + 4 * 17)), (1, 3 * (12 * 8 + 12 * 17))):
        order = torch.randperm(12 // width, generator=g)
        whole = cumulative_error(W, X.T @ X, width, order)
        old, st_mod.CUM_CHUNK_BYTES = st_mod.CUM_CHUNK_BYTES, cap
        try:
            chunked = cumulative_error(W, X.T @ X, width, order)
        finally:
            st_mod.CUM_CHUNK_BYTES = old
        for k in range(len(order) + 1):
            cols = torch.cat([torch.arange(width * u, width * u + width) for u in order[:k]]) if k else order[:0]
            ref = float((X[:, cols] @ W[:, cols].T).square().sum())
            assert float(chunked[k]) == pytest.approx(ref, rel=1e-10, abs=1e-12)
            assert float(whole[k]) == pytest.approx(ref, rel=1e-10, abs=1e-12)
    # float32 weights (the real blocks): float32 products, float64 sums
    cum32 = cumulative_error(W.float(), (X.T @ X).float(), 2, torch.tensor([2, 0, 3, 1, 5, 4]))
    assert torch.allclose(cum32, cum, rtol=1e-5, atol=1e-6 * float(cum[-1]))

    class _Adapter:
        def get_weight(self, block, spec):
            return block[spec.name]

    from engine.arch import LinearSpec

    specs = [LinearSpec("a", "in", 5, 12), LinearSpec("b", "in2", 3, 7)]
    block = {"a": W.float(), "b": torch.randn(3, 7, generator=g)}
    stats = {}
    for sid, d in (("in", 12), ("in2", 7)):
        stats[sid] = init_stats(d, gram=False)
        accumulate(stats[sid], torch.randn(20, d, generator=g) * torch.linspace(0.1, 8, d))
    from solvers.masks import wanda_scores

    ref = outlier_ratio_reference([wanda_scores(block[s.name], stats[s.input_id].sumsq) for s in specs], M=1.5)
    assert outlier_ratio(_Adapter(), block, specs, stats, 1.5) == pytest.approx(ref)


def test_energies_and_interpolation():
    layers = [
        {"layer": i, "errors": {"0.2": e, "0.4": 4 * e}, "influence": b, "score_stats": {"k": [2, s, s * s]}}
        for i, (e, b, s) in enumerate([(1e-3, 0.1, 1.0), (1e-2, 0.3, 3.0), (1e-1, 0.2, 2.0)])
    ]
    assert error_at(layers[0], 0.3) == pytest.approx(2e-3)  # geometric mean of 1e-3 and 4e-3
    E = layer_energies(layers, "error", 0.2)
    assert E.tolist() == pytest.approx([-1.224744871, 0.0, 1.224744871], abs=1e-8)
    assert torch.argsort(layer_energies(layers, "influence", 0.2)).tolist() == [0, 2, 1]
    assert torch.argsort(layer_energies(layers, "score", 0.2)).tolist() == [0, 2, 1]


def test_model_params_counts_everything(tiny_ckpt):
    src = tiny_ckpt("llama")
    r = CheckpointReader(src)
    assert model_params(adapter_for(r.config)) == sum(math.prod(r.info(n).shape) for n in r.names())


# --------------------------------------------------------------------------------------------- recipe errors


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({**STRUCT, "allocation": {"rule": "greedy"}}, "rule = 'greedy'"),
        ({**STRUCT, "allocation": {"rule": "softmax", "energy": "loss"}}, "energy = 'loss'"),
        ({**STRUCT, "allocation": {"rule": "softmax", "temperature": 0}}, "temperature = 0.0"),
        ({**STRUCT, "allocation": {"rule": "softmax", "min": 0.5, "max": 0.4}}, "min <= max"),
        ({**STRUCT, "allocation": {"rule": "softmax", "max": 1.0}}, "max = 1.0"),
        ({**STRUCT, "allocation": {"rule": "softmax", "temp": 1}}, "unknown key"),
        ({"method": "wanda", "pattern": "2:4", "allocation": {"rule": "owl"}}, "needs pattern: unstructured"),
        ({"method": "wanda", "allocation": {"rule": "owl", "split": "error"}}, "unknown key"),
    ],
)
def test_allocation_recipe_errors(stage, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(recipe(tmp_path, tmp_path / "o", tmp_path / "c", [stage]))


def test_allocation_model_errors(tiny_ckpt, calib_file, tmp_path):
    src = tiny_ckpt("llama")
    two = [
        {"method": "wanda", "targets": ["self_attn.*"], "allocation": {"rule": "owl"}},
        {"method": "wanda", "targets": ["mlp.*"], "allocation": {"rule": "softmax"}},
    ]
    with pytest.raises(ConfigError, match="only one stage per run"):
        run(config_from_dict(recipe(src, tmp_path / "a", calib_file, two)))
    with pytest.raises(ConfigError, match="outside what min"):
        run(
            config_from_dict(
                recipe(
                    src,
                    tmp_path / "b",
                    calib_file,
                    [{"method": "wanda", "sparsity": 0.5, "allocation": {"rule": "softmax", "max": 0.4}}],
                )
            )
        )
    with pytest.raises(ConfigError, match="must stay below 1"):
        run(
            config_from_dict(
                recipe(
                    src,
                    tmp_path / "c",
                    calib_file,
                    [{"method": "wanda", "sparsity": 0.9, "allocation": {"of": "total"}}],
                )
            )
        )
    assert not any((tmp_path / n).exists() for n in "abc")


def test_plan_mentions_the_scoring_pass(tiny_ckpt, tmp_path):
    from engine.planning import format_plan, make_plan

    stage = {**STRUCT, "allocation": {"rule": "softmax"}}
    text = format_plan(make_plan(config_from_dict(recipe(tiny_ckpt("llama"), tmp_path / "o", tmp_path / "c", [stage]))))
    assert "allocation softmax: a scoring pass first (1 dense + up to 5 masked forwards" in text  # 4 + (2 − 1)
    uniform = config_from_dict(recipe(tiny_ckpt("llama"), tmp_path / "o", tmp_path / "c", [STRUCT]))
    assert make_plan(uniform).allocation is None


@pytest.mark.slow
def test_two_ranks_plan_like_one_and_share_the_scores(tiny_ckpt, calib_file, tmp_path):
    """`--nproc 2`: the scoring pass reduces over ranks, so the per-layer widths equal one rank's; a re-tempered rerun
    into the same directory reuses the scores on both ranks (one key for all ranks: no rank scores alone)."""
    import yaml

    src = _layers4(tiny_ckpt, "llama")
    stage = {**STRUCT, "allocation": {"rule": "softmax", "temperature": 0.5}}
    one = run(config_from_dict(recipe(src, tmp_path / "one", calib_file, [stage])))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k, t in enumerate((0.5, 0.7)):
        r = recipe(
            src,
            tmp_path / "two",
            calib_file,
            [{**stage, "allocation": {"rule": "softmax", "temperature": t}}],
            overwrite=k > 0,
        )
        (tmp_path / "two.yaml").write_text(yaml.safe_dump(r))
        p = subprocess.run(
            [sys.executable, "-m", "launch", "run", str(tmp_path / "two.yaml"), "--nproc", "2"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
            env=env,
            timeout=600,
        )
        assert p.returncode == 0, p.stderr[-4000:]
        two = json.loads((tmp_path / "two" / "blockprune_report.json").read_text())
        assert two["world_size"] == 2 and two["allocation"]["scores"]["reused"] is (k > 0)
        if k == 0:
            assert [r["remove"] for r in two["allocation"]["layers"]] == [
                r["remove"] for r in one["allocation"]["layers"]
            ]
            assert (
                json.loads((tmp_path / "two" / "config.json").read_text())["blockprune"]
                == json.loads((tmp_path / "one" / "config.json").read_text())["blockprune"]
            )
