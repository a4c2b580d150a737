"""The `blockprune` CLI: one error base, one-line errors with exit code 2 (a traceback only with -v)."""

from __future__ import annotations

import pytest

from engine.calibration import CalibrationError
from engine.config import ConfigError
from launch.cli import main
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
