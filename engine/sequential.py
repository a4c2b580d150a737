"""True-sequential solving of a dense decoder block in one pass over the calibration tokens.

The default block loop (`engine.pipeline`) runs every block twice over the calibration tokens: a dense forward that
gathers every linear's input statistics, then, after solving, the pruned block again to produce the next block's
inputs. For a dense attention + MLP block whose stages are all unstructured, this module does the same work with
every linear applied once, in the order of the forward (the "true sequential" order of the SparseGPT and GPTQ
reference code):

    1. a = input_layernorm(x)                           -> statistics of q/k/v's input  -> solve q, k, v
    2. core = self_attn(a) up to o_proj's input         -> statistics of o_proj's input -> solve o_proj
    3. h = x + o_proj(core);  n = post_attention_layernorm(h)
                                                        -> statistics of gate/up's input -> solve gate, up
    4. m = mlp(n) up to down_proj's input               -> statistics of down_proj's input -> solve down_proj
    5. y = h + down_proj(m)                             -> the next block's inputs

Each group's statistics therefore come from the already pruned groups before it (true sequential; the default path
takes all of a block's statistics from the dense block). The pieces are the block's own modules, called as its
forward calls them; `self_attn` and `mlp` run whole with `o_proj` / `down_proj` swapped for a module that records
its input, so no modeling code is copied. `decomposition_matches` checks on real inputs that the pieces compose to
`block(x)` (the pipeline checks once per run and falls back to the two-forward path if they do not).

Between steps, per micro-batch: ``core`` (width ``n_heads·head_dim``) and ``m`` (width ``intermediate``) are held in
memory next to the activation cache, ``h`` in the cache's output buffer. `side_bytes` says what that costs; the
pipeline uses this path only when it fits the memory budget (``m`` is recomputed when only ``core`` fits).

The block's relative output error (the report's `output_error`) is measured on the first calibration sample of each
rank only (the dense block's output of all samples is never computed on this path).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from engine.arch import ArchAdapter, LinearSpec
from engine.blocks import num_experts_of

log = logging.getLogger(__name__)

PHASES = ("attn_in", "attn_out", "mlp_in", "mlp_out")  # input ids in forward order


@dataclass
class Parts:
    """The modules of a dense pre-norm decoder block, as its forward uses them."""

    ln1: nn.Module
    attn: nn.Module
    ln2: nn.Module
    mlp: nn.Module

    @property
    def o_proj(self) -> nn.Linear:
        return self.attn.o_proj

    @property
    def down_proj(self) -> nn.Linear:
        return self.mlp.down_proj


def parts_of(adapter: ArchAdapter, block: nn.Module) -> Parts | None:
    """`Parts` of a dense GQA block (llama, mistral, qwen2, qwen3); None for anything else (MoE, MLA, a block with
    a removed sublayer)."""
    if adapter.spec.attention != "gqa" or num_experts_of(block):
        return None
    try:
        parts = Parts(block.input_layernorm, block.self_attn, block.post_attention_layernorm, block.mlp)
    except AttributeError:
        return None
    ok = isinstance(getattr(parts.attn, "o_proj", None), nn.Linear) and isinstance(
        getattr(parts.mlp, "down_proj", None), nn.Linear
    )
    return parts if ok else None


class _Capture(nn.Module):
    """Stands in for a linear: records its input and returns a zero view of the linear's output shape."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.x: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.x = x
        return x.new_zeros(()).expand(*x.shape[:-1], self.out_features)


@contextlib.contextmanager
def _capturing(owner: nn.Module, name: str) -> Iterator[_Capture]:
    lin = getattr(owner, name)
    cap = _Capture(lin.out_features)
    setattr(owner, name, cap)
    try:
        yield cap
    finally:
        setattr(owner, name, lin)


def _attention_core(adapter: ArchAdapter, block: nn.Module, parts: Parts, a: Tensor, ctx: dict) -> Tensor:
    """o_proj's input for the attention input ``a`` (= input_layernorm(x)), called as the block's forward calls it."""
    mask = ctx["attention_masks"][adapter.layer_type(block.self_attn.layer_idx)]
    with _capturing(parts.attn, "o_proj") as cap:
        parts.attn(
            hidden_states=a,
            attention_mask=mask,
            position_ids=ctx["position_ids"],
            position_embeddings=ctx["position_embeddings"],
        )
    assert cap.x is not None
    return cap.x


def _mlp_hidden(parts: Parts, n: Tensor) -> Tensor:
    """down_proj's input for the MLP input ``n``."""
    with _capturing(parts.mlp, "down_proj") as cap:
        parts.mlp(n)
    assert cap.x is not None
    return cap.x


def composed_forward(adapter: ArchAdapter, block: nn.Module, parts: Parts, x: Tensor, ctx: dict) -> Tensor:
    """The block's output computed from its pieces, as `run` does (for the check and the tests)."""
    h = x + parts.o_proj(_attention_core(adapter, block, parts, parts.ln1(x), ctx))
    return h + parts.down_proj(_mlp_hidden(parts, parts.ln2(h)))


@torch.no_grad()
def decomposition_matches(adapter: ArchAdapter, block: nn.Module, x: Tensor, ctx: dict) -> bool:
    """Whether `composed_forward` reproduces ``block(x)`` (to 1e-6 relative) on the given inputs."""
    parts = parts_of(adapter, block)
    if parts is None:
        return False
    ref = adapter.block_forward(block, x, ctx).float()
    got = composed_forward(adapter, block, parts, x, ctx).float()
    err = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
    if err > 1e-6:
        log.warning(
            "true-sequential: block %s computed from its pieces differs from its forward (relative %.3g); "
            "using the two-forward path",
            type(block).__name__,
            err,
        )
    return err <= 1e-6


def side_bytes(adapter: ArchAdapter, block: nn.Module, n_tokens: int, dtype: torch.dtype) -> tuple[int, int]:
    """Bytes held between steps: (attention core, MLP hidden) for `n_tokens` tokens."""
    parts = parts_of(adapter, block)
    assert parts is not None
    size = torch.empty((), dtype=dtype).element_size()
    return n_tokens * parts.o_proj.in_features * size, n_tokens * parts.down_proj.in_features * size


@torch.no_grad()
def run(
    adapter: ArchAdapter,
    block: nn.Module,
    specs: list[LinearSpec],
    cache,
    ctx_for: Callable[[int], dict],
    gather: Callable[[str, Callable[[Callable[[Tensor], None]], None]], dict],
    solve: Callable[[list[LinearSpec], dict], dict],
    *,
    keep_mlp_hidden: bool,
    side_device: torch.device,
) -> tuple[dict[str, dict], tuple[float, float]]:
    """Solve `block` true-sequentially and write its outputs into `cache` (see the module docstring).

    ``ctx_for(batch)``: the forward context for a micro-batch of that many samples. ``gather(input_id, feed)``: runs
    ``feed(observe)``, where the feed passes every micro-batch's inputs of `input_id` to ``observe``, and returns the
    reduced statistics ``{input_id: InputStats}`` (empty when nothing of the block needs them). ``solve(specs,
    stats)``: prunes those linears in place (rounded to the checkpoint's dtype) and returns their records.
    Returns the records and ``(Σ‖y − y_dense‖², Σ‖y_dense‖²)`` over the first sample of this rank's calibration.
    """
    parts = parts_of(adapter, block)
    assert parts is not None
    nb = cache.num_batches()
    by_phase = {p: [s for s in specs if s.input_id == p] for p in PHASES}
    stray = [s.name for s in specs if s.input_id not in PHASES]
    if stray:
        raise ValueError(f"true-sequential: linears outside the attention/MLP phases: {stray}")
    x0 = cache.get(0)[:1]
    ref0 = adapter.block_forward(block, x0, ctx_for(1)).float()  # the dense output of the first sample
    records: dict[str, dict] = {}
    side: list[Tensor | None] = [None] * nb

    def phase(input_id: str, feed: Callable[[Callable[[Tensor], None] | None], None]) -> None:
        stats = gather(input_id, feed) if by_phase[input_id] else None
        if stats is None:  # nothing to solve: only propagate
            feed(None)
            return
        if by_phase[input_id]:
            records.update(solve(by_phase[input_id], stats))

    def feed_attn_in(observe) -> None:
        if observe is None:
            return  # nothing computed here that a later step needs
        for b in range(nb):
            observe(parts.ln1(cache.get(b)))

    def feed_attn_out(observe) -> None:
        for b in range(nb):
            x = cache.get(b)
            core = _attention_core(adapter, block, parts, parts.ln1(x), ctx_for(x.shape[0]))
            if observe is not None:
                observe(core)
            side[b] = core.to(side_device)

    def feed_mlp_in(observe) -> None:
        for b in range(nb):
            x = cache.get(b)
            h = x + parts.o_proj(side[b].to(x.device))
            side[b] = None
            cache.put(b, h)
            if observe is not None:
                observe(parts.ln2(h))

    def feed_mlp_out(observe) -> None:
        if observe is None:
            return  # step 5 computes the MLP hidden itself
        for b in range(nb):
            m = _mlp_hidden(parts, parts.ln2(cache.get_output(b)))
            observe(m)
            if keep_mlp_hidden:
                side[b] = m.to(side_device)

    phase("attn_in", feed_attn_in)
    phase("attn_out", feed_attn_out)
    phase("mlp_in", feed_mlp_in)
    phase("mlp_out", feed_mlp_out)
    for b in range(nb):  # 5. the outputs
        h = cache.get_output(b)
        m = side[b].to(h.device) if side[b] is not None else _mlp_hidden(parts, parts.ln2(h))
        side[b] = None
        cache.put(b, h + parts.down_proj(m))
    y0 = cache.get_output(0)[:1].float()
    return records, (float((y0 - ref0).square().sum()), float(ref0.square().sum()))
