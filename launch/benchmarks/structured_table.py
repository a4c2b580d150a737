"""Structured pruning of SmolLM2-135M: every score x solver at one target (issue 4's quality table).

    python -m launch.benchmarks.structured_table [--runs magnitude-none,obs-closed_form,...] [--target 0.2]
                                                 [--samples 64 --seq-len 512] [--threads 1] [--reuse]
                                                 [--write-results]

Each run removes ``target`` of the decoder-block parameters (uniform allocation: every layer loses the same KV
groups and MLP channels; stock Llama output) with one score (``magnitude``, ``wanda``, ``fluctuation`` with FLAP's
bias compensation, ``obs``) and one solver (``none``, ``closed_form``, ``admm``), in its own
``python -m launch run`` subprocess, one after the other. The dense model and every output are then evaluated on a
different text (Hamlet by default) with ``engine.report.evaluate.evaluate_one``. Reported per run: perplexity, the plan's
achieved share of block parameters and the output widths, the run's ``wall_time_s`` and the part of it spent in
the per-block solves, the process wall time and the peak RSS (VmHWM).

``--reuse`` keeps an earlier run whose recipe is identical (``<work-dir>/<run>.result.json``) and an earlier evaluation
of an unchanged checkpoint (``<work-dir>/<run>.eval.json``), so an interrupted grid resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from launch.benchmarks import common

log = logging.getLogger("structured_table")

SECTION = "structured"
SCORES = ("magnitude", "wanda", "fluctuation", "obs")
SOLVERS = ("none", "closed_form", "admm")
RUNS = [f"{score}-{solver}" for score in SCORES for solver in SOLVERS]


def stage_for(name: str, target: float) -> dict:
    """The structured stage of run ``<score>-<solver>``; ``fluctuation`` runs with bias compensation (FLAP)."""
    score, solver = name.split("-", 1)
    return {
        "method": "structured",
        "target": target,
        "units": ["heads", "channels"],
        "score": score,
        "solver": solver,
        "allocation": {"rule": "uniform"},
        "bias_compensation": score == "fluctuation",
        "align": 1,
        "percdamp": 0.01,
    }


def prune_one(name: str, args: argparse.Namespace) -> dict:
    """One blockprune child (or the reused result of an identical earlier recipe); returns the run's numbers."""
    dest = args.work_dir / name
    recipe = common.blockprune_recipe(args.model, dest, args, stage_for(name, args.target))
    if args.threads:
        recipe["runtime"]["threads"] = args.threads
    saved = args.work_dir / f"{name}.result.json"
    if args.reuse and saved.exists() and (dest / "blockprune_report.json").exists():
        old = json.loads(saved.read_text())
        if old["recipe"] == json.loads(json.dumps(recipe)):
            log.info("reusing %s (identical recipe)", name)
            return {**old, "output": dest}
    report, child = common.run_blockprune(recipe, args.work_dir, name)
    plan = report["structured_plan"]
    res = {
        "recipe": recipe,
        "wall_s": child.wall_s,
        "prune_s": report["wall_time_s"],
        "solve_s": sum(b["time_s"]["solve"] for b in report["blocks"]),
        "rss": report["peak_rss_mb"],
        "threads": report["machine"].get("cpus"),
        "achieved": plan["achieved"],
        "config": plan["config"],
    }
    saved.write_text(json.dumps(res, indent=1, default=str))
    return {**res, "output": dest}


def evaluate_cached(paths: dict[str, Path], args: argparse.Namespace) -> dict[str, dict]:
    """`common.evaluate_all` of the checkpoints, reusing (with ``--reuse``) ``<work-dir>/<name>.eval.json`` when the
    checkpoint's config and report are unchanged and the evaluation settings are the same."""

    def key(path: Path) -> dict:
        stamps = {
            f.name: f.stat().st_mtime_ns for f in (path / "config.json", path / "blockprune_report.json") if f.exists()
        }
        return {
            "model": str(path),
            "stamps": stamps,
            "text": str(args.eval_path),
            "windows": args.eval_windows,
            "seq_len": args.eval_seq_len,
        }

    out, todo = {}, {}
    for name, path in paths.items():
        f = args.work_dir / f"{name}.eval.json"
        old = json.loads(f.read_text()) if args.reuse and f.exists() else None
        if old is not None and old["key"] == key(path):
            log.info("reusing the evaluation of %s", name)
            out[name] = old["result"]
        else:
            todo[name] = path
    for name, res in common.evaluate_all(todo, args).items():
        (args.work_dir / f"{name}.eval.json").write_text(json.dumps({"key": key(paths[name]), "result": res}))
        out[name] = res
    return {name: out[name] for name in paths}


def widths(config: dict) -> str:
    """``kv/q heads, intermediate`` of the output config."""
    return (
        f"{config.get('num_key_value_heads', '-')}/{config.get('num_attention_heads', '-')}, "
        f"{config.get('intermediate_size', '-')}"
    )


def table(runs: dict[str, dict], evals: dict[str, dict], dense_cfg: dict) -> str:
    dense = evals["dense"]["ppl"]
    rows = [["dense", "-", "-", "-", f"{dense:.2f}", "1.00", "0", widths(dense_cfg), "-", "-", "-", "-"]]
    for name, r in runs.items():
        score, solver = name.split("-", 1)
        ppl = evals[name]["ppl"]
        rows.append(
            [
                name,
                score,
                solver,
                "yes" if score == "fluctuation" else "no",
                f"{ppl:.2f}",
                f"{ppl / dense:.2f}",
                f"{r['achieved']:.4f}",
                widths({**dense_cfg, **r["config"]}),
                f"{r['solve_s']:.1f}",
                f"{r['prune_s']:.1f}",
                f"{r['wall_s']:.1f}",
                f"{r['rss']:.0f}",
            ]
        )
    return common.markdown_table(
        [
            "run",
            "score",
            "solver",
            "bias comp.",
            "ppl",
            "ppl / dense",
            "block params removed",
            "KV/Q heads, intermediate",
            "solve s",
            "prune s",
            "process wall s",
            "peak RSS MiB",
        ],
        rows,
    )


def best_line(runs: dict[str, dict], evals: dict[str, dict]) -> str:
    best = min(runs, key=lambda n: evals[n]["ppl"])
    line = f"Best: **{best}** (ppl {evals[best]['ppl']:.2f})"
    if "magnitude-none" in runs:
        base = evals["magnitude-none"]["ppl"]
        line += f"; magnitude without reconstruction: {base:.2f} ({base / evals[best]['ppl']:.1f}x the best's ppl)"
    return line + "."


LEGEND = (
    "Every layer loses the same KV groups and MLP channels (stock Llama output, `structured_plan` in the report); "
    "*fluctuation* runs with FLAP's bias compensation (jointly fitted with the closed form / ADMM). *solve*: the "
    "per-block solver time summed over the blocks (scores, selection, reconstruction); *prune*: the run's "
    "`wall_time_s` (read, calibrate, prune, write); *process wall*: the `blockprune run` child from spawn to exit; "
    "peak RSS: its VmHWM. Runs were one after the other on a shared machine, so the times are noisy (see the load "
    "average); the perplexities are deterministic."
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m launch.benchmarks.structured_table",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated <score>-<solver>: " + ", ".join(RUNS))
    p.add_argument("--target", type=float, default=0.2, help="fraction of the decoder-block parameters removed")
    p.add_argument("--threads", type=int, default=None, help="torch threads of each pruning run (default: torch's)")
    p.add_argument(
        "--reuse", action="store_true", help="keep earlier runs whose recipe is identical and their evaluations"
    )
    common.add_common_args(p, "structured_table")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    if not names or set(names) - set(RUNS):
        p.error(f"--runs {args.runs!r}: choose from {', '.join(RUNS)}")
    common.setup_logging()
    load_before = common.load_average()
    common.resolve_inputs(args)
    runs = {name: prune_one(name, args) for name in names}
    evals = evaluate_cached({"dense": Path(args.model)} | {n: r["output"] for n, r in runs.items()}, args)
    dense_cfg = json.loads((Path(args.model) / "config.json").read_text())
    body = table(runs, evals, dense_cfg) + "\n\n" + best_line(runs, evals)
    print(body)
    if args.write_results:
        common.publish_section(
            SECTION,
            f"SmolLM2-135M, structured pruning: {args.target:.0%} of the block parameters, uniform (float32, CPU)",
            "nice -n 10 " + common.command_line("launch.benchmarks.structured_table", argv),
            LEGEND,
            [body],
            facts={**common.input_facts(args), "pruning threads": args.threads or "torch default"},
            load_before=load_before,
            path=args.results,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
