"""Where and how a run computes: device, compute dtype, micro-batch, memory budgets, spill directory, ranks.

`resolve_runtime` turns the recipe's `runtime:` section (strings such as "auto") into concrete objects once, before
the block loop; everything after it takes a `Runtime`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.cache import default_budgets
from engine.schema import ConfigError
from sharding import dist
from sharding.dist import DistInfo
from sharding.reader import CheckpointReader


@dataclass
class Runtime:
    """`device` / `dtype`: where blocks run and in which dtype. `micro_batch`: calibration samples per forward.
    `device_budget` / `host_budget`: bytes the activation cache may hold there (None: unbounded). `spill_dir`: the
    disk tier's directory (per rank). `progress`: show progress bars. `dist`: this process's rank information."""

    device: torch.device
    dtype: torch.dtype
    micro_batch: int
    device_budget: int | None
    host_budget: int | None
    spill_dir: str
    progress: bool
    dist: DistInfo = field(default_factory=DistInfo)


def resolve_runtime(cfg, reader: CheckpointReader) -> Runtime:
    """The concrete runtime of a `RunConfig`; joins the process group when launched with several ranks."""
    rt = cfg.runtime
    if rt.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(rt.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"runtime.device = {rt.device}: CUDA is not available on this machine")
    if rt.dtype == "auto":
        dtype = checkpoint_dtype(reader) if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, rt.dtype)
    if rt.threads:
        torch.set_num_threads(rt.threads)
    info = dist.init_from_env(device.type)
    spill_dir = rt.spill_dir or cfg.output
    if info.enabled:
        if device.type == "cuda":  # one GPU per rank (a launcher that narrows CUDA_VISIBLE_DEVICES leaves one)
            device = torch.device("cuda", info.local_rank % torch.cuda.device_count())
        spill_dir = str(Path(spill_dir) / f".rank{info.rank}")
        if len(range(cfg.calibration.samples)[dist.sample_slice(cfg.calibration.samples, info)]) == 0:
            raise ConfigError(
                f"calibration.samples = {cfg.calibration.samples} is fewer than the {info.world_size} "
                "ranks: every rank needs at least one sample"
            )
    gb = 2**30
    dev_default, host_default = default_budgets(device)
    return Runtime(
        device=device,
        dtype=dtype,
        micro_batch=rt.micro_batch,
        device_budget=int(rt.device_budget_gb * gb) if rt.device_budget_gb is not None else dev_default,
        host_budget=int(rt.host_budget_gb * gb) if rt.host_budget_gb is not None else host_default,
        spill_dir=spill_dir,
        progress=rt.progress and info.is_main,
        dist=info,
    )


def checkpoint_dtype(reader: CheckpointReader) -> torch.dtype:
    """The most common floating dtype of the checkpoint's tensors (float32 when it has none)."""
    floats = [reader.torch_dtype(n) for n in reader.names() if reader.torch_dtype(n).is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32
