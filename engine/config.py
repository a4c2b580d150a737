"""The run configuration: one typed dataclass tree, loaded from YAML with `key=value` overrides, validated
before any weight is read, and saved beside the output as `blockprune_recipe.yaml`.

Recipe surface (see docs/recipes.md for every key)::

    model: /path/to/hf_model_dir
    output: /path/to/out_dir
    calibration: {data: /path/to/text_or_jsonl, samples: 128, seq_len: 2048, seed: 0}
    runtime: {device: cpu, dtype: float32}
    prune:
      - {method: sparsegpt, sparsity: 0.5}          # pattern: unstructured (default) or "2:4"

Stages are looked up in `STAGE_TYPES` by their `method`, so new methods register a dataclass and nothing else here
changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from engine.calibration import CalibrationConfig
from sharding.errors import BlockpruneError

CONFIG_VERSION = 1


class ConfigError(BlockpruneError, ValueError):
    """A recipe that cannot run: the message is one line naming the key and what is allowed."""


@dataclass
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (compute dtype of block forwards)
    micro_batch: int = 8  # calibration samples per block forward
    device_budget_gb: float | None = None  # activation cache on the device up to this size (None: 25% of free memory)
    host_budget_gb: float | None = None  # then pinned/host memory up to this size (None: 25% of available RAM)
    spill_dir: str | None = None  # where the disk tier of the activation cache lives (None: the output dir)
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    progress: bool = True  # progress bar on stderr

    _ALLOWED: ClassVar[dict[str, tuple[str, ...]]] = {
        "dtype": ("auto", "float32", "bfloat16", "float16"),
    }


@dataclass
class UnstructuredStage:
    """Magnitude, Wanda or SparseGPT on every selected linear of every block.

    `targets` / `ignore`: patterns over the linear's name inside the block (e.g. `self_attn.q_proj`,
    `mlp.experts.3.down_proj`): shell globs (`*proj`, `mlp.*`) or regular expressions prefixed `re:`.
    A linear is pruned when it matches a target and no ignore pattern.
    """

    method: str
    sparsity: float = 0.5
    pattern: str = "unstructured"  # unstructured | N:M (e.g. "2:4")
    targets: list[str] = field(default_factory=lambda: ["*"])
    ignore: list[str] = field(default_factory=list)
    blocksize: int = 128  # SparseGPT lazy-update block
    percdamp: float = 0.01  # SparseGPT damping, fraction of mean(diag H)
    allocation: dict[str, Any] = field(default_factory=lambda: {"rule": "uniform"})  # docs/allocation.md

    METHODS: ClassVar[tuple[str, ...]] = ("magnitude", "wanda", "sparsegpt")

    def validate(self, where: str) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"{where}.sparsity = {self.sparsity}: must be in [0, 1)")
        self.allocation = resolve_allocation(self.allocation, f"{where}.allocation", structured=False)
        nm = parse_nm(self.pattern, where)
        if nm is not None and self.allocation["rule"] != "uniform":
            raise ConfigError(
                f"{where}: pattern {self.pattern} fixes every layer's sparsity; allocation.rule "
                f"{self.allocation['rule']!r} needs pattern: unstructured"
            )
        if nm is not None and self.sparsity not in (0.5, 1 - nm[0] / nm[1]):
            # N:M fixes the sparsity; accept the default 0.5 or the exact value, and say so otherwise
            raise ConfigError(
                f"{where}: pattern {self.pattern} means sparsity {1 - nm[0] / nm[1]:g}, but sparsity = {self.sparsity}"
            )
        if self.blocksize < 1:
            raise ConfigError(f"{where}.blocksize must be >= 1")
        if self.percdamp < 0:
            raise ConfigError(f"{where}.percdamp must be >= 0")
        for p in self.targets + self.ignore:
            compile_pattern(p, where)

    @property
    def effective_sparsity(self) -> float:
        nm = parse_nm(self.pattern, "stage")
        return self.sparsity if nm is None else 1 - nm[0] / nm[1]


@dataclass
class StructuredStage:
    """Structured pruning of whole units with reconstruction (docs/structured.md).

    `target`: fraction of the prunable (non-embedding) parameters removed. `units`: `heads` (whole KV groups)
    and/or `channels` (MLP / expert intermediate channels). `score`: how units are chosen; `solver`: how the kept
    weights of o_proj / down_proj are refit. `allocation`: how the target is spread over the layers (`uniform`: every
    layer removes the same units, stock output; `owl` / `softmax`: per-layer widths from a scoring pass, see
    docs/allocation.md). `align`: kept channel counts are multiples of it.
    """

    method: str = "structured"
    target: float = 0.2
    units: list[str] = field(default_factory=lambda: ["heads", "channels"])
    score: str = "obs"  # magnitude | wanda | fluctuation | obs
    solver: str = "closed_form"  # none | closed_form | admm
    allocation: dict[str, Any] = field(default_factory=lambda: {"rule": "uniform"})
    bias_compensation: bool = False
    align: int = 1
    percdamp: float = 0.01

    UNITS: ClassVar[tuple[str, ...]] = ("heads", "channels")
    SCORES: ClassVar[tuple[str, ...]] = ("magnitude", "wanda", "fluctuation", "obs")
    SOLVERS: ClassVar[tuple[str, ...]] = ("none", "closed_form", "admm")

    def validate(self, where: str) -> None:
        if not 0.0 < self.target < 1.0:
            raise ConfigError(f"{where}.target = {self.target}: must be in (0, 1)")
        _choice(self.units, self.UNITS, f"{where}.units")
        if not self.units:
            raise ConfigError(f"{where}.units must name at least one of {', '.join(self.UNITS)}")
        _choice([self.score], self.SCORES, f"{where}.score")
        _choice([self.solver], self.SOLVERS, f"{where}.solver")
        self.allocation = resolve_allocation(self.allocation, f"{where}.allocation", structured=True)
        if self.allocation["max"] >= 1.0:
            raise ConfigError(
                f"{where}.allocation.max = {self.allocation['max']}: a structured layer keeps at least "
                "one unit of each kind; use max < 1"
            )
        if self.align < 1:
            raise ConfigError(f"{where}.align must be >= 1")
        if self.percdamp < 0:
            raise ConfigError(f"{where}.percdamp must be >= 0")


@dataclass
class DepthStage:
    """Depth pruning, scored in a dense pass before the main pass.

    `by: block`: remove the `remove` blocks of lowest block influence `1 - mean cos(x_in, x_out)` (ShortGPT); the
    output renumbers the remaining layers (stock architecture). `by: sublayer`: remove the `remove` attention or MLP
    sublayers whose removal changes their block's output least, `‖y − y_ref‖² / ‖y_ref‖²` (FinerCut's criterion,
    per block); the output is a non-uniform checkpoint (`modeling_blockprune.py`, see docs/structured.md)."""

    method: str = "depth"
    remove: int = 1
    by: str = "block"

    BY: ClassVar[tuple[str, ...]] = ("block", "sublayer")

    def validate(self, where: str) -> None:
        if self.remove < 1:
            raise ConfigError(f"{where}.remove must be >= 1")
        _choice([self.by], self.BY, f"{where}.by")


@dataclass
class ExpertsStage:
    """MoE expert pruning (STUN; docs/moe.md): cluster the routed experts of every MoE block by behaviour and keep one
    expert per cluster, with its router row. Shared experts are never removed.

    `target`: fraction of the routed experts removed. `similarity`: `router` (distance between router rows),
    `coactivation` (how often two experts share a token's top-k) or `both` (`alpha`·router + (1−`alpha`)·coactivation,
    each scaled to [0, 1]). `representative`: `centroid` (the member closest to the cluster's weight centroid) or
    `average` (that slot receives the token-weighted cluster average). `per_layer`: per-layer counts from one global
    threshold on the router-row merge heights (same total; non-uniform output), else every layer keeps the same
    number (stock config)."""

    method: str = "experts"
    target: float = 0.25
    similarity: str = "router"
    alpha: float = 0.5
    representative: str = "centroid"
    per_layer: bool = False

    SIMILARITIES: ClassVar[tuple[str, ...]] = ("router", "coactivation", "both")
    REPRESENTATIVES: ClassVar[tuple[str, ...]] = ("centroid", "average")

    def validate(self, where: str) -> None:
        if not 0.0 < self.target < 1.0:
            raise ConfigError(f"{where}.target = {self.target}: must be in (0, 1)")
        _choice([self.similarity], self.SIMILARITIES, f"{where}.similarity")
        _choice([self.representative], self.REPRESENTATIVES, f"{where}.representative")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"{where}.alpha = {self.alpha}: must be in [0, 1]")


ALLOCATION_RULES: tuple[str, ...] = ("uniform", "owl", "softmax")
ALLOCATION_ENERGIES: tuple[str, ...] = ("error", "influence", "score")
ALLOCATION_OF: tuple[str, ...] = ("prunable", "total")
ALLOCATION_SPLITS: tuple[str, ...] = ("error", "proportional")
# every key of an `allocation` mapping and its default (docs/allocation.md); `split` only for structured stages
ALLOCATION_DEFAULTS: dict[str, Any] = {
    "rule": "uniform",
    "energy": "error",
    "temperature": 1.0,
    "min": 0.0,
    "max": 0.8,
    "of": "prunable",
    "lambda": 0.08,
    "m": 5.0,
}
STRUCTURED_ALLOCATION_DEFAULTS: dict[str, Any] = {**ALLOCATION_DEFAULTS, "split": "error"}


def resolve_allocation(alloc: Any, where: str, *, structured: bool) -> dict[str, Any]:
    """The `allocation` mapping with every default filled in and every value checked (ConfigError naming the key)."""
    if not isinstance(alloc, dict):
        raise ConfigError(f"{where}: expected a mapping such as {{rule: softmax, temperature: 1.0}}")
    defaults = STRUCTURED_ALLOCATION_DEFAULTS if structured else ALLOCATION_DEFAULTS
    unknown = sorted(set(alloc) - set(defaults))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(defaults)}")
    out = {**defaults, **alloc}
    for key, allowed in (
        ("rule", ALLOCATION_RULES),
        ("energy", ALLOCATION_ENERGIES),
        ("of", ALLOCATION_OF),
        ("split", ALLOCATION_SPLITS),
    ):
        if key in out:
            _choice([str(out[key])], allowed, f"{where}.{key}")
    for key in ("temperature", "min", "max", "lambda", "m"):
        try:
            out[key] = float(out[key])
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.{key} = {out[key]!r}: expected a number") from None
    if not out["temperature"] > 0:
        raise ConfigError(f"{where}.temperature = {out['temperature']}: must be > 0 (use a large value for uniform)")
    if not 0.0 <= out["min"] <= out["max"] <= 1.0:
        raise ConfigError(f"{where}: need 0 <= min <= max <= 1, got min = {out['min']}, max = {out['max']}")
    if out["lambda"] < 0 or out["m"] <= 0:
        raise ConfigError(f"{where}: OWL needs lambda >= 0 and m > 0, got lambda = {out['lambda']}, m = {out['m']}")
    return out


def _choice(values: list[str], allowed: tuple[str, ...], where: str) -> None:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ConfigError(f"{where} = {bad[0]!r}: choose from {', '.join(allowed)}")


STAGE_TYPES: dict[str, type] = {
    **{m: UnstructuredStage for m in UnstructuredStage.METHODS},
    "structured": StructuredStage,
    "depth": DepthStage,
    "experts": ExpertsStage,
}


@dataclass
class RunConfig:
    model: str
    output: str
    calibration: CalibrationConfig
    prune: list[Any] = field(default_factory=list)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    sequential: bool = True  # feed the pruned block's outputs to the next block (False: the dense outputs)
    # within a dense block pruned by unstructured stages: each linear group's statistics come from the groups
    # before it already pruned, one pass per block (engine.sequential); False: all from the dense block
    true_sequential: bool = True
    overwrite: bool = False  # replace a non-empty output directory
    resume: bool = False  # continue an interrupted run in `output` (same recipe and input)
    max_shard_size: str = "5GB"
    report_plots: bool = True  # write report.md and plots/*.png beside blockprune_report.json
    version: int = CONFIG_VERSION

    def to_dict(self) -> dict:
        return config_to_dict(self)

    def run_id(self) -> str:
        """Hash of everything that determines the output bytes (not paths of the output, resume or overwrite)."""
        d = self.to_dict()
        for k in ("output", "overwrite", "resume", "report_plots"):
            d.pop(k, None)
        d["runtime"] = {k: v for k, v in d["runtime"].items() if k in ("dtype", "micro_batch", "device")}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- parsing


def parse_nm(pattern: str | None, where: str = "stage") -> tuple[int, int] | None:
    """ "unstructured"/None -> None; "N:M" -> (N, M) with 0 < N < M."""
    if pattern in (None, "", "unstructured"):
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not m:
        raise ConfigError(f"{where}.pattern = {pattern!r}: expected 'unstructured' or 'N:M' such as '2:4'")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise ConfigError(f"{where}.pattern = {pattern!r}: N:M needs 0 < N < M")
    return n, mm


def compile_pattern(pattern: str, where: str = "stage") -> re.Pattern:
    """`re:<regex>` or a shell glob -> compiled regex matched against the whole name."""
    import fnmatch

    try:
        if pattern.startswith("re:"):
            return re.compile(pattern[3:])
        return re.compile(fnmatch.translate(pattern))
    except re.error as e:
        raise ConfigError(f"{where}: bad name pattern {pattern!r}: {e}") from None


def name_selected(name: str, targets: list[str], ignore: list[str]) -> bool:
    """Globs match the whole name; `re:` patterns match from the start of the name (as `re.match`)."""

    def hit(pats: list[str]) -> bool:
        return any(
            compile_pattern(p).match(name) if p.startswith("re:") else compile_pattern(p).fullmatch(name) for p in pats
        )

    return hit(targets) and not hit(ignore)


def _build(cls: type, data: Any, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}.{f.name} is required")
            continue
        kwargs[f.name] = _coerce(f, data[f.name], f"{where}.{f.name}")
    return cls(**kwargs)


def _coerce(f: dataclasses.Field, value: Any, where: str):
    t = str(f.type)
    if dataclasses.is_dataclass(value) or (isinstance(value, list) and t.startswith("list[Any]")):
        return value  # already-built sub-configs
    if value is None:
        if "None" in t:
            return None
        raise ConfigError(f"{where} must not be empty")
    try:
        if t.startswith("bool"):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if t.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if t.startswith("float"):
            return float(value)
        if t.startswith("str"):
            return str(value)
        if t.startswith("list"):
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list):
                raise ValueError(value)
            return [str(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"{where} = {value!r}: expected {t}") from None
    return value


def config_from_dict(data: dict) -> RunConfig:
    """Build and validate the config tree (structure and values; the model-dependent checks are in
    `validate_against_model`)."""
    if not isinstance(data, dict):
        raise ConfigError("recipe: expected a mapping at the top level")
    data = dict(data)
    for key in ("model", "output", "calibration"):
        if key not in data:
            raise ConfigError(f"recipe: `{key}` is required")
    calib = _build(CalibrationConfig, data.pop("calibration"), "calibration")
    runtime = _build(RuntimeConfig, data.pop("runtime", {}) or {}, "runtime")
    stages_raw = data.pop("prune", []) or []
    if not isinstance(stages_raw, list):
        raise ConfigError("prune: expected a list of stages")
    stages = [_build_stage(s, f"prune[{i}]") for i, s in enumerate(stages_raw)]
    cfg = _build(RunConfig, {**data, "calibration": calib, "runtime": runtime, "prune": stages}, "recipe")
    _validate(cfg)
    _validate_stage_mix(stages)
    return cfg


def _build_stage(raw: Any, where: str):
    if not isinstance(raw, dict) or "method" not in raw:
        raise ConfigError(f"{where}: a stage is a mapping with a `method` ({', '.join(STAGE_TYPES)})")
    cls = STAGE_TYPES.get(str(raw["method"]))
    if cls is None:
        raise ConfigError(f"{where}.method = {raw['method']!r}: unknown; choose from {', '.join(STAGE_TYPES)}")
    stage = _build(cls, raw, where)
    stage.validate(where)
    return stage


def _validate(cfg: RunConfig) -> None:
    rt = cfg.runtime
    if rt.dtype not in RuntimeConfig._ALLOWED["dtype"]:
        raise ConfigError(f"runtime.dtype = {rt.dtype!r}: choose from {', '.join(RuntimeConfig._ALLOWED['dtype'])}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", rt.device):
        raise ConfigError(f"runtime.device = {rt.device!r}: choose auto, cpu, cuda or cuda:N")
    if rt.micro_batch < 1:
        raise ConfigError("runtime.micro_batch must be >= 1")
    c = cfg.calibration
    if c.samples < 1 or c.seq_len < 2:
        raise ConfigError("calibration: samples must be >= 1 and seq_len >= 2")
    parse_size(cfg.max_shard_size)


def _validate_stage_mix(stages: list) -> None:
    """At most one structured and one depth stage; they do not combine with unstructured stages in one run yet."""
    kinds = [s.method for s in stages]
    for m in ("structured", "depth"):
        if kinds.count(m) > 1:
            raise ConfigError(f"prune: at most one `{m}` stage per run")
    if any(k in ("structured", "depth") for k in kinds) and any(k in UnstructuredStage.METHODS for k in kinds):
        raise ConfigError(
            "prune: structured/depth stages and unstructured stages cannot share a run yet; "
            "run them one after the other (the output of one is the input of the next)"
        )
    if kinds.count("experts") > 1:
        raise ConfigError("prune: at most one `experts` stage per run")
    if "experts" in kinds and any(k in ("structured", "depth") for k in kinds):
        raise ConfigError("prune: an experts stage cannot share a run with structured/depth stages yet")
    if "experts" in kinds and any(k in UnstructuredStage.METHODS for k in kinds[: kinds.index("experts")]):
        raise ConfigError(
            "prune: the experts stage must come before the unstructured stages (they act on the surviving experts)"
        )


def parse_size(size: str | int) -> int:
    """'5GB' / '500MB' / '20KB' / '1GiB' / a byte count -> bytes (the writer's rule)."""
    from sharding.writer import WriterError
    from sharding.writer import parse_size as _parse

    try:
        return _parse(size)
    except (WriterError, ValueError) as e:
        raise ConfigError(f"max_shard_size = {size!r}: {e}") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`a.b=c` overrides (YAML-parsed values); `prune.0.sparsity=0.6` indexes into lists."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node: Any = data
        parts = key.split(".")
        for p in parts[:-1]:
            if isinstance(node, list):
                node = node[_index(p, key, len(node))]
            else:
                node = node.setdefault(p, {})
        last = parts[-1]
        if isinstance(node, list):
            node[_index(last, key, len(node))] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:-1])} is not a mapping")
    return data


def _index(p: str, key: str, n: int) -> int:
    if not p.isdigit() or int(p) >= n:
        raise ConfigError(f"override {key!r}: {p!r} is not an index below {n}")
    return int(p)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path}: not valid YAML: {str(e).splitlines()[0]}") from None
    return config_from_dict(apply_overrides(data, overrides or []))


def config_to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: config_to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, list):
        return [config_to_dict(v) for v in obj]
    return obj


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
