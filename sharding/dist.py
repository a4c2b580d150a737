"""Process groups, collectives and partition plans for multi-rank runs (torchrun; NCCL on CUDA, gloo on CPU).

Everything distributed in blockprune goes through this module; `solvers/` never sees a rank. With one process
(no `WORLD_SIZE`, or `WORLD_SIZE=1`) every function here is a cheap no-op, so the engine has one code path.

Reduction order (DESIGN.md §5, documented in docs/distributed.md): statistics are sums. Each rank accumulates its
own contiguous slice of the calibration samples in micro-batch order; `all_reduce(SUM)` then adds the ranks'
partial sums. Float addition is not associative, so the same recipe gives the same bytes at the same world size
(the collective's order is fixed for a given world size and backend) and weights equal within float tolerance
across world sizes; masks and shapes agree unless two candidates tie within that tolerance.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job. `device` is where its blocks run (cuda:LOCAL_RANK on GPU jobs)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init_from_env(device_type: str = "cpu", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by torchrun's (or submitit's exported) environment variables.

    One process: returns `DistInfo()` without touching torch.distributed. Several: `init_process_group` with NCCL
    for CUDA devices and gloo otherwise (idempotent: an existing default group is reused)."""
    world = env_world_size()
    if world <= 1:
        return DistInfo()
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun or `blockprune submit`"
        )
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        log.info("rank %d/%d joined the %s process group", dist.get_rank(), world, backend)
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        backend=dist.get_backend(),
    )


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def sample_slice(n: int, info: DistInfo) -> slice:
    """This rank's contiguous slice of `n` calibration samples (sizes differ by at most one; rank order)."""
    base, extra = divmod(n, info.world_size)
    start = info.rank * base + min(info.rank, extra)
    return slice(start, start + base + (1 if info.rank < extra else 0))


def partition(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each item: longest-processing-time greedy (largest cost first to the least-loaded rank; ties to
    the lower rank, then the earlier item), deterministic for equal inputs. Max load <= 4/3 of the optimum."""
    loads = [0.0] * world_size
    owner = [0] * len(costs)
    for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        owner[k] = r
        loads[r] += float(costs[k])
    return owner


def all_reduce_sum(tensors: Iterable[torch.Tensor], info: DistInfo) -> None:
    """In-place sum over ranks of every tensor (one collective per tensor, in the given order). A tensor on
    another device than the backend's (CPU sums in an NCCL job) travels through a copy."""
    if not info.enabled:
        return
    wire = _wire_device(info)
    for t in tensors:
        if t.device == wire:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        else:
            tmp = t.to(wire)
            dist.all_reduce(tmp, op=dist.ReduceOp.SUM)
            t.copy_(tmp)


def all_reduce_floats(values: Sequence[float], info: DistInfo) -> list[float]:
    """Sum over ranks of a few Python floats (float64 on the wire)."""
    if not info.enabled:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=_wire_device(info))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (pickled; small objects only: plans, decisions, records)."""
    if not info.enabled:
        return obj
    box = [obj if info.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=_wire_device(info))
    return box[0]


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_tensors(
    tensors: dict[str, torch.Tensor] | None, info: DistInfo, src: int = 0, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """The tensor dict of rank `src` on every rank, on `device` (names, shapes and dtypes travel as one object,
    then one broadcast per tensor in name order). Other ranks pass None."""
    if not info.enabled:
        assert tensors is not None
        return tensors
    mine = None if info.rank != src or tensors is None else sorted(tensors.items())
    spec = broadcast_object(None if mine is None else [(n, tuple(t.shape), t.dtype) for n, t in mine], info, src)
    wire = _wire_device(info)
    out: dict[str, torch.Tensor] = {}
    for name, shape, dtype in spec:
        if info.rank == src:
            assert tensors is not None
            t = tensors[name].detach().to(wire).contiguous()
        else:
            t = torch.empty(shape, dtype=dtype, device=wire)
        dist.broadcast(t, src=src)
        out[name] = t.to(device)
    return out


def _wire_device(info: DistInfo) -> torch.device:
    """Where tensors must live for the backend: the rank's GPU for NCCL, CPU for gloo."""
    if info.backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
