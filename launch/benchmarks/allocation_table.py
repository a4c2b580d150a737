"""Global allocation on SmolLM2-135M: structured pruning with uniform, OWL and softmax per-layer budgets.

    nice -n 10 python -m launch.benchmarks.allocation_table [--budgets 0.2,0.35] [--temperatures 1,0.5,2]
        [--energies error,influence,score]
        [--score wanda --solver closed_form] [--samples 32 --seq-len 512] [--write-results]

Per budget (fraction of the non-embedding parameters removed) one structured run per rule, each in its own
``python -m launch run`` child, one after the other: ``softmax`` at every temperature for every energy (`error`,
then `influence` and `score`: rows ``softmax-<energy>-T<t>``), ``equal-budgets`` (softmax at T = inf: every layer
the same budget, but KV groups and channels divided per layer by the run's `split`, as the softmax runs do),
``owl``, ``uniform`` (stock output: the same units in every layer) and, at the `--compare-split` budgets, softmax
at the first temperature with the uniform rule's split of KV groups and channels (``-proportional``). The first
softmax run of a budget does the scoring pass; the later runs of the same budget start from a copy of its
``blockprune_scores.json`` (what a re-tempered run does), so the score pass is paid once per budget and split
(block errors are measured with the run's split). Every output is then evaluated on Hamlet with the package's own
loader (`engine.load_pruned`: non-uniform checkpoints need it or ``trust_remote_code``). Reported per run:
perplexity, the achieved fraction of the block parameters removed and the per-layer spread, wall times.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path

from launch.benchmarks import common
from sharding.writer import MANIFEST_NAME

log = logging.getLogger("allocation_table")

SECTION = "allocation"
SCORES = "blockprune_scores.json"


def stage(args: argparse.Namespace, budget: float, alloc: dict) -> dict:
    return {
        "method": "structured",
        "target": budget,
        "units": ["heads", "channels"],
        "score": args.score,
        "solver": args.solver,
        "allocation": alloc,
        "align": 1,  # exact widths: the allocation, not the rounding to GEMM-friendly widths, is what is measured
    }


def runs_for(budget: float, args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(run name, allocation mapping) of one budget, in execution order (softmax first: it scores)."""
    out = [
        (
            f"softmax-T{t:g}" if e == args.energy_list[0] else f"softmax-{e}-T{t:g}",
            {"rule": "softmax", "temperature": t, "energy": e, "split": args.split},
        )
        for e in args.energy_list
        for t in args.temps
    ]
    # T = inf: every layer the same budget, through the coordinator with the run's split (isolates the split)
    out += [("equal-budgets", {"rule": "softmax", "temperature": math.inf, "split": args.split})]
    out += [("owl", {"rule": "owl", "split": args.split}), ("uniform", {"rule": "uniform"})]
    if args.split != "proportional" and budget in args.split_list:  # the split within layers: its own scores
        out.append(
            (
                f"softmax-T{args.temps[0]:g}-proportional",
                {
                    "rule": "softmax",
                    "temperature": args.temps[0],
                    "energy": args.energy_list[0],
                    "split": "proportional",
                },
            )
        )
    return out


def prune_all(args: argparse.Namespace) -> list[dict]:
    rows = []
    for budget in args.budget_list:
        scores: Path | None = None
        for name, alloc in runs_for(budget, args):
            dest = args.work_dir / f"b{round(budget * 100)}-{name}"
            if dest.exists():  # an earlier run's output: removed only when the writer's manifest says it is ours
                if not (dest / MANIFEST_NAME).is_file():
                    raise SystemExit(f"{dest} exists and is not a blockprune output; choose another --work-dir")
                shutil.rmtree(dest)
            if scores is not None and alloc["rule"] != "uniform":
                dest.mkdir(parents=True)
                shutil.copy(scores, dest / SCORES)  # the scores of this budget's first run (same key)
            recipe = common.blockprune_recipe(args.model, dest, args, stage(args, budget, alloc))
            report, child = common.run_blockprune(recipe, args.work_dir, dest.name)
            if scores is None and (dest / SCORES).is_file():
                scores = dest / SCORES
            rows.append({"budget": budget, "run": name, "output": dest, "report": report, "wall_s": child.wall_s})
    return rows


def evaluate(path: Path, args: argparse.Namespace) -> float:
    """Perplexity of `path` on the evaluation text (`engine.report.evaluate`'s windows, loaded by `engine.load_pruned`)."""
    import torch
    from transformers import AutoTokenizer

    from engine.loader import load_pruned
    from engine.report.evaluate import eval_windows, perplexity

    tok = AutoTokenizer.from_pretrained(str(path))
    ids = eval_windows(tok, args.eval_path.read_text(encoding="utf-8"), args.eval_windows, args.eval_seq_len)
    model = load_pruned(path, dtype=torch.float32)
    ppl = perplexity(model, ids)
    log.info("%s: ppl %.3f", path.name, ppl)
    return ppl


def spread(report: dict) -> str:
    """min / max of the achieved per-layer fractions (uniform: the stock plan's single value)."""
    alloc = report.get("allocation") or {}
    vals = [r["achieved"] for r in alloc.get("layers", []) if "achieved" in r]
    if not vals:
        return "uniform"
    return f"{min(vals):.3f} / {max(vals):.3f}"


def achieved(report: dict) -> float:
    alloc = report.get("allocation") or {}
    if "achieved" in alloc:
        return alloc["achieved"]
    return report["structured_plan"]["achieved"]


def table(rows: list[dict], dense: float) -> str:
    body = [["dense", "-", f"{dense:.3f}", "1.000", "0", "-", "-", "-"]]
    for r in rows:
        rep = r["report"]
        alloc = rep.get("allocation") or {}
        body.append(
            [
                f"{r['budget']:g}",
                r["run"],
                f"{r['ppl']:.3f}",
                f"{r['ppl'] / dense:.3f}",
                f"{achieved(rep):.4f}",
                spread(rep),
                "reused" if (alloc.get("scores") or {}).get("reused") else ("scored" if alloc else "-"),
                f"{rep['wall_time_s']:.0f}",
            ]
        )
    return common.markdown_table(
        [
            "target",
            "allocation",
            "ppl",
            "ppl / dense",
            "removed (of block params)",
            "per-layer min / max",
            "scores",
            "prune s",
        ],
        body,
    )


def best_lines(rows: list[dict], energies: list[str]) -> list[str]:
    """One line per budget: the best softmax run of each energy against uniform, equal budgets and OWL."""
    out = []
    for b in sorted({r["budget"] for r in rows}):
        rs = {r["run"]: r["ppl"] for r in rows if r["budget"] == b}
        if "uniform" not in rs:
            continue
        parts = []
        for k, e in enumerate(energies):
            soft = {
                n: v
                for n, v in rs.items()
                if n.startswith("softmax")
                and "proportional" not in n
                and (
                    (k == 0 and not any(n.startswith(f"softmax-{o}-") for o in energies[1:]))
                    or n.startswith(f"softmax-{e}-")
                )
            }
            if soft:
                n = min(soft, key=lambda k: soft[k])
                verdict = "beats" if soft[n] < rs["uniform"] else "does NOT beat"
                parts.append(f"energy `{e}`: best {n} ppl {soft[n]:.3f} ({verdict} uniform)")
        others = ", ".join(f"{n} {rs[n]:.3f}" for n in ("uniform", "equal-budgets", "owl") if n in rs)
        out.append(f"- target {b:g}: " + "; ".join(parts) + f"; {others}")
    return out


LEGEND = (
    "*uniform*: every layer removes the same KV groups and channels (stock architecture); *equal-budgets*: every "
    "layer the same budget, divided between KV groups and channels per layer by the split (softmax at T = inf); "
    "*-proportional*: the split of the uniform rule. *target*: fraction of the non-embedding (block) parameters "
    "removed; *removed*: what the output really removed; *per-layer min / max*: the achieved per-layer fractions; "
    "*scores*: whether the run did the scoring pass or reused the budget's first run's `blockprune_scores.json`; "
    "*prune s*: the run's `wall_time_s` (scoring pass included)."
)


def section_facts(args: argparse.Namespace) -> dict[str, str]:
    facts = common.input_facts(args)
    facts["calibration"] += "; smaller than the other tables (64 x 512) because the machine is shared"
    facts["stage"] = (
        f"structured, units heads + channels, score `{args.score}`, solver `{args.solver}`; softmax energies "
        f"{', '.join(f'`{e}`' for e in args.energy_list)}, split `{args.split}`, min 0, max 0.8"
    )
    return facts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m launch.benchmarks.allocation_table",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--budgets", default="0.2,0.35", help="comma-separated structured targets")
    p.add_argument("--temperatures", default="1,0.5,2", help="softmax temperatures (the first also scores)")
    p.add_argument("--score", default="wanda")
    p.add_argument("--solver", default="closed_form")
    p.add_argument(
        "--energies",
        default="error,influence,score",
        help="softmax energies, the first is the main one (rows softmax-T*; the others softmax-<energy>-T*)",
    )
    p.add_argument("--split", default="error", help="KV groups vs channels within a layer: error | proportional")
    p.add_argument(
        "--compare-split",
        default="0.2",
        help="budgets at which softmax also runs with split: "
        "proportional (a second scoring pass: block errors are measured with the run's split)",
    )
    p.add_argument("--section", default=SECTION, help="the section of the results file to write")
    common.add_common_args(p, "allocation_table")
    p.set_defaults(samples=32)
    args = p.parse_args(argv)
    args.budget_list = [float(b) for b in args.budgets.split(",") if b.strip()]
    args.temps = [float(t) for t in args.temperatures.split(",") if t.strip()]
    args.split_list = [float(b) for b in args.compare_split.split(",") if b.strip()]
    args.energy_list = [e.strip() for e in args.energies.split(",") if e.strip()]
    common.setup_logging()
    load_before = common.load_average()
    common.resolve_inputs(args)
    rows = prune_all(args)
    dense = evaluate(Path(args.model), args)
    for r in rows:
        r["ppl"] = evaluate(r["output"], args)
    (args.work_dir / "results.json").write_text(
        json.dumps(
            [
                {**{k: v for k, v in r.items() if k not in ("output", "report")}, "achieved": achieved(r["report"])}
                for r in rows
            ]
            + [{"run": "dense", "ppl": dense}],
            indent=1,
        )
    )
    body, lines = table(rows, dense), best_lines(rows, args.energy_list)
    print(body + "\n" + "\n".join(lines))
    if args.write_results:
        nice = f"nice -n {os.nice(0)} " if os.nice(0) > 0 else ""
        common.publish_section(
            args.section,
            f"Global allocation: SmolLM2-135M, structured, {args.score} + {args.solver} (float32, CPU)",
            nice + common.command_line("launch.benchmarks.allocation_table", argv),
            LEGEND,
            [body, "\n".join(lines)],
            facts=section_facts(args),
            load_before=load_before,
            path=args.results,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
