"""Shared pieces of the benchmark scripts: measured child processes, blockprune runs, evaluation, machine facts,
markdown tables and the sections of ``docs/results.md``.

Child protocol: every measured run is its own process, started by `run_child`, which times it from spawn to exit
(the process wall time: imports, model load, pruning and saving). A child may end by printing one line
``BENCH_RESULT <json>`` (`emit_result`) whose ``peak_rss_mb`` is its own ``VmHWM`` from ``/proc/self/status``:
the kernel's per-process peak, which starts afresh at ``exec`` (unlike ``ru_maxrss``, which carries a forking
parent's peak over). ``blockprune run`` reports the same reading as ``peak_rss_mb`` in ``blockprune_report.json``.

Results sections: ``docs/results.md`` holds one section per script between ``<!-- BEGIN name -->`` and
``<!-- END name -->``. Every script publishes its own with `publish_section` (title, command, machine facts, legend,
then its tables and notes), which `write_section` replaces in place (or appends), so scripts never clobber each other.

Only the standard library is imported at module level: the llm-compressor child imports this file from its own
venv, which has no blockprune dependencies.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_MD = REPO_ROOT / "docs" / "results.md"
BENCH_DIR = REPO_ROOT / ".bench"  # git-ignored: venvs, recipes, pruned outputs, logs
RESULT_TAG = "BENCH_RESULT "
RESULTS_HEADER = (
    "# Results\n\n"
    "Benchmark tables written by the scripts in `launch/benchmarks/` (run by hand, not in CI). Each section names\n"
    "the machine, its load while the benchmark ran, and the exact command that produced it; rerun the command to\n"
    "reproduce or refresh the section.\n"
)
# Decoder-block linears of HF Llama-family checkpoints (the tensors both tools prune; lm_head and embeddings excluded).
BLOCK_LINEAR = re.compile(r"\.layers\.\d+\..*_proj\.weight$")


# ------------------------------------------------------------------------------------------- child processes


def vmhwm_mb() -> float:
    """This process's peak resident set size in MiB: ``VmHWM`` of ``/proc/self/status`` (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("/proc/self/status has no VmHWM line (not Linux?)")


def emit_result(**fields: object) -> None:
    """Print the child's ``BENCH_RESULT <json>`` line: ``fields`` plus ``peak_rss_mb`` (VmHWM, read now)."""
    print(RESULT_TAG + json.dumps({**fields, "peak_rss_mb": round(vmhwm_mb(), 1)}), flush=True)


@dataclass
class ChildRun:
    """One finished child process: its command, wall time from spawn to exit, log file and ``BENCH_RESULT``."""

    cmd: list[str]
    wall_s: float
    log: Path
    result: dict = field(default_factory=dict)


def run_child(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> ChildRun:
    """Run ``cmd`` in the repository root to completion, stdout and stderr into ``log_path``; raise on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    log.info("running %s  (log: %s)", shlex.join(cmd), log_path)
    with open(log_path, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - t0
    text = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-15:])
        raise RuntimeError(f"{cmd[0]} ... exited with {proc.returncode} after {wall:.0f} s; log {log_path}:\n{tail}")
    result = {}
    for line in text.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG) :])
    log.info("finished in %.1f s", wall)
    return ChildRun(cmd=cmd, wall_s=wall, log=log_path, result=result)


# ------------------------------------------------------------------------------------------- blockprune runs


def blockprune_recipe(
    model: Path, output: Path, args: argparse.Namespace, stage: dict, runtime: dict | None = None, **extra: object
) -> dict:
    """A one-stage recipe: float32 on the CPU (plus the ``runtime`` keys given), the calibration of ``args``
    (``calib_path``, ``samples``, ``seq_len``, ``seed``: see `add_common_args`), `stage` as ``prune[0]``, then the
    top-level keys in ``extra``."""
    return {
        "model": str(model),
        "output": str(output),
        "overwrite": True,
        "calibration": {
            "data": str(args.calib_path),
            "samples": args.samples,
            "seq_len": args.seq_len,
            "seed": args.seed,
        },
        "runtime": {"device": "cpu", "dtype": "float32", **(runtime or {})},
        "prune": [stage],
        **extra,
    }


def run_blockprune(recipe: dict, work: Path, name: str, extra: Sequence[str] = ()) -> tuple[dict, ChildRun]:
    """``python -m launch run <work>/<name>.yaml [extra...]`` in a child; returns (its ``blockprune_report.json``,
    the run)."""
    import yaml

    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    child = run_child([sys.executable, "-m", "launch", "run", str(path), *extra], work / f"{name}.log")
    report = json.loads((Path(recipe["output"]) / "blockprune_report.json").read_text())
    return report, child


# ------------------------------------------------------------------------------------------- inputs and evaluation


def add_common_args(p: argparse.ArgumentParser, work_name: str) -> None:
    """Model, calibration, evaluation and output options shared by the benchmark scripts."""
    p.add_argument("--model", default=None, help="HF checkpoint dir (default: the cached SmolLM2-135M float32)")
    p.add_argument(
        "--calib-text",
        default=None,
        help="calibration text: a path or a name in launch.assets.TEXTS "
        "(default: CALIBRATION_TEXT, Shakespeare's comedies)",
    )
    p.add_argument(
        "--eval-text",
        default=None,
        help="evaluation text: a path or a name in launch.assets.TEXTS (default: EVAL_TEXT, Hamlet)",
    )
    p.add_argument("--samples", type=int, default=64, help="calibration samples")
    p.add_argument("--seq-len", type=int, default=512, help="calibration tokens per sample")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--work-dir", type=Path, default=BENCH_DIR / work_name, help="recipes, pruned outputs and logs")
    add_results_args(p)


def add_results_args(p: argparse.ArgumentParser) -> None:
    """``--write-results`` and ``--results``: whether and where the script publishes its section."""
    p.add_argument("--write-results", action="store_true", help=f"rewrite this script's section of {RESULTS_MD}")
    p.add_argument("--results", type=Path, default=RESULTS_MD, help="results file for --write-results")


def resolve_inputs(args: argparse.Namespace) -> None:
    """Set ``args.model``, ``args.calib_path`` and ``args.eval_path`` (cached assets unless paths were given)."""
    from launch.assets import CALIBRATION_TEXT, EVAL_TEXT, TEXTS, real_text, smollm2_checkpoint

    def text(spec: str | None, default: str) -> Path:
        spec = spec or default
        return real_text(spec) if spec in TEXTS else Path(spec)

    args.model = Path(args.model) if args.model else smollm2_checkpoint()
    args.calib_path = text(args.calib_text, CALIBRATION_TEXT)
    args.eval_path = text(args.eval_text, EVAL_TEXT)
    for p in (args.model, args.calib_path, args.eval_path):
        if not p.exists():
            raise SystemExit(f"no such file or directory: {p}")
    args.work_dir.mkdir(parents=True, exist_ok=True)


def input_facts(args: argparse.Namespace) -> dict[str, str]:
    """The model, calibration and evaluation facts of a results section (the inputs of `resolve_inputs`)."""
    return {
        "model": f"`{args.model}`",
        "calibration": f"{args.samples} x {args.seq_len} tokens of `{args.calib_path.name}` (seed {args.seed})",
        "evaluation": f"{args.eval_windows} x {args.eval_seq_len} tokens of `{args.eval_path.name}`",
    }


def evaluate_all(paths: dict[str, Path], args: argparse.Namespace) -> dict[str, dict]:
    """`engine.report.evaluate.evaluate_one` of every checkpoint on the evaluation text (one after the other)."""
    from engine.report.evaluate import evaluate_one

    text = args.eval_path.read_text(encoding="utf-8")
    out = {}
    for name, path in paths.items():
        log.info(
            "evaluating %s (%d x %d tokens of %s)", name, args.eval_windows, args.eval_seq_len, args.eval_path.name
        )
        out[name] = evaluate_one(path, text, windows=args.eval_windows, seq_len=args.eval_seq_len)
        log.info("%s: ppl %.3f", name, out[name]["ppl"])
    return out


def linear_sparsity(ckpt: Path, pattern: re.Pattern = BLOCK_LINEAR) -> float:
    """Fraction of exact zeros over the checkpoint's tensors whose names match ``pattern`` (decoder linears)."""
    from safetensors import safe_open

    zeros = total = 0
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if pattern.search(name):
                    t = st.get_tensor(name)
                    zeros += int((t == 0).sum())
                    total += t.numel()
    if total == 0:
        raise ValueError(f"{ckpt}: no tensor matches {pattern.pattern}")
    return zeros / total


# ------------------------------------------------------------------------------------------- machine and results


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` prints them."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_info() -> dict:
    """CPU model, cores, memory, torch threads and library versions of this machine (main venv)."""
    import torch
    import transformers

    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gb": round(mem_gb, 1),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }


def machine_markdown(info: dict, load_before: str, load_after: str, extra: dict | None = None) -> str:
    """Bullet list of the machine facts, the load average before/after and any ``extra`` facts."""
    lines = [
        f"- CPU: {info['cpu']}, {info['usable_cores']} usable of {info['cores']} logical cores, "
        f"{info['memory_gb']} GiB RAM; torch intra-op threads {info['torch_threads']}",
        f"- Python {info['python']}, torch {info['torch']}, transformers {info['transformers']} ({info['platform']})",
        f"- load average (`uptime`, 1/5/15 min) before: {load_before}; after: {load_after} "
        "(other processes shared the CPU: wall times are noisy when it exceeds the core count)",
    ]
    lines += [f"- {k}: {v}" for k, v in (extra or {}).items()]
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """GitHub markdown table; cells are formatted with ``str``."""
    cells = [[str(c) for c in r] for r in rows]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(out)


def command_line(module: str, argv: list[str]) -> str:
    """The exact command, relative to the repository root when the interpreter lives inside it."""
    exe = Path(sys.executable)
    with contextlib.suppress(ValueError):  # an interpreter outside the repository keeps its absolute path
        exe = exe.absolute().relative_to(REPO_ROOT)
    return shlex.join([str(exe), "-m", module, *argv])


def render_section(
    title: str,
    command: str,
    machine: str,
    legend: str | None,
    blocks: Sequence[str],
) -> str:
    """The text of a results section, paragraphs separated by one blank line: ``## title``, ``Command: `command```,
    the ``machine`` facts (`machine_markdown`), the ``legend`` (omitted when empty), then ``blocks`` in order."""
    parts = [f"## {title}", f"Command: `{command}`", machine]
    if legend:
        parts.append(legend)
    return "\n\n".join([*parts, *blocks])


def publish_section(
    anchor: str,
    title: str,
    command: str,
    legend: str | None,
    blocks: Sequence[str],
    *,
    facts: Mapping[str, object] | None = None,
    load_before: str,
    load_after: str | None = None,
    info: dict | None = None,
    path: Path = RESULTS_MD,
) -> str:
    """Write section ``anchor`` of ``path`` (replaced between its markers, or appended; idempotent) and return it.

    The section: ``## title``; ``Command: `command``` (`command_line`, with any ``nice`` prefix); the machine
    (``info``, default `machine_info` now), the load average before the run and after it (``load_after``, default
    now) and the ``facts`` (model, calibration, ...), one bullet each; the ``legend`` paragraph (skipped when empty);
    then ``blocks``, the script's tables (`markdown_table`) and notes, in order. Paragraphs are separated by one
    blank line.
    """
    machine = machine_markdown(
        machine_info() if info is None else info,
        load_before,
        load_average() if load_after is None else load_after,
        dict(facts or {}),
    )
    text = render_section(title, command, machine, legend, blocks)
    write_section(anchor, text, path)
    return text


def write_section(name: str, body: str, path: Path = RESULTS_MD) -> None:
    """Replace the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` in ``path`` with ``body``
    (append the section, or create the file with a header, when absent)."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else RESULTS_HEADER
    i, j = text.find(begin), text.find(end)
    if (i < 0) != (j < 0) or j < i:
        raise ValueError(f"{path}: markers of section {name!r} are unbalanced; fix the file by hand")
    if i >= 0:
        text = text[:i] + block + text[j + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    log.info("wrote section %s of %s", name, path)


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
