"""blockprune vs llm-compressor's ``oneshot`` (issue 3's benchmark; issue 9, item 3).

    python -m launch.benchmarks.vs_llmcompressor [--methods sparsegpt,wanda] [--samples 64 --seq-len 512]
                                                 [--write-results]

Same on both sides: the checkpoint (SmolLM2-135M, float32), the calibration token ids ``[samples, seq_len]``
(computed once with blockprune's ``load_calibration`` from the calibration text and the model's tokenizer, seed
``--seed``; llm-compressor reads them from ``calib.safetensors``, blockprune draws the same windows from the same
config), float32 on the CPU, 50% unstructured sparsity on every decoder-block Linear (lm_head excluded), SparseGPT
block size 128 and damping 0.01 (both tools' defaults), sequential propagation. Each tool runs in its own
subprocess, one after the other; llm-compressor in its own venv (``.bench/llmc-venv``, created when missing).
The dense model and both outputs are then evaluated with ``engine.report.evaluate.evaluate_one`` on a different text.

Targets (issue 3): perplexity <= llm-compressor's x 1.02 and process wall time <= 0.5 x llm-compressor's.

Only the standard library and `common` are imported at module level: the llm-compressor child runs this module
(``_llmc_child``) with the other venv's interpreter.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

from launch.benchmarks import common

log = logging.getLogger("vs_llmcompressor")

SECTION = "vs-llmcompressor"
CHILD_CMD = "_llmc_child"
LLMC_VENV = common.BENCH_DIR / "llmc-venv"
TORCH_SPEC = "torch==2.13.0"  # the CPU build; a plain `torch` pulls a multi-GB CUDA build
LLMC_SPEC = "llmcompressor"
MODIFIERS = {"sparsegpt": "SparseGPTModifier", "wanda": "WandaPruningModifier"}  # llmcompressor.modifiers.pruning
PPL_TARGET = 1.02
WALL_TARGET = 0.5


# ------------------------------------------------------------------------------------------- llm-compressor side


def ensure_llmc_venv(venv: Path, torch_spec: str = TORCH_SPEC, llmc_spec: str = LLMC_SPEC) -> Path:
    """The venv's python, after ``python3 -m venv``, ``pip install <torch_spec>`` and ``pip install <llmc_spec>``
    when ``import llmcompressor`` fails in it."""
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import llmcompressor"], capture_output=True).returncode == 0:
        return py
    log.info("creating the llm-compressor venv %s (%s, then %s)", venv, torch_spec, llmc_spec)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for spec in (torch_spec, llmc_spec):
        subprocess.run([str(py), "-m", "pip", "install", "-q", *spec.split()], check=True)
    return py


def llmc_versions(py: Path) -> str:
    """``llmcompressor X, torch Y, transformers Z`` as installed in the llm-compressor venv."""
    code = (
        "import importlib.metadata as m; "
        "print(', '.join(f'{p} {m.version(p)}' for p in ('llmcompressor', 'torch', 'transformers')))"
    )
    return subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def llmc_child(argv: list[str]) -> int:
    """Runs inside the llm-compressor venv: load, ``oneshot`` on the saved token ids, ``save_pretrained``
    (uncompressed, with the tokenizer), then `common.emit_result` with the phase times and VmHWM."""
    p = argparse.ArgumentParser(prog=f"vs_llmcompressor {CHILD_CMD}")
    for name in ("--model", "--calib", "--output", "--method"):
        p.add_argument(name, required=True)
    p.add_argument("--sparsity", type=float, required=True)
    p.add_argument("--mask-structure", default="0:0", help='"0:0" (unstructured) or "N:M", e.g. "2:4"')
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers import pruning
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_import = time.perf_counter()
    ids = load_file(a.calib)["input_ids"]
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    modifier = getattr(pruning, MODIFIERS[a.method])(
        sparsity=a.sparsity, mask_structure=a.mask_structure, targets=["Linear"], ignore=["re:.*lm_head"]
    )
    t_load = time.perf_counter()
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=data,
        recipe=modifier,
        pipeline="sequential",
        max_seq_length=ids.shape[1],
        num_calibration_samples=ids.shape[0],
        shuffle_calibration_samples=False,
    )
    t_prune = time.perf_counter()
    model.save_pretrained(a.output, save_compressed=False)
    tokenizer.save_pretrained(a.output)
    t_end = time.perf_counter()
    common.emit_result(
        import_s=round(t_import - t0, 2),
        load_s=round(t_load - t_import, 2),
        prune_s=round(t_prune - t_load, 2),
        save_s=round(t_end - t_prune, 2),
        threads=torch.get_num_threads(),
    )
    return 0


# ------------------------------------------------------------------------------------------- the benchmark


def save_calibration_ids(args: argparse.Namespace) -> Path:
    """blockprune's calibration windows for this config, saved as ``input_ids`` in ``calib.safetensors``."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from engine.calibration import CalibrationConfig, load_calibration

    cfg = CalibrationConfig(data=str(args.calib_path), samples=args.samples, seq_len=args.seq_len, seed=args.seed)
    ids = load_calibration(cfg, AutoTokenizer.from_pretrained(str(args.model)))
    path = args.work_dir / "calib.safetensors"
    save_file({"input_ids": ids.contiguous()}, str(path))
    log.info("calibration ids %s -> %s", tuple(ids.shape), path)
    return path


def prune_both(method: str, args: argparse.Namespace, py: Path, calib: Path) -> dict:
    """Run blockprune, then llm-compressor, on ``method``; returns {tool: {output, wall_s, prune_s, rss, threads}}."""
    bp_out = args.work_dir / f"blockprune-{method}"
    recipe = common.blockprune_recipe(args.model, bp_out, args, {"method": method, "sparsity": args.sparsity})
    report, bp = common.run_blockprune(recipe, args.work_dir, f"blockprune-{method}")
    llmc_out = args.work_dir / f"llmc-{method}"
    llmc = common.run_child(
        [
            str(py),
            "-m",
            "launch.benchmarks.vs_llmcompressor",
            CHILD_CMD,
            "--model",
            str(args.model),
            "--calib",
            str(calib),
            "--output",
            str(llmc_out),
            "--method",
            method,
            "--sparsity",
            str(args.sparsity),
        ],
        args.work_dir / f"llmc-{method}.log",
    )
    return {
        "blockprune": {
            "output": bp_out,
            "wall_s": bp.wall_s,
            "prune_s": report["wall_time_s"],
            "rss": report["peak_rss_mb"],
            "threads": report["machine"]["cpus"],
        },
        "llm-compressor": {
            "output": llmc_out,
            "wall_s": llmc.wall_s,
            "prune_s": llmc.result["prune_s"],
            "rss": llmc.result["peak_rss_mb"],
            "threads": llmc.result["threads"],
        },
    }


def verdict(ratio: float, target: float) -> str:
    return f"{ratio:.3f} ({'PASS' if ratio <= target else 'MISS'}, target <= {target})"


def tables(runs: dict[str, dict], evals: dict[str, dict]) -> str:
    """Per-run table (dense first) and the blockprune / llm-compressor ratio table, in markdown."""
    rows = [["dense", "-", f"{evals['dense']['ppl']:.3f}", "0", "-", "-", "-", "-"]]
    ratios = []
    for method, tools in runs.items():
        for tool, r in tools.items():
            rows.append(
                [
                    method,
                    tool,
                    f"{evals[f'{tool}-{method}']['ppl']:.3f}",
                    f"{r['sparsity']:.4f}",
                    f"{r['wall_s']:.1f}",
                    f"{r['prune_s']:.1f}",
                    f"{r['rss']:.0f}",
                    r["threads"],
                ]
            )
        bp, lc = tools["blockprune"], tools["llm-compressor"]
        ppl = evals[f"blockprune-{method}"]["ppl"] / evals[f"llm-compressor-{method}"]["ppl"]
        ratios.append(
            [
                method,
                verdict(ppl, PPL_TARGET),
                verdict(bp["wall_s"] / lc["wall_s"], WALL_TARGET),
                f"{bp['prune_s'] / lc['prune_s']:.3f}",
                f"{bp['rss'] / lc['rss']:.3f}",
            ]
        )
    per_run = common.markdown_table(
        ["method", "tool", "ppl", "linear sparsity", "process wall s", "prune s", "peak RSS MiB", "threads"], rows
    )
    ratio = common.markdown_table(
        [
            "method",
            "ppl blockprune/llmc",
            "process wall blockprune/llmc",
            "prune time blockprune/llmc",
            "peak RSS blockprune/llmc",
        ],
        ratios,
    )
    return per_run + "\n\n" + ratio


LEGEND = (
    "*process wall*: the child process from spawn to exit (imports, load, prune, save); *prune*: blockprune's "
    "`wall_time_s` (read, calibrate, prune, write) vs the time inside llm-compressor's `oneshot` (without load and "
    'save); peak RSS: each child\'s VmHWM. llm-compressor ran `oneshot(..., pipeline="sequential", '
    "shuffle_calibration_samples=False)` with default batch size 1 on the same token ids."
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD_CMD]:
        return llmc_child(argv[1:])
    p = argparse.ArgumentParser(
        prog="python -m launch.benchmarks.vs_llmcompressor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--methods", default="sparsegpt,wanda", help="comma-separated: " + ", ".join(MODIFIERS))
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--venv", type=Path, default=LLMC_VENV, help="llm-compressor's venv (created when missing)")
    common.add_common_args(p, "vs_llmcompressor")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - set(MODIFIERS):
        p.error(f"--methods {args.methods!r}: choose from {', '.join(MODIFIERS)}")
    common.setup_logging()
    load_before = common.load_average()
    py = ensure_llmc_venv(args.venv)
    common.resolve_inputs(args)
    calib = save_calibration_ids(args)
    runs = {m: prune_both(m, args, py, calib) for m in methods}
    paths = {"dense": args.model} | {f"{t}-{m}": r["output"] for m, tools in runs.items() for t, r in tools.items()}
    evals = common.evaluate_all(paths, args)
    for tools in runs.values():
        for r in tools.values():
            r["sparsity"] = common.linear_sparsity(r["output"])
    body = tables(runs, evals)
    print(body)
    if args.write_results:
        common.publish_section(
            SECTION,
            "blockprune vs llm-compressor (SmolLM2-135M, float32, CPU)",
            common.command_line("launch.benchmarks.vs_llmcompressor", argv),
            LEGEND,
            [body],
            facts={"llm-compressor venv": llmc_versions(py), **common.input_facts(args)},
            load_before=load_before,
            path=args.results,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
