"""Recipe loading cannot hurt us (issue 16 items 4 and 7): bounded, alias-free YAML, strict values, one-line errors
naming the key; and the saved recipe records what defines the output, not how the run was started."""

from __future__ import annotations

import time

import pytest
import yaml

from engine.config import (
    MAX_RECIPE_BYTES,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_yaml,
    load_recipe,
    read_recipe,
)
from engine.distill.run import load_distill_recipe

RECIPE = """\
model: /models/tiny
output: /out/tiny-50
calibration: {data: /data/calib.txt, samples: 4, seq_len: 32}
runtime: {device: cpu, dtype: float32}
prune:
  - {method: sparsegpt, sparsity: 0.5, percdamp: 1e-2}
"""

# 9 levels of 9 aliases: 9^9 ≈ 387 million strings once expanded; about 500 bytes on disk
BOMB = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    + "".join(f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))
    + "model: /m\noutput: /o\ncalibration: {data: /c}\n"
)


def _write(tmp_path, text: str, name: str = "recipe.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _one_line_error(fn, *args, match: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 400, msg
    if match is not None:
        assert match in msg, msg
    return msg


def test_a_valid_recipe_loads(tmp_path):
    cfg = load_recipe(_write(tmp_path, RECIPE), ["prune.0.sparsity=0.6", "runtime.threads=2"])
    assert cfg.prune[0].sparsity == 0.6 and cfg.prune[0].percdamp == 0.01 and cfg.runtime.threads == 2


def test_yaml_1_2_numbers_nm_patterns_stay_strings_and_1e_minus_4_is_a_float(tmp_path):
    """PyYAML alone reads `2:4` as the base-60 integer 124 and `1e-4` as a string."""
    text = RECIPE.replace("percdamp: 1e-2}", "percdamp: 1e-2, pattern: 2:4}")
    cfg = load_recipe(_write(tmp_path, text), ["calibration.seed=1e1"])
    assert cfg.prune[0].pattern == "2:4" and cfg.calibration.seed == 10
    assert read_recipe(_write(tmp_path, "x: 1e-4\ny: 12\nz: 0x10\nw: 1.5\n", "n.yaml")) == {
        "x": 1e-4,
        "y": 12,
        "z": 16,
        "w": 1.5,
    }
    assert load_recipe(_write(tmp_path, RECIPE), ["prune.0.pattern=2:4"]).prune[0].pattern == "2:4"


def test_saved_recipe_reads_back_the_same_in_our_loader_and_in_stock_yaml(tmp_path):
    cfg = load_recipe(_write(tmp_path, RECIPE), ["prune.0.pattern=2:4", "calibration.text_field=1e-4"])
    saved = config_to_yaml(cfg)
    assert yaml.safe_load(saved) == read_recipe(_write(tmp_path, saved, "saved.yaml"))
    assert yaml.safe_load(saved)["prune"][0]["pattern"] == "2:4"


def test_alias_bomb_is_rejected_in_well_under_a_second(tmp_path):
    path = _write(tmp_path, BOMB)
    assert path.stat().st_size < 700
    t0 = time.perf_counter()
    _one_line_error(load_recipe, path, match="aliases are not allowed")
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("text", ["x: &a 1\ny: 2\n", "x: [1]\ny: *a\n", "<<: {a: 1}\nmodel: &m /m\n"])
def test_any_anchor_or_alias_is_rejected(tmp_path, text):
    _one_line_error(read_recipe, _write(tmp_path, text), match="not allowed")


def test_alias_in_an_override_value_is_rejected():
    _one_line_error(apply_overrides, {"model": "/m"}, ["calibration=&a {data: /c}"], match="not allowed")


def test_a_python_dict_with_shared_references_is_refused_without_expanding_it():
    """Library callers may pass recipe dicts built in Python (e.g. from their own yaml.safe_load of a bomb)."""
    leaf: list = ["lol"] * 9
    for _ in range(9):
        leaf = [leaf] * 9
    t0 = time.perf_counter()
    _one_line_error(apply_overrides, {"model": "/m", "x": leaf}, [], match="more than")
    assert time.perf_counter() - t0 < 0.5


def test_an_oversized_recipe_is_refused_before_it_is_parsed(tmp_path):
    path = _write(tmp_path, "# padding\n" * (MAX_RECIPE_BYTES // 10 + 1) + RECIPE)
    _one_line_error(load_recipe, path, match="at most")


@pytest.mark.parametrize("depth", [40, 5000])
def test_deep_nesting_is_one_line_not_a_recursion_error(tmp_path, depth):
    _one_line_error(read_recipe, _write(tmp_path, "x: " + "[" * depth + "]" * depth + "\n"), match="nesting")


def test_too_many_values_are_refused_while_parsing(tmp_path):
    text = "x: [" + ", ".join(["1"] * 20_000) + "]\n"
    assert len(text) < MAX_RECIPE_BYTES
    _one_line_error(read_recipe, _write(tmp_path, text), match="more than 10000 values")


def test_a_key_written_twice_is_refused(tmp_path):
    _one_line_error(load_recipe, _write(tmp_path, RECIPE + "output: /other\n"), match="'output' is written twice")


def test_unreadable_recipe_files(tmp_path):
    _one_line_error(load_recipe, tmp_path / "missing.yaml", match="no such file")
    _one_line_error(load_recipe, tmp_path, match="not a regular file")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"model: /m\xe9\n")
    _one_line_error(load_recipe, bad, match="not UTF-8")
    _one_line_error(load_recipe, _write(tmp_path, "- a\n- b\n", "list.yaml"), match="top level")
    _one_line_error(load_recipe, _write(tmp_path, "model: [1\n", "broken.yaml"), match="invalid YAML")
    _one_line_error(load_recipe, _write(tmp_path, "", "empty.yaml"), match="`model` is required")


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("model.x.y=1", "model is a string, not a mapping"),
        ("calibration.samples=[1", "invalid YAML"),
        ("calibration.data=!!python/object/apply:os.system [echo hi]", "could not determine a constructor"),
        ("calibration.data=!!python/name:os.system", "could not determine a constructor"),
        ("prune.0.sparsity", "expected key=value"),
        ("=0.5", "empty part"),
        ("prune..sparsity=0.5", "empty part"),
        ("prune.3.sparsity=0.5", "not an index below 1"),
        ("prune.first.sparsity=0.5", "not an index below 1"),
        ("prune.0.sparsity.x=1", "prune.0.sparsity is a number"),
        ("runtime.threads=-1", "runtime.threads = -1"),
        ("runtime.threads=0", "runtime.threads = 0"),
        ("runtime.micro_batch=0", "runtime.micro_batch = 0"),
        ("runtime.host_budget_gb=-1", "runtime.host_budget_gb = -1"),
        ("runtime.spill_dir=' '", "runtime.spill_dir is blank"),
        ("runtime.threads=2.5", "expected an integer"),
        ("calibration.samples=true", "expected an integer"),
        ("sequential=[1]", "expected true or false"),
        ("output=[a, b]", "expected a string"),
        ("calibration.data=yes", "expected a string"),
        ("model={a: 1}", "expected a string"),
        ("output=' '", "output"),
        ("output=''", "output"),
        ("output=", "output"),
        ("prune.0.targets=[[a]]", "expected a list of strings"),
        ("prune.0.allocation=[1]", "expected a mapping"),
        ("seed=2024-01-01", "date is not a recipe value"),
        ("version=2", "recipe version 1"),
        ("max_shard_size=5XB", "max_shard_size"),
    ],
)
def test_malformed_overrides_are_one_line_naming_the_key(tmp_path, override, match):
    _one_line_error(load_recipe, _write(tmp_path, RECIPE), [override], match=match)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "inf", "'-Infinity'", "1e999"])
@pytest.mark.parametrize(
    "key",
    [
        "prune.0.percdamp",
        "prune.0.sparsity",
        "runtime.device_budget_gb",
        "calibration.samples",
    ],
)
def test_non_finite_numbers_are_refused_in_every_numeric_field(tmp_path, key, value):
    msg = _one_line_error(load_recipe, _write(tmp_path, RECIPE), [f"{key}={value}"])
    assert key.rsplit(".", 1)[1] in msg, msg


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_yaml_floats_are_refused_anywhere_even_in_free_form_mappings(tmp_path, value):
    """`allocation` and distill's `deepspeed` are mappings checked by their own code; YAML floats are caught first."""
    _one_line_error(load_recipe, _write(tmp_path, RECIPE), [f"prune.0.allocation.lambda={value}"], match="lambda")


def test_non_finite_numbers_in_the_file_are_refused(tmp_path):
    _one_line_error(load_recipe, _write(tmp_path, RECIPE.replace("0.5,", ".nan,")), match="prune.0.sparsity = nan")


def test_a_whitespace_output_in_the_file_is_refused(tmp_path):
    _one_line_error(load_recipe, _write(tmp_path, RECIPE.replace("/out/tiny-50", "'   '")), match="output is empty")


def test_library_recipes_get_the_same_strict_values():
    recipe = yaml.safe_load(RECIPE)
    recipe["prune"][0]["percdamp"] = float("nan")
    _one_line_error(config_from_dict, recipe, match="finite")


def test_library_recipes_take_paths_and_refuse_a_reference_bomb_quickly(tmp_path):
    recipe = yaml.safe_load(RECIPE)
    recipe["output"] = tmp_path / "out"  # a pathlib.Path
    assert config_from_dict(recipe).output == str(tmp_path / "out")
    leaf: list = ["lol"] * 9
    for _ in range(9):
        leaf = [leaf] * 9
    recipe["prune"][0]["targets"] = leaf
    t0 = time.perf_counter()
    _one_line_error(config_from_dict, recipe, match="more than 10000 values")
    assert time.perf_counter() - t0 < 0.5


def test_saved_recipe_omits_how_the_run_was_started_and_loads_back(tmp_path):
    cfg = load_recipe(_write(tmp_path, RECIPE))
    fresh = config_to_yaml(cfg)
    cfg.resume = cfg.overwrite = True
    saved = config_to_yaml(cfg)
    assert saved == fresh
    assert "resume" not in yaml.safe_load(saved) and "overwrite" not in yaml.safe_load(saved)
    again = load_recipe(_write(tmp_path, saved, "saved.yaml"))
    assert again.to_dict() == load_recipe(_write(tmp_path, RECIPE)).to_dict()


def test_saved_recipe_writes_shared_objects_out_instead_of_aliasing_them(tmp_path):
    cfg = load_recipe(_write(tmp_path, RECIPE))
    cfg.prune[0].ignore = cfg.prune[0].targets  # one list object twice
    saved = config_to_yaml(cfg)
    assert "&" not in saved and "*" not in saved.replace("'*'", "")
    load_recipe(_write(tmp_path, saved, "saved.yaml"))


DISTILL = "student: /s\nteacher: /t\noutput: /o\ndata: /d\nsteps: 10\n"


def test_distill_recipes_share_the_loader(tmp_path):
    assert load_distill_recipe(_write(tmp_path, DISTILL), ["lr=5e-5"]).lr == 5e-5
    _one_line_error(load_distill_recipe, _write(tmp_path, BOMB + DISTILL, "bomb.yaml"), match="not allowed")
    _one_line_error(load_distill_recipe, _write(tmp_path, DISTILL), ["lr=nan"], match="distill.lr")
    _one_line_error(load_distill_recipe, _write(tmp_path, DISTILL), ["student.x=1"], match="student is a string")
    _one_line_error(load_distill_recipe, tmp_path / "nope.yaml", match="distill recipe")
