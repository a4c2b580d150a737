"""The stage protocol: a pruning method defined entirely inside this test runs end to end through the real loop.

`ZeroSmallest` ("zero the smallest k% of every selected linear") is registered with `engine.stage.register_stage`
and nothing in `engine/` knows about it: the recipe builds it, the loop gathers nothing for it (it asks for no
statistics), applies it on the two-forward path and, being `linear_wise`, on the one-pass true-sequential path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from engine.config import ConfigError, config_from_dict
from engine.pipeline import run
from engine.schema import ConfigError as SchemaConfigError
from engine.stage import (
    BlockRecord,
    BlockStage,
    StageBase,
    StageResult,
    StatsRequest,
    register_stage,
    unregister_stage,
)
from tests.tiny_models import recipe


@dataclass
class ZeroSmallestConfig:
    method: str = "zero_smallest"
    fraction: float = 0.25

    def validate(self, where: str) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise SchemaConfigError(f"{where}.fraction = {self.fraction}: must be in [0, 1)")


class ZeroSmallest(StageBase):
    """Zero the `fraction` smallest-magnitude weights of every linear (one threshold per matrix)."""

    linear_wise = True

    def solve_linears(self, visit, specs, stats, target) -> StageResult:
        out = StageResult()
        for spec in specs:
            W = visit.adapter.get_weight(visit.block, spec)
            k = int(self.config.fraction * W.numel())
            flat = W.flatten().clone()
            flat[flat.abs().argsort(stable=True)[:k]] = 0
            visit.adapter.set_weight(visit.block, spec, flat.view_as(W))
            zeros = int((flat == 0).sum())
            out.linears[spec.name] = {"sparsity": zeros / W.numel(), "zeros": zeros, "shape": list(W.shape)}
            out.removed += zeros
        return out

    def apply(self, visit, target) -> StageResult:
        return self.solve_linears(visit, visit.specs(), visit.stats, target)


@pytest.fixture
def zero_smallest():
    register_stage("zero_smallest", ZeroSmallestConfig, ZeroSmallest)
    yield
    unregister_stage("zero_smallest")


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            for n in fh.keys():  # noqa: SIM118
                out[n] = fh.get_tensor(n)
    return out


@pytest.mark.parametrize("one_pass", [True, False])
def test_a_stage_defined_in_a_test_runs_through_the_real_loop(one_pass, zero_smallest, tiny_ckpt, calib_file, tmp_path):
    src = tiny_ckpt("llama")
    stage = {"method": "zero_smallest", "fraction": 0.25}
    cfg = config_from_dict(recipe(src, tmp_path / "out", calib_file, [stage], true_sequential=one_pass))
    report = run(cfg)
    got, dense = _tensors(tmp_path / "out"), _tensors(src)
    linears = [n for n in got if n.endswith("proj.weight")]
    assert linears
    for n in linears:
        W, W0 = got[n], dense[n]
        k = int(0.25 * W0.numel())
        assert int((W == 0).sum()) >= k  # the k smallest are zero ...
        kept = W != 0
        assert torch.equal(W[kept], W0[kept])  # ... and nothing else changed
        assert W0[~kept].abs().max() <= W0[kept].abs().min()
    for n in set(got) - set(linears):
        assert torch.equal(got[n], dense[n]), n  # norms and embeddings untouched
    blocks = report["blocks"]
    assert all(b.get("true_sequential", False) is one_pass for b in blocks)
    assert all(b["removed"]["prune[0]"] == sum(r["zeros"] for r in b["linears"].values()) for b in blocks)
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # a stock checkpoint
    assert json.loads((tmp_path / "out" / "blockprune_report.json").read_text())["stages"] == ["zero_smallest"]


def test_unregistered_method_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="zero_smallest.*unknown"):
        config_from_dict(recipe("m", "o", "c", [{"method": "zero_smallest"}]))


def test_registry_refuses_a_second_registration(zero_smallest):
    with pytest.raises(ValueError, match="already registered"):
        register_stage("zero_smallest", ZeroSmallestConfig, ZeroSmallest)
    with pytest.raises(TypeError, match="dataclass"):
        register_stage("other", object, ZeroSmallest)


def test_builtin_stages_implement_the_protocol():
    from engine.stage import build_stage, stage_methods

    defaults = {"structured": {}, "depth": {}, "experts": {}}
    for method in stage_methods():
        cfg = config_from_dict(recipe("m", "o", "c", [{"method": method, **defaults.get(method, {})}]))
        stage = build_stage(cfg.prune[0], 0)
        assert isinstance(stage, BlockStage), method  # every method of the protocol is there
        assert stage.key == "prune[0]" and stage.config is cfg.prune[0]


def test_block_record_round_trips_through_the_manifest_form():
    r = BlockRecord(
        block=3,
        output_block=2,
        params=10,
        nonzero=7,
        linears={"mlp.down_proj": {"zeros": 3}},
        sections={"experts": {"kept": [0, 2]}, "allocation": {"removed": 3}},
        removed={"prune[0]": 3},
        output_error=0.25,
        time_s={"load": 1.0},
        memory={"peak_rss_mb": 10.0},
    )
    stable = r.to_dict(volatile=False)
    assert "time_s" not in stable and "peak_rss_mb" not in stable
    back = BlockRecord.from_dict(json.loads(json.dumps(stable)))
    assert back.to_dict(volatile=False) == stable
    assert back.removed == {"prune[0]": 3} and back.sections["experts"] == {"kept": [0, 2]}


def test_stats_requests_union_keeps_grams_out_of_moments():
    a = StatsRequest(gram={"attn_in"}, moments={"mlp_in"})
    b = StatsRequest(moments={"attn_in", "mlp_out"}, track={"mlp_out"})
    u = StatsRequest.union([a, b])
    assert u.gram == {"attn_in"} and u.moments == {"mlp_in", "mlp_out"} and u.track == {"mlp_out"}
