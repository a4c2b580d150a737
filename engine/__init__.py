"""engine: the block loop, architecture adapters, calibration, activation cache, config, report.

Library verbs: `engine.prune(model_dir, config) -> report`, `engine.load_pruned(path) -> model`.
"""

from __future__ import annotations


def prune(model_dir, config):
    """Prune the checkpoint in `model_dir` with `config` (a recipe dict or `engine.config.RunConfig`); returns the
    report dict (also written as `blockprune_report.json` in the output)."""
    from engine.pipeline import prune as _prune

    return _prune(model_dir, config)


def load_pruned(path, **kwargs):
    """Load a blockprune output (stock or non-uniform) without remote code; see `engine.loader.load_pruned`."""
    from engine.loader import load_pruned as _load

    return _load(path, **kwargs)


__all__ = ["load_pruned", "prune"]
