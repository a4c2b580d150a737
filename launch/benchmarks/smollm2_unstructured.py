"""blockprune's unstructured methods on SmolLM2-135M (issue 3's acceptance table).

    python -m launch.benchmarks.smollm2_unstructured [--runs sparsegpt,sparsegpt-2:4,wanda,magnitude]
                                                     [--samples 64 --seq-len 512] [--write-results]

Each run prunes the float32 checkpoint on the CPU with ``samples x seq_len`` calibration tokens of real text
(Shakespeare's comedies by default) in its own ``python -m launch run`` subprocess, one after the other; the dense
model and every output are then evaluated on a different text (Hamlet by default) with
``engine.report.evaluate.evaluate_one``. Reported per run: perplexity, achieved decoder-linear sparsity, the run's own
``wall_time_s``, the process wall time and the peak RSS (VmHWM) from ``blockprune_report.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from launch.benchmarks import common

log = logging.getLogger("smollm2_unstructured")

SECTION = "smollm2-unstructured"
RUNS: dict[str, dict] = {  # run name -> prune stage
    "sparsegpt": {"method": "sparsegpt", "sparsity": 0.5},
    "sparsegpt-2:4": {"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"},
    "wanda": {"method": "wanda", "sparsity": 0.5},
    "wanda-2:4": {"method": "wanda", "sparsity": 0.5, "pattern": "2:4"},
    "magnitude": {"method": "magnitude", "sparsity": 0.5},
    "magnitude-2:4": {"method": "magnitude", "sparsity": 0.5, "pattern": "2:4"},
}
DEFAULT_RUNS = "sparsegpt,sparsegpt-2:4,wanda,magnitude"


def prune_all(names: list[str], args: argparse.Namespace) -> dict[str, dict]:
    """One blockprune child per run; returns {name: {output, wall_s, prune_s, rss, threads}}."""
    out = {}
    for name in names:
        dest = args.work_dir / name.replace(":", "of")
        report, child = common.run_blockprune(
            common.blockprune_recipe(args.model, dest, args, RUNS[name]), args.work_dir, dest.name
        )
        out[name] = {
            "output": dest,
            "wall_s": child.wall_s,
            "prune_s": report["wall_time_s"],
            "rss": report["peak_rss_mb"],
            "threads": report["machine"]["cpus"],
        }
    return out


def table(runs: dict[str, dict], evals: dict[str, dict]) -> str:
    dense = evals["dense"]["ppl"]
    rows = [["dense", "-", "-", f"{dense:.3f}", "1.000", "0", "-", "-", "-"]]
    for name, r in runs.items():
        stage, ppl = RUNS[name], evals[name]["ppl"]
        rows.append(
            [
                name,
                stage["method"],
                stage.get("pattern", "unstructured"),
                f"{ppl:.3f}",
                f"{ppl / dense:.3f}",
                f"{r['sparsity']:.4f}",
                f"{r['prune_s']:.1f}",
                f"{r['wall_s']:.1f}",
                f"{r['rss']:.0f}",
            ]
        )
    return common.markdown_table(
        [
            "run",
            "method",
            "pattern",
            "ppl",
            "ppl / dense",
            "linear sparsity",
            "prune s",
            "process wall s",
            "peak RSS MiB",
        ],
        rows,
    )


LEGEND = (
    "*prune*: the run's `wall_time_s` (read, calibrate, prune, write); *process wall*: the `blockprune run` child "
    "from spawn to exit; peak RSS: its VmHWM; sparsity over the decoder-block linears (embeddings, norms and lm_head "
    "are copied through)."
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m launch.benchmarks.smollm2_unstructured",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runs", default=DEFAULT_RUNS, help="comma-separated: " + ", ".join(RUNS))
    common.add_common_args(p, "smollm2_unstructured")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    if not names or set(names) - set(RUNS):
        p.error(f"--runs {args.runs!r}: choose from {', '.join(RUNS)}")
    common.setup_logging()
    load_before = common.load_average()
    common.resolve_inputs(args)
    runs = prune_all(names, args)
    evals = common.evaluate_all({"dense": args.model} | {n: r["output"] for n, r in runs.items()}, args)
    for r in runs.values():
        r["sparsity"] = common.linear_sparsity(r["output"])
    body = table(runs, evals)
    print(body)
    if args.write_results:
        common.publish_section(
            SECTION,
            "SmolLM2-135M, unstructured and 2:4 pruning (float32, CPU)",
            common.command_line("launch.benchmarks.smollm2_unstructured", argv),
            LEGEND,
            [body],
            facts=common.input_facts(args),
            load_before=load_before,
            path=args.results,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
