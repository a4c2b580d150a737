"""DeepSeek-V3 group-limited routing in the experts stage (issue 15 item 5), and the acceptance run of items 4 and 5:
a tiny DeepSeek-V3 stored as FP8 + `weight_scale_inv` with `n_group = 2` and a multi-token-prediction layer, pruned
directly at 0%, with SparseGPT 50% and with experts 25% + Wanda 50%.

Tiny DeepSeek here: 8 routed experts in 2 routing groups of 4 (`topk_group = 1`, top-2), 3 layers (layer 0 dense,
1 and 2 MoE), random `e_score_correction_bias` so that the kept biases are visibly the source's."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.config import ConfigError, config_from_dict
from engine.loader import load_pruned
from engine.model_check import open_checked
from engine.pipeline import run
from engine.stages.experts import allocate_per_layer, grouped_keep, routed_top_k
from launch.benchmarks.moe_planted import experts_logits
from sharding.reader import CheckpointReader
from solvers.clustering import cluster_experts_grouped
from tests.test_fp8 import fp8_checkpoint, reference_dequantized
from tests.tiny_models import recipe, save_tiny, tiny_config, tiny_model

GROUPS = {"n_routed_experts": 8, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2}
STUN = {"method": "experts", "target": 0.25, "similarity": "router", "representative": "centroid"}
MOE_LAYERS = (1, 2)
ROUTER = "model.layers.{i}.mlp.gate.weight"
BIAS = "model.layers.{i}.mlp.gate.e_score_correction_bias"


def ids_for_test() -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def grouped_deepseek(path: Path, *, pairs=((0, 1), (6, 7), (3, 4)), **overrides) -> Path:
    """The tiny grouped DeepSeek-V3 saved in `path`, with, in every MoE layer, near-duplicate experts (weights and
    router rows, 1e-3 relative noise) at `pairs`: by default one pair inside each group and one across the groups
    (3 and 4), which group-limited clustering must not merge."""
    model = tiny_model("deepseek_v3", **{**GROUPS, **overrides})
    g = torch.Generator().manual_seed(5)
    for i in MOE_LAYERS:
        mlp = model.model.layers[i].mlp
        mlp.gate.e_score_correction_bias.copy_(0.1 * torch.randn(mlp.gate.e_score_correction_bias.shape, generator=g))
        for a, b in pairs:
            for T in (mlp.experts.gate_up_proj, mlp.experts.down_proj, mlp.gate.weight):
                T[b] = T[a] * (1 + 1e-3 * torch.randn(T[a].shape, generator=g))
    return save_tiny(model, path)


def groups_of(keep: list[int], E: int = 8, n_group: int = 2) -> list[int]:
    return [sum(1 for e in keep if e // (E // n_group) == c) for c in range(n_group)]


# ------------------------------------------------------------------------------------------ pure pieces


def test_cluster_experts_grouped_never_spans_groups():
    D = torch.ones(8, 8, dtype=torch.float64).fill_diagonal_(0)
    D[3, 4] = D[4, 3] = 1e-3  # the closest pair straddles the groups
    D[0, 1] = D[1, 0] = D[6, 7] = D[7, 6] = 1e-2
    assert cluster_experts_grouped(D, 6, 2).tolist() == [0, 0, 1, 2, 3, 4, 5, 5]
    assert cluster_experts_grouped(D, 7, 1).tolist() == [0, 1, 2, 3, 3, 4, 5, 6]  # ungrouped: 3 and 4 merge
    assert cluster_experts_grouped(D, 4, 2).tolist()[:4] in ([0, 0, 1, 1], [0, 0, 0, 1])
    assert cluster_experts_grouped(D, 8, 2).tolist() == list(range(8))
    with pytest.raises(ValueError, match="must divide"):
        cluster_experts_grouped(D, 5, 2)


def test_kept_count_rounding_and_top_k_cap():
    assert grouped_keep(8, 0.25, 2) == 6 and grouped_keep(8, 0.25, 1) == 6
    assert grouped_keep(256, 0.25, 8) == 192 and grouped_keep(256, 0.3, 8) == 176  # 179 -> 22 per group
    assert grouped_keep(8, 0.375, 2) == 6  # 5 kept -> 2.5 per group, halves keep more
    with pytest.raises(
        ConfigError, match="fewer than 2 in each of the n_group = 2 routing groups.*largest target is 0.5"
    ):
        grouped_keep(8, 0.75, 2)
    config = tiny_config("deepseek_v3", **{**GROUPS, "num_experts_per_tok": 4})
    assert [routed_top_k(config, n) for n in (8, 6, 4)] == [4, 3, 2]  # topk_group 1 x experts per group
    assert routed_top_k(tiny_config("deepseek_v3", **GROUPS), 6) == 2
    assert routed_top_k(tiny_config("mixtral", num_local_experts=4), 1) == 1


def test_per_layer_allocation_in_rounds_of_one_expert_per_group():
    """Layer 0: tight pairs in both groups (0-1 and 4-5); layer 1: a tight pair in group 0 only. A round removes
    one expert from every group and costs the largest of their merge heights, so layer 1's lone pair does not make
    it cheap; counts stay multiples of n_group with at least 2 per group."""
    far = torch.ones(8, 8, dtype=torch.float64).fill_diagonal_(0)
    D0, D1 = far.clone(), far.clone()
    D0[0, 1] = D0[1, 0] = D0[4, 5] = D0[5, 4] = 0.01
    D1[0, 1] = D1[1, 0] = 0.001
    counts, _ = allocate_per_layer({0: D0, 1: D1}, 2, n_group=2)
    assert counts == {0: 6, 1: 8}
    counts, _ = allocate_per_layer({0: D0, 1: D1}, 8, n_group=2)
    assert counts == {0: 4, 1: 4}
    with pytest.raises(ValueError, match="each of the 2 groups keeps 2"):
        allocate_per_layer({0: D0, 1: D1}, 10, n_group=2)
    with pytest.raises(ValueError, match="in multiples of 2"):
        allocate_per_layer({0: D0, 1: D1}, 3, n_group=2)


# ------------------------------------------------------------------------------------------ the experts stage


def check_groups_valid(src: Path, out: Path, rep: dict, n_keep: int, top_k: int) -> None:
    """The output's routing is valid: every MoE layer keeps n_keep / 2 experts per group, its router rows and
    score-correction biases are the source's rows of the kept experts, the stock config agrees, and the stock-loaded
    model computes what blockprune's adapter computes with those experts."""
    s, o = CheckpointReader(src), CheckpointReader(out)
    for b in rep["blocks"]:
        if "experts" not in b or b["block"] not in MOE_LAYERS:
            continue
        keep, i = b["experts"]["kept"], b["block"]
        assert groups_of(keep) == [n_keep // 2] * 2, keep
        assert len(set(b["experts"]["clusters"][:4]) & set(b["experts"]["clusters"][4:])) == 0
        for name in (ROUTER.format(i=i), BIAS.format(i=i)):
            assert torch.equal(o.read([name])[name], s.read([name])[name][keep]), name
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["n_routed_experts"], cfg["n_group"], cfg["topk_group"], cfg["num_experts_per_tok"]) == (
        n_keep,
        2,
        1,
        top_k,
    )
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = ids_for_test()
    with torch.no_grad():
        got = model(ids).logits
    keep = {b["block"]: b["experts"]["kept"] for b in rep["blocks"] if b["block"] in MOE_LAYERS}
    torch.testing.assert_close(got, experts_logits(src, ids, keep), rtol=1e-5, atol=1e-5)


def test_experts_respect_routing_groups(calib_file, tmp_path):
    """25% of 8 experts in 2 groups: one per group goes; the near-duplicates inside each group are merged, the pair
    that straddles the groups is not."""
    src = grouped_deepseek(tmp_path / "src")
    rep = run(config_from_dict(recipe(src, tmp_path / "out", calib_file, [STUN])))
    for i in MOE_LAYERS:
        (m,) = [b["experts"] for b in rep["blocks"] if b["block"] == i]
        assert m["clusters"] == [0, 0, 1, 2, 3, 4, 5, 5] and m["kept"][:1] in ([0], [1]) and m["top_k"] == 2
    assert rep["experts"]["n_group"] == 2 and rep["experts"]["experts_per_group_after"] == {"1": 3, "2": 3}
    check_groups_valid(src, tmp_path / "out", rep, 6, 2)


def test_top_k_clipped_to_what_the_selected_groups_hold(calib_file, tmp_path, caplog):
    """top-4 with topk_group 1: a group of 4 could serve it; once groups hold 3, num_experts_per_tok becomes 3."""
    src = grouped_deepseek(tmp_path / "src", num_experts_per_tok=4)
    with caplog.at_level(logging.WARNING, logger="engine.stages.experts"):
        rep = run(config_from_dict(recipe(src, tmp_path / "out", calib_file, [STUN])))
    assert "topk_group x experts per group" in caplog.text and "clipped to [3]" in caplog.text
    assert rep["experts"]["top_k_clipped_layers"] == [1, 2]
    check_groups_valid(src, tmp_path / "out", rep, 6, 3)


def test_rounding_to_a_multiple_of_n_group_is_said(calib_file, tmp_path, caplog):
    from engine.planning import format_plan, make_plan

    src = grouped_deepseek(tmp_path / "src")
    plan = make_plan(config_from_dict(recipe(src, tmp_path / "out", calib_file, [{**STUN, "target": 0.375}])))
    assert "12 of 16 routed experts kept in 2 MoE layers (3 in each of 2 routing groups, rounded from 5)" in (
        format_plan(plan)
    )
    with caplog.at_level(logging.WARNING, logger="engine.stages.experts"):
        rep = run(config_from_dict(recipe(src, tmp_path / "out", calib_file, [{**STUN, "target": 0.375}])))
    assert "rounded from 5 to 6 (3 per group)" in caplog.text
    assert rep["experts"]["rounded_from"] == 5 and rep["experts"]["experts_after"] == {"1": 6, "2": 6}


def test_per_layer_counts_with_groups(calib_file, tmp_path):
    """per_layer: counts are multiples of n_group (2 per group at least), the non-uniform output loads and computes
    what the adapter computes with the kept experts."""
    src = grouped_deepseek(tmp_path / "src", pairs=((0, 1), (4, 5), (2, 3), (6, 7)))
    rep = run(config_from_dict(recipe(src, tmp_path / "out", calib_file, [{**STUN, "per_layer": True}])))
    after = rep["experts"]["experts_after"]
    assert sum(after.values()) == 12 and all(n % 2 == 0 and n >= 4 for n in after.values())
    keep = {b["block"]: b["experts"]["kept"] for b in rep["blocks"] if b["block"] in MOE_LAYERS}
    assert all(groups_of(k) == [len(k) // 2] * 2 for k in keep.values())
    model = load_pruned(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        got = model(ids_for_test()).logits
    torch.testing.assert_close(got, experts_logits(src, ids_for_test(), keep), rtol=1e-5, atol=1e-5)


def test_structured_mla_is_refused_by_plan_in_one_line(calib_file, tmp_path, capsys):
    import yaml

    from launch.cli import main

    src = grouped_deepseek(tmp_path / "src")
    rec = recipe(src, tmp_path / "out", calib_file, [{"method": "structured", "target": 0.2}])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rec))
    capsys.readouterr()
    assert main(["plan", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        "\n" not in err and "structured pruning of deepseek_v3 (MLA attention) is not supported; prune it with" in err
    ), err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ acceptance: FP8 + groups


@pytest.fixture(scope="module")
def fp8_src(tmp_path_factory) -> Path:
    """The grouped tiny DeepSeek-V3 as an FP8 checkpoint ([16, 16] blocks: the 24-wide latents leave partial
    blocks) with a multi-token-prediction layer `model.layers.3.*`."""
    root = tmp_path_factory.mktemp("ds_fp8")
    return fp8_checkpoint(grouped_deepseek(root / "float"), root / "fp8", block=[16, 16], mtp=True)


def _auto(rec: dict) -> dict:
    rec["runtime"]["dtype"] = "auto"  # CPU: float32 compute, FP8 weights written as bfloat16
    return rec


def _stock_forward(out: Path) -> tuple[torch.nn.Module, dict]:
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        logits = model.eval()(ids_for_test()).logits
    assert bool(torch.isfinite(logits).all())
    return model, info


def test_fp8_deepseek_at_zero_percent_is_the_exact_dequantization(fp8_src, calib_file, tmp_path):
    """SparseGPT at 0%: every output tensor is the float32-reference dequantization in bfloat16 (the float tensors
    as stored), the MTP layer included; no scale and no quantization_config; stock transformers loads it, ignoring
    the MTP layer (reported as unexpected keys)."""
    out = tmp_path / "out"
    run(config_from_dict(_auto(recipe(fp8_src, out, calib_file, [{"method": "sparsegpt", "sparsity": 0.0}]))))
    got = CheckpointReader(out)
    ref = reference_dequantized(fp8_src)
    assert sorted(got.names()) == sorted(ref)
    assert all(torch.equal(got.read([n])[n], ref[n]) for n in ref)
    assert got.torch_dtype("model.layers.3.mlp.experts.0.down_proj.weight") == torch.bfloat16  # MTP, dequantized
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model, info = _stock_forward(out)
    assert info["unexpected_keys"] and all(k.startswith("model.layers.3.") for k in info["unexpected_keys"])
    assert not info["missing_keys"]
    sd = model.state_dict()
    assert torch.equal(
        sd["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"],
        ref["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"].float(),
    )
    open_checked(out)


def test_fp8_deepseek_sparsegpt_50(fp8_src, calib_file, tmp_path):
    out = tmp_path / "out"
    rep = run(config_from_dict(_auto(recipe(fp8_src, out, calib_file, [{"method": "sparsegpt", "sparsity": 0.5}]))))
    assert abs(rep["pruned_linear_sparsity"] - 0.5) < 0.01
    W = CheckpointReader(out).read(["model.layers.1.self_attn.q_b_proj.weight"])
    assert abs(float((W["model.layers.1.self_attn.q_b_proj.weight"] == 0).float().mean()) - 0.5) < 0.01
    _stock_forward(out)
    open_checked(out)


def test_fp8_deepseek_experts_then_wanda(fp8_src, calib_file, tmp_path, caplog):
    """Experts 25% (one per group) then Wanda 50% on the survivors: routing groups valid (3 + 3 experts, the kept
    router rows and biases the source's), stock-loadable, the MTP layer present (copied with the source's 8 experts,
    which the log says)."""
    out = tmp_path / "out"
    stages = [STUN, {"method": "wanda", "sparsity": 0.5}]
    with caplog.at_level(logging.WARNING):
        rep = run(config_from_dict(_auto(recipe(fp8_src, out, calib_file, stages))))
    assert "copied with the source's shapes" in caplog.text
    s, o = CheckpointReader(fp8_src), CheckpointReader(out)
    for i in MOE_LAYERS:
        (keep,) = [b["experts"]["kept"] for b in rep["blocks"] if b["block"] == i]
        assert groups_of(keep) == [3, 3]
        for name in (ROUTER.format(i=i), BIAS.format(i=i)):
            assert torch.equal(o.read([name])[name], s.read([name])[name][keep])
        W = o.read([f"model.layers.{i}.mlp.experts.5.up_proj.weight"])[f"model.layers.{i}.mlp.experts.5.up_proj.weight"]
        assert W.dtype == torch.bfloat16 and abs(float((W == 0).float().mean()) - 0.5) < 0.02
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["n_routed_experts"], cfg["n_group"], cfg["num_experts_per_tok"]) == (6, 2, 2)
    assert "quantization_config" not in cfg and cfg["num_nextn_predict_layers"] == 1
    assert "model.layers.3.mlp.experts.7.down_proj.weight" in o
    _stock_forward(out)
    open_checked(out)


def test_mtp_layer_renumbered_after_depth_pruning(fp8_src, calib_file, tmp_path):
    """Removing a block moves the MTP layer to follow the output's last block (model.layers.2.*), as the output
    config's num_hidden_layers says; the checkpoint passes the input checks."""
    out = tmp_path / "out"
    run(config_from_dict(_auto(recipe(fp8_src, out, calib_file, [{"method": "depth", "remove": 1, "by": "block"}]))))
    o = CheckpointReader(out)
    assert o.config["num_hidden_layers"] == 2 and o.config["num_nextn_predict_layers"] == 1
    src_mtp = reference_dequantized(fp8_src)["model.layers.3.eh_proj.weight"]
    assert torch.equal(o.read(["model.layers.2.eh_proj.weight"])["model.layers.2.eh_proj.weight"], src_mtp)
    assert not any(n.startswith("model.layers.3.") for n in o.names())
    open_checked(out)


def test_fp8_run_killed_before_the_mtp_layer_resumes_byte_identically(fp8_src, calib_file, tmp_path, monkeypatch):
    from engine.pipeline import EXTRA_UNIT
    from tests.tiny_models import run_killed_before

    stages = [STUN, {"method": "wanda", "sparsity": 0.5}]
    run(config_from_dict(_auto(recipe(fp8_src, tmp_path / "full", calib_file, stages))))
    run_killed_before(
        EXTRA_UNIT, config_from_dict(_auto(recipe(fp8_src, tmp_path / "part", calib_file, stages))), monkeypatch
    )
    rep = run(config_from_dict(_auto(recipe(fp8_src, tmp_path / "part", calib_file, stages, resume=True))))
    assert all(b.get("resumed") for b in rep["blocks"])
    files = sorted((tmp_path / "full").glob("*.safetensors")) + [tmp_path / "full" / "config.json"]
    assert len(files) > 2 and all(f.read_bytes() == (tmp_path / "part" / f.name).read_bytes() for f in files)
