"""The run configuration: one typed dataclass tree, loaded from YAML with `key=value` overrides, validated
before any weight is read, and saved beside the output as `blockprune_recipe.yaml`.

Recipe surface (see docs/recipes.md for every key)::

    model: /path/to/hf_model_dir
    output: /path/to/out_dir
    calibration: {data: /path/to/text_or_jsonl, samples: 128, seq_len: 2048, seed: 0}
    runtime: {device: cpu, dtype: float32}
    prune:
      - {method: sparsegpt, sparsity: 0.5}          # pattern: unstructured (default) or "2:4"

Stages are looked up in the stage registry (`engine.stage.register_stage`) by their `method`: each file under
`engine/stages/` registers its recipe dataclass and its `BlockStage`, so a new method changes nothing here.
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

import engine.stages  # noqa: F401  (registers the built-in stages)
from engine.calibration import CalibrationConfig
from engine.schema import (  # noqa: F401  (re-exported: the recipe vocabulary)
    ALLOCATION_DEFAULTS,
    ALLOCATION_ENERGIES,
    ALLOCATION_OF,
    ALLOCATION_RULES,
    ALLOCATION_SPLITS,
    STRUCTURED_ALLOCATION_DEFAULTS,
    ConfigError,
    choice,
    compile_pattern,
    name_selected,
    parse_nm,
    resolve_allocation,
)
from engine.stage import stage_methods, stage_type
from engine.stages.unstructured import UnstructuredConfig

CONFIG_VERSION = 1


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
        raise ConfigError(f"{where}: a stage is a mapping with a `method` ({', '.join(stage_methods())})")
    st = stage_type(str(raw["method"]))
    if st is None:
        raise ConfigError(f"{where}.method = {raw['method']!r}: unknown; choose from {', '.join(stage_methods())}")
    stage = _build(st.config_cls, raw, where)
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
    masks = [isinstance(s, UnstructuredConfig) for s in stages]
    if any(k in ("structured", "depth") for k in kinds) and any(masks):
        raise ConfigError(
            "prune: structured/depth stages and unstructured stages cannot share a run yet; "
            "run them one after the other (the output of one is the input of the next)"
        )
    depth = next((s for s in stages if s.method == "depth"), None)
    if depth is not None and depth.by == "sublayer" and "structured" in kinds:
        raise ConfigError("prune: depth by sublayer and structured stages cannot share a run yet")
    if kinds.count("experts") > 1:
        raise ConfigError("prune: at most one `experts` stage per run")
    if "experts" in kinds and any(k in ("structured", "depth") for k in kinds):
        raise ConfigError("prune: an experts stage cannot share a run with structured/depth stages yet")
    if "experts" in kinds and any(masks[: kinds.index("experts")]):
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
