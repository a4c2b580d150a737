"""Process and device memory readings for progress bars and reports.

Peak RSS comes from Linux's `VmHWM` (resettable through `/proc/self/clear_refs`, so a run or a block can measure
its own peak); elsewhere from `getrusage`, which is a process-lifetime peak (and on Linux survives fork/exec).
"""

from __future__ import annotations

import resource

import psutil
import torch

_STATUS = "/proc/self/status"


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size (MiB) since the last `reset_peak_rss()` (or process start)."""
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def available_host_bytes() -> int:
    return psutil.virtual_memory().available


def device_peak_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def reset_device_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free_device_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    return None
