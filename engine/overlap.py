"""I/O beside compute: the next block read ahead on a background thread while this one computes, the last block
written behind on another while the next one computes.

    io = BlockIO(reader, adapter, order=[blocks to read, in visiting order], pin=cuda)
    disk = io.read(i)                  # block i's source tensors (host; pinned for CUDA), then block i+1 starts
    io.write(lambda: writer.write_unit(...))   # waits for the previous write, then writes this one behind
    io.drain()                         # before finalize (and on any exit): the pending write is done, or its error

Bounded: at most one block read ahead and one block being written, so host memory holds O(2 blocks) besides the
one computing (`engine.memory_plan` counts the read-ahead buffer as `prefetch`). An error on a background thread is
raised in the main thread at the next call. Reading and writing release the GIL (file I/O, tensor copies), so the
threads overlap with torch compute.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from engine.arch import ArchAdapter

log = logging.getLogger(__name__)


class BlockIO:
    """Read-ahead and write-behind for the block loop (module docstring). `enabled=False`: everything inline."""

    def __init__(
        self,
        reader,
        adapter: ArchAdapter,
        order: Sequence[int],
        *,
        pin: bool = False,
        enabled: bool = True,
    ) -> None:
        self.reader, self.adapter, self.pin, self.enabled = reader, adapter, pin, enabled
        self.order = list(order)
        self._reads: dict[int, Future] = {}
        self._write: Future | None = None
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="blockprune-io") if enabled else None
        self._schedule_after(None)

    # ---- reads --------------------------------------------------------------------------------------------------
    def _load(self, i: int) -> dict[str, Tensor]:
        tensors = self.reader.read(self.reader.names_with_prefix(self.adapter.block_prefix(i)))
        if self.pin:
            tensors = {n: t.pin_memory() for n, t in tensors.items()}
        return tensors

    def _schedule_after(self, i: int | None) -> None:
        """Start reading the block that follows `i` in `order` (the first one for None)."""
        if self._pool is None or not self.order:
            return
        k = 0 if i is None else (self.order.index(i) + 1 if i in self.order else len(self.order))
        if k < len(self.order) and self.order[k] not in self._reads:
            nxt = self.order[k]
            self._reads[nxt] = self._pool.submit(self._load, nxt)

    def read(self, i: int) -> dict[str, Tensor]:
        """Block `i`'s source tensors on the host (read ahead when `i` was next in `order`); starts the next read."""
        future = self._reads.pop(i, None)
        tensors = future.result() if future is not None else self._load(i)
        self._schedule_after(i)
        return tensors

    # ---- writes -------------------------------------------------------------------------------------------------
    def write(self, fn: Callable[[], object]) -> None:
        """Run `fn` (a unit's write) behind the compute: waits for the previous write first (its error, if any, is
        raised here), so at most one block is being written."""
        self.drain()
        if self._pool is None:
            fn()
            return
        self._write = self._pool.submit(fn)

    def drain(self) -> None:
        """Wait for the pending write; raise its error in this thread."""
        pending, self._write = self._write, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Finish the pending write (its error is raised) and stop the threads; read-aheads are dropped."""
        try:
            self.drain()
        finally:
            for f in self._reads.values():
                f.cancel()
            self._reads.clear()
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None

    def __enter__(self) -> BlockIO:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def to_device(tensors: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Host tensors onto `device` (asynchronously from pinned memory), consuming the dict."""
    if device.type == "cpu":
        return tensors
    return {n: tensors.pop(n).to(device, non_blocking=True) for n in list(tensors)}
