"""The experts stage (STUN) end to end on tiny MoE models with planted clusters of near-duplicate experts: the
clusters found, the logits of the pruned model, stock / trust_remote_code loading, per-layer counts, the later
unstructured stage on the survivors, resume, errors, and flat peak memory in depth."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.arch import adapter_for
from engine.config import ConfigError, config_from_dict
from engine.loader import load_pruned
from engine.pipeline import run
from engine.stages.experts import allocate_per_layer, expert_count_field, routing_stats
from launch.benchmarks.moe_planted import (
    build_planted,
    experts_logits,
    random_keeps,
    relative_change,
    whole_clusters_removed,
)
from sharding.reader import CheckpointReader
from solvers.clustering import coactivation_counts
from tests.test_structured_pipeline import remote_logits
from tests.tiny_models import build_tiny_checkpoint, peak_rss_by_depth, recipe, run_killed_before

MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]
STUN = {"method": "experts", "target": 0.25, "similarity": "router", "representative": "centroid"}
SIZES = [2, 2, 1, 1, 1, 1]  # 8 experts, 6 clusters: target 0.25 removes exactly the planted duplicates


def ids_for_test() -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))


def moe_records(rep: dict) -> dict[int, dict]:
    return {b["block"]: b["experts"] for b in rep["blocks"] if "experts" in b}


def kept(rep: dict) -> dict[int, list[int]]:
    return {i: m["kept"] for i, m in moe_records(rep).items() if m["after"] < m["before"]}


def stock_logits(path: Path, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Logits of the stock-loaded checkpoint and {"experts": routed experts, "top_k"} of its config."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    c = model.config
    with torch.no_grad():
        return model(ids).logits, {"experts": getattr(c, expert_count_field(c)), "top_k": c.num_experts_per_tok}


def assert_recovered(rep: dict, truth: dict[int, list[int]]) -> None:
    """Every MoE block found the planted clusters and kept one expert of each; with router distances (1e-3 noise)
    the clusters are also far tighter than they are apart."""
    moe = moe_records(rep)
    assert sorted(moe) == sorted(truth)
    for i, m in moe.items():
        assert m["clusters"] == truth[i], (i, m["clusters"], truth[i])
        assert sorted(truth[i][e] for e in m["kept"]) == list(range(max(truth[i]) + 1))  # one per planted cluster
        if rep["experts"]["similarity"] == "router":
            assert m["diameter"] < 1e-2 * m["separation"]


# ------------------------------------------------------------------------------------------ planted structure


@pytest.mark.parametrize("arch", MOE + ["deepseek_v3"])
def test_planted_top1_recovered_near_lossless_and_stock_loadable(arch, calib_file, tmp_path):
    """Top-1 routing (renormalised): keeping one expert per planted cluster changes the logits by < 1% relative;
    removing the same number of experts as whole clusters changes them by far more. The stock-loaded output equals
    the in-memory pruned model (the source with the reported experts kept); config counts and top_k agree."""
    src, out = tmp_path / "src", tmp_path / "out"
    truth = build_planted(arch, src, SIZES, top_k=1, layers=3)
    rep = run(config_from_dict(recipe(src, out, calib_file, [STUN])))
    assert_recovered(rep, truth)
    ids = ids_for_test()
    got, cfg = stock_logits(out, ids)
    keep = kept(rep)
    torch.testing.assert_close(got, experts_logits(src, ids, keep), rtol=1e-5, atol=1e-5)
    assert cfg == {"experts": 6, "top_k": 1}
    assert rep["experts"]["achieved"] == 0.25 and rep["experts"]["experts_after"] == {str(i): 6 for i in truth}
    dense = experts_logits(src, ids)
    stun = relative_change(got, dense)
    whole = relative_change(
        experts_logits(src, ids, {i: whole_clusters_removed(t, 2) for i, t in truth.items()}), dense
    )
    assert stun < 0.01 and whole > 10 * stun and whole > 0.05, (stun, whole)
    if arch in ("qwen2_moe", "deepseek_v3"):  # shared experts are untouched
        a, b = CheckpointReader(src), CheckpointReader(out)
        names = [n for n in a.names() if ".shared_expert" in n]
        assert names and all(torch.equal(a.read([n])[n], b.read([n])[n]) for n in names)


@pytest.mark.parametrize(
    ("arch", "similarity"), [("mixtral", "coactivation"), ("qwen2_moe", "both"), ("qwen3_moe", "router")]
)
def test_planted_top2_stun_beats_random_removal(arch, similarity, calib_file, tmp_path):
    """Top-2 routing: every similarity recovers the planted clusters (near-duplicates fire together), and STUN's
    choice changes the logits several times less than random removals of the same count."""
    src, out = tmp_path / "src", tmp_path / "out"
    truth = build_planted(arch, src, SIZES, top_k=2, layers=2)
    rep = run(config_from_dict(recipe(src, out, calib_file, [{**STUN, "similarity": similarity}])))
    assert_recovered(rep, truth)
    ids = ids_for_test()
    dense = experts_logits(src, ids)
    stun = relative_change(experts_logits(out, ids), dense)
    rand = [relative_change(experts_logits(src, ids, k), dense) for k in random_keeps(8, 6, list(truth), draws=6)]
    assert 3 * stun < sum(rand) / len(rand), (stun, rand)


# ------------------------------------------------------------------------------------------ later stage, options


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_unstructured_stage_acts_on_surviving_experts(method, calib_file, tmp_path):
    """`[experts, wanda|sparsegpt 0.25]`: the later stage prunes exactly the kept experts (renumbered 0..5) in the
    same block visit; Wanda keeps the surviving source weights where it keeps any."""
    src, out = tmp_path / "src", tmp_path / "out"
    build_planted("mixtral", src, SIZES, top_k=2, layers=2)
    rep = run(config_from_dict(recipe(src, out, calib_file, [STUN, {"method": method, "sparsity": 0.25}])))
    a, b = CheckpointReader(src), CheckpointReader(out)
    for blk in rep["blocks"]:
        i, keep = blk["block"], blk["experts"]["kept"]
        experts = sorted({n.split(".")[2] for n in blk["linears"] if n.startswith("mlp.experts.")}, key=int)
        assert experts == [str(j) for j in range(6)] and blk["output_error"] > 0
        for name, rec in blk["linears"].items():
            assert rec["sparsity"] == pytest.approx(0.25, abs=0.01), name
        for j, e in enumerate(keep):
            for part in ("w1", "w2", "w3"):
                W0 = a.read([f"model.layers.{i}.block_sparse_moe.experts.{e}.{part}.weight"]).popitem()[1]
                W = b.read([f"model.layers.{i}.block_sparse_moe.experts.{j}.{part}.weight"]).popitem()[1]
                assert (W == 0).float().mean() == pytest.approx(0.25, abs=0.01)
                if method == "wanda":
                    torch.testing.assert_close(W, W0 * (W != 0), rtol=0, atol=0)
    ids = ids_for_test()
    got, cfg = stock_logits(out, ids)
    torch.testing.assert_close(got, experts_logits(out, ids), rtol=1e-5, atol=1e-5)
    assert cfg == {"experts": 6, "top_k": 2}


def test_exact_issue_recipe_with_owl_allocation(calib_file, tmp_path):
    """The recipe as written in the issue: experts (router, centroid) then Wanda 25% with OWL allocation."""
    src, out = tmp_path / "src", tmp_path / "out"
    truth = build_planted("qwen3_moe", src, SIZES, top_k=2, layers=2)
    stages = [
        {"method": "experts", "target": 0.25, "similarity": "router", "representative": "centroid"},
        {"method": "wanda", "sparsity": 0.25, "allocation": {"rule": "owl"}},
    ]
    rep = run(config_from_dict(recipe(src, out, calib_file, stages)))
    assert_recovered(rep, truth)
    ids = ids_for_test()
    got, cfg = (
        stock_logits(out, ids)
        if "blockprune" not in json.loads((out / "config.json").read_text())
        else (load_pruned(out, dtype=torch.float32)(ids).logits.detach(), None)
    )
    torch.testing.assert_close(got, experts_logits(out, ids), rtol=1e-5, atol=1e-5)
    linears = [r for b in rep["blocks"] for r in b["linears"].values()]
    total = sum(r["shape"][0] * r["shape"][1] for r in linears)
    zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in linears)
    assert zeros / total == pytest.approx(0.25, abs=0.01)


def test_average_representative(calib_file, tmp_path):
    """`representative: average`: each kept slot holds its cluster's token-weighted average (weights and router
    row), and the planted model still changes by < 1%."""
    src, out = tmp_path / "src", tmp_path / "out"
    truth = build_planted("qwen3_moe", src, SIZES, top_k=1, layers=2)
    rep = run(config_from_dict(recipe(src, out, calib_file, [{**STUN, "representative": "average"}])))
    assert_recovered(rep, truth)
    a, b = CheckpointReader(src), CheckpointReader(out)
    for i, m in moe_records(rep).items():
        n = torch.tensor(m["tokens_per_expert"], dtype=torch.float64)
        for j, e in enumerate(m["kept"]):
            members = [x for x in range(8) if m["clusters"][x] == m["clusters"][e]]
            w = n[members] / n[members].sum() if n[members].sum() > 0 else torch.full((len(members),), 1 / len(members))
            for part in ("down_proj", "up_proj"):
                src_w = [a.read([f"model.layers.{i}.mlp.experts.{x}.{part}.weight"]).popitem()[1] for x in members]
                want = sum(wk * t.double() for wk, t in zip(w, src_w)).float()
                got = b.read([f"model.layers.{i}.mlp.experts.{j}.{part}.weight"]).popitem()[1]
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            router = a.read([f"model.layers.{i}.mlp.gate.weight"]).popitem()[1].double()
            out_router = b.read([f"model.layers.{i}.mlp.gate.weight"]).popitem()[1]
            torch.testing.assert_close(
                out_router[j], (w[:, None] * router[members]).sum(0).float(), rtol=1e-6, atol=1e-6
            )
    ids = ids_for_test()
    assert relative_change(experts_logits(out, ids), experts_logits(src, ids)) < 0.01


def test_top_k_clipped_to_kept_experts(calib_file, tmp_path, caplog):
    """4 experts, top-2, target 0.75: one expert is left, so num_experts_per_tok becomes 1 (logged and reported)."""
    src, out = tmp_path / "src", tmp_path / "out"
    build_planted("mixtral", src, [2, 2], top_k=2, layers=2)
    with caplog.at_level(logging.WARNING, logger="engine.stages.experts"):
        rep = run(config_from_dict(recipe(src, out, calib_file, [{**STUN, "target": 0.75}])))
    assert "top_k is clipped" in caplog.text
    assert rep["experts"]["top_k_clipped_layers"] == [0, 1]
    assert all(m["after"] == 1 and m["top_k"] == 1 and m["top_k_clipped_from"] == 2 for m in moe_records(rep).values())
    ids = ids_for_test()
    got, cfg = stock_logits(out, ids)
    assert cfg == {"experts": 1, "top_k": 1}
    torch.testing.assert_close(got, experts_logits(src, ids, kept(rep)), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ per-layer counts


def test_per_layer_counts_nonuniform_checkpoint(calib_file, tmp_path):
    """`per_layer: true` on a model whose duplicates sit in layers 0 and 1 only: the global threshold removes them
    all (4 + 4 = the uniform total 2·4), layers 2 and 3 keep every expert; the output carries per-layer counts, loads
    with trust_remote_code in a Python without blockprune and with `engine.load_pruned`, with the logits of the
    in-memory pruned model."""
    src, out = tmp_path / "src", tmp_path / "out"
    truth = build_planted("mixtral", src, {0: [2, 2, 2, 2], 1: [2, 2, 2, 2]}, top_k=1, layers=4)
    rep = run(config_from_dict(recipe(src, out, calib_file, [{**STUN, "per_layer": True}])))
    assert rep["experts"]["experts_after"] == {"0": 4, "1": 4, "2": 8, "3": 8}
    assert_recovered(rep, {i: truth[i] for i in (0, 1)} | {i: list(range(8)) for i in (2, 3)})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_blockprune.BlockpruneForCausalLM"
    assert [e["config"] for e in cfg["blockprune"]["layers"]] == [
        {"num_local_experts": n, "num_experts_per_tok": 1} for n in (4, 4, 8, 8)
    ]
    assert cfg["num_local_experts"] == 8 and cfg["num_experts_per_tok"] == 1
    ids = ids_for_test()
    ref = experts_logits(src, ids, kept(rep))
    torch.testing.assert_close(remote_logits(out, tmp_path), ref, rtol=1e-5, atol=1e-5)
    model = load_pruned(out, dtype=torch.float32)
    assert [layer.mlp.experts.gate_up_proj.shape[0] for layer in model.model.layers] == [4, 4, 8, 8]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
    assert relative_change(ref, experts_logits(src, ids)) < 0.01


def test_per_layer_resume_is_byte_identical(calib_file, tmp_path, monkeypatch):
    src = tmp_path / "src"
    build_planted("qwen2_moe", src, {0: [2, 2, 2, 2], 1: SIZES}, top_k=2, layers=3)
    stages = [{**STUN, "per_layer": True, "similarity": "both"}, {"method": "sparsegpt", "sparsity": 0.25}]
    full = run(config_from_dict(recipe(src, tmp_path / "full", calib_file, stages)))
    assert full["experts"]["experts_after"] == {"0": 4, "1": 6, "2": 8}  # the uniform total, 3 x 2
    run_killed_before("block.00002", config_from_dict(recipe(src, tmp_path / "part", calib_file, stages)), monkeypatch)
    rep = run(config_from_dict(recipe(src, tmp_path / "part", calib_file, stages, resume=True)))
    assert [b.get("resumed", False) for b in rep["blocks"]] == [True, True, False]
    for f in sorted((tmp_path / "full").glob("*.safetensors")) + [tmp_path / "full" / "config.json"]:
        assert f.read_bytes() == (tmp_path / "part" / f.name).read_bytes(), f.name


def test_allocate_per_layer_global_threshold():
    """Layer 0: two tight pairs (merge heights 0.01, 0.02 before scaling); layer 1: evenly spread. Removing 2 takes
    both of layer 0's pairs; removing 3 also takes layer 1's closest merge."""
    D0 = torch.tensor([[0, 0.01, 1, 1], [0.01, 0, 1, 1], [1, 1, 0, 0.02], [1, 1, 0.02, 0]], dtype=torch.float64)
    D1 = torch.tensor([[0, 0.5, 1, 1], [0.5, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0]], dtype=torch.float64)
    assert allocate_per_layer({0: D0, 1: D1}, 2)[0] == {0: 2, 1: 4}
    counts, info = allocate_per_layer({0: D0, 1: D1}, 3)
    assert counts == {0: 2, 1: 3} and info["threshold"] == pytest.approx(0.5 / (11 / 12))  # / mean off-diagonal
    assert allocate_per_layer({0: D0, 1: D1}, 6)[0] == {0: 1, 1: 1}
    with pytest.raises(ValueError, match="every layer keeps one"):
        allocate_per_layer({0: D0, 1: D1}, 7)


# ------------------------------------------------------------------------------------------ statistics, errors


def test_routing_stats_match_the_router(tiny_ckpt):
    """The hook's sums equal co-activation counts recomputed from the router's own top-k, over two micro-batches."""
    src = tiny_ckpt("qwen3_moe")
    reader = CheckpointReader(src)
    adapter = adapter_for(reader.config)
    block = adapter.build_block(
        1, reader.read(reader.names_with_prefix("model.layers.1.")), device="cpu", dtype=torch.float32
    )
    xs = [torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    ctx = adapter.forward_context(2, 8, device="cpu", dtype=torch.float32)
    top_k, weights = [], []

    def record(module, args, out) -> None:
        top_k.append(out[2])
        weights.append(out[1])

    h = block.mlp.gate.register_forward_hook(record)
    with routing_stats(block) as routing:
        for x in xs:
            adapter.block_forward(block, x, ctx)
    h.remove()
    idx = torch.cat(top_k)
    assert torch.equal(routing["coactivation"], coactivation_counts(idx, 4)) and int(routing["tokens"]) == 32
    want = torch.zeros(4, dtype=torch.float64).index_add_(0, idx.reshape(-1), torch.cat(weights).reshape(-1).double())
    torch.testing.assert_close(routing["routing_weight"], want)
    assert not block.mlp.experts._forward_pre_hooks  # removed on exit


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{**STUN, "similarity": "cosine"}], "similarity = 'cosine'"),
        ([{**STUN, "target": 1.0}], "target = 1.0"),
        ([{**STUN, "representative": "medoid"}], "representative = 'medoid'"),
        ([{**STUN, "alpha": 2}], "alpha = 2"),
        ([{"method": "wanda"}, STUN], "must come before"),
        ([STUN, STUN], "at most one `experts`"),
        ([STUN, {"method": "depth", "remove": 1}], "cannot share a run"),
    ],
)
def test_stage_config_errors(stages, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(recipe(tmp_path, tmp_path / "o", tmp_path / "c", stages))


def test_model_dependent_errors(tiny_ckpt, calib_file, tmp_path):
    with pytest.raises(ConfigError, match="has no MoE block"):
        run(config_from_dict(recipe(tiny_ckpt("llama"), tmp_path / "a", calib_file, [STUN])))
    src = build_tiny_checkpoint("deepseek_v3", tmp_path / "ds", n_routed_experts=8, n_group=2, topk_group=1)
    with pytest.raises(ConfigError, match="fewer than 2 in each of the n_group = 2 routing groups"):
        run(config_from_dict(recipe(src, tmp_path / "b", calib_file, [{**STUN, "target": 0.75}])))
    top1 = build_planted("mixtral", tmp_path / "top1", [2, 2], top_k=1, layers=1)
    with pytest.raises(ConfigError, match="coactivation needs num_experts_per_tok >= 2"):
        run(
            config_from_dict(
                recipe(tmp_path / "top1", tmp_path / "c", calib_file, [{**STUN, "similarity": "coactivation"}])
            )
        )
    assert top1 and not any((tmp_path / d).exists() for d in "abc")


def test_plan_shows_expert_counts(tiny_ckpt, tmp_path):
    from engine.planning import format_plan, make_plan

    plan = make_plan(config_from_dict(recipe(tiny_ckpt("qwen2_moe"), tmp_path / "o", tmp_path / "c", [STUN])))
    text = format_plan(plan)
    assert [b["experts"] for b in plan.blocks] == ["4->3"] * 3
    assert "experts 4->3;" in text and "9 of 12 routed experts kept in 3 MoE layers" in text


# ------------------------------------------------------------------------------------------ memory


@pytest.mark.slow
def test_peak_rss_flat_in_depth(tmp_path, calib_file):
    """A 16-layer and a 4-layer Mixtral of equal width (hidden 256, 8 experts of 512): experts 25% + Wanda 25%,
    peak RSS ratio <= 1.15."""
    peaks = peak_rss_by_depth(
        tmp_path,
        calib_file,
        "mixtral",
        (4, 16),
        [STUN, {"method": "wanda", "sparsity": 0.25}],
        threads=1,  # on a shared, loaded machine 2 OpenMP threads spin and run ~10x slower
        timeout=600,
        hidden_size=256,
        intermediate_size=512,
        num_local_experts=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_shard_size="10MB",
    )
    ratio = peaks[16] / peaks[4]
    print(f"peak RSS 4 layers {peaks[4] / 1024:.0f} MB, 16 layers {peaks[16] / 1024:.0f} MB, ratio {ratio:.3f}")
    assert ratio <= 1.15, peaks
