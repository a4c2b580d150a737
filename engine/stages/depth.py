"""Depth pruning: whole blocks (ShortGPT) or attention / MLP sublayers (FinerCut) removed, chosen in the scoring pass.

The scoring pass (`engine.prepass`) gives every block's dense forward; this stage's scorer records

- `block`: block influence ``BI_l = 1 − mean_t cos(x_t, y_t)`` over all calibration tokens (shared with the budget:
  computed once per block);
- with `by: sublayer`, for `attention` and `mlp`: ``Σ_t ‖y'_t − y_t‖² / Σ_t ‖y_t‖²``, the change of the block's
  output when that sublayer is an identity (one forward per sublayer over the cached inputs, the dense outputs as
  the reference).

Then the `remove` lowest (ties: lower index) are removed: blocks are skipped by the loop (their inputs pass through;
the output renumbers the layers, a stock architecture), sublayers are taken out of the blocks as they are built
(a non-uniform output, `modeling_blockprune.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from engine.arch import ArchAdapter
from engine.export import output_config
from engine.modeling_blockprune import remove_sublayers
from engine.schema import ConfigError, choice
from engine.stage import (
    BlockVisit,
    LayerShape,
    ModelInfo,
    OutputChanges,
    StageBase,
    StageResult,
    StatsRequest,
    register_stage,
)
from sharding import dist

log = logging.getLogger(__name__)

SUBLAYERS = ("attention", "mlp")


@dataclass
class DepthConfig:
    """Depth pruning, scored in a dense pass before the main pass.

    `by: block`: remove the `remove` blocks of lowest block influence `1 - mean cos(x_in, x_out)` (ShortGPT); the
    output renumbers the remaining layers (stock architecture). `by: sublayer`: remove the `remove` attention or MLP
    sublayers whose removal changes their block's output least, `‖y − y_ref‖² / ‖y_ref‖²` (FinerCut's criterion,
    per block); the output is a non-uniform checkpoint (`modeling_blockprune.py`, see docs/structured.md)."""

    method: str = "depth"
    remove: int = 1
    by: str = "block"

    def validate(self, where: str) -> None:
        if self.remove < 1:
            raise ConfigError(f"{where}.remove must be >= 1")
        choice([self.by], ("block", "sublayer"), f"{where}.by")


class DepthStage(StageBase):
    """See the module docstring."""

    section = "sublayers"
    config: DepthConfig

    def __init__(self, config: DepthConfig, index: int) -> None:
        super().__init__(config, index)
        self.removed: list[int] = []  # source blocks removed
        self.kept_sublayers: dict[int, dict[str, bool]] = {}  # source block -> {"attention", "mlp"}: kept
        self.scores: list[dict[str, float]] = []
        self.adapter: ArchAdapter | None = None

    def setup(self, model: ModelInfo) -> None:
        self.adapter = model.adapter
        n = model.adapter.num_layers
        c = self.config
        if c.by == "block":
            if c.remove >= n:
                raise ConfigError(f"{self.key}.remove = {c.remove}: the model has only {n} blocks")
            output_config(dict(model.config), {}, list(range(c.remove)))  # the config can be renumbered
        elif c.remove > 2 * n - 1:
            raise ConfigError(f"{self.key}.remove = {c.remove}: the model has only {2 * n} sublayers")

    def scorer(self) -> DepthScorer:
        return DepthScorer(self)

    def decide(self, scores: list[dict[str, float]]) -> None:
        """Choose what to remove from the per-block scores (lowest first; ties: lower index)."""
        self.scores = scores
        influence = [s["block"] for s in scores]
        if self.config.by == "block":
            order = sorted(range(len(scores)), key=lambda i: (influence[i], i))
            self.removed = sorted(order[: self.config.remove])
            log.info("depth: removing blocks %s", self.removed)
            return
        cands = sorted((s[p], i, p) for i, s in enumerate(scores) for p in SUBLAYERS)
        for _, i, p in cands[: self.config.remove]:
            self.kept_sublayers.setdefault(i, {"attention": True, "mlp": True})[p] = False
        log.info("depth: removing sublayers %s", self._removed_sublayers())

    def _removed_sublayers(self) -> list[list]:
        return [[i, p] for i, keep in sorted(self.kept_sublayers.items()) for p in SUBLAYERS if not keep[p]]

    def skips(self, i: int) -> bool:
        return i in self.removed

    def layer_shape(self, i: int, target=None) -> LayerShape:
        keep = self.kept_sublayers.get(i)
        return LayerShape() if keep is None else LayerShape.of(attention=keep["attention"], mlp=keep["mlp"])

    def apply(self, visit: BlockVisit, target=None) -> StageResult:
        keep = self.kept_sublayers.get(visit.i)
        return StageResult(section=dict(keep) if keep is not None else None)

    def output(self) -> OutputChanges:
        section: dict = {"by": self.config.by, "block_influence": [round(s["block"], 6) for s in self.scores]}
        if self.config.by == "block":
            section["removed"] = self.removed
        else:
            section["output_change"] = [{p: round(s[p], 6) for p in SUBLAYERS} for s in self.scores]
            section["removed_sublayers"] = self._removed_sublayers()
        return OutputChanges(removed_layers=list(self.removed), report={"depth": section})


class DepthScorer:
    """The depth stage's observer of the scoring pass (module docstring)."""

    def __init__(self, stage: DepthStage) -> None:
        self.stage = stage
        self.scores: list[dict[str, float]] = []

    def needed(self) -> bool:
        return True

    def stats(self, adapter: ArchAdapter, block: nn.Module, i: int) -> StatsRequest:
        return StatsRequest()

    @torch.no_grad()
    def score(self, i: int, block: nn.Module, dense, runner) -> None:
        scores = {"block": dense.influence}
        if self.stage.config.by == "sublayer":
            sums = {"ref": 0.0, "attention": 0.0, "mlp": 0.0}
            for b, x, ctx in runner.batches():
                y = runner.cache.get_output(b).double()
                sums["ref"] += float(y.square().sum())
                for part in SUBLAYERS:
                    y_wo = _without(runner.adapter, block, part, x, ctx)
                    sums[part] += float((y_wo.double() - y).square().sum())
            sums = dict(zip(sums, dist.all_reduce_floats(list(sums.values()), runner.rt.dist)))
            scores.update({p: sums[p] / max(sums["ref"], 1e-30) for p in SUBLAYERS})
        self.scores.append(scores)

    def finish(self) -> None:
        self.stage.decide(self.scores)


def _without(adapter: ArchAdapter, block: nn.Module, part: str, x: Tensor, ctx: dict) -> Tensor:
    """The block's output with sublayer `part` an identity (modules swapped in and restored)."""
    names = ("self_attn", "input_layernorm", "mlp", "post_attention_layernorm")
    saved = {n: getattr(block, n) for n in names}
    try:
        remove_sublayers(block, attention=part != "attention", mlp=part != "mlp")
        return adapter.block_forward(block, x, ctx)
    finally:
        for n, m in saved.items():
            setattr(block, n, m)


register_stage("depth", DepthConfig, DepthStage)
