"""I/O beside compute: wall time of a run whose reads are throttled, with and without the read-ahead / write-behind.

    python -m launch.benchmarks.overlap [--layers 8 --hidden 1024 --read-mb-s 200 --samples 16 --seq-len 256]
        [--write-results]

A random llama checkpoint (`launch.benchmarks.ranks.build_model`) is pruned in this process by Wanda 50% three
times: with reads throttled to ``--read-mb-s`` (a sleep of ``bytes / rate`` inside `CheckpointReader.read`, which
only this benchmark installs: a slow network filesystem or disk) and the overlap off, the same with the overlap on
(`runtime.overlap`, engine/overlap.py), and once unthrottled with the overlap off (the compute alone). The I/O time
is the throttled reads' total sleep. With the overlap, wall time should approach ``max(I/O, compute)`` rather than
their sum; the outputs are byte-identical.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from launch.benchmarks import common
from launch.benchmarks.ranks import build_model, max_rel_diff, random_model_recipe

SECTION = "overlap"
LEGEND = (
    "*I/O s*: the throttled reads' sleep (block reads only); *compute s*: the unthrottled run without overlap; "
    "*ideal*: max(I/O, compute); *wall / ideal* near 1 means the reads hide behind the compute. Same output bytes "
    "in every run."
)


class Throttle:
    """Installs a read-rate limit on `CheckpointReader.read` (bytes / rate of sleep per call); benchmark only."""

    def __init__(self, mb_s: float) -> None:
        self.rate = mb_s * 2**20
        self.slept = 0.0

    def __enter__(self) -> Throttle:
        from sharding.reader import CheckpointReader

        self.real = CheckpointReader.read
        throttle = self

        def slow_read(reader, names, **kwargs):
            out = throttle.real(reader, names, **kwargs)
            delay = sum(t.numel() * t.element_size() for t in out.values()) / throttle.rate
            throttle.slept += delay
            time.sleep(delay)
            return out

        CheckpointReader.read = slow_read  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        from sharding.reader import CheckpointReader

        CheckpointReader.read = self.real  # type: ignore[method-assign]


def timed_run(recipe: dict) -> float:
    from engine.config import config_from_dict
    from engine.pipeline import run

    t = time.perf_counter()
    run(config_from_dict(recipe))
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m launch.benchmarks.overlap",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--read-mb-s", type=float, default=200.0)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--work-dir", type=Path, default=common.BENCH_DIR / "overlap")
    common.add_results_args(p)
    args = p.parse_args(argv)
    common.setup_logging()
    load_before = common.load_average()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(work / f"llama-{args.layers}x{args.hidden}", args.layers, args.hidden)
    stage = {"method": "wanda", "sparsity": 0.5}

    def recipe(name: str, overlap: bool) -> dict:
        return {
            **random_model_recipe(model, work / name, args.samples, args.seq_len, stage, overlap=overlap),
            "overwrite": True,
        }

    compute = timed_run(recipe("compute", False))
    with Throttle(args.read_mb_s) as off:
        wall_off = timed_run(recipe("off", False))
    with Throttle(args.read_mb_s) as on:
        wall_on = timed_run(recipe("on", True))
    io = off.slept
    ideal = max(io, compute)
    same = max_rel_diff(work / "on", work / "off") == 0.0
    rows = [
        ["overlap off", f"{wall_off:.1f}", f"{io:.1f}", f"{compute:.1f}", f"{ideal:.1f}", f"{wall_off / ideal:.2f}"],
        ["overlap on", f"{wall_on:.1f}", f"{on.slept:.1f}", f"{compute:.1f}", f"{ideal:.1f}", f"{wall_on / ideal:.2f}"],
    ]
    table = common.markdown_table(["run", "wall s", "I/O s", "compute s", "ideal s", "wall / ideal"], rows)
    note = (
        f"Overlap on / off: **{wall_on / wall_off:.3f}** of the wall time; I/O + compute = {io + compute:.1f} s, "
        f"max = {ideal:.1f} s. Outputs identical: {same}."
    )
    print(table)
    print(note)
    if args.write_results:
        common.publish_section(
            SECTION,
            "Overlap of I/O and compute (throttled reads)",
            common.command_line("launch.benchmarks.overlap", argv),
            LEGEND,
            [table, note],
            facts={
                "model": f"random llama, {args.layers} layers, hidden {args.hidden}, float32",
                "calibration": f"{args.samples} x {args.seq_len} tokens",
                "reads": f"{args.read_mb_s:g} MB/s",
            },
            load_before=load_before,
            path=args.results,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
