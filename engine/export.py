"""The output `config.json` of a structured or depth run (DESIGN.md §6).

Uniform widths keep the stock architecture: the source config with the shrunk fields (`num_attention_heads`,
`num_key_value_heads`, `head_dim`, `intermediate_size` / `moe_intermediate_size` /
`shared_expert_intermediate_size`, `attention_bias` / `mlp_bias` for bias compensation) and, after depth pruning,
`num_hidden_layers` with the per-layer lists renumbered (`layer_types` and `mlp_only_layers` keep the entries of
the remaining layers, `first_k_dense_replace` counts the remaining dense layers).

Non-uniform layers (removed sublayers, per-layer widths or expert counts) add a `blockprune` section and `auto_map`
to a `modeling_blockprune.py` written beside the weights (format in `engine/modeling_blockprune.py`);
`engine.load_pruned` reads them without remote code.

`export: {layout: native|padded}` (`ExportConfig`): `native` writes the layers as pruned (non-uniform outputs need
the shipped model class); `padded` rewrites a non-uniform output as the stock architecture by zero-padding every
layer to the widest (`engine.padded`), so that it loads without remote code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.schema import ConfigError, choice

LAYOUTS: tuple[str, ...] = ("native", "padded")


@dataclass
class ExportConfig:
    """How the output is laid out. `layout`: `native` (default; the smallest, fastest checkpoint: non-uniform
    layers need `trust_remote_code=True` or `engine.load_pruned`) or `padded` (non-uniform layers zero-padded to one
    stock shape, same function, loads in every client; engine/padded.py). Uniform outputs are stock either way."""

    layout: str = "native"

    def validate(self, where: str = "export", stages: list[Any] | None = None) -> None:
        """ConfigError for an unknown layout, or `padded` with a stage whose output padding cannot represent
        (per-layer expert counts: a padded expert would need a router logit of -inf, see engine/padded.py)."""
        choice([self.layout], LAYOUTS, f"{where}.layout")
        if self.layout != "padded":
            return
        for k, st in enumerate(stages or []):
            if getattr(st, "method", None) == "experts" and getattr(st, "per_layer", False):
                raise ConfigError(
                    f"{where}.layout = padded: prune[{k}] keeps per-layer expert counts (per_layer: true), which "
                    "the stock architecture cannot hold (a padded expert would need a router logit of -inf); use "
                    "layout: native, or per_layer: false"
                )


log = logging.getLogger(__name__)


def kept_layers(num_layers: int, removed: list[int]) -> list[int]:
    """Source indices of the layers that remain, in order; output layer j is source layer `kept[j]`."""
    gone = set(removed)
    return [i for i in range(num_layers) if i not in gone]


def output_config(src: dict, overrides: dict, removed: list[int]) -> dict:
    """The output config dict: `src` (a config.json dict) with `overrides` set and the layers `removed` taken out.

    ConfigError when the config numbers layers in a way that cannot be renumbered (`decoder_sparse_step` > 1).
    """
    out = {**src, **overrides}
    foreign = sorted((src.get("auto_map") or {}).items())
    if foreign:  # the input's remote code is not ours and is not copied: no output may point at it
        log.warning("dropping the input config's auto_map %s: blockprune outputs reference no foreign code", foreign)
        out.pop("auto_map", None)
    if not removed:
        return out
    n = int(src["num_hidden_layers"])
    kept = kept_layers(n, removed)
    out["num_hidden_layers"] = len(kept)
    if isinstance(src.get("layer_types"), list):
        out["layer_types"] = [src["layer_types"][i] for i in kept]
    if src.get("mlp_only_layers"):
        new_index = {i: j for j, i in enumerate(kept)}
        out["mlp_only_layers"] = [new_index[i] for i in src["mlp_only_layers"] if i in new_index]
    if src.get("first_k_dense_replace"):
        out["first_k_dense_replace"] = sum(1 for i in kept if i < int(src["first_k_dense_replace"]))
    if int(src.get("decoder_sparse_step") or 1) > 1:
        raise ConfigError(
            f"depth: {src.get('model_type')} with decoder_sparse_step = {src['decoder_sparse_step']} "
            "places MoE layers by index; removing blocks would move them"
        )
    if src.get("max_window_layers") is not None and not isinstance(src.get("layer_types"), list):
        out["max_window_layers"] = sum(1 for i in kept if i < int(src["max_window_layers"]))
    return out


MODELING_FILE = "modeling_blockprune.py"
AUTO_CLASS = "modeling_blockprune.BlockpruneForCausalLM"


def modeling_source(model_type: str) -> str:
    """Text of the `modeling_blockprune.py` shipped in a non-uniform checkpoint: `engine/modeling_blockprune.py`
    (torch and transformers only) plus the line that binds `BlockpruneForCausalLM` to `model_type`."""
    from engine import modeling_blockprune

    src = Path(modeling_blockprune.__file__).read_text()
    return src.rstrip("\n") + (
        f"\n\n\nBlockpruneForCausalLM = make_causal_lm({model_type!r})\n"
        "# the class carries the stock name (clients check it): a saved copy's auto_map names it so\n"
        "globals()[BlockpruneForCausalLM.__name__] = BlockpruneForCausalLM\n"
    )


def nonuniform_config(config: dict, layers: list[dict]) -> tuple[dict, str]:
    """A config with the `blockprune` section (`layers`: one {"attention", "mlp", "config"} entry per output
    layer) and `auto_map`, and the modeling file's text. Format: engine/modeling_blockprune.py."""
    from engine.modeling_blockprune import FORMAT_VERSION, SECTION

    if len(layers) != int(config["num_hidden_layers"]):
        raise ValueError(f"{SECTION}.layers: {len(layers)} entries for {config['num_hidden_layers']} layers")
    out = {**config, SECTION: {"version": FORMAT_VERSION, "layers": layers}}
    out["auto_map"] = {"AutoModelForCausalLM": AUTO_CLASS}  # ours only: the file written beside the weights
    return out, modeling_source(config["model_type"])
