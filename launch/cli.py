"""`blockprune` command line: run, submit, plan, inspect, eval, demo, distill.

Thin by design: parse arguments, call the engine, turn known errors into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("blockprune")


def _known_errors() -> tuple[type[BaseException], ...]:
    from engine.calibration import CalibrationError
    from engine.config import ConfigError
    from sharding.errors import CheckpointError
    from sharding.writer import WriterError

    return (ConfigError, CheckpointError, CalibrationError, WriterError, FileNotFoundError, ValueError)


def _spawn_torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run this command as `torchrun --standalone --nproc_per_node N -m launch ...` (one machine)."""
    import subprocess

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "launch",
        *argv,
    ]
    log.info("spawning %d ranks: %s", nproc, " ".join(cmd))
    return subprocess.call(cmd)


def _cmd_run(args) -> int:
    from engine.config import load_recipe
    from engine.pipeline import run
    from sharding import dist

    cfg = load_recipe(args.recipe, args.overrides)  # fail here, before any process is spawned
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _spawn_torchrun(
            args.nproc,
            [
                *(["-v"] if args.verbose else []),
                "run",
                args.recipe,
                *args.overrides,
                *(["--resume"] if args.resume else []),
                *(["--overwrite"] if args.overwrite else []),
            ],
        )
    if args.resume:
        cfg.resume = True
    if args.overwrite:
        cfg.overwrite = True
    report = run(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"pruned {report['model']} -> {cfg.output}: linear sparsity {report['pruned_linear_sparsity']:.4f}, "
            f"{report['wall_time_s']:.1f} s, peak RSS {report['peak_rss_mb']:.0f} MB"
            + (f", {report['world_size']} ranks" if report.get("world_size", 1) > 1 else "")
        )
    dist.shutdown(dist.DistInfo(world_size=dist.env_world_size()))
    return 0


def _cmd_submit(args) -> int:
    from launch.submit import SubmitOptions, submit

    opts = SubmitOptions(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks=args.tasks,
        partition=args.partition,
        time_min=args.time,
        account=args.account,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem,
        local=args.local,
        logs=args.logs,
    )
    job = submit(args.recipe, args.overrides, opts)
    print(f"submitted job {job.job_id}; logs: {job.paths.stdout} (stderr: {job.paths.stderr})", flush=True)
    if not (opts.local or args.wait):
        return 0
    result = job.results()[0]  # rank 0's; raises submitit's FailedJobException (with the task's traceback)
    print(f"job {job.job_id} done: {json.dumps(result)}")
    return 0


def _cmd_plan(args) -> int:
    from engine.config import load_recipe
    from engine.planning import format_plan, make_plan

    cfg = load_recipe(args.recipe, args.overrides)
    print(format_plan(make_plan(cfg)))
    return 0


def _cmd_inspect(args) -> int:
    from engine.report.inspect_ckpt import format_inspection, inspect_checkpoint

    info = inspect_checkpoint(args.checkpoint, verify=not args.no_verify)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0 if info.get("ok", True) else 1


def _cmd_eval(args) -> int:
    from engine.report.evaluate import evaluate, format_eval, format_lm_eval, lm_eval_tasks

    if args.tasks or not args.data:  # --tasks: local lm-eval task files, handed to lm-eval's Python API
        if not args.tasks:
            raise ValueError("eval needs --data TEXT (perplexity) or --tasks FILE_OR_DIR (lm-eval tasks)")
        res = lm_eval_tasks(args.model, args.tasks, device=args.device, dtype=args.dtype)
        print(json.dumps(res, indent=2) if args.json else format_lm_eval(res))
        if not args.data:
            return 0
    res = evaluate(
        args.model,
        data=args.data,
        windows=args.windows,
        seq_len=args.seq_len,
        compare=args.compare,
        batch=args.batch,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        speed=not args.no_speed,
        device=args.device,
        dtype=args.dtype,
    )
    print(json.dumps(res, indent=2) if args.json else format_eval(res))
    return 0


def _cmd_demo(args) -> int:
    from launch.demo import demo

    return demo(out_dir=args.output, samples=args.samples, seq_len=args.seq_len)


def _cmd_distill(args) -> int:
    """`--nproc N > 1` outside torchrun: respawn as `torchrun --standalone --nproc_per_node N -m launch distill ...`;
    under torchrun/deepspeed (WORLD_SIZE set) or with one process: run this rank's worker."""
    import subprocess

    from engine.distill.run import distill, load_distill_recipe

    cfg = load_distill_recipe(args.recipe, args.overrides)  # fail here, before any process is spawned
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.nproc}",
            "-m",
            "launch",
            *(["-v"] if args.verbose else []),
            "distill",
            args.recipe,
            *args.overrides,
            *(["--overwrite"] if args.overwrite else []),
        ]
        log.info("spawning %d ranks: %s", args.nproc, " ".join(cmd))
        return subprocess.call(cmd)
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)
    if args.overwrite:
        cfg.overwrite = True
    s = distill(cfg)
    if s["rank"] == 0:
        print(
            f"distilled {cfg.student} -> {cfg.output}: {s['steps']} steps on {s['world_size']} rank(s), loss "
            f"{s['loss_first']:.4f} -> {s['loss_last']:.4f}, {s['tokens_per_s']:.0f} tokens/s, "
            f"{s['wall_time_s']:.1f} s"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blockprune", description="Memory-bounded block-by-block LLM pruning.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="prune a checkpoint with a recipe")
    r.add_argument("recipe")
    r.add_argument("overrides", nargs="*", help="key=value overrides, e.g. prune.0.sparsity=0.6 calibration.samples=32")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run in the same output")
    r.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    r.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="ranks on this machine (spawns torchrun --standalone); under torchrun, WORLD_SIZE decides",
    )
    r.set_defaults(func=_cmd_run)

    sb = sub.add_parser("submit", help="run a recipe as a Slurm job (or --local) through submitit")
    sb.add_argument("recipe")
    sb.add_argument("overrides", nargs="*")
    sb.add_argument("--nodes", type=int, default=1)
    sb.add_argument("--gpus-per-node", type=int, default=0, help="one task per GPU")
    sb.add_argument("--tasks", type=int, default=1, help="tasks per node without GPUs (and with --local)")
    sb.add_argument("--partition", default=None)
    sb.add_argument("--time", type=int, default=240, help="minutes per attempt (requeued on timeout)")
    sb.add_argument("--account", default=None)
    sb.add_argument("--cpus-per-task", type=int, default=None)
    sb.add_argument("--mem", type=int, default=None, help="GB per node")
    sb.add_argument("--local", action="store_true", help="run on this machine with submitit's LocalExecutor")
    sb.add_argument("--logs", default=None, help="submitit folder (default: OUTPUT.submitit)")
    sb.add_argument("--wait", action="store_true", help="wait for a Slurm job to finish (--local always waits)")
    sb.set_defaults(func=_cmd_submit)

    pl = sub.add_parser("plan", help="print per-block shapes, parameter counts and peak memory; reads no weights")
    pl.add_argument("recipe")
    pl.add_argument("overrides", nargs="*")
    pl.set_defaults(func=_cmd_plan)

    ins = sub.add_parser("inspect", help="shapes and sparsity per layer; verifies shards and hashes")
    ins.add_argument("checkpoint")
    ins.add_argument("--json", action="store_true")
    ins.add_argument("--no-verify", action="store_true", help="skip hashing the shards")
    ins.set_defaults(func=_cmd_inspect)

    ev = sub.add_parser("eval", help="perplexity (and sizes) of a checkpoint on a text")
    ev.add_argument("model")
    ev.add_argument("--data", default=None)
    ev.add_argument("--tasks", default=None, help="local lm-eval task YAML file or directory (needs lm_eval)")
    ev.add_argument("--compare", default=None, help="a second (e.g. dense) checkpoint to evaluate side by side")
    ev.add_argument("--windows", type=int, default=16)
    ev.add_argument("--seq-len", type=int, default=512)
    ev.add_argument("--batch", type=int, default=1, help="speed: prompts per forward")
    ev.add_argument("--prompt-len", type=int, default=128, help="speed: prompt tokens (prefill)")
    ev.add_argument("--new-tokens", type=int, default=32, help="speed: greedy tokens generated per prompt (decode)")
    ev.add_argument("--repeats", type=int, default=3, help="speed: timed runs (median), after one warm-up run")
    ev.add_argument("--no-speed", action="store_true", help="perplexity and sizes only")
    ev.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=_cmd_eval)

    d = sub.add_parser("demo", help="prune the real SmolLM2-135M 50%% with SparseGPT and evaluate it")
    d.add_argument("--output", default=None)
    d.add_argument("--samples", type=int, default=64)
    d.add_argument("--seq-len", type=int, default=512)
    d.set_defaults(func=_cmd_demo)

    di = sub.add_parser("distill", help="recovery distillation of a pruned checkpoint on DeepSpeed ZeRO-3")
    di.add_argument("recipe")
    di.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=50 lr=5e-5")
    di.add_argument("--nproc", type=int, default=1, help="local ranks (spawns torchrun when > 1)")
    di.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    di.set_defaults(func=_cmd_distill)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("transformers", "urllib3", "filelock", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if int(os.environ.get("RANK", "0")) != 0 and not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 narrates a multi-rank run
    try:
        return args.func(args)
    except _known_errors() as e:
        if args.verbose:
            raise
        print(f"blockprune: error: {e}  (run with -v for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blockprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
