"""Channel alignment (engine/align.py): the automatic default, how it resolves per width and kind, what the plan
says it costs, and that a default structured run on a tiny model still prunes to aligned widths."""

from __future__ import annotations

import dataclasses
import json

import pytest

from engine.align import auto_align, check_align, resolve_align
from engine.arch import adapter_for
from engine.config import ConfigError, config_from_dict
from engine.pipeline import run
from engine.planning import alignment_note, format_plan, make_plan
from engine.stages.structured import StructuredConfig
from engine.units import plan_uniform
from sharding.reader import CheckpointReader
from tests.tiny_models import recipe


def test_auto_align_is_64_for_real_widths_and_scales_down_for_small_ones():
    assert [auto_align(n) for n in (14336, 11008, 1536, 1024)] == [64, 64, 64, 64]
    assert [auto_align(n) for n in (768, 512, 96, 48, 32, 10)] == [32, 32, 4, 2, 2, 1]
    for n in range(1, 5000, 37):
        a = auto_align(n)
        assert a & (a - 1) == 0 and a <= 64 and (a == 1 or a * 16 <= n)


def test_resolve_align_per_kind():
    assert resolve_align("auto", 1536, "kv_group") == 1  # KV groups are whole heads
    assert resolve_align("auto", 1536, "channel") == 64
    assert resolve_align(1, 1536, "channel") == 1
    assert resolve_align("auto", 32, "expert_channel") == 8  # grouped matmul strides
    assert resolve_align(12, 768, "expert_channel") == 24
    assert check_align("64", "x") == 64 and check_align(" AUTO ", "x") == "auto"
    for bad in (0, -1, "x", "1.5", True):
        with pytest.raises(ValueError):
            check_align(bad, "x")


def test_default_is_auto_and_validates():
    cfg = config_from_dict(recipe("m", "o", "c", [{"method": "structured"}]))
    assert StructuredConfig().align == "auto" and cfg.prune[0].align == "auto"
    assert config_from_dict(recipe("m", "o", "c", [{"method": "structured", "align": 64}])).prune[0].align == 64
    with pytest.raises(ConfigError, match="align"):
        config_from_dict(recipe("m", "o", "c", [{"method": "structured", "align": 0}]))


def test_plan_says_what_alignment_costs(tiny_ckpt, calib_file):
    """The plan's line is the exact difference between the aligned uniform plan and the align-1 plan."""
    src = tiny_ckpt("llama", intermediate_size=1536, hidden_size=64, num_hidden_layers=2)
    stage = {"method": "structured", "target": 0.27, "units": ["channels"]}
    cfg = config_from_dict(recipe(src, "unused", calib_file, [stage]))
    adapter = adapter_for(CheckpointReader(src).config)
    aligned = plan_uniform(adapter, cfg.prune[0])
    exact = plan_uniform(adapter, dataclasses.replace(cfg.prune[0], align=1))
    assert aligned.overrides["intermediate_size"] % 64 == 0 and exact.overrides["intermediate_size"] % 64 != 0
    cost = aligned.params_after - exact.params_after
    assert cost != 0
    note = alignment_note(cfg, adapter)
    assert "channel 1536 -> multiples of 64" in note and f"{cost:+,} block parameters" in note
    assert note in format_plan(make_plan(cfg))
    glob = config_from_dict(recipe(src, "unused", calib_file, [{**stage, "allocation": {"rule": "softmax"}}]))
    assert "per layer (the budget absorbs it)" in alignment_note(glob, adapter)


def test_default_align_still_prunes_tiny_models(tiny_ckpt, calib_file, tmp_path):
    """auto on 96 channels is 4: a default structured run removes channels, kept widths multiples of 4."""
    src = tiny_ckpt("llama")
    rep = run(config_from_dict(recipe(src, tmp_path / "out", calib_file, [{"method": "structured", "target": 0.2}])))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["intermediate_size"] < 96 and cfg["intermediate_size"] % 4 == 0
    assert rep["structured_plan"]["achieved"] > 0.1
