"""The memory plan of the mission's models on one GPU: `blockprune plan --json` on header-only checkpoints with the real
configs, tensor names, dtypes and sharding (tests/realshape.py: safetensors headers over sparse files, no disk used).

    python -m launch.benchmarks.realshape_plans [--device-memory-gb 79.2 --host-memory-gb 1024] [--write-results]

For Llama-3.1-70B and -405B, Mixtral-8x22B, Qwen3-235B-A22B, Qwen3-Coder-480B-A35B and DeepSeek-V3 (FP8 with its
128x128 block scales and its MTP layer): SparseGPT 50%, structured 20% with softmax allocation, and (MoE) experts 25%
+ Wanda 50%, bfloat16 on a CUDA device of `--device-memory-gb` (79.2 GiB: what torch reports for an 80 GB H100),
128 x 2048 calibration tokens, micro-batch 8. Reported per run: the device and host peaks of the widest block, its
budget (weights, statistics, solve workspace, forward, one-pass intermediates), the chunking and the cache tier the
plan chose, and whether it fits; a recipe the model cannot run is the plan's one-line refusal.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from launch.benchmarks import common

SECTION = "realshape-plans"
MOE = {"Mixtral-8x22B-v0.1", "Qwen3-235B-A22B", "Qwen3-Coder-480B-A35B-Instruct", "DeepSeek-V3"}
RECIPES = {
    "SparseGPT 50%": [{"method": "sparsegpt", "sparsity": 0.5}],
    "structured 20%, softmax": [{"method": "structured", "target": 0.2, "allocation": {"rule": "softmax"}}],
    "experts 25% + Wanda 50%": [{"method": "experts", "target": 0.25}, {"method": "wanda", "sparsity": 0.5}],
}
LEGEND = (
    "*device / host peak*: GiB at the widest block (`engine.memory_plan`, the code `run` budgets with); *weights, "
    "stats, solve, forward, side*: that block's budget (GiB); *chunks*: dense forwards that gather its statistics "
    "(1: all at once); *cache*: where the activation cache lives. Headers only: no tensor byte is read."
)


def plan_row(model: Path, stages: list[dict], args: argparse.Namespace) -> dict:
    from engine.config import config_from_dict
    from engine.planning import make_plan

    recipe = {
        "model": str(model),
        "output": str(args.work_dir / "out"),
        "calibration": {"data": str(args.calib), "samples": args.samples, "seq_len": args.seq_len},
        "runtime": {
            "device": "cuda",
            "dtype": "bfloat16",
            "micro_batch": 8,
            "device_memory_gb": args.device_memory_gb,
            "host_memory_gb": args.host_memory_gb,
            "progress": False,
        },
        "prune": stages,
    }
    return make_plan(config_from_dict(recipe)).to_json()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m launch.benchmarks.realshape_plans",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device-memory-gb", type=float, default=79.2)
    p.add_argument("--host-memory-gb", type=float, default=1024.0)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--work-dir", type=Path, default=common.BENCH_DIR / "realshape")
    common.add_results_args(p)
    args = p.parse_args(argv)
    common.setup_logging()
    logging.getLogger("engine").setLevel(logging.WARNING)
    from tests.realshape import REALSHAPE_MODELS, build_realshape

    load_before = common.load_average()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.calib = args.work_dir / "calib.txt"
    args.calib.write_text("a calibration text " * 100)
    rows, raw = [], []
    for name in REALSHAPE_MODELS:
        model = args.work_dir / name
        if not (model / "config.json").exists():
            build_realshape(name, model)
        for label, stages in RECIPES.items():
            if label.startswith("experts") and name not in MOE:
                continue
            t = time.perf_counter()
            try:
                plan = plan_row(model, stages, args)
            except Exception as e:  # a refusal is a result: the plan says the recipe cannot run on this model
                rows.append([name, label, "refused", "", "", "", "", "", "", "", "", str(e).splitlines()[0][:120]])
                raw.append({"model": name, "recipe": label, "refused": str(e)})
                continue
            worst = max(plan["blocks"], key=lambda b: b["device_peak"])
            chunks = max(b["chunks"] for b in plan["blocks"])
            rows.append(
                [
                    name,
                    label,
                    f"{plan['device_peak_gb']:.1f}",
                    f"{plan['host_peak_gb']:.1f}",
                    f"{worst['weights']:.1f}",
                    f"{worst['stats']:.1f}",
                    f"{worst['solve']:.1f}",
                    f"{worst['forward']:.1f}",
                    f"{worst['side']:.1f}",
                    str(chunks),
                    plan["cache_tier"],
                    "yes" if plan["fits"] else "NO: " + "; ".join(plan["advice"]),
                ]
            )
            raw.append({"model": name, "recipe": label, "plan_s": str(round(time.perf_counter() - t, 1)), **plan})
    table = common.markdown_table(
        [
            "model",
            "recipe",
            "device peak",
            "host peak",
            "weights",
            "stats",
            "solve",
            "forward",
            "side",
            "chunks",
            "cache",
            "fits",
        ],
        rows,
    )
    print(table)
    (args.work_dir / "plans.json").write_text(json.dumps(raw, indent=1, default=str))
    if args.write_results:
        common.publish_section(
            SECTION,
            f"The mission's models on one {args.device_memory_gb:g} GiB GPU (memory plans, headers only)",
            common.command_line("launch.benchmarks.realshape_plans", argv),
            LEGEND,
            [table],
            facts={
                "models": "header-only checkpoints with the published configs, names, dtypes and shards",
                "run": f"bfloat16 on CUDA, {args.samples} x {args.seq_len} calibration tokens, micro-batch 8, "
                f"host memory {args.host_memory_gb:g} GiB",
            },
            load_before=load_before,
            path=args.results,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
