"""One real block at Llama-3.1-70B widths on this CPU: the runs complete, their peak RSS against the plan's host peak,
time per block split into read / stats / solve / write.

    python -m launch.benchmarks.wide_block [--recipes sparsegpt,structured,wanda] [--samples 8 --seq-len 128]
        [--write-results]

A random llama checkpoint with one decoder block of Llama-3.1-70B's widths (hidden 8192, intermediate 28672, 64
heads / 8 KV heads; a 32000-token vocabulary), bfloat16 on disk, pruned in a child process per recipe (bfloat16
compute on the CPU, ``--samples x --seq-len`` calibration tokens): SparseGPT 50%, structured 20% (Wanda score,
closed-form reconstruction) and Wanda 50%. `blockprune plan` runs first in the same kind of child; the table gives
the plan's host peak, the run's peak RSS (VmHWM) and their ratio (issue 15's bar: within 15%).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from launch.benchmarks import common

SECTION = "wide-block"
RECIPES = {
    "sparsegpt": {"method": "sparsegpt", "sparsity": 0.5},
    "structured": {"method": "structured", "target": 0.2, "score": "wanda", "solver": "closed_form"},
    "wanda": {"method": "wanda", "sparsity": 0.5},
}
LEGEND = (
    "*plan host peak*: `blockprune plan --json`'s `host_peak_gb` for the same recipe; *peak RSS*: the run's VmHWM; "
    "*read / stats / solve / write*: the block's `time_s` (read: load; stats: the dense forward; solve: the stages; "
    "write: the unit's commit)."
)


def build(path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_models import tiny_tokenizer

    if (path / "config.json").exists():
        return path
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=1,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.save_pretrained(path, max_shard_size="2GB")
    tiny_tokenizer(cfg.vocab_size).save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m launch.benchmarks.wide_block",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--recipes", default="sparsegpt,structured,wanda")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--work-dir", type=Path, default=common.BENCH_DIR / "wide_block")
    common.add_results_args(p)
    args = p.parse_args(argv)
    common.setup_logging()
    load_before = common.load_average()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    model = build(work / "llama70b-width-1layer")
    from tests.tiny_models import tiny_text

    calib = work / "calib.txt"
    if not calib.exists():
        calib.write_text(tiny_text(100_000, seed=0))
    rows, raw = [], {}
    for name in [r for r in args.recipes.split(",") if r]:
        import yaml

        recipe = {
            "model": str(model),
            "output": str(work / f"out-{name}"),
            "overwrite": True,
            "calibration": {"data": str(calib), "samples": args.samples, "seq_len": args.seq_len, "seed": 0},
            "runtime": {"device": "cpu", "dtype": "bfloat16", "micro_batch": 8, "progress": False},
            "prune": [RECIPES[name]],
            "report_plots": False,
        }
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        plan_child = common.run_child(
            [sys.executable, "-m", "launch", "plan", str(path), "--json"], work / f"plan-{name}.log"
        )
        plan = json.loads(_json_tail((work / f"plan-{name}.log").read_text()))
        report, child = common.run_blockprune(recipe, work, f"run-{name}")
        block = report["blocks"][0]
        t = block["time_s"]
        peak = report["peak_rss_mb"] / 1024
        planned = plan["host_peak_gb"]
        rows.append(
            [
                name,
                f"{planned:.2f}",
                f"{peak:.2f}",
                f"{peak / planned:.3f}",
                f"{t.get('load', 0):.1f}",
                f"{t.get('stats', 0):.1f}",
                f"{t.get('solve', 0):.1f}",
                f"{t.get('write', 0):.1f}",
                f"{report['wall_time_s']:.1f}",
                f"{child.wall_s:.1f}",
            ]
        )
        raw[name] = {"plan": plan, "report_block": block, "peak_rss_gb": peak, "plan_wall_s": plan_child.wall_s}
    table = common.markdown_table(
        [
            "recipe",
            "plan host peak GiB",
            "peak RSS GiB",
            "peak / plan",
            "read s",
            "stats s",
            "solve s",
            "write s",
            "run s",
            "process s",
        ],
        rows,
    )
    print(table)
    (work / "results.json").write_text(json.dumps(raw, indent=1, default=str))
    if args.write_results:
        common.publish_section(
            SECTION,
            "One block at Llama-3.1-70B widths on this CPU (bfloat16)",
            common.command_line("launch.benchmarks.wide_block", argv),
            LEGEND,
            [table],
            facts={
                "model": "random llama, 1 block: hidden 8192, intermediate 28672, 64 / 8 heads, vocab 32000, bf16",
                "calibration": f"{args.samples} x {args.seq_len} tokens",
                "compute": "bfloat16 on the CPU",
            },
            load_before=load_before,
            path=args.results,
        )
    return 0


def _json_tail(text: str) -> str:
    """The JSON object a `plan --json` child printed (after any log lines)."""
    start = text.index("\n{") + 1 if not text.startswith("{") else 0
    return text[start : text.rindex("}") + 1]


if __name__ == "__main__":
    raise SystemExit(main())
