"""The activation cache between blocks: calibration hidden states ``[N, L, H]`` held as micro-batches.

Two buffers of ``N*L*H`` elements each: ``inputs`` (the hidden states entering the current block) and ``outputs``
(the block's outputs, written batch by batch while later inputs are still unread). ``swap()`` makes the outputs the
next block's inputs. One round per block::

    with ActivationCache(N, L, H, dtype=torch.bfloat16, device="cuda", micro_batch=8,
                         device_budget_bytes=dev, host_budget_bytes=host, spill_dir="/scratch") as cache:
        for b in range(cache.num_batches()):
            cache.put(b, embed(ids[slice(*cache.batch_range(b))]))
        cache.swap()
        for block in blocks:
            for b in range(cache.num_batches()):
                cache.put(b, block(cache.get(b)))
            cache.swap()

The tier is chosen once, from the bytes of both buffers ``nbytes() = 2*N*L*H*itemsize``: ``device`` when
``nbytes <= device_budget_bytes``, else ``host`` (CPU memory, pinned when ``device`` is a CUDA device) when
``nbytes <= host_budget_bytes``, else ``disk`` (two anonymous raw files under ``spill_dir``, read and written with
positioned reads/writes of one micro-batch, never mapped whole; nameless, so nothing stays on disk after ``close()``
or after the process dies, even by ``kill -9``).
A budget of ``None`` means unlimited.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import weakref
from typing import Any

import psutil
import torch

logger = logging.getLogger(__name__)

TIERS = ("device", "host", "disk")


def choose_tier(nbytes: int, device_budget_bytes: int | None, host_budget_bytes: int | None) -> str:
    """``device`` if ``nbytes`` fits the device budget, else ``host`` if it fits the host budget, else ``disk``."""
    if device_budget_bytes is None or nbytes <= device_budget_bytes:
        return "device"
    if host_budget_bytes is None or nbytes <= host_budget_bytes:
        return "host"
    return "disk"


def default_budgets(
    device: torch.device | str, *, device_fraction: float = 0.25, host_fraction: float = 0.5
) -> tuple[int, int]:
    """Budgets from free memory now: ``device_fraction`` of free device memory (of available RAM for a CPU device),
    ``host_fraction`` of available RAM. The rest of the device is left for the block, its Grams and its forward."""
    available = psutil.virtual_memory().available
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        device_free = free
    else:
        device_free = available
    return int(device_free * device_fraction), int(available * host_fraction)


class _TensorStore:
    """Both buffers as tensors on the device, or in (optionally pinned) CPU memory."""

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device, pin: bool) -> None:
        self.buffers = [self._alloc(shape, dtype, device, pin) for _ in range(2)]
        self.pinned = self.buffers[0].is_pinned()

    @staticmethod
    def _alloc(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device, pin: bool) -> torch.Tensor:
        if not pin:
            return torch.empty(shape, dtype=dtype, device=device)
        try:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        except RuntimeError as e:  # the pinned-memory limit is lower than RAM on some systems
            logger.warning("activation cache: pinning %s failed (%s); using pageable CPU memory", shape, e)
            return torch.empty(shape, dtype=dtype)

    def read(self, i: int, start: int, stop: int) -> torch.Tensor:
        return self.buffers[i][start:stop]

    def write(self, i: int, start: int, x: torch.Tensor) -> None:
        self.buffers[i][start : start + x.shape[0]].copy_(x, non_blocking=self.pinned and x.is_cuda)

    def close(self) -> None:
        self.buffers = []


def _close_files(files: list[Any]) -> None:
    for f in files:
        f.close()


class _DiskStore:
    """Both buffers as two anonymous raw files (row-major ``[N, L, H]``) under ``spill_dir``.

    The files have no name (``tempfile.TemporaryFile``: ``O_TMPFILE``, or unlinked right after creation), so their
    space returns to the filesystem when they are closed or the process ends in any way, ``kill -9`` and the OOM
    killer included: a killed 100 GB spill never stays behind on a scratch disk. Reads and writes move one
    micro-batch through a CPU tensor with seek + readinto/write, so host RSS stays at about one micro-batch (the
    kernel's page cache is not part of RSS)."""

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, spill_dir: str | None) -> None:
        self.shape, self.dtype = shape, dtype
        self.row_bytes = shape[1] * shape[2] * torch.empty((), dtype=dtype).element_size()
        size = shape[0] * self.row_bytes
        parent = spill_dir if spill_dir is not None else tempfile.gettempdir()
        os.makedirs(parent, exist_ok=True)
        free = shutil.disk_usage(parent).free
        if free < 2 * size:
            raise OSError(f"activation cache: {parent} has {free} bytes free, {2 * size} needed for the disk tier")
        self.directory = parent
        self.files = [
            tempfile.TemporaryFile(mode="w+b", buffering=0, prefix="blockprune-acts-", dir=parent)  # noqa: SIM115
            for _ in range(2)
        ]  # open until close(): the files live as long as the cache
        for f in self.files:
            f.truncate(size)
        self._finalizer = weakref.finalize(self, _close_files, self.files)

    def read(self, i: int, start: int, stop: int) -> torch.Tensor:
        out = torch.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
        f = self.files[i]
        f.seek(start * self.row_bytes)
        done = 0
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                raise OSError(
                    f"activation cache: short read of buffer {i} in {self.directory} at byte "
                    f"{start * self.row_bytes + done}"
                )
            done += n
        return out

    def write(self, i: int, start: int, x: torch.Tensor) -> None:
        data = x.detach().to("cpu").contiguous()
        view = memoryview(data.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
        f = self.files[i]
        f.seek(start * self.row_bytes)
        done = 0
        while done < len(view):
            done += f.write(view[done:])

    def close(self) -> None:
        self._finalizer()


class ActivationCache:
    """Holds the calibration hidden states ``[N, L, H]`` between blocks as micro-batches of ``micro_batch`` samples
    (the last one smaller when ``micro_batch`` does not divide ``N``), in two buffers: ``get`` reads the inputs,
    ``put`` writes the outputs, ``swap`` makes the outputs the next inputs. See the module docstring for the tiers.
    """

    def __init__(
        self,
        n_samples: int,
        seq_len: int,
        hidden: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        micro_batch: int,
        device_budget_bytes: int | None,
        host_budget_bytes: int | None,
        spill_dir: str | None = None,
    ) -> None:
        for name, value in (
            ("n_samples", n_samples),
            ("seq_len", seq_len),
            ("hidden", hidden),
            ("micro_batch", micro_batch),
        ):
            if value < 1:
                raise ValueError(f"ActivationCache: {name} must be >= 1, got {value}")
        self.shape = (n_samples, seq_len, hidden)
        self.dtype = dtype
        self.device = torch.device(device)
        self.micro_batch = min(micro_batch, n_samples)
        self.buffer_bytes = n_samples * seq_len * hidden * torch.empty((), dtype=dtype).element_size()
        self.tier = choose_tier(2 * self.buffer_bytes, device_budget_bytes, host_budget_bytes)
        self._store: _TensorStore | _DiskStore | None = self._make_store(spill_dir)
        self._inputs = 0  # index of the inputs buffer; outputs are 1 - _inputs
        self._has_inputs = False
        self._written: set[int] = set()
        logger.info(
            "activation cache: %s x %s, %d bytes, tier %s, %d micro-batches of %d",
            self.shape,
            dtype,
            self.nbytes(),
            self.tier,
            self.num_batches(),
            self.micro_batch,
        )

    def _make_store(self, spill_dir: str | None) -> _TensorStore | _DiskStore:
        if self.tier == "device":
            return _TensorStore(self.shape, self.dtype, self.device, pin=False)
        if self.tier == "host":
            return _TensorStore(self.shape, self.dtype, torch.device("cpu"), pin=self.device.type == "cuda")
        return _DiskStore(self.shape, self.dtype, spill_dir)

    def num_batches(self) -> int:
        return math.ceil(self.shape[0] / self.micro_batch)

    def batch_range(self, b: int) -> tuple[int, int]:
        """Sample rows ``[start, stop)`` of micro-batch ``b``."""
        if not 0 <= b < self.num_batches():
            raise IndexError(f"ActivationCache: micro-batch {b} out of range [0, {self.num_batches()})")
        start = b * self.micro_batch
        return start, min(start + self.micro_batch, self.shape[0])

    def get(self, b: int) -> torch.Tensor:
        """Inputs of micro-batch ``b`` on ``device``, ``[mb, L, H]`` (device tier: a view; do not modify it)."""
        store = self._open_store()
        if not self._has_inputs:
            raise RuntimeError("ActivationCache.get: no inputs yet; put every micro-batch, then swap()")
        start, stop = self.batch_range(b)
        x = store.read(self._inputs, start, stop)
        return x.to(self.device, non_blocking=x.is_pinned())

    def get_output(self, b: int) -> torch.Tensor:
        """Outputs of micro-batch ``b`` as last ``put`` (e.g. the dense block's, kept as the reference while the
        pruned block runs), on ``device``."""
        store = self._open_store()
        if b not in self._written:
            raise RuntimeError(f"ActivationCache.get_output: micro-batch {b} has no outputs since the last swap()")
        start, stop = self.batch_range(b)
        x = store.read(1 - self._inputs, start, stop)
        return x.to(self.device, non_blocking=x.is_pinned())

    def put(self, b: int, x: torch.Tensor) -> None:
        """Write the outputs of micro-batch ``b`` (cast to the cache dtype); inputs stay readable until ``swap()``."""
        store = self._open_store()
        start, stop = self.batch_range(b)
        expected = (stop - start, *self.shape[1:])
        if tuple(x.shape) != expected:
            raise ValueError(f"ActivationCache.put: micro-batch {b} has shape {tuple(x.shape)}, expected {expected}")
        store.write(1 - self._inputs, start, x.to(self.dtype))
        self._written.add(b)

    def swap(self) -> None:
        """Make the outputs the inputs of the next round; every micro-batch must have been put since the last swap."""
        self._open_store()
        missing = sorted(set(range(self.num_batches())) - self._written)
        if missing:
            raise RuntimeError(f"ActivationCache.swap: outputs of micro-batches {missing[:8]} were never put")
        if self.device.type == "cuda" and self.tier != "device":
            torch.cuda.synchronize(self.device)  # async copies to/from pinned memory end before it is reused
        self._inputs = 1 - self._inputs
        self._has_inputs = True
        self._written.clear()

    def nbytes(self) -> int:
        """Bytes held by both buffers (on the device, in host memory, or on disk)."""
        return 2 * self.buffer_bytes

    @property
    def spill_path(self) -> str | None:
        """The directory whose filesystem holds the disk tier's (nameless) files; ``None`` for the other tiers."""
        return self._store.directory if isinstance(self._store, _DiskStore) else None

    def close(self) -> None:
        """Free the buffers; the disk tier removes its files and directory. Idempotent."""
        if self._store is not None:
            self._store.close()
            self._store = None

    def _open_store(self) -> _TensorStore | _DiskStore:
        if self._store is None:
            raise RuntimeError("ActivationCache is closed")
        return self._store

    def __enter__(self) -> ActivationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
