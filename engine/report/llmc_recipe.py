"""A blockprune recipe in llm-compressor's terms: the modifiers that do the same, where one exists.

    llmc_recipe(recipe, report=None) -> {"version", "recipe", "stages", "complete"}
    llmc_recipe_yaml(recipe, report=None) -> str      # written next to the output as `llmcompressor_recipe.yaml`

`recipe` is the resolved recipe dict (what `blockprune_recipe.yaml` holds); `report` the run report
(`blockprune_report.json`), used only for the per-layer sparsities of an allocation rule. Pure: no files, no
llm-compressor import. The YAML loads with llm-compressor's own parser (`oneshot(model=..., recipe=PATH, ...)`,
tested with llmcompressor 0.14 in tests/test_llmc.py).

Stage by stage (llm-compressor 0.14 names; its modifiers take module names matched with `re.match` on the full name,
e.g. `model.layers.3.mlp.down_proj`, or class names such as `Linear`):

| blockprune stage | llm-compressor |
|---|---|
| `sparsegpt`, `sparsity`, `pattern`, `blocksize`, `percdamp` | `SparseGPTModifier(sparsity, mask_structure="0:0" or "N:M", block_size, dampening_frac)` |
| `wanda`, `sparsity`, `pattern` | `WandaPruningModifier(sparsity, mask_structure)` |
| `magnitude` | none in one shot (`MagnitudePruningModifier` only acts during llm-compressor training) |
| `allocation: {rule: owl, m, lambda}` | with the report: blockprune's per-layer sparsities (below); without: `sparsity_profile="owl", owl_m=m, owl_lmbda=lambda` (the same rule `s_l = S − (r_l − mean r)`, but llmcompressor 0.14.0.1's oneshot fails with it) |
| `allocation: {rule: softmax}` | with the report: blockprune's per-layer sparsities as a list over the decoder layers (`targets: ["re:.*layers\\.\\d+$"]`); without: none |
| `targets` / `ignore` (names inside a block) | `targets` / `ignore` over full names (`re:.*layers\\.\\d+\\.` + the pattern) |
| `structured` (heads, channels), `depth`, `experts` (STUN) | none (llm-compressor removes no heads, channels or blocks; `REAPPruningModifier` removes experts by another criterion) |

Always ignored, as blockprune never prunes them: `lm_head`, MoE routers (`mlp.gate`) and Qwen's
`shared_expert_gate`.
"""

from __future__ import annotations

import fnmatch
from typing import Any

FORMAT_VERSION = 1
LAYERS = r"re:.*layers\.\d+$"  # the decoder layers: targets of a per-layer sparsity list
IN_LAYER = r".*layers\.\d+\."  # what precedes a linear's name inside its block in the full module name
ALWAYS_IGNORE = ["re:.*lm_head", r"re:.*mlp\.gate$", r"re:.*shared_expert_gate$"]
MODIFIERS = {"sparsegpt": "SparseGPTModifier", "wanda": "WandaPruningModifier"}
NO_EQUIVALENT = {
    "magnitude": "no one-shot equivalent: MagnitudePruningModifier acts only in llm-compressor's training lifecycle "
    "(it starts on BATCH_START events, which oneshot does not send)",
    "structured": "llm-compressor has no modifier that removes attention heads or MLP channels",
    "depth": "llm-compressor has no modifier that removes blocks or sublayers",
    "experts": "no equivalent: REAPPruningModifier(sparsity=target) removes as many experts per layer, but ranks "
    "them by router-weighted activation norm instead of clustering them (STUN) and keeping a representative",
}


def full_name_regex(pattern: str) -> str:
    """A blockprune name pattern (over a linear's name inside its block: a shell glob matched whole, or `re:X`
    matched from the start) as a regex over full module names, for `re.match`: `mlp.*` ->
    `.*layers\\.\\d+\\.(?s:mlp\\..*)\\Z`, which matches `model.layers.3.mlp.down_proj`."""
    body = f"(?:{pattern[3:]})" if pattern.startswith("re:") else fnmatch.translate(pattern)
    return IN_LAYER + body


def _mask_structure(pattern: str) -> str:
    return "0:0" if pattern in ("unstructured", None) else str(pattern).replace(" ", "")


def _targets_and_ignore(stage: dict, per_layer: bool) -> tuple[list[str], list[str]]:
    """llm-compressor `targets` and `ignore` for the stage's `targets` / `ignore`. With a per-layer sparsity list the
    targets must be the decoder layers, so a target narrower than `*` becomes an ignore of everything else."""
    targets, ignore = list(stage.get("targets") or ["*"]), list(stage.get("ignore") or [])
    extra = [f"re:{full_name_regex(p)}" for p in ignore]
    if targets == ["*"]:
        return ([LAYERS] if per_layer else ["Linear"]), ALWAYS_IGNORE + extra
    if per_layer:
        keep = "|".join(full_name_regex(p).removeprefix(IN_LAYER) for p in targets)
        return [LAYERS], [*ALWAYS_IGNORE, f"re:{IN_LAYER}(?!(?:{keep}))", *extra]
    return [f"re:{full_name_regex(p)}" for p in targets], ALWAYS_IGNORE + extra


def _layer_sparsities(report: dict | None, index: int) -> list[float] | None:
    alloc = (report or {}).get("allocation")
    if not isinstance(alloc, dict) or alloc.get("stage") != index or alloc.get("kind") != "unstructured":
        return None
    rows = alloc.get("layers") or []
    values = [row.get("decided", row.get("planned")) for row in rows]
    return [round(float(v), 6) for v in values] if values and None not in values else None


def stage_modifier(stage: dict, index: int, report: dict | None = None) -> dict[str, Any]:
    """One blockprune stage -> {"stage", "method", "modifier": class name or None, "args": dict or None,
    "equivalent": the call as text or None, "note"}."""
    method = stage.get("method")
    out: dict[str, Any] = {"stage": index, "method": method, "modifier": None, "args": None, "equivalent": None}
    if method not in MODIFIERS:
        out["note"] = NO_EQUIVALENT.get(str(method), f"unknown method {method!r}")
        return out
    alloc = stage.get("allocation") or {"rule": "uniform"}
    rule = alloc.get("rule", "uniform")
    layers = _layer_sparsities(report, index) if rule != "uniform" else None
    if rule not in ("uniform", "owl") and layers is None:
        out["note"] = (
            f"allocation rule {rule!r} has no llm-compressor equivalent; pass the run report for its sparsities"
        )
        return out
    targets, ignore = _targets_and_ignore(stage, per_layer=layers is not None)
    sparsity: float | list[float] = layers if layers is not None else float(stage.get("sparsity", 0.5))
    args: dict[str, Any] = {
        "sparsity": sparsity,
        "mask_structure": _mask_structure(stage.get("pattern", "unstructured")),
        "targets": targets,
        "ignore": ignore,
    }
    if method == "sparsegpt":
        damp = stage.get("percdamp")  # None: the solver default (SparseGPT 0.01)
        args.update(block_size=int(stage.get("blocksize", 128)), dampening_frac=float(0.01 if damp is None else damp))
    if rule == "owl" and layers is None:
        args.update(
            sparsity_profile="owl", owl_m=float(alloc.get("m", 5.0)), owl_lmbda=float(alloc.get("lambda", 0.08))
        )
    out.update(modifier=MODIFIERS[method], args=args)
    out["equivalent"] = f"{MODIFIERS[method]}({', '.join(f'{k}={v!r}' for k, v in args.items())})"
    if layers is not None:
        out["note"] = f"the per-layer sparsities blockprune's {rule} allocation decided (from the run report)"
    elif rule == "owl":
        out["note"] = (
            "the same OWL rule; llmcompressor 0.14.0.1 fails in oneshot with this profile ('Cannot invoke event "
            "before initializing'): with the run report, the per-layer sparsities are written instead"
        )
    else:
        out["note"] = ""
    return out


def llmc_recipe(recipe: dict, report: dict | None = None) -> dict[str, Any]:
    """The llm-compressor equivalent of `recipe["prune"]`: {"version", "recipe": a stage-format recipe dict with one
    llm-compressor stage per blockprune stage that has an equivalent (None when none has), "stages": `stage_modifier`
    of every stage, "complete": whether every stage has one}."""
    stages = [stage_modifier(dict(s), i, report) for i, s in enumerate(recipe.get("prune") or [])]
    body = {
        f"blockprune_{s['stage']}_stage": {"pruning_modifiers": {s["modifier"]: s["args"]}}
        for s in stages
        if s["modifier"] is not None
    }
    return {
        "version": FORMAT_VERSION,
        "recipe": body or None,
        "stages": stages,
        "complete": bool(stages) and all(s["modifier"] is not None for s in stages),
    }


def llmc_recipe_yaml(recipe: dict, report: dict | None = None) -> str:
    """`llmc_recipe` as the text of `llmcompressor_recipe.yaml`: a comment per stage (its equivalent, or why there is
    none), then the recipe (an empty mapping when no stage has an equivalent)."""
    import yaml

    res = llmc_recipe(recipe, report)
    lines = [
        "# llm-compressor equivalent of this blockprune recipe (written by blockprune; llmcompressor 0.14 names).",
        "# Use: from llmcompressor import oneshot; oneshot(model=DENSE_MODEL, recipe=THIS_FILE, dataset=..., ...)",
    ]
    for s in res["stages"]:
        what = s["equivalent"] or "no equivalent"
        lines.append(f"# stage {s['stage']} ({s['method']}): {what}" + (f" -- {s['note']}" if s.get("note") else ""))
    if not res["complete"]:
        lines.append("# INCOMPLETE: the stages marked 'no equivalent' are not in the recipe below.")
    text = yaml.safe_dump(res["recipe"] or {}, sort_keys=False, default_flow_style=None, width=120)
    return "\n".join(lines) + "\n" + text
