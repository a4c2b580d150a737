"""The memory governor: every large allocation of a block visit, budgeted against the device's memory and the host's,
computed from shapes alone (no weight is read). `blockprune plan` prints it; `run` uses the same plan to decide how
each block fits (one source of truth).

Per block (bytes; the block's own shapes, the stages' statistics requests and their solvers' workspaces):

    weights    the block in the compute dtype (device)
    staging    the source tensors as read, before the cast to the compute dtype (device; 0 when the dtypes match)
    stats      the statistics held at once: every requested input's Gram ``4·d²`` (MoE: one per expert input), or, on
               the one-pass path, the largest single input's (groups are gathered and solved one after another)
    solve      the largest solve task: its solver's workspace (`solvers.registry.workspace_bytes`, the structured
               solvers' float64 work) beyond its weights and statistics
    forward    one micro-batch through the block: hidden states, the MLP / expert intermediates, attention scores
    side       the one-pass path's held intermediates (attention core, MLP hidden) of all calibration tokens
    written    the host copy of the written tensors (a CUDA block; a CPU block whose dtype differs from the disk's)

    device peak = weights + staging|forward|... : weights + max(staging, stats + max(forward, solve)) + cache(device)
                  + side(device)
    host peak   = baseline (this process: interpreter, torch, transformers) + cache(host) + written + prefetch
                  (+ every device term on a CPU run, where the device is the host); prefetch is the next block's
                  read-ahead, so the last block visited has none. A CPU run's peak is the larger of that and the
                  write: weights + the writer's contiguous copy of one shard of them (the statistics freed)

When the statistics do not fit beside the rest, the plan gathers them in chunks (one dense forward per chunk over the
cached inputs, each chunk's statistics moved to the host afterwards, so solving sees exactly what one forward would
have given) — MoE experts `k` at a time. When even one chunk does not fit, the plan says so, naming the device
memory that would fit, before anything is read or written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from engine.arch import ArchAdapter
from engine.blocks import build_meta_block, num_experts_of
from engine.reconstruct import reconstruct_bytes, reconstruct_config
from engine.stage import BlockStage, BlockVisit, StatsRequest
from sharding.writer import parse_size

GiB = 2**30
BASELINE_SLACK = 1.06  # allocator fragmentation and small tensors on top of the counted ones (measured, CPU)


@dataclass
class BlockMemory:
    """The budget of one block visit (see the module docstring); bytes."""

    block: int
    params: int
    weights: int
    staging: int
    stats: int
    stats_all: int  # every requested statistic at once (the two-forward path)
    stats_chunks: int
    solve: int
    forward: int
    side_core: int  # one-pass: the attention core of all calibration tokens (o_proj's input)
    side_mlp: int  # one-pass: the MLP hidden of all tokens (down_proj's input), held when it fits, else recomputed
    written: int
    one_pass: bool
    write_copy: int = 0  # the writer's contiguous host copy of the block's tensors (one shard of them at a time)
    keep_mlp: bool = True
    side_on_device: bool = False
    device_peak: int = 0
    host_peak: int = 0
    chunks: list[list[str]] = field(default_factory=list)  # input ids gathered per dense forward (chunked only)

    @property
    def side(self) -> int:
        """The one-pass intermediates held between its steps."""
        return (self.side_core + (self.side_mlp if self.keep_mlp else 0)) if self.one_pass else 0

    @property
    def work(self) -> int:
        """The block's own peak on the device: weights plus the larger of the cast staging and its statistics with
        the larger of a forward and a solve."""
        return self.weights + max(self.staging, self.stats + max(self.forward, self.solve))


@dataclass
class MemoryPlan:
    """The run's memory plan: where the activation cache lives, each block's budget, the peaks and whether they fit."""

    device: str
    dtype: str
    device_memory: int
    host_memory: int
    baseline: int
    cache_bytes: int
    cache_tier: str
    prefetch: int
    blocks: list[BlockMemory]
    device_peak: int
    host_peak: int
    fits: bool
    advice: list[str] = field(default_factory=list)

    def block(self, i: int) -> BlockMemory | None:
        return next((b for b in self.blocks if b.block == i), None)

    def to_json(self) -> dict:
        gb = lambda n: round(n / GiB, 3)
        return {
            "device": self.device,
            "dtype": self.dtype,
            "device_memory_gb": gb(self.device_memory),
            "host_memory_gb": gb(self.host_memory),
            "device_peak_gb": gb(self.device_peak),
            "host_peak_gb": gb(self.host_peak),
            "fits": self.fits,
            "cache_tier": self.cache_tier,
            "cache_gb": gb(self.cache_bytes),
            "baseline_gb": gb(self.baseline),
            "prefetch_gb": gb(self.prefetch),
            "advice": self.advice,
            "blocks": [
                {
                    **{k: _json_value(k, v) for k, v in asdict(b).items() if k != "chunks"},
                    "side": gb(b.side),
                    "chunks": len(b.chunks) or 1,
                }
                for b in self.blocks
            ],
        }


def _json_value(key: str, value):
    """Byte counts as GiB (3 decimals); counts, indices and flags as they are."""
    if isinstance(value, bool) or not isinstance(value, int) or key in ("block", "params", "stats_chunks"):
        return value
    return round(value / GiB, 3)


def device_reserve(device_memory: int) -> int:
    """Device bytes the plan leaves free: the CUDA context and cuBLAS/cuSOLVER workspaces (about 1 GiB) and the
    caching allocator's fragmentation (5% of the device)."""
    return max(int(1.5 * GiB), int(0.05 * device_memory))


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def forward_bytes(
    adapter: ArchAdapter, block: nn.Module, micro_batch: int, seq_len: int, dtype: torch.dtype, cuda: bool = False
) -> int:
    """Activations of one micro-batch through `block` (a conservative count of what the stock layer allocates):
    residual and norm copies ``6·H``, q/k/v/o ``4·A``, the MLP (or routed experts') intermediates ``3·I`` per
    token, the MoE input hooks' per-expert gate/up ``2·I_e``, and on a CPU the attention scores ``2·heads·L`` per
    token (torch's CPU SDPA materialises them; the CUDA kernels for these dtypes are memory-efficient)."""
    cfg = adapter.config
    H = int(cfg.hidden_size)
    heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(cfg, "head_dim", None) or H // heads)
    A = heads * head_dim
    experts = num_experts_of(block)
    if experts:
        inter = int(block.mlp.experts.down_proj.shape[-1])
        top_k = int(getattr(cfg, "num_experts_per_tok", 1) or 1)
        I = 3 * inter * top_k + 2 * inter
    else:
        I = 3 * int(getattr(block.mlp, "down_proj", nn.Linear(1, 1)).in_features)
    per_token = 6 * H + 4 * A + I + (0 if cuda else heads * seq_len * 2)
    return micro_batch * seq_len * per_token * itemsize(dtype)


def _meta_visit(adapter: ArchAdapter, i: int, cuda: bool = False) -> BlockVisit:
    block = build_meta_block(adapter.spec, adapter.config, i)
    return BlockVisit(i, i, adapter, adapter, block, rt=None, run_sharded=None, cuda=cuda)  # shapes only


def _gram_bytes(request: StatsRequest, widths: dict[str, int]) -> dict[str, int]:
    out = {k: 4 * widths[k] * widths[k] for k in request.gram}
    out.update({k: 12 * widths[k] for k in request.moments | request.track if k not in out})
    return out


def chunk_inputs(sizes: dict[str, int], budget: int) -> list[list[str]] | None:
    """Input ids grouped so that each group's statistics fit `budget` bytes (first fit, largest first; order inside
    a chunk: sorted); None when a single input does not fit."""
    if not sizes:
        return [[]]
    if max(sizes.values()) > budget:
        return None
    chunks: list[tuple[int, list[str]]] = []
    for k in sorted(sizes, key=lambda k: (-sizes[k], k)):
        for c in chunks:
            if c[0] + sizes[k] <= budget:
                c[1].append(k)
                chunks[chunks.index(c)] = (c[0] + sizes[k], c[1])
                break
        else:
            chunks.append((sizes[k], [k]))
    return [sorted(c[1]) for c in chunks]


def plan_memory(
    adapter: ArchAdapter,
    stages: Sequence[BlockStage],
    *,
    device: str,
    dtype: torch.dtype,
    source_dtype: torch.dtype,
    samples: int,
    seq_len: int,
    micro_batch: int,
    device_memory: int,
    host_memory: int,
    baseline: int,
    one_pass: bool,
    skip: Sequence[int] = (),
    prefetch: bool = False,
    reconstruct=None,
    shard_bytes: int | None = None,
) -> MemoryPlan:
    """The plan of a run (module docstring). `device_memory` / `host_memory`: what the run may use. `baseline`: the
    process's own resident memory before any block (interpreter, libraries). `one_pass`: the stages allow the
    one-pass path (dense blocks only take it). `skip`: blocks removed whole. `reconstruct`: the run's
    `ReconstructConfig` (its training, `engine.reconstruct.reconstruct_bytes`, counted as a solve after the stages')."""
    cuda = device.startswith("cuda")
    # what the plan may fill: the device less the CUDA context, the allocator's fragmentation and kernels' scratch
    usable = max(device_memory - device_reserve(device_memory), 0) if cuda else 0
    size = itemsize(dtype)
    H = int(adapter.config.hidden_size)
    cache = 2 * samples * seq_len * H * size
    mb = min(micro_batch, samples)
    blocks = []
    for i in range(adapter.num_layers):
        if i in skip:
            continue
        b = _block_memory(adapter, stages, i, dtype, source_dtype, samples, seq_len, mb, one_pass, cuda)
        if reconstruct is not None:
            meta = build_meta_block(adapter.spec, adapter.config, i)
            b.solve = max(b.solve, reconstruct_bytes(meta, mb, seq_len, H, dtype, reconstruct, n_samples=samples))
        blocks.append(b)
    worst = max((b.work for b in blocks), default=0)
    core = max((b.side_core for b in blocks if b.one_pass), default=0)
    advice: list[str] = []
    # the activation cache: on the device when it fits beside the worst block (and the one-pass attention core),
    # else pinned host memory, else disk
    if cuda:
        tier = "device" if worst + core + cache <= usable else ("host" if cache <= host_memory // 2 else "disk")
    else:
        tier = "host" if baseline + worst + core + cache <= host_memory else "disk"
    cache_device = cache if (cuda and tier == "device") else 0
    for b in blocks:
        _fit_side(b, tier, cuda, usable - cache_device, host_memory - baseline - (cache if tier == "host" else 0))
        _fit_stats(b, adapter, stages, usable - cache_device - (b.side if b.side_on_device else 0), cuda)
    pre = max((b.staging or b.weights for b in blocks), default=0) if prefetch else 0
    last = blocks[-1].block if blocks else None
    for b in blocks:
        ahead = pre if b.block != last else 0  # the read-ahead of the next block: none beside the last one
        offloaded = b.stats * (b.stats_chunks - 1) if b.stats_chunks > 1 else 0
        host_side = b.side if not b.side_on_device else 0
        if cuda:
            b.device_peak = b.work + (b.side if b.side_on_device else 0) + cache_device
            b.host_peak = baseline + (cache if tier == "host" else 0) + b.written + ahead + offloaded + host_side
        else:
            b.device_peak = 0
            host = baseline + (cache if tier == "host" else 0) + b.work + b.side + b.written + ahead
            # writing: the pruned block and the writer's copy of (one shard of) it, the statistics freed
            copy = min(b.write_copy, shard_bytes) if shard_bytes else b.write_copy
            host = max(host, baseline + (cache if tier == "host" else 0) + b.weights + b.written + copy + ahead)
            b.host_peak = int(host * BASELINE_SLACK) if host else 0
    device_peak = max((b.device_peak for b in blocks), default=0)
    host_peak = max((b.host_peak for b in blocks), default=baseline)
    fits = (device_peak <= usable if cuda else True) and host_peak <= host_memory
    if any(b.stats_chunks == 0 for b in blocks):
        fits = False
        need = max(b.weights + b.stats + max(b.forward, b.solve) for b in blocks if b.stats_chunks == 0)
        smallest = need + cache_device + device_reserve(need + cache_device)
        advice.append(
            f"a single input's statistics and its solve do not fit {usable / GiB:.1f} GiB beside the block "
            f"(needs about {need / GiB:.1f} GiB): use a device with at least {math.ceil(smallest / GiB)}"
            " GiB or a smaller calibration set"
        )
    elif not fits:
        on_device = cuda and device_peak > usable
        need = device_peak + device_reserve(device_peak) if on_device else host_peak
        what = "device" if on_device else "host"
        advice.append(
            f"the {what} peak {(device_peak if on_device else host_peak) / GiB:.1f} GiB exceeds the {what} memory "
            f"left to the run; needs at least {math.ceil(need / GiB)} GiB"
        )
    chunked = [b.block for b in blocks if b.stats_chunks > 1]
    if chunked:
        advice.append(f"statistics gathered in chunks (one dense forward each) in blocks {_ranges(chunked)}")
    if tier != "device" and cuda:
        advice.append(
            f"activation cache ({cache / GiB:.1f} GiB) in {'pinned host memory' if tier == 'host' else 'disk'}"
        )
    return MemoryPlan(
        device=device,
        dtype=str(dtype).replace("torch.", ""),
        device_memory=device_memory,
        host_memory=host_memory,
        baseline=baseline,
        cache_bytes=cache,
        cache_tier=tier,
        prefetch=pre,
        blocks=blocks,
        device_peak=device_peak,
        host_peak=host_peak,
        fits=fits,
        advice=advice,
    )


def _block_memory(
    adapter: ArchAdapter,
    stages: Sequence[BlockStage],
    i: int,
    dtype: torch.dtype,
    source_dtype: torch.dtype,
    samples: int,
    seq_len: int,
    mb: int,
    one_pass: bool,
    cuda: bool,
) -> BlockMemory:
    visit = _meta_visit(adapter, i, cuda)
    block = visit.block
    params = sum(p.numel() for p in block.parameters())
    size, src = itemsize(dtype), itemsize(source_dtype)
    specs = adapter.linears(block, i)
    widths = {s.input_id: s.d_in for s in specs}
    request = StatsRequest.union([s.stats(visit, None) for s in stages])
    grams = _gram_bytes(request, widths)
    dense = not num_experts_of(block) and adapter.spec.attention == "gqa"
    takes_one_pass = one_pass and dense
    stats_all = sum(grams.values())
    stats = max(grams.values(), default=0) if takes_one_pass else stats_all
    solve = max((s.solve_bytes(visit, None) for s in stages), default=0)
    core = mlp = 0
    if takes_one_pass:
        core = samples * seq_len * block.self_attn.o_proj.in_features * size
        mlp = samples * seq_len * block.mlp.down_proj.in_features * size
    return BlockMemory(
        block=i,
        params=params,
        weights=params * size,
        staging=params * src if src != size else 0,
        stats=stats,
        stats_all=stats_all,
        stats_chunks=1,
        solve=solve,
        forward=forward_bytes(adapter, block, mb, seq_len, dtype, cuda),
        side_core=core,
        side_mlp=mlp,
        written=params * src if (cuda or src != size) else 0,
        one_pass=takes_one_pass,
        write_copy=params * src,
    )


def _fit_side(b: BlockMemory, tier: str, cuda: bool, device_room: int, host_room: int) -> None:
    """Where the one-pass intermediates live and whether the MLP hidden is held (as the run decides: beside a
    device cache on the device, else on the host; the attention core must fit, else the block takes two
    forwards; the MLP hidden is recomputed when it does not fit)."""
    if not b.one_pass:
        return
    b.side_on_device = cuda and tier == "device"
    room = (device_room - b.work) if b.side_on_device else host_room - (0 if cuda else b.work)
    if tier == "disk" or b.side_core > room:
        b.one_pass = False  # two forwards: every statistic at once instead of one input at a time
        b.stats = b.stats_all
        return
    b.keep_mlp = b.side_core + b.side_mlp <= room


def _fit_stats(b: BlockMemory, adapter: ArchAdapter, stages: Sequence[BlockStage], room: int, cuda: bool) -> None:
    """Chunk the block's statistics when they do not fit the device beside its weights and transients."""
    if not cuda or b.one_pass:
        return
    free = room - b.weights - max(b.forward, b.solve)
    if b.stats <= free:
        return
    visit = _meta_visit(adapter, b.block, cuda)
    widths = {s.input_id: s.d_in for s in adapter.linears(visit.block, b.block)}
    grams = _gram_bytes(StatsRequest.union([s.stats(visit, None) for s in stages]), widths)
    chunks = chunk_inputs(grams, max(free, 0))
    if chunks is None:
        b.stats_chunks = 0
        return
    b.chunks = chunks
    b.stats_chunks = len(chunks)
    b.stats = max(sum(grams[k] for k in c) for c in chunks)


def _ranges(xs: list[int]) -> str:
    out, start = [], None
    for k, x in enumerate(xs):
        if start is None:
            start = x
        if k + 1 == len(xs) or xs[k + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)


def plan_for_run(cfg, reader, adapter: ArchAdapter, stages: Sequence[BlockStage]) -> MemoryPlan:
    """The plan of `cfg` on this machine (or on the device the recipe names: `runtime.device: cuda` with
    `runtime.device_memory_gb` plans for a GPU from anywhere). Reads headers only."""
    from engine import memory
    from engine.runtime import checkpoint_dtype
    from engine.schema import ConfigError

    rt = cfg.runtime
    device = rt.device if rt.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    source = checkpoint_dtype(reader)
    dtype = (source if cuda else torch.float32) if rt.dtype == "auto" else getattr(torch, rt.dtype)
    if rt.device_memory_gb is not None:
        device_memory = int(rt.device_memory_gb * GiB)
    elif cuda and torch.cuda.is_available():
        index = torch.device(device).index or 0
        device_memory = int(torch.cuda.get_device_properties(index).total_memory)
    elif cuda:
        raise ConfigError(
            f"runtime.device = {rt.device}: CUDA is not available here; set runtime.device_memory_gb to plan for a "
            "GPU of that size"
        )
    else:
        device_memory = 0
    rss = int(memory.rss_mb() * 2**20)
    host_memory = int(rt.host_memory_gb * GiB) if rt.host_memory_gb is not None else memory.available_host_bytes() + rss
    rc = reconstruct_config(list(stages))
    one_pass = bool(
        cfg.sequential and cfg.true_sequential and stages and all(s.linear_wise for s in stages) and rc is None
    )
    c = cfg.calibration
    return plan_memory(
        adapter,
        stages,
        device=device,
        dtype=dtype,
        source_dtype=source,
        samples=c.samples,
        seq_len=c.seq_len,
        micro_batch=rt.micro_batch,
        device_memory=device_memory,
        host_memory=host_memory,
        baseline=rss,
        one_pass=one_pass,
        prefetch=bool(rt.overlap),
        reconstruct=rc,
        shard_bytes=parse_size(cfg.max_shard_size),
    )
