"""The one whole-model scoring pass: every block built once, forwarded densely once, observed by every scorer.

Stages that must see the whole model before deciding anything (depth: block influence and sublayer changes; a
global budget: per-layer energies and error curves) each give a `engine.stage.Scorer`. When any of them needs
scores, one pass runs: embeddings, then every block in turn (one in memory), its dense forward gathering the union
of the statistics the scorers ask for and the block influence / output norm sums (computed once, shared), the dense
outputs fed forward through the activation cache; each scorer then looks at the block, and may run masked forwards
of it over the cached inputs against the dense outputs (`masked_error`). Nothing is solved or written.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from engine.dense_pass import BlockBuilder, BlockRunner, free_block
from engine.stage import Scorer, StatsRequest
from sharding import dist

log = logging.getLogger(__name__)


def scoring_pass(
    builder: BlockBuilder, runner: BlockRunner, scorers: Sequence[Scorer | None], embed: Callable[[], None]
) -> bool:
    """Run the pass when a scorer needs it (after `embed()` fills the activation cache); returns whether it ran.
    Every scorer's `finish()` is called after the last block."""
    active = [s for s in scorers if s is not None and s.needed()]
    if not active:
        return False
    embed()
    adapter = builder.adapter
    for i in range(adapter.num_layers):
        block, _ = builder.read(i)
        request = StatsRequest.union([s.stats(adapter, block, i) for s in active])
        dense = runner.dense(block, i, request, measure=True)
        for s in active:
            s.score(i, block, dense, runner)
        runner.cache.swap()
        free_block(block)
        del block
    for s in active:
        s.finish()
    return True


@contextlib.contextmanager
def zeroed(pairs: list[tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Set the selected entries (a column index or a boolean mask) of each weight to zero, restore them on exit."""
    saved = []
    try:
        for W, sel in pairs:
            sel = sel.to(W.device)
            if sel.dtype == torch.bool:
                saved.append((W, sel, W[sel].clone()))
                W[sel] = 0
            else:
                saved.append((W, sel, W[:, sel].clone()))
                W[:, sel] = 0
        yield
    finally:
        for W, sel, old in reversed(saved):
            if sel.dtype == torch.bool:
                W[sel] = old
            else:
                W[:, sel] = old


@torch.no_grad()
def masked_error(runner: BlockRunner, block: nn.Module, pairs: list[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    """``(Σ_t ‖y'_t − y_t‖², Σ_t ‖y'_t − y_t‖² / ‖y_t‖²)`` over every micro-batch and rank, ``y'`` the block with
    `pairs` zeroed, ``y`` the dense outputs (the cache's outputs)."""
    if not pairs:
        return 0.0, 0.0
    pooled = per_token = 0.0
    with zeroed(pairs):
        for b, x, ctx in runner.batches():
            ref = runner.cache.get_output(b).double()
            d = (runner.forward(block, x, ctx).double() - ref).square().sum(-1)
            pooled += float(d.sum())
            per_token += float((d / ref.square().sum(-1).clamp_min(1e-30)).sum())
    pooled, per_token = dist.all_reduce_floats([pooled, per_token], runner.rt.dist)
    return pooled, per_token
