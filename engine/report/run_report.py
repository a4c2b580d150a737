"""`blockprune_report.json`: what a run did, per block and in total."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from engine import memory


@dataclass
class RunReport:
    data: dict[str, Any] = field(default_factory=dict)
    cache_tier: str | None = None

    @classmethod
    def start(cls, cfg, adapter, rt) -> RunReport:
        return cls(
            data={
                "blockprune_version": _version(),
                "model": cfg.model,
                "model_type": adapter.model_type,
                "num_layers": adapter.num_layers,
                "run_id": cfg.run_id(),
                "device": str(rt.device),
                "dtype": str(rt.dtype).replace("torch.", ""),
                "calibration": {"samples": cfg.calibration.samples, "seq_len": cfg.calibration.seq_len},
                "stages": [s.method for s in cfg.prune],
                "sequential": cfg.sequential,
                "machine": {
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "cpus": torch.get_num_threads(),
                    "platform": platform.platform(),
                },
                "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "blocks": [],
            }
        )

    def add_block(self, entry: dict) -> None:
        self.data["blocks"].append(entry)

    def finish(self, wall_time_s: float, reader=None) -> None:
        blocks = self.data["blocks"]
        lin_params = lin_zero = 0
        for b in blocks:
            for rec in b.get("linears", {}).values():
                n = 1
                for d in rec["shape"]:
                    n *= d
                lin_params += n
                lin_zero += round(rec["sparsity"] * n)
        block_params = sum(b.get("params", 0) for b in blocks)
        block_nonzero = sum(b.get("nonzero", 0) for b in blocks)
        self.data.update(
            {
                "wall_time_s": round(wall_time_s, 3),
                "peak_rss_mb": round(memory.peak_rss_mb(), 1),
                "cache_tier": self.cache_tier,
                "pruned_linear_params": lin_params,
                "pruned_linear_sparsity": lin_zero / lin_params if lin_params else 0.0,
                "block_params": block_params,
                "block_sparsity": 1 - block_nonzero / block_params if block_params else 0.0,
            }
        )
        if reader is not None:
            self.data["total_params"] = sum(_numel(reader.info(n).shape) for n in reader.names())

    @property
    def wall_time_s(self) -> float:
        return self.data.get("wall_time_s", 0.0)

    def to_json(self) -> str:
        return json.dumps(self.data, indent=2, sort_keys=False)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("blockprune")
    except Exception:  # not installed (running from a source tree)
        return "dev"
