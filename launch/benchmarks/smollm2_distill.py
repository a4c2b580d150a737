"""Recovery distillation of a structured-pruned SmolLM2-135M on the CPU (issue: `blockprune distill`).

    python -m launch.benchmarks.smollm2_distill [--samples 64 --seq-len 512] [--steps 24 --train-seq-len 256]
                                                [--nproc 2] [--reuse-pruned] [--write-results]

1. Prune the float32 checkpoint 20% structured (`{method: structured, target: 0.2, score: wanda, solver:
   closed_form}`, calibration `samples x seq_len` tokens of Shakespeare's comedies) in a `python -m launch run`
   child. `--reuse-pruned` skips this when the work directory already holds an output of the same recipe.
2. Distill it against the dense model with `python -m launch distill --nproc N` (DeepSpeed ZeRO-3 over gloo) on
   real text that is not Hamlet (the comedies by default; `--train-text`).
3. Evaluate dense, pruned and distilled on Hamlet (`engine.report.evaluate.evaluate_one`, the same windows for all).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml

from launch.benchmarks import common

log = logging.getLogger("smollm2_distill")

SECTION = "distill"
STAGE = {"method": "structured", "target": 0.2, "score": "wanda", "solver": "closed_form"}


def prune(args: argparse.Namespace) -> tuple[Path, dict]:
    """The pruned checkpoint and its run facts (a reused output says so)."""
    dest = args.work_dir / "pruned"
    recipe = common.blockprune_recipe(args.model, dest, args, STAGE)
    saved = dest / "blockprune_recipe.yaml"
    if args.reuse_pruned and (dest / "model.safetensors.index.json").is_file() and saved.is_file():
        old = yaml.safe_load(saved.read_text())
        same = (
            old["model"] == str(args.model)
            and old["calibration"] == {**old["calibration"], **recipe["calibration"]}
            and old["prune"][0] == {**old["prune"][0], **STAGE}
        )
        if same:
            report = json.loads((dest / "blockprune_report.json").read_text())
            log.info("reusing %s (same recipe)", dest)
            return dest, {"prune_s": report["wall_time_s"], "reused": True}
    report, child = common.run_blockprune(recipe, args.work_dir, "pruned")
    return dest, {"prune_s": report["wall_time_s"], "process_s": round(child.wall_s, 1), "reused": False}


def distill_recipe(student: Path, args: argparse.Namespace) -> dict:
    return {
        "student": str(student),
        "teacher": str(args.model),
        "output": str(args.work_dir / "distilled"),
        "data": str(args.train_path),
        "steps": args.steps,
        "seq_len": args.train_seq_len,
        "batch_size": args.batch_size,
        "micro_batch": args.micro_batch,
        "lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "temperature": args.temperature,
        "seed": args.seed,
        "deepspeed": {"zero_stage": 3},
        "overwrite": True,
    }


def distill(student: Path, args: argparse.Namespace) -> tuple[Path, dict, float]:
    """`python -m launch distill <recipe> --nproc N` in a child; returns (output, its distill_report, process s)."""
    recipe = distill_recipe(student, args)
    path = args.work_dir / "distill.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    child = common.run_child(
        [sys.executable, "-m", "launch", "distill", str(path), "--nproc", str(args.nproc)],
        args.work_dir / "distill.log",
        env={"DS_ACCELERATOR": "cpu"},
    )
    out = Path(recipe["output"])
    return out, json.loads((out / "distill_report.json").read_text()), child.wall_s


def table(evals: dict[str, dict]) -> str:
    dense = evals["dense"]["ppl"]
    rows = [
        [name, f"{e['params'] / 1e6:.1f}M", f"{e['ppl']:.3f}", f"{e['ppl'] / dense:.3f}"] for name, e in evals.items()
    ]
    pruned, distilled = evals["pruned 20%"]["ppl"], evals["pruned + distilled"]["ppl"]
    recovered = (pruned - distilled) / (pruned - dense) if pruned != dense else float("nan")
    return (
        common.markdown_table(["model", "params", "Hamlet ppl", "ppl / dense"], rows)
        + f"\n\nDistillation recovers {100 * recovered:.0f}% of the perplexity lost to pruning."
    )


def facts(args: argparse.Namespace, pr: dict, rep: dict, wall: float) -> str:
    tokens_per_step = args.batch_size * args.train_seq_len
    rows = [
        ["pruning", f"{pr['prune_s']:.0f} s" + (" (reused output of the same recipe)" if pr["reused"] else "")],
        [
            "distillation",
            f"{rep['steps']} steps x {args.batch_size} x {args.train_seq_len} tokens "
            f"({tokens_per_step} per step, {rep['tokens']} trained tokens) on {rep['world_size']} ranks",
        ],
        [
            "distillation process wall",
            f"{wall:.0f} s (load {rep['load_s']:.0f} s, train {rep['train_s']:.0f} s, save {rep['save_s']:.1f} s)",
        ],
        [
            "throughput",
            f"{rep['tokens_per_s']:.0f} tokens/s; teacher forward {100 * rep['teacher_share']:.0f}% of step time",
        ],
        ["KD loss (first / last 10% of steps)", f"{rep['loss_first_10pct']:.4f} -> {rep['loss_last_10pct']:.4f}"],
        ["peak RSS rank 0", f"{rep['peak_rss_mb_rank0']:.0f} MiB"],
    ]
    return common.markdown_table(["", ""], rows)


def section_facts(args: argparse.Namespace) -> dict[str, str]:
    inputs = common.input_facts(args)
    return {
        "model": inputs["model"],
        "pruning": f"`{json.dumps(STAGE)}`, calibration {args.samples} x {args.seq_len} tokens of "
        f"`{args.calib_path.name}` (seed {args.seed})",
        "distillation": f"`blockprune distill` on `{args.train_path.name}`, lr {args.lr} (cosine to 10%, "
        f"warmup {args.warmup_steps}), KL at T = {args.temperature}, DeepSpeed ZeRO-3 over gloo, "
        f"{args.nproc} ranks of 1 torch thread each (torchrun's OMP_NUM_THREADS=1), float32, "
        "run under `nice -n 10`",
        "evaluation": inputs["evaluation"],
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m launch.benchmarks.smollm2_distill",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common.add_common_args(p, "smollm2_distill")
    p.add_argument(
        "--train-text",
        default="shakespeare-comedies",
        help="distillation text (a name in launch.assets.TEXTS or a path; not the evaluation text)",
    )
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--train-seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="global sequences per step")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per forward per rank")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--reuse-pruned", action="store_true", help="keep a pruned output of the same recipe")
    args = p.parse_args(argv)
    common.setup_logging()
    load_before = common.load_average()
    common.resolve_inputs(args)
    from launch.assets import TEXTS, real_text

    args.train_path = real_text(args.train_text) if args.train_text in TEXTS else Path(args.train_text)
    if args.train_path.resolve() == args.eval_path.resolve():
        p.error("--train-text must differ from the evaluation text")
    pruned, pr = prune(args)
    distilled, rep, wall = distill(pruned, args)
    evals = common.evaluate_all({"dense": args.model, "pruned 20%": pruned, "pruned + distilled": distilled}, args)
    body = table(evals) + "\n\n" + facts(args, pr, rep, wall)
    print(body)
    if args.write_results:
        common.publish_section(
            SECTION,
            "SmolLM2-135M: 20% structured pruning, then recovery distillation (float32, CPU)",
            "nice -n 10 " + common.command_line("launch.benchmarks.smollm2_distill", argv),
            None,
            [body],
            facts=section_facts(args),
            load_before=load_before,
            path=args.results,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
