"""Peak memory against model depth: the same width, 4 to 24 blocks, one-pass SparseGPT and two-forward structured.

    python -m launch.benchmarks.memory_depth [--depths 4,12,24 --hidden 768 --samples 16 --seq-len 512]
        [--write-results]

Random llama checkpoints of equal width (`--hidden`, intermediate 8/3 x hidden, 12 heads, 4 KV heads, SmolLM2's
tokenizer and vocabulary) and growing depth, each pruned in its own ``python -m launch run`` child by
SparseGPT 50% (the one-pass true-sequential path) and by 20% structured pruning (KV groups and channels, Wanda
score, closed-form reconstruction: the two-forward path). Printed and written: the child's peak RSS (``VmHWM``),
the checkpoint size, the run time, and each peak relative to the shallowest model's. A bounded-memory engine keeps
the ratio near 1 while the checkpoint grows with depth (DESIGN.md section 2: the test's bound is 1.15 for 24 vs 4
layers).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from launch.benchmarks import common
from launch.benchmarks.ranks import build_model, random_model_recipe

log = logging.getLogger("memory_depth")
SECTION = "memory-depth"
LEGEND = (
    "*peak RSS*: the run's `peak_rss_mb` (the process's `VmHWM`); *peak / shallowest*: against the same stage on the "
    "shallowest model; *one-pass blocks*: blocks that took the true-sequential path. The checkpoint grows with depth; "
    "the peak holds one block, its statistics and the activation cache."
)

STAGES = {
    "sparsegpt 50% (one pass)": {"method": "sparsegpt", "sparsity": 0.5},
    "structured 20% (two forwards)": {
        "method": "structured",
        "target": 0.2,
        "units": ["heads", "channels"],
        "score": "wanda",
        "solver": "closed_form",
    },
}


def checkpoint_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m launch.benchmarks.memory_depth",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--depths", default="4,12,24")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--work-dir", type=Path, default=common.BENCH_DIR / "memory_depth")
    common.add_results_args(p)
    args = p.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",") if d.strip()]
    common.setup_logging()
    load_before = common.load_average()
    from launch.assets import CALIBRATION_TEXT

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    info = common.machine_info()
    rows: list[list[object]] = []
    peaks: dict[str, float] = {}
    for depth in depths:
        model = build_model(work / f"llama-{depth}x{args.hidden}", depth, args.hidden)
        for k, (label, stage) in enumerate(STAGES.items()):
            recipe = random_model_recipe(model, work / f"out-{depth}-{k}", args.samples, args.seq_len, stage)
            report, child = common.run_blockprune(recipe, work, f"run-{depth}-{k}")
            peak = float(report["peak_rss_mb"])
            peaks.setdefault(label, peak)  # the shallowest model's peak is the reference
            one_pass = sum(1 for b in report["blocks"] if b.get("true_sequential"))
            rows.append(
                [
                    label,
                    depth,
                    f"{checkpoint_mb(model):.0f}",
                    f"{peak:.0f}",
                    f"{peak / peaks[label]:.3f}",
                    f"{report['wall_time_s']:.1f}",
                    f"{one_pass}/{len(report['blocks'])}",
                ]
            )
    body = common.markdown_table(
        ["stage", "layers", "checkpoint MiB", "peak RSS MiB", "peak / shallowest", "run s", "one-pass blocks"], rows
    )
    print(body)
    (work / "results.json").write_text(json.dumps(rows, indent=1))
    if args.write_results:
        common.publish_section(
            SECTION,
            "Peak memory vs depth (CPU)",
            common.command_line("launch.benchmarks.memory_depth", argv),
            LEGEND,
            [body],
            facts={
                "models": f"random llama, hidden {args.hidden}, {', '.join(map(str, depths))} layers (float32, "
                f"vocabulary 49152: the embedding alone is {49152 * args.hidden * 4 / 2**20:.0f} MiB)",
                "calibration": f"{args.samples} x {args.seq_len} tokens of {CALIBRATION_TEXT}",
            },
            load_before=load_before,
            info=info,
            path=args.results,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
