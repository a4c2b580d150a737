"""Say what a checkpoint is: the sparsity metadata in `config.json`, the `README.md` model card, and
`total_parameters` in the index.

Sparsity metadata. An output of unstructured or N:M stages stores its zeros densely; nothing but the recipe said
which pattern they follow. `config.json` gets a top-level `sparsity_config` with the fields of compressed-tensors'
`SparsityCompressionConfig` (what llm-compressor writes for a sparse model saved uncompressed)::

    "sparsity_config": {"format": "dense", "sparsity_structure": "2:4",       # or "unstructured"
                        "global_sparsity": 0.4512,                            # zeros / all parameters
                        "targets": ["re:^model\\.layers\\.\\d+\\.self_attn\\.q_proj$", ...],
                        "ignore": ["lm_head"]}

`targets` / `ignore` are module names or `re:` patterns (compressed-tensors' convention), here over the names in the
checkpoint (the weight name without `.weight`; per-expert names for MoE). It sits at the top level, not under
`quantization_config` as compressed-tensors nests it: a `quantization_config` with `quant_method:
compressed-tensors` makes transformers require that package to load the model at all, and this checkpoint is a
plain dense one. `blockprune inspect` reads it and counts, per targeted linear, the groups of M consecutive inputs
of a row with more than N nonzeros (violations of an N:M claim).

The card (`README.md`, Hugging Face model-card front matter + markdown): base model, recipe, parameters and
sparsity achieved, the evaluation when one was recorded (`blockprune_eval.json`), how to load it (stock,
`trust_remote_code=True` or `engine.load_pruned`, padded), and the warning that merging a LoRA adapter into an N:M
or unstructured checkpoint fills its zeros (use `blockprune distill`, which keeps the masks).

`total_parameters`: transformers' `save_pretrained` writes ``{"metadata": {"total_parameters": N, "total_size": B},
"weight_map": ...}`` with N = `model.num_parameters()` (every parameter once; tied embeddings once, which is also
what the checkpoint stores).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from engine.modeling_blockprune import SECTION
from sharding.writer import INDEX_NAME, atomic_write

CARD_NAME = "README.md"
EVAL_FILE = "blockprune_eval.json"
RECIPE_FILE = "blockprune_recipe.yaml"
REPORT_FILE = "blockprune_report.json"
SPARSITY_KEY = "sparsity_config"
UNSTRUCTURED = "unstructured"
_INDEX_RE = re.compile(r"\.(\d+)\.")


def _json_bytes(obj: Any) -> bytes:
    """JSON as the writer writes its files (sorted keys, indent 2, a final newline)."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


# --------------------------------------------------------------------------------------------- sparsity_config


def sparsity_structure(stages: Iterable[dict]) -> str | None:
    """The `sparsity_structure` of a recipe's `prune` list: "N:M" when every masking stage uses that one pattern,
    "unstructured" when any masks without one, None when no stage masks weights (structured, depth, experts)."""
    patterns = {str(s.get("pattern") or UNSTRUCTURED) for s in stages if "sparsity" in s and "pattern" in s}
    if not patterns:
        return None
    return patterns.pop() if len(patterns) == 1 else UNSTRUCTURED


def _generalise(name: str) -> str:
    """`model.layers.3.mlp.experts.7.down_proj` -> an anchored regex with every index a `\\d+`."""
    parts = re.split(r"(?<=\.)(\d+)(?=\.)", name)
    return "re:^" + "".join(r"\d+" if p.isdigit() else re.escape(p) for p in parts) + "$"


def module_patterns(pruned: set[str], linears: set[str]) -> tuple[list[str], list[str]]:
    """(targets, ignore) over module names: targets cover exactly `pruned` (a pattern per name shape when every
    module of that shape was pruned, the names themselves otherwise); ignore names the other `linears`
    (generalised the same way) and lm_head."""
    shapes: dict[str, set[str]] = {}
    for n in linears | pruned:
        shapes.setdefault(_generalise(n), set()).add(n)
    targets, ignore = [], ["lm_head"]
    for pat, names in sorted(shapes.items()):
        hit = names & pruned
        if hit == names:
            targets.append(pat)
        elif not hit:
            ignore.append(pat)
        else:
            targets += sorted(hit)
            ignore += sorted(names - hit)
    return targets, ignore


def sparsity_config(
    stages: Iterable[dict], pruned: set[str], linears: set[str], params: int, zeros: int
) -> dict[str, Any] | None:
    """compressed-tensors' dense `sparsity_config` (module docstring) for a run whose stages (recipe dicts) masked
    the modules `pruned` among the block `linears` (checkpoint names without `.weight`), with `zeros` of the
    checkpoint's `params` parameters zero. None when no stage masks weights."""
    structure = sparsity_structure(stages)
    if structure is None:
        return None
    targets, ignore = module_patterns(pruned, linears)
    return {
        "format": "dense",
        "sparsity_structure": structure,
        "global_sparsity": round(zeros / params, 6) if params else 0.0,
        "targets": targets,
        "ignore": ignore,
    }


_EXPERT_LINEAR = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")


def checkpoint_module(adapter, j: int, name: str) -> str:
    """The checkpoint name (without `.weight`) of linear `name` (a `LinearSpec.name`) of output block `j`: experts
    by their on-disk per-expert names (Mixtral `block_sparse_moe.experts.E.w1`)."""
    from engine.blocks import expert_disk_name

    prefix = adapter.block_prefix(j)
    m = _EXPERT_LINEAR.match(name)
    if m:
        return expert_disk_name(prefix, adapter.spec, int(m.group(1)), m.group(2)).removesuffix(".weight")
    return prefix + name


def run_sparsity(cfg, reader, report: dict, shapes: list) -> tuple[int, dict[str, Any] | None]:
    """(parameters of the output, its `sparsity_config` or None) at the end of a run, before the checkpoint is
    finalized: blocks from the run's records (`params`, `nonzero`, pruned `linears`), the non-block tensors (copied
    unchanged) from the source's headers; their zeros are counted, one tensor at a time, only when a stage masked
    weights. `shapes`: the written layers' `LayerShape`s, in output order."""
    from engine.arch import adapter_for

    adapter = adapter_for(reader.config)
    non_block = adapter.non_block_keys(reader.names())
    blocks = report.get("blocks") or []
    params = sum(int(b.get("params", 0)) for b in blocks) + sum(reader.info(n).numel for n in non_block)
    stages = cfg.to_dict()["prune"]
    if sparsity_structure(stages) is None:
        return params, None
    zeros = sum(int(b.get("params", 0)) - int(b.get("nonzero", 0)) for b in blocks)
    for n in non_block:
        t = reader.read([n])[n]
        zeros += t.numel() - count_nonzero(t)
    pruned = {checkpoint_module(adapter, int(b["output_block"]), name) for b in blocks for name in b.get("linears", {})}
    linears = set(pruned)
    for j, shape in enumerate(shapes):
        out = adapter.with_overrides(shape.config)
        linears.update(checkpoint_module(out, j, s.name) for s in out.meta_linears(j))
    return params, sparsity_config(stages, pruned, linears, params, zeros)


def parse_nm(structure: str | None) -> tuple[int, int] | None:
    """(N, M) of an "N:M" `sparsity_structure`; None for unstructured, "0:0" or anything else."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(structure or ""))
    if m is None or not 0 < int(m.group(1)) < int(m.group(2)):
        return None
    return int(m.group(1)), int(m.group(2))


def module_selected(module: str, targets: list[str], ignore: list[str]) -> bool:
    """compressed-tensors' matching: an entry is an exact module name, `re:<regex>` (full match), or the class name
    `Linear` (every 2-D weight; the caller passes only those)."""

    def hit(entries: list[str]) -> bool:
        return any(
            e in ("Linear", module) or (e.startswith("re:") and re.fullmatch(e[3:], module) is not None)
            for e in entries
        )

    return hit(targets) and not hit(ignore)


def nm_violations(W: torch.Tensor, n: int, m: int) -> tuple[int, int]:
    """(groups of `m` consecutive inputs of a row of `W [d_out, d_in]` with more than `n` nonzeros, groups). A
    width that is not a multiple of `m` counts its ragged tail as one group per row."""
    d_in = W.shape[-1]
    full = d_in // m * m
    nz = W.reshape(-1, d_in) != 0
    bad = int((nz[:, :full].reshape(-1, m).sum(dim=1) > n).sum()) if full else 0
    groups = nz.shape[0] * (full // m)
    if full < d_in:
        bad += int((nz[:, full:].sum(dim=1) > n).sum())
        groups += nz.shape[0]
    return bad, groups


# --------------------------------------------------------------------------------------------- the index


# --------------------------------------------------------------------------------------------- the card


def _fmt_int(n: Any) -> str:
    return f"{int(n):,}" if isinstance(n, (int, float)) and not isinstance(n, bool) else "?"


def _layout(config: dict, report: dict | None) -> str:
    export = (report or {}).get("export") or {}
    if export.get("layout") == "padded" and export.get("layers"):
        return "padded"
    return "native" if SECTION in config else "stock"


def _load_section(config: dict, report: dict | None, sparse: bool) -> list[str]:
    layout = _layout(config, report)
    lines = ["## How to load", ""]
    if layout == "native":
        lines += [
            "Layers differ in shape (per-layer widths or removed sublayers). `config.json` keeps the stock fields "
            "plus a `blockprune` section, and `modeling_blockprune.py` (torch and transformers only) ships beside "
            "the weights:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            'model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype="auto")',
            "# or, with blockprune installed and no remote code: from engine import load_pruned; load_pruned(path)",
            "```",
            "",
            "Clients that cannot run remote code (many serving stacks, hubs, `AutoPeftModelForCausalLM` without the "
            "flag) fail with a size mismatch. `blockprune export THIS OUT --layout padded` writes the same function "
            "in the stock architecture (zero-padded, larger).",
        ]
    else:
        lines += [
            "The stock architecture: any client loads it without remote code.",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            'model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")',
            "```",
        ]
        if layout == "padded":
            export = (report or {})["export"]
            lines += [
                "",
                f"This is the **padded** layout: every layer was zero-padded to the widest one ({export['widths']}, "
                f"align {export.get('align')}), adding {_fmt_int(export.get('zero_params'))} zero parameters. The "
                "zeros change nothing: padded gate/up/q/k/v rows and the down_proj/o_proj columns that read them are "
                "all zero. The native layout of the same run is smaller and faster but needs "
                "`trust_remote_code=True`.",
            ]
    lines += [""]
    if sparse:
        lines += [
            "**Fine-tuning keeps the zeros only if you keep the masks.** Merging a LoRA adapter "
            "(`merge_and_unload`) adds a dense low-rank update to every targeted weight and fills the zeros, "
            "N:M patterns included. Recover accuracy with `blockprune distill` (recovery distillation that keeps "
            "the masks), or keep the adapter unmerged.",
            "",
        ]
    return lines


def _numbers(config: dict, report: dict | None, total: int | None) -> list[str]:
    r = report or {}
    padded = _layout(config, report) == "padded"
    rows = []
    if r.get("total_params") is not None:
        rows.append(("parameters of the base model", _fmt_int(r["total_params"])))
    if total is not None:
        rows.append(("parameters of this checkpoint", _fmt_int(total)))
    if padded:
        rows.append(("of which zeros added by padding", _fmt_int(r["export"].get("zero_params"))))
    if r.get("block_params"):
        native = " (native layout)" if padded else ""
        rows.append((f"decoder block parameters{native}", _fmt_int(r["block_params"])))
        rows.append((f"decoder block sparsity (zeros / parameters){native}", f"{r.get('block_sparsity', 0.0):.4f}"))
    if r.get("pruned_linear_params"):
        rows.append(("sparsity of the pruned linears", f"{r['pruned_linear_sparsity']:.4f}"))
    sp = config.get(SPARSITY_KEY)
    if sp:
        rows.append(("sparsity structure", f"`{sp['sparsity_structure']}`"))
        rows.append(("global sparsity (all parameters)", f"{sp['global_sparsity']:.4f}"))
    plan = r.get("structured_plan")
    if plan:
        rows.append(("structured: block parameters removed", f"{plan['achieved']:.4f} (target {plan['target']})"))
    alloc = r.get("allocation")
    if isinstance(alloc, dict) and alloc.get("achieved") is not None:
        rows.append((f"allocation {alloc.get('rule', '')}: removed", f"{alloc['achieved']:.4f}"))
    if not rows:
        return []
    return ["## What was pruned", "", "| | |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows), ""]


def _evaluation(evaluation: dict | None) -> list[str]:
    if not evaluation:
        return []
    from engine.report.evaluate import format_eval

    try:
        table = format_eval(evaluation)
    except (KeyError, TypeError, ValueError):
        table = json.dumps(evaluation, indent=2)
    return ["## Evaluation", "", "`blockprune eval` (recorded in `blockprune_eval.json`):", "", "```", table, "```", ""]


def model_card(
    config: dict,
    *,
    report: dict | None = None,
    recipe_text: str | None = None,
    evaluation: dict | None = None,
    total_parameters: int | None = None,
    src: str | None = None,
) -> str:
    """The `README.md` of a blockprune output (module docstring). `config`: its config.json dict; `report`:
    blockprune_report.json; `recipe_text`: blockprune_recipe.yaml; `evaluation`: a `blockprune eval --json` result;
    `src`: where it was exported from (padded exports)."""
    r = report or {}
    base = str(r.get("model") or src or "unknown")
    stages = ", ".join(r.get("stages") or []) or "none"
    sparse = bool(config.get(SPARSITY_KEY))
    layout = _layout(config, report)
    tags = ["blockprune", "pruned"] + (["sparse"] if sparse else []) + (["padded"] if layout == "padded" else [])
    front = ["---", "library_name: transformers", "tags:", *(f"- {t}" for t in tags)]
    if "/" in base and not Path(base).exists() and not base.startswith(("/", ".")):
        front.append(f"base_model: {base}")  # a hub id; local paths are not base_model values
    front.append("---")
    title = f"# {config.get('model_type', 'model')} pruned with blockprune"
    lines = [*front, "", title, ""]
    lines += [
        f"Base model: `{base}`. Stages: {stages}. Layout: {layout}"
        + (f" (exported from `{src}`)" if src and layout == "padded" else "")
        + ".",
        "",
    ]
    lines += _numbers(config, report, total_parameters)
    lines += _evaluation(evaluation)
    lines += _load_section(config, report, sparse)
    if recipe_text:  # without `output:`: where it was written says nothing about the model (and differs per copy)
        recipe_text = "\n".join(x for x in recipe_text.splitlines() if not x.startswith("output:"))
        lines += [
            "## Recipe",
            "",
            "`blockprune_recipe.yaml`, as the run resolved it:",
            "",
            "```yaml",
            recipe_text.rstrip(),
            "```",
            "",
        ]
    lines += [
        "Files: `blockprune_report.json` (per block: parameters, zeros, errors, timings), `blockprune_recipe.yaml`; "
        "`blockprune inspect` checks the shards and the sparsity pattern.",
        "",
    ]
    return "\n".join(lines)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def refresh_card(path: str | Path, evaluation: dict | None = None) -> str:
    """Rewrite the card of the checkpoint at `path` from its files (config, report, recipe, the recorded evaluation,
    or `evaluation`, which is then recorded in `blockprune_eval.json`); returns the card's text."""
    d = Path(path)
    if evaluation is not None:
        atomic_write(d / EVAL_FILE, _json_bytes(evaluation))
    config = _read_json(d / "config.json") or {}
    index = _read_json(d / INDEX_NAME) or {}
    text = model_card(
        config,
        report=_read_json(d / REPORT_FILE),
        recipe_text=(d / RECIPE_FILE).read_text() if (d / RECIPE_FILE).is_file() else None,
        evaluation=evaluation if evaluation is not None else _read_json(d / EVAL_FILE),
        total_parameters=(index.get("metadata") or {}).get("total_parameters"),
    )
    atomic_write(d / CARD_NAME, text.encode())
    return text


def checkpoint_parameters(shapes: Iterable[Iterable[int]]) -> int:
    """Σ numel over tensor shapes (what `num_parameters()` gives for a checkpoint whose tensors are all parameters)."""
    return sum(math.prod(s) for s in shapes)


_SIGNED_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def count_nonzero(t: torch.Tensor) -> int:
    """Number of nonzero entries of `t`, for every safetensors dtype (float8 and unsigned ints included;
    −0.0 counts as zero)."""
    try:
        return int(torch.count_nonzero(t))
    except (NotImplementedError, RuntimeError):
        if t.dtype.is_floating_point:
            return int(torch.count_nonzero(t.to(torch.float32)))
        return int(torch.count_nonzero(t.view(_SIGNED_OF_SIZE[t.element_size()])))  # same bits, zero iff zero
