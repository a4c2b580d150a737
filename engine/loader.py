"""`load_pruned(path)`: load any blockprune output without remote code.

Uniform outputs are stock checkpoints (`AutoModelForCausalLM`); non-uniform ones (a `blockprune` section in
`config.json`) are built with this package's copy of `modeling_blockprune.BlockpruneForCausalLM`, the same code the
checkpoint ships for `trust_remote_code=True`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from engine.modeling_blockprune import SECTION, make_causal_lm

log = logging.getLogger(__name__)


def load_pruned(path: str | Path, **kwargs: Any):
    """The pruned model in `path` (a `PreTrainedModel` in eval mode); `kwargs` go to `from_pretrained` (e.g.
    `dtype=torch.float32`, `device_map`). ValueError when `path` has no config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"load_pruned: {cfg_file} does not exist")
    raw = json.loads(cfg_file.read_text())
    if SECTION not in raw:  # a stock model: transformers' own class, never code shipped in the checkpoint
        return AutoModelForCausalLM.from_pretrained(path, **{"trust_remote_code": False, **kwargs}).eval()
    config = AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "auto_map"})
    cls = make_causal_lm(raw["model_type"])
    log.info(
        "load_pruned: %s is non-uniform (%d layers); loading with %s",
        path,
        len(raw[SECTION]["layers"]),
        cls.__mro__[1].__name__,
    )
    return cls.from_pretrained(path, config=config, **kwargs).eval()
