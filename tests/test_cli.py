"""The `blockprune` CLI: one error base, one-line errors with exit code 2 (a traceback only with -v)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from engine.calibration import CalibrationError
from engine.config import ConfigError
from launch.cli import build_parser, main, version
from sharding.errors import BlockpruneError, CheckpointError
from sharding.writer import WriterError


@pytest.mark.parametrize("cls", [ConfigError, CheckpointError, WriterError, CalibrationError])
def test_every_error_derives_from_the_one_base(cls):
    assert issubclass(cls, BlockpruneError)


def test_old_bases_are_kept_for_callers_that_catch_them():
    assert issubclass(ConfigError, ValueError) and issubclass(CheckpointError, ValueError)
    assert issubclass(CalibrationError, ValueError) and issubclass(WriterError, RuntimeError)


def test_a_blockprune_error_is_one_line_on_stderr_with_exit_code_2(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("blockprune: error: ") and "missing.yaml" in err


def test_verbose_shows_the_traceback(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml"):
        main(["-v", "plan", str(tmp_path / "missing.yaml")])


# ------------------------------------------------------------------------------------- a table of bad inputs
#
# Each row runs `launch.cli.main` in-process on bad input and must end with exit code 2 and exactly one line on
# stderr, no traceback (issue 16 acceptance). Tiny checkpoints are copies of the session's tiny llama with one lie
# in config.json or one shard rewritten.


def _edit_config(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    path = dst / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return dst


def _fp8_copy(src: Path, dst: Path, name: str) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    shard = dst / json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    save_file(tensors, shard, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def bad(tiny_ckpt, tmp_path_factory) -> dict[str, Path]:
    """Paths of good and bad inputs: `good` model, models with one lie each, recipes, a calibration text."""
    root = tmp_path_factory.mktemp("bad_inputs")
    good = tiny_ckpt("llama")
    q = "model.layers.0.self_attn.q_proj.weight"
    p = {
        "good": good,
        "str_hidden": _edit_config(good, root / "str_hidden", lambda c: {**c, "hidden_size": "64"}),
        "no_layers": _edit_config(
            good, root / "no_layers", lambda c: {k: v for k, v in c.items() if k != "num_hidden_layers"}
        ),
        "vocab": _edit_config(good, root / "vocab", lambda c: {**c, "vocab_size": 100}),
        "extra_layer": _edit_config(good, root / "extra_layer", lambda c: {**c, "num_hidden_layers": 2}),
        "missing_block": _edit_config(good, root / "missing_block", lambda c: {**c, "num_hidden_layers": 4}),
        "fp8": _fp8_copy(good, root / "fp8", q),
        "pickle": root / "pickle",
        "calib": root / "calib.txt",
        "out": root / "out",
    }
    p["pickle"].mkdir()
    shutil.copy(good / "config.json", p["pickle"])
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, p["pickle"] / "pytorch_model.bin")
    p["calib"].write_text("some calibration text\n" * 50)
    recipe = {
        "model": str(good),
        "output": str(p["out"]),
        "calibration": {"data": str(p["calib"]), "samples": 2, "seq_len": 16},
        "runtime": {"device": "cpu", "progress": False},
        "prune": [{"method": "sparsegpt", "sparsity": 0.5}],
    }
    p["recipe"] = root / "recipe.yaml"
    p["recipe"].write_text(yaml.safe_dump(recipe))
    p["bomb"] = root / "bomb.yaml"
    p["bomb"].write_text(BOMB + yaml.safe_dump(recipe))
    p["list"] = root / "list.yaml"
    p["list"].write_text("- model\n- output\n")
    p["latin1"] = root / "latin1.yaml"
    p["latin1"].write_bytes(b"model: /m\xe9\n")
    p["big"] = root / "big.yaml"
    p["big"].write_text("# padding\n" * 200_000)
    p["zero"] = root / "zero.yaml"
    p["zero"].symlink_to("/dev/zero")  # endless bytes: refused before a read
    distill = {"student": str(good), "teacher": str(good), "output": str(root / "dout"), "data": str(p["calib"])}
    p["distill"] = root / "distill.yaml"
    p["distill"].write_text(yaml.safe_dump({**distill, "steps": 2}))
    p["distill_bomb"] = root / "distill_bomb.yaml"
    p["distill_bomb"].write_text(
        BOMB.replace("model: /m\noutput: /o\ncalibration: {data: /c}\n", "") + yaml.safe_dump(distill)
    )
    return p


BOMB = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    + "".join(f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))
    + "model: /m\noutput: /o\ncalibration: {data: /c}\n"
)

# (row id, argv with {placeholders} filled from the `bad` fixture, a piece of the expected message)
ROWS = [
    ("run-missing-recipe", ["run", "{out}/nope.yaml"], "no such file"),
    ("run-alias-bomb", ["run", "{bomb}"], "anchors and aliases are not allowed"),
    ("run-recipe-is-a-list", ["run", "{list}"], "expected a mapping at the top level"),
    ("run-recipe-not-utf8", ["run", "{latin1}"], "not UTF-8"),
    ("run-recipe-too-big", ["run", "{big}"], "a recipe is at most"),
    ("run-recipe-is-dev-zero", ["run", "{zero}"], "not a regular file"),
    ("run-percdamp-nan", ["run", "{recipe}", "prune.0.percdamp=.nan"], "percdamp = nan: must be a finite number"),
    ("run-percdamp-inf", ["run", "{recipe}", "prune.0.percdamp=.inf"], "percdamp = inf: must be a finite number"),
    ("run-sparsity-nan-string", ["run", "{recipe}", "prune.0.sparsity=nan"], "sparsity = 'nan': must be a finite"),
    ("run-threads-negative", ["run", "{recipe}", "runtime.threads=-1"], "runtime.threads = -1: must be >= 1"),
    ("run-override-into-string", ["run", "{recipe}", "model.x.y=1"], "model is a string, not a mapping"),
    ("run-override-bad-yaml", ["run", "{recipe}", "calibration.samples=[1"], "invalid YAML"),
    ("run-override-yaml-tag", ["run", "{recipe}", "calibration.data=!!python/object/apply:os.system [true]"], "tag"),
    ("run-override-no-equals", ["run", "{recipe}", "calibration.samples"], "expected key=value"),
    ("run-override-alias", ["run", "{recipe}", "calibration=&a {{data: x}}"], "not allowed"),
    ("run-empty-output", ["run", "{recipe}", "output="], "output must not be empty"),
    ("run-blank-output", ["run", "{recipe}", "output='  '"], "output is empty"),
    ("run-unknown-key", ["run", "{recipe}", "runtime.thread=2"], "unknown key(s) thread"),
    ("run-missing-model", ["run", "{recipe}", "model={out}/no_model"], "not a checkpoint directory"),
    ("run-string-hidden-size", ["run", "{recipe}", "model={str_hidden}"], "hidden_size = '64': must be an integer"),
    ("run-no-num-hidden-layers", ["run", "{recipe}", "model={no_layers}"], "num_hidden_layers is missing"),
    ("run-vocab-mismatch", ["run", "{recipe}", "model={vocab}"], "vocab_size = 100, but the embedding"),
    ("run-fp8", ["run", "{recipe}", "model={fp8}"], "FP8 weights need the block scales"),
    ("run-extra-layer", ["run", "{recipe}", "model={extra_layer}"], "but the checkpoint has block 2"),
    ("run-pickle-only", ["run", "{recipe}", "model={pickle}"], "convert it to safetensors first"),
    ("submit-alias-bomb", ["submit", "{bomb}", "--local"], "not allowed"),
    ("submit-string-hidden-size", ["submit", "{recipe}", "model={str_hidden}", "--local"], "hidden_size = '64'"),
    ("plan-string-hidden-size", ["plan", "{recipe}", "model={str_hidden}"], "hidden_size = '64'"),
    ("plan-missing-block", ["plan", "{recipe}", "model={missing_block}"], "no tensor of block 3"),
    ("plan-sparsity-inf", ["plan", "{recipe}", "prune.0.sparsity=.inf"], "sparsity = inf"),
    ("plan-alias-bomb", ["plan", "{bomb}"], "not allowed"),
    ("inspect-string-hidden-size", ["inspect", "{str_hidden}"], "hidden_size = '64'"),
    ("plan-fp8", ["plan", "{recipe}", "model={fp8}"], "tensor 'model.layers.0.self_attn.q_proj.weight': dtype F8_E4M3"),
    ("inspect-extra-layer", ["inspect", "{extra_layer}"], "but the checkpoint has block 2"),
    ("inspect-missing-dir", ["inspect", "{out}/nowhere"], "not a checkpoint directory"),
    ("inspect-pickle-only", ["inspect", "{pickle}"], "pickle checkpoint refused"),
    ("eval-pickle-only", ["eval", "{pickle}", "--data", "{calib}"], "convert it to safetensors first"),
    ("eval-vocab-mismatch", ["eval", "{vocab}", "--data", "{calib}"], "vocab_size = 100"),
    ("eval-string-hidden-size", ["eval", "{good}", "--compare", "{str_hidden}", "--data", "{calib}"], "hidden_size"),
    ("eval-missing-data", ["eval", "{good}", "--data", "{out}/none.txt"], "evaluation text not found"),
    ("eval-missing-model", ["eval", "{out}/nowhere", "--data", "{calib}"], "not a checkpoint directory"),
    ("eval-bogus-device", ["eval", "{good}", "--data", "{calib}", "--device", "bogus"], "choose auto, cpu, cuda"),
    ("eval-device-out-of-range", ["eval", "{good}", "--data", "{calib}", "--device", "cuda:99"], "--device cuda:99"),
    ("distill-missing-recipe", ["distill", "{out}/nope.yaml"], "distill recipe"),
    ("distill-alias-bomb", ["distill", "{distill_bomb}"], "not allowed"),
    ("distill-lr-nan", ["distill", "{distill}", "lr=.nan"], "lr = nan: must be a finite number"),
    ("distill-override-into-string", ["distill", "{distill}", "student.x=1"], "student is a string"),
    ("distill-bad-student", ["distill", "{distill}", "student={str_hidden}"], "hidden_size = '64'"),
    ("distill-fp8-teacher", ["distill", "{distill}", "teacher={fp8}"], "FP8 weights need the block scales"),
]


@pytest.mark.parametrize(("argv", "match"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_on_stderr_with_exit_code_2(bad, capsys, argv, match):
    code = main([a.format(**bad) for a in argv])
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.err.count("\n") == 1 and captured.err.startswith("blockprune: error: "), captured.err
    assert "Traceback" not in captured.err and match in captured.err, captured.err
    assert not bad["out"].exists()  # nothing was written


def test_inspect_reads_fp8_checkpoints_it_cannot_prune(bad, capsys):
    assert main(["inspect", str(bad["fp8"]), "--no-verify"]) == 0
    assert "model.layers.0" in capsys.readouterr().out


def test_the_table_covers_every_command_and_enough_rows():
    assert len(ROWS) >= 25 and {r[1][0] for r in ROWS} >= {"run", "submit", "plan", "inspect", "eval", "distill"}


def test_verbose_shows_the_traceback_of_a_table_row(bad):
    """`-v` re-raises; run as a real process to see what the user sees."""
    p = subprocess.run(
        [sys.executable, "-m", "launch", "-v", "plan", str(bad["recipe"]), f"model={bad['str_hidden']}"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert p.returncode != 0 and "Traceback" in p.stderr and "CheckpointError" in p.stderr, p.stderr[-2000:]


# ------------------------------------------------------------------------------------- a CLI that explains itself


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_option_of_every_subcommand_has_help():
    subs = _subparsers()
    assert set(subs) >= {"run", "submit", "plan", "inspect", "eval", "demo", "distill"}
    for name, sub in [("blockprune", build_parser()), *subs.items()]:
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            label = action.option_strings or [action.dest]
            assert action.help and action.help != argparse.SUPPRESS and action.help.strip(), (name, label)


def test_every_subcommand_has_a_description_and_an_example():
    for name, sub in _subparsers().items():
        assert sub.description and len(sub.description) > 40, name
        assert sub.epilog and f"blockprune {name} " in sub.epilog, name
        assert isinstance(sub.formatter_class, type) and issubclass(
            sub.formatter_class, argparse.RawDescriptionHelpFormatter
        )
        assert sub.format_help()  # renders


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"blockprune {version()}"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", version())


def test_verbose_is_also_accepted_after_the_subcommand(tmp_path):
    with pytest.raises(ConfigError):
        main(["plan", str(tmp_path / "missing.yaml"), "-v"])
    assert build_parser().parse_args(["plan", "r.yaml"]).verbose is False


def test_run_dry_run_prints_the_plan_and_writes_nothing(bad, capsys):
    assert main(["plan", str(bad["recipe"]), "calibration.samples=3"]) == 0
    plan = capsys.readouterr().out
    assert main(["run", str(bad["recipe"]), "calibration.samples=3", "--dry-run", "--nproc", "2"]) == 0
    dry = capsys.readouterr().out
    # The same report; the host figures include this process's resident memory, which moves between the two calls.
    assert re.sub(r"\d+\.\d+", "#", dry) == re.sub(r"\d+\.\d+", "#", plan) and "estimated peak memory" in plan
    assert not bad["out"].exists()
