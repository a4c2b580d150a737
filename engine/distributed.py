"""The engine's distributed glue: what a block visit does differently when several ranks share the work.

    every rank: its slice of the calibration samples -> statistics of its tokens
    all ranks:  all_reduce(SUM) of every statistic (the union of the inputs any rank saw)
    sharded:    each solve task (a linear, a shared-input group, a structured unit group) runs on one owner rank,
                chosen by `sharding.dist.partition` over estimated costs; results are broadcast from the owner
    every rank: forwards its own samples through the pruned block; rank 0 alone writes

The collectives themselves live in `sharding.dist`; this module only knows the engine's objects (InputStats, solve
results). With one rank every function is the serial code path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from sharding.dist import DistInfo, all_gather_object, all_reduce_floats, all_reduce_sum, broadcast_object, partition
from solvers.stats import InputStats, init_stats

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def _layout(st: InputStats) -> tuple[int, bool, bool, str]:
    ref = st.H if st.H is not None else st.sumsq
    assert ref is not None  # statistics hold a Gram or column sums of squares
    return st.d, st.H is not None, st.sum is not None, str(ref.dtype)


def reduce_stats(stats: dict[str, InputStats], info: DistInfo, device: torch.device | str) -> dict[str, InputStats]:
    """Sum every rank's statistics in place and return the dict, completed with the inputs this rank never saw
    (an expert no token of this rank was routed to). Keys are reduced in sorted order on every rank."""
    if not info.enabled:
        return stats
    layouts: dict[str, tuple] = {}
    for part in all_gather_object({k: _layout(v) for k, v in stats.items()}, info):
        for k, lay in part.items():
            if layouts.setdefault(k, lay) != lay:
                raise RuntimeError(f"statistics of input {k!r} differ in layout across ranks: {layouts[k]} vs {lay}")
    for k in sorted(layouts):
        if k not in stats:
            d, gram, moments, dtype = layouts[k]
            stats[k] = init_stats(
                d, device=device, dtype=getattr(torch, dtype.replace("torch.", "")), gram=gram, track_moments=moments
            )
    keys = sorted(stats)
    all_reduce_sum([t for k in keys for t in (stats[k].H, stats[k].sum, stats[k].sumsq) if t is not None], info)
    counts = all_reduce_floats([stats[k].n for k in keys], info)
    for k, n in zip(keys, counts):
        stats[k].n = int(round(n))
    return stats


def run_sharded(tasks: Sequence[T], costs: Sequence[float], fn: Callable[[T], R], info: DistInfo) -> list[R]:
    """`[fn(t) for t in tasks]`, each task computed once, on the rank `partition(costs)` assigns it, and the result
    broadcast from there (picklable results: tensors, dataclasses of tensors, dicts). Same order on every rank."""
    if not info.enabled or len(tasks) <= 1:
        return [fn(t) for t in tasks]
    owner = partition(costs, info.world_size)
    mine = {k: fn(t) for k, t in enumerate(tasks) if owner[k] == info.rank}
    log.debug("rank %d solved %d of %d tasks", info.rank, len(mine), len(tasks))
    out: list[Any] = []
    for k in range(len(tasks)):
        res = broadcast_object(_to_cpu(mine.get(k)), info, src=owner[k])
        out.append(res)
    return out


def _to_cpu(obj: Any) -> Any:
    """Results travel pickled; move tensors to CPU first so that any backend can carry them."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.replace(obj, **{f: _to_cpu(getattr(obj, f)) for f in obj.__dataclass_fields__})
    return obj


class RankWriter:
    """The run's CheckpointWriter as every rank sees it: rank 0 owns the real writer (the one writer per block);
    queries (`is_committed`, `unit_metadata`, `read_unit`) are answered by rank 0 and broadcast, so every rank
    takes the same branch; `write_unit` and `finalize` act on rank 0 only. Every rank must call the queries in the
    same order. With one rank it is a transparent wrapper."""

    def __init__(self, open_writer: Callable[[], Any], info: DistInfo) -> None:
        self.info = info
        self.writer = None
        error = None
        if info.is_main:
            try:
                self.writer = open_writer()
            except Exception as e:  # every rank must learn that the output cannot be opened
                if not info.enabled:
                    raise
                error = (type(e).__name__, str(e))
                failure = e
        error = broadcast_object(error, info)
        if error is not None:
            if info.is_main:
                raise failure
            from sharding.writer import WriterError

            raise WriterError(f"rank 0 could not open the output: {error[1]}")

    def is_committed(self, unit: str) -> bool:
        return bool(broadcast_object(self.writer.is_committed(unit) if self.writer else None, self.info))

    def unit_metadata(self, unit: str) -> dict:
        return broadcast_object(self.writer.unit_metadata(unit) if self.writer else None, self.info)

    def read_unit(self, unit: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        from sharding.dist import broadcast_tensors

        if not self.info.enabled:
            assert self.writer is not None  # one rank: rank 0 owns the writer
            return self.writer.read_unit(unit, device=device)
        tensors = self.writer.read_unit(unit, device="cpu") if self.writer else None
        return broadcast_tensors(tensors, self.info, device=device)

    def unit_measurements(self, unit: str) -> dict:
        return broadcast_object(self.writer.unit_measurements(unit) if self.writer else None, self.info) or {}

    def write_unit(
        self,
        unit: str,
        tensors: dict[str, torch.Tensor],
        metadata: dict | None = None,
        measurements: dict | None = None,
    ) -> None:
        if self.writer is not None:
            self.writer.write_unit(unit, tensors, metadata=metadata, measurements=measurements)

    def finalize(self, *args: Any, **kwargs: Any) -> None:
        if self.writer is not None:
            self.writer.finalize(*args, **kwargs)

    def close(self) -> None:
        """Release the output (its lock) on rank 0; idempotent."""
        if self.writer is not None:
            self.writer.close()
