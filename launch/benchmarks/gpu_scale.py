"""The GPU check: block stacks at real widths on CUDA, time per block, dense-pass tokens/s, peak device memory against
the memory plan.

    python -m launch.benchmarks.gpu_scale [--shapes 7b,70b-width --layers 2 --samples 32 --seq-len 2048]
        [--write-results]                        # on a machine with a CUDA device (bf16)
    python -m launch.benchmarks.gpu_scale --device cpu --shapes tiny   # a smoke run of the script itself

Each shape is a random llama checkpoint of a few layers at a published width (`7b`: Llama-2-7B's 4096/11008, 32
heads; `70b-width`: Llama-3.1-70B's 8192/28672, 64 heads / 8 KV heads), pruned by SparseGPT 50% (the one-pass path)
and by structured 20% (Wanda score, closed form: the two-forward path), bfloat16 on the device. Reported per run:
the plan's device peak (`engine.memory_plan`, the same code `blockprune plan` prints), the measured peak
(`torch.cuda.max_memory_allocated` over the run's blocks), time per block and the dense pass's tokens per second.
Prepared for a lent GPU: one process, a few minutes, no downloads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from launch.benchmarks import common

SECTION = "gpu-scale"
SHAPES = {
    "tiny": {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4, "num_key_value_heads": 2},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32},
    "70b-width": {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8},
}
STAGES = {
    "sparsegpt 50%": {"method": "sparsegpt", "sparsity": 0.5},
    "structured 20%": {"method": "structured", "target": 0.2, "score": "wanda", "solver": "closed_form"},
}


def build(path: Path, shape: dict, layers: int) -> Path:
    """A random llama checkpoint of `layers` blocks at `shape` (bf16 weights, a small vocabulary, a tiny tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").exists():
        return path
    from tests.tiny_models import tiny_tokenizer

    cfg = LlamaConfig(vocab_size=512, num_hidden_layers=layers, max_position_embeddings=4096, **shape)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg)
    model = model.to(torch.bfloat16)  # type: ignore[arg-type]
    model.save_pretrained(path, max_shard_size="2GB")
    tiny_tokenizer(cfg.vocab_size).save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m launch.benchmarks.gpu_scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--shapes", default="7b,70b-width")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--device", default="cuda")
    p.add_argument("--work-dir", type=Path, default=common.BENCH_DIR / "gpu_scale")
    common.add_results_args(p)
    args = p.parse_args(argv)
    common.setup_logging()
    import torch

    from engine.config import config_from_dict
    from engine.pipeline import run
    from engine.planning import make_plan
    from tests.tiny_models import tiny_text

    load_before = common.load_average()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    calib = work / "calib.txt"
    if not calib.exists():
        calib.write_text(tiny_text(400_000, seed=0))
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    rows, raw = [], []
    for name in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        model = build(work / f"llama-{name}-{args.layers}", SHAPES[name], args.layers)
        for label, stage in STAGES.items():
            rec = {
                "model": str(model),
                "output": str(work / f"out-{name}-{label.split()[0]}"),
                "overwrite": True,
                "calibration": {"data": str(calib), "samples": args.samples, "seq_len": args.seq_len, "seed": 0},
                "runtime": {"device": args.device, "dtype": dtype, "micro_batch": 4, "progress": False},
                "prune": [stage],
                "report_plots": False,
            }
            cfg = config_from_dict(rec)
            plan = make_plan(cfg).memory
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            report = run(cfg)
            wall = time.perf_counter() - t
            blocks = report["blocks"]
            if args.device.startswith("cuda"):
                measured = max((b.get("peak_device_mb") or 0.0) for b in blocks) / 1024
            else:  # the smoke run: the process's peak RSS against the host plan
                measured = report["peak_rss_mb"] / 1024
            planned = (plan.device_peak if args.device.startswith("cuda") else plan.host_peak) / 2**30
            stats_s = sum(b["time_s"].get("stats", 0.0) for b in blocks)
            tokens = args.samples * args.seq_len * len(blocks)
            raw.append(
                {
                    "shape": name,
                    "stage": label,
                    "report": {k: report[k] for k in ("wall_time_s", "peak_rss_mb")},
                    "plan_gb": planned,
                    "measured_gb": measured,
                    "blocks": blocks,
                }
            )
            rows.append(
                [
                    name,
                    label,
                    f"{wall / len(blocks):.1f}",
                    f"{tokens / max(stats_s, 1e-9):,.0f}",
                    f"{planned:.1f}",
                    f"{measured:.1f}",
                    f"{measured / planned:.2f}" if planned else "-",
                ]
            )
    table = common.markdown_table(
        ["shape", "stage", "s / block", "dense tok/s", "plan peak GiB", "measured peak GiB", "measured / plan"], rows
    )
    print(table)
    (work / "results.json").write_text(json.dumps(raw, indent=1, default=str))
    if args.write_results:
        common.publish_section(
            SECTION,
            "GPU: real widths, time per block and peak memory against the plan",
            common.command_line("launch.benchmarks.gpu_scale", argv),
            "*dense tok/s*: calibration tokens through the statistics forward per second; *measured peak*: "
            "`torch.cuda.max_memory_allocated` over the run's blocks.",
            [table],
            facts={"device": torch.cuda.get_device_name() if torch.cuda.is_available() else args.device},
            load_before=load_before,
            path=args.results,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
