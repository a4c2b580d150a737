"""One block over the calibration tokens: build it, run it over every micro-batch, observe what it sees.

Every forward of the engine goes through here — the statistics forward of a block visit, the whole-model scoring
pass (`engine.prepass`), the one-pass true-sequential path (`engine.sequential`), the propagation of a pruned or
resumed block — so there is one block builder, one forward-context memo, one statistics accumulator:

    builder = BlockBuilder(reader, adapter, rt)
    block, dtypes = builder.read(i)                              # the dense block of source layer i
    runner = BlockRunner(adapter, cache, rt)
    dense = runner.dense(block, request)                         # statistics (reduced over ranks); outputs -> cache
    err = runner.propagate(pruned, compare=True)                 # Σ‖y − y_dense‖² / Σ‖y_dense‖²; outputs -> cache
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from engine.arch import ArchAdapter
from engine.blocks import (
    DISK_LAYOUT_ATTR,
    build_meta_block,
    cast_state,
    check_shapes,
    disk_to_memory_state,
    load_assign,
)
from engine.cache import ActivationCache
from engine.distributed import reduce_stats
from engine.modeling_blockprune import remove_sublayers
from engine.overlap import BlockIO, to_device
from engine.runtime import Runtime
from engine.schema import PruningError
from engine.stage import LayerShape, StatsRequest
from sharding import dist
from sharding.errors import CheckpointError
from sharding.reader import CheckpointReader
from solvers.scores import block_influence
from solvers.stats import InputStats, accumulate, init_stats

Observe = Callable[[Tensor], None]


class BlockBuilder:
    """Blocks from the source checkpoint (`read`) or from written tensors (`build`), and the adapters of written
    layer shapes (`adapter_for`, cached per shape)."""

    def __init__(self, reader: CheckpointReader, adapter: ArchAdapter, rt: Runtime) -> None:
        self.reader, self.adapter, self.rt = reader, adapter, rt
        self._adapters: dict[tuple, ArchAdapter] = {(): adapter}
        self.io: BlockIO | None = None

    @contextlib.contextmanager
    def overlapping(self, order: Iterable[int], enabled: bool = True) -> Iterator[BlockIO]:
        """While active, `read` takes its tensors from a read-ahead of the blocks in `order` (engine.overlap);
        the pending write (if the caller wrote behind) is finished on exit."""
        io = BlockIO(self.reader, self.adapter, list(order), pin=self.rt.device.type == "cuda", enabled=enabled)
        self.io = io
        try:
            yield io
        finally:
            self.io = None
            io.close()

    def adapter_for(self, shape: LayerShape) -> ArchAdapter:
        """The adapter whose stock layer has `shape`'s config fields (the source adapter when it has none)."""
        if shape.overrides not in self._adapters:
            self._adapters[shape.overrides] = self.adapter.with_overrides(shape.config)
        return self._adapters[shape.overrides]

    def read(self, i: int, shape: LayerShape | None = None) -> tuple[nn.Module, dict[str, torch.dtype]]:
        """Source block `i` on the device in the compute dtype, its removed sublayers (of `shape`) taken out, and
        the disk dtype of each of its tensors."""
        if self.io is not None:
            disk = to_device(self.io.read(i), self.rt.device)
        else:
            disk = self.reader.read(self.reader.names_with_prefix(self.adapter.block_prefix(i)), device=self.rt.device)
        check_finite(disk)
        dtypes = {n: t.dtype for n, t in disk.items()}
        block = self.adapter.build_block(i, disk, device=self.rt.device, dtype=self.rt.dtype, consume=True)
        if shape is not None and shape.sublayers_removed:
            remove_sublayers(block, attention=shape.attention, mlp=shape.mlp)
        return block, dtypes

    def build(self, i: int, disk: dict[str, Tensor], shape: LayerShape) -> nn.Module:
        """Block `i` of the written `shape` from its tensors (source numbering); removed sublayers have none."""
        adapter = self.adapter_for(shape)
        if not shape.sublayers_removed:
            return adapter.build_block(i, disk, device=self.rt.device, dtype=self.rt.dtype)
        prefix = adapter.block_prefix(i)
        meta = remove_sublayers(
            build_meta_block(adapter.spec, adapter.config, i), attention=shape.attention, mlp=shape.mlp
        )
        state, layout = disk_to_memory_state(disk, prefix, meta, adapter.spec)
        check_shapes(state, meta, prefix, layout)
        block = load_assign(meta, cast_state(state, adapter.spec, device=self.rt.device, dtype=self.rt.dtype), prefix)
        setattr(block, DISK_LAYOUT_ATTR, layout)
        return block


def stats_to(st: InputStats, device: torch.device) -> InputStats:
    """`st` with its tensors on `device` (the same object when they are there already)."""
    tensors = [t for t in (st.H, st.sum, st.sumsq) if t is not None]
    if all(t.device == device for t in tensors):
        return st
    move = lambda t: None if t is None else t.to(device)
    return InputStats(H=move(st.H), n=st.n, sum=move(st.sum), sumsq=move(st.sumsq))


def check_finite(tensors: dict[str, Tensor]) -> None:
    """CheckpointError naming the first floating tensor that holds a NaN or an infinity: nothing computed from it
    (statistics, scores, the next blocks' inputs) would mean anything."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{name}: {bad} NaN/Inf value(s) in the input checkpoint; refusing to prune it")


class StatsCollector:
    """Accumulates, per input id, what a `StatsRequest` asks for (float32 on the inputs' device); `reduced()` sums
    them over ranks. Call it as `collector(input_id, X)` (the adapter's input-hook callback) or `observer(input_id)`."""

    def __init__(self, widths: dict[str, int], request: StatsRequest) -> None:
        self.widths, self.request = widths, request
        self.stats: dict[str, InputStats] = {}

    def __call__(self, input_id: str, X: Tensor) -> None:
        if input_id not in self.request.wanted:
            return
        st = self.stats.get(input_id)
        if st is None:
            st = self.stats[input_id] = init_stats(
                self.widths[input_id],
                device=X.device,
                dtype=torch.float32,
                gram=input_id in self.request.gram,
                track_moments=input_id in self.request.track,
            )
        accumulate(st, X)

    def observer(self, input_id: str) -> Observe:
        return lambda X: self(input_id, X)

    def reduced(self, rt: Runtime) -> dict[str, InputStats]:
        return reduce_stats(self.stats, rt.dist, rt.device)


@dataclass
class DenseResult:
    """What a dense forward of a block saw: reduced input statistics and, summed over every token of every rank,
    the block influence ``Σ_t (1 − cos(x_t, y_t))`` (`influence_sum`), ``Σ_t ‖y_t‖²`` (`norm`) and `tokens`."""

    stats: dict[str, InputStats] = field(default_factory=dict)
    influence_sum: float = 0.0
    norm: float = 0.0
    tokens: int = 0

    @property
    def influence(self) -> float:
        """Block influence ``1 − mean_t cos(x_t, y_t)`` (ShortGPT)."""
        return self.influence_sum / max(self.tokens, 1)


class BlockRunner:
    """Forwards of one block at a time over the activation cache's micro-batches (inputs `cache.get`, outputs
    `cache.put`), with the forward context of each batch size built once."""

    def __init__(self, adapter: ArchAdapter, cache: ActivationCache, rt: Runtime) -> None:
        self.adapter, self.cache, self.rt = adapter, cache, rt
        self._ctx: dict[int, dict] = {}

    def ctx(self, batch: int) -> dict:
        """The forward context (positions, rotary embeddings, masks) of a micro-batch of `batch` samples."""
        if batch not in self._ctx:
            self._ctx[batch] = self.adapter.forward_context(
                batch, self.cache.shape[1], device=self.rt.device, dtype=self.rt.dtype
            )
        return self._ctx[batch]

    def batches(self) -> Iterator[tuple[int, Tensor, dict]]:
        """(index, inputs, context) of every micro-batch."""
        for b in range(self.cache.num_batches()):
            x = self.cache.get(b)
            yield b, x, self.ctx(x.shape[0])

    def forward(self, block: nn.Module, x: Tensor, ctx: dict) -> Tensor:
        return self.adapter.block_forward(block, x, ctx)

    @torch.no_grad()
    def dense(
        self,
        block: nn.Module,
        i: int,
        request: StatsRequest,
        *,
        observers: Sequence[contextlib.AbstractContextManager] = (),
        measure: bool = False,
        write_outputs: bool = True,
    ) -> DenseResult:
        """One forward over every micro-batch: the input statistics `request` names (reduced over ranks), the
        outputs into the cache (the next block's inputs, or the reference a pruned block is compared with), with
        `observers` (context managers attaching their own hooks) active. `measure`: also the influence and norm
        sums (the scoring pass). `write_outputs=False`: statistics only (a further chunk of a chunked gather)."""
        widths = {s.input_id: s.d_in for s in self.adapter.linears(block, i)}
        collect = StatsCollector(widths, request)
        out = DenseResult()
        hooks = self.adapter.input_hooks(block, collect) if request.wanted else contextlib.nullcontext()
        with hooks, contextlib.ExitStack() as stack:
            for o in observers:
                stack.enter_context(o)
            for b, x, ctx in self.batches():
                y = self.forward(block, x, ctx)
                if measure:
                    n = x.shape[0] * x.shape[1]
                    out.influence_sum += block_influence(x, y) * n
                    out.norm += float(y.double().square().sum())
                    out.tokens += n
                if not bool(torch.isfinite(y).all()):
                    raise PruningError(
                        f"block {i}: its dense outputs hold NaN/Inf (micro-batch {b}); the calibration activations "
                        "or the block's computation overflow in this dtype"
                    )
                if write_outputs:
                    self.cache.put(b, y)
        out.stats = collect.reduced(self.rt)
        if measure:
            out.influence_sum, out.norm, tokens = dist.all_reduce_floats(
                [out.influence_sum, out.norm, float(out.tokens)], self.rt.dist
            )
            out.tokens = int(round(tokens))
        return out

    @torch.no_grad()
    def propagate(self, block: nn.Module, compare: bool = False) -> float | None:
        """Run `block` over every micro-batch into the cache's outputs. With `compare`, the outputs already there
        (the dense block's) are the reference: returns ``Σ‖y − y_dense‖² / Σ‖y_dense‖²`` over all ranks."""
        num = den = 0.0
        for b, x, ctx in self.batches():
            y = self.forward(block, x, ctx)
            if compare:
                ref = self.cache.get_output(b).float()
                num += float((y.float() - ref).pow(2).sum())
                den += float(ref.pow(2).sum())
            self.cache.put(b, y)
        if not compare:
            return None
        num, den = dist.all_reduce_floats([num, den], self.rt.dist)
        return num / den if den > 0 else None


def free_block(block: nn.Module | None) -> None:
    """Release the device cache after a block (its tensors go with the caller's last reference; a full
    `gc.collect()` here cost 0.2 s a block and freed nothing: blocks hold no reference cycles)."""
    del block
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
