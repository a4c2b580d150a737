"""The stage protocol: what the block loop needs from a pruning method, and nothing else.

A recipe's `prune:` list becomes one `BlockStage` per entry (one file per method under `engine/stages/`, registered
here by its `method` names). The loop (`engine.pipeline`) never asks which method runs; per run and per block it
calls, in recipe order::

    setup(model)              before any weight is read: validate against the model's shapes (ConfigError), plan
    prepare(reader)           after the output checks: read what the plan needs besides blocks (e.g. router rows)
    scorer()                  an optional observer of the one whole-model scoring pass (`engine.prepass`)
    skips(i)                  the block is removed whole (depth): never visited, its inputs pass through
    layer_shape(i, target)    how the written layer differs from the stock one (config fields, removed sublayers)
    stats(visit, target)      the input statistics it needs from the block's dense forward
    observe(visit)            extra hooks during that forward (e.g. MoE routing counts)
    apply(visit, target)      prune the block in `visit` (may replace `visit.block` / `visit.stats`) -> StageResult
    verify(result, target)    before the block is committed: did it achieve what was planned? (else an error)
    solve_bytes(visit, target) the largest transient `apply` allocates beyond the block and its statistics (the
                              memory plan, engine/memory_plan.py; shapes only: `visit.block` may be a meta block)
    output()                  after the loop: config fields, removed layers, per-layer entries, report section

`target` is this layer's share of a global budget when an allocation policy (`engine.budget`) drives the stage,
else None (the stage's own uniform target). Stages that only mask weights of selected linears, with no shape change
(`linear_wise = True`), also implement `solve_linears`, which the one-pass true-sequential path calls one input group
at a time. `StageBase` gives every method a do-nothing default, so a new method overrides only what it does.

What a block visit produced is one `BlockRecord`: the report, the budget's reconciliation and the resume path all
read it (its deterministic part is the unit's metadata in the writer's manifest).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import nn

    from engine.arch import ArchAdapter, LinearSpec
    from engine.coordinator import LayerDecision
    from engine.runtime import Runtime
    from sharding.reader import CheckpointReader
    from solvers.stats import InputStats


# --------------------------------------------------------------------------------------------- what flows


@dataclass
class StatsRequest:
    """Input statistics a block's dense forward gathers, by input id (`LinearSpec.input_id`): `gram` the full Gram
    ``H = XᵀX``, `moments` column norms only, `track` also the column sums (means, variances)."""

    gram: set[str] = field(default_factory=set)
    moments: set[str] = field(default_factory=set)
    track: set[str] = field(default_factory=set)

    def __or__(self, other: StatsRequest) -> StatsRequest:
        gram = self.gram | other.gram
        return StatsRequest(gram, (self.moments | other.moments) - gram, self.track | other.track)

    @property
    def wanted(self) -> set[str]:
        return self.gram | self.moments

    @staticmethod
    def union(requests: Sequence[StatsRequest]) -> StatsRequest:
        out = StatsRequest()
        for r in requests:
            out = out | r
        return out


@dataclass(frozen=True)
class LayerShape:
    """How a written layer differs from the stock layer of the source config: `overrides` (config fields of its own
    stock layer, e.g. `intermediate_size`, the expert count) and the sublayers it keeps."""

    overrides: tuple[tuple[str, Any], ...] = ()
    attention: bool = True
    mlp: bool = True

    @staticmethod
    def of(overrides: dict | None = None, *, attention: bool = True, mlp: bool = True) -> LayerShape:
        return LayerShape(tuple(sorted((overrides or {}).items())), attention, mlp)

    def __or__(self, other: LayerShape) -> LayerShape:
        return LayerShape.of(
            {**dict(self.overrides), **dict(other.overrides)},
            attention=self.attention and other.attention,
            mlp=self.mlp and other.mlp,
        )

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.overrides)

    @property
    def sublayers_removed(self) -> bool:
        return not (self.attention and self.mlp)


@dataclass
class StageResult:
    """What one stage did to one block. `removed`: parameters it took (exact zeros it set in the linears it prunes,
    or parameters surgery removed); the budget reconciles on it. `linears`: per-linear records (unstructured).
    `section`: the stage's part of the block's report entry (stored under the stage's `section` key); `time_s`: named
    timings of the stage's own phases (reported with the block's times, never in the manifest)."""

    removed: int = 0
    linears: dict[str, dict] = field(default_factory=dict)
    section: dict | None = None
    time_s: dict[str, float] = field(default_factory=dict)  # extra phases, added to the block's times


@dataclass
class OutputChanges:
    """What the stages change in the output checkpoint as a whole: `overrides` (stock config fields), `removed_layers`
    (source indices of removed blocks; the output renumbers), `layers` ({source layer: {"attention", "mlp",
    "config"}} entries of a non-uniform output) and `report` (run-level report sections)."""

    overrides: dict[str, Any] = field(default_factory=dict)
    removed_layers: list[int] = field(default_factory=list)
    layers: dict[int, dict] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    def __or__(self, other: OutputChanges) -> OutputChanges:
        layers = dict(self.layers)
        for i, e in other.layers.items():
            mine = layers.get(i, {})
            layers[i] = {
                "attention": mine.get("attention", True) and e.get("attention", True),
                "mlp": mine.get("mlp", True) and e.get("mlp", True),
                "config": {**mine.get("config", {}), **e.get("config", {})},
            }
        return OutputChanges(
            {**self.overrides, **other.overrides},
            sorted(set(self.removed_layers) | set(other.removed_layers)),
            layers,
            {**self.report, **other.report},
        )


@dataclass
class BlockRecord:
    """One block visit, typed. `to_dict()` is its entry in `blockprune_report.json` (flat: the stages' sections are
    top-level keys such as "structured", "experts", "sublayers", "allocation"); `to_dict(volatile=False)` drops
    timings and memory readings, which is what the writer's manifest stores, so two runs write the same manifest."""

    block: int
    output_block: int
    params: int = 0
    nonzero: int = 0
    linears: dict[str, dict] = field(default_factory=dict)
    sections: dict[str, Any] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)  # stage key -> parameters removed (StageResult.removed)
    output_error: float | None = None
    output_error_on: str | None = None  # "first sample" on the one-pass path; None = all calibration samples
    true_sequential: bool = False
    resumed: bool = False
    time_s: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float | None] = field(default_factory=dict)

    _FIELDS: ClassVar[tuple[str, ...]] = ("block", "output_block", "params", "nonzero", "linears", "removed")

    def to_dict(self, volatile: bool = True) -> dict:
        d: dict[str, Any] = {k: getattr(self, k) for k in self._FIELDS}
        d["output_error"] = self.output_error
        if self.output_error_on:
            d["output_error_on"] = self.output_error_on
        if self.true_sequential:
            d["true_sequential"] = True
        d.update(self.sections)
        if volatile:
            d.update(self.memory)
            d["time_s"] = dict(self.time_s)
            if self.resumed:
                d["resumed"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BlockRecord:
        """The record of a committed unit (its manifest metadata); unknown keys are stage sections."""
        known = {*cls._FIELDS, "output_error", "output_error_on", "true_sequential", "resumed", "time_s"}
        memory_keys = ("peak_rss_mb", "rss_mb", "peak_device_mb")
        return cls(
            **{k: d[k] for k in cls._FIELDS if k in d},
            output_error=d.get("output_error"),
            output_error_on=d.get("output_error_on"),
            true_sequential=bool(d.get("true_sequential", False)),
            sections={k: v for k, v in d.items() if k not in known and k not in memory_keys},
        )


@dataclass
class BlockVisit:
    """One block on the device while its stages act on it.

    `i` / `j`: source / output layer index. `adapter`: the source architecture; `out_adapter` builds the layer as it
    will be written. `block`: the block as it is now (a stage may replace it with a rebuilt, smaller one). `stats`:
    the reduced input statistics of the dense forward (a stage may renumber them, e.g. after removing experts).
    `run_sharded(tasks, costs, fn)`: `[fn(t) for t in tasks]`, each task solved by one rank and broadcast.
    `scratch`: per-stage data that lives for this visit (keyed by stage key). `cuda`: the device the visit is for
    when there is no runtime (a memory plan's meta visit)."""

    i: int
    j: int
    adapter: ArchAdapter
    out_adapter: ArchAdapter
    block: nn.Module
    rt: Runtime
    run_sharded: Callable[[list, list[float], Callable], list]
    stats: dict[str, InputStats] = field(default_factory=dict)
    scratch: dict[str, Any] = field(default_factory=dict)
    cuda: bool = False

    @property
    def on_cuda(self) -> bool:
        return self.rt.device.type == "cuda" if self.rt is not None else self.cuda

    def specs(self) -> list[LinearSpec]:
        """The prunable linears of the block as it is now (shapes read from the block)."""
        return self.adapter.linears(self.block, self.i)


@dataclass
class ModelInfo:
    """What `setup` may look at: the source adapter, its config.json dict, the run config and the stages of the run
    (in recipe order, for the few cross-stage facts a stage needs, e.g. the shapes earlier stages give a layer)."""

    adapter: ArchAdapter
    config: dict
    run: Any
    stages: list[BlockStage]

    def shape_before(self, stage: BlockStage, i: int) -> LayerShape:
        """The shape layer `i` has when `stage` acts: what the stages before it made of it (their uniform targets)."""
        shape = LayerShape()
        for s in self.stages:
            if s is stage:
                break
            shape = shape | s.layer_shape(i, None)
        return shape


# --------------------------------------------------------------------------------------------- the protocol


@runtime_checkable
class Scorer(Protocol):
    """An observer of the whole-model scoring pass (`engine.prepass`): every block is built once, forwarded densely
    once (statistics and block influence shared by all scorers), then handed to each scorer."""

    def needed(self) -> bool: ...

    def stats(self, adapter: ArchAdapter, block: nn.Module, i: int) -> StatsRequest: ...

    def score(self, i: int, block: nn.Module, dense: Any, runner: Any) -> None: ...

    def finish(self) -> None: ...


@runtime_checkable
class BlockStage(Protocol):
    """See the module docstring. `key` is unique in a run ("prune[k]"); `section` names the stage's part of a block
    record (None: it has none)."""

    key: str
    config: Any
    section: str | None
    linear_wise: bool

    def setup(self, model: ModelInfo) -> None: ...

    def prepare(self, reader: CheckpointReader) -> None: ...

    def scorer(self) -> Scorer | None: ...

    def skips(self, i: int) -> bool: ...

    def layer_shape(self, i: int, target: LayerDecision | None) -> LayerShape: ...

    def stats(self, visit: BlockVisit, target: LayerDecision | None) -> StatsRequest: ...

    def observe(self, visit: BlockVisit) -> contextlib.AbstractContextManager: ...

    def apply(self, visit: BlockVisit, target: LayerDecision | None) -> StageResult: ...

    def verify(self, result: StageResult, target: LayerDecision | None) -> None: ...

    def solve_bytes(self, visit: BlockVisit, target: LayerDecision | None) -> int: ...

    def solve_linears(
        self, visit: BlockVisit, specs: list[LinearSpec], stats: dict[str, InputStats], target: LayerDecision | None
    ) -> StageResult: ...

    def output(self) -> OutputChanges: ...


class StageBase:
    """Do-nothing defaults for every `BlockStage` method; subclasses set `section` / `linear_wise` and override what
    they do. `config` is the stage's recipe dataclass, `index` its position in the recipe."""

    section: str | None = None
    linear_wise: bool = False

    def __init__(self, config: Any, index: int) -> None:
        self.config = config
        self.index = index
        self.key = f"prune[{index}]"

    def setup(self, model: ModelInfo) -> None:
        return None

    def prepare(self, reader: CheckpointReader) -> None:
        return None

    def scorer(self) -> Scorer | None:
        return None

    def skips(self, i: int) -> bool:
        return False

    def layer_shape(self, i: int, target: LayerDecision | None) -> LayerShape:
        return LayerShape()

    def stats(self, visit: BlockVisit, target: LayerDecision | None) -> StatsRequest:
        return StatsRequest()

    @contextlib.contextmanager
    def observe(self, visit: BlockVisit) -> Iterator[None]:
        yield

    def apply(self, visit: BlockVisit, target: LayerDecision | None) -> StageResult:
        return StageResult()

    def verify(self, result: StageResult, target: LayerDecision | None) -> None:
        return None

    def solve_bytes(self, visit: BlockVisit, target: LayerDecision | None) -> int:
        return 0

    def solve_linears(
        self, visit: BlockVisit, specs: list[LinearSpec], stats: dict[str, InputStats], target: LayerDecision | None
    ) -> StageResult:
        raise NotImplementedError(f"{type(self).__name__} is not linear-wise")

    def output(self) -> OutputChanges:
        return OutputChanges()


# --------------------------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class StageType:
    """A registered pruning method: its recipe dataclass (built from the `prune:` entry and validated with its
    `validate(where)`) and the `BlockStage` class built from it as `stage_cls(config, index)`."""

    methods: tuple[str, ...]
    config_cls: type
    stage_cls: type


_REGISTRY: dict[str, StageType] = {}


def register_stage(methods: str | Sequence[str], config_cls: type, stage_cls: type) -> StageType:
    """Make `methods` (the recipe's `method:` values) build `stage_cls(config_cls(...), index)`. A method name can be
    registered once; a test or a plug-in registers its own stage the same way the built-in ones do."""
    names = (methods,) if isinstance(methods, str) else tuple(methods)
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"register_stage: {config_cls.__name__} must be a dataclass")
    taken = [m for m in names if m in _REGISTRY]
    if taken:
        raise ValueError(f"register_stage: method(s) {', '.join(taken)} already registered")
    st = StageType(names, config_cls, stage_cls)
    for m in names:
        _REGISTRY[m] = st
    return st


def unregister_stage(methods: str | Sequence[str]) -> None:
    """Remove methods registered by `register_stage` (tests)."""
    for m in (methods,) if isinstance(methods, str) else methods:
        _REGISTRY.pop(m, None)


def stage_type(method: str) -> StageType | None:
    return _REGISTRY.get(method)


def stage_methods() -> tuple[str, ...]:
    """Every registered method name, in registration order."""
    return tuple(_REGISTRY)


def build_stage(config: Any, index: int) -> BlockStage:
    """The `BlockStage` of one validated recipe entry."""
    st = _REGISTRY[config.method]
    return st.stage_cls(config, index)
