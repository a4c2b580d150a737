"""engine: the block loop, architecture adapters, calibration, activation cache, config, report.

Library verb: `engine.prune(model_dir, config) -> report`.
"""

from __future__ import annotations


def prune(model_dir, config):
    """Prune the checkpoint in `model_dir` with `config` (a recipe dict or `engine.config.RunConfig`); returns the
    report dict (also written as `blockprune_report.json` in the output)."""
    from engine.pipeline import prune as _prune

    return _prune(model_dir, config)


__all__ = ["prune"]
