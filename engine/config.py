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

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import reprlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

import engine.stages  # noqa: F401  (registers the built-in stages)
from engine.calibration import CalibrationConfig
from engine.export import ExportConfig
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
    overlap: bool = True  # read the next block ahead and write the last one behind, on background threads
    device_memory_gb: float | None = None  # memory the run may use on the device (None: what the device reports)
    host_memory_gb: float | None = None  # host memory the run may use (None: what the machine has available)

    _ALLOWED: ClassVar[dict[str, tuple[str, ...]]] = {
        "dtype": ("auto", "float32", "bfloat16", "float16"),
    }

    def validate(self, where: str = "runtime") -> None:
        """ConfigError naming the key for a value the run could only fail on later (or silently misuse)."""
        if self.dtype not in self._ALLOWED["dtype"]:
            raise ConfigError(f"{where}.dtype = {self.dtype!r}: choose from {', '.join(self._ALLOWED['dtype'])}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"{where}.device = {self.device!r}: choose auto, cpu, cuda or cuda:N")
        if self.micro_batch < 1:
            raise ConfigError(f"{where}.micro_batch = {self.micro_batch}: must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"{where}.threads = {self.threads}: must be >= 1 (or empty for torch's default)")
        for key in ("device_budget_gb", "host_budget_gb", "device_memory_gb", "host_memory_gb"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ConfigError(f"{where}.{key} = {getattr(self, key)}: must be >= 0 (or empty for the default)")
        if self.spill_dir is not None and not self.spill_dir.strip():
            raise ConfigError(f"{where}.spill_dir is blank: give a directory (or leave it empty for the output)")


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
    export: ExportConfig = field(default_factory=ExportConfig)  # layout of the output: native | padded
    report_plots: bool = True  # write report.md and plots/*.png beside blockprune_report.json
    version: int = CONFIG_VERSION

    def to_dict(self) -> dict:
        return config_to_dict(self)

    def run_id(self) -> str:
        """Hash of everything that determines the output bytes (not paths of the output, resume or overwrite)."""
        d = self.to_dict()
        for k in ("output", "overwrite", "resume", "report_plots", "export"):  # export: applied after the blocks
            d.pop(k, None)
        d["runtime"] = {k: v for k, v in d["runtime"].items() if k in ("dtype", "micro_batch", "device")}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- parsing


def _build(cls: type, data: Any, where: str):
    """`cls(**data)` with every value coerced to its field's type; ConfigError naming the key for an unknown or
    missing key or a value of the wrong kind."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_kind(data)}")
    names = {f.name for f in fields(cls)}
    not_names = [k for k in data if not isinstance(k, str)]
    if not_names:
        raise ConfigError(f"{where}: key {_short(not_names[0])} is not a name; allowed: {', '.join(sorted(names))}")
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


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_EXPECTED = {
    "bool": "true or false",
    "int": "an integer",
    "float": "a finite number",
    "str": "a string (quote it in YAML)",
    "list": "a list of strings",
    "dict": "a mapping",
}


def _coerce(f: dataclasses.Field, value: Any, where: str):
    """`value` as the type of field `f` (annotations are strings: "int | None", "list[str]", ...).

    Strict on purpose: a bool is not a number, a list is not a string, NaN and infinities are not numbers (a NaN
    damping reaches a Cholesky; a NaN sparsity prunes nothing), so a typo fails here, naming the key."""
    t = str(f.type)
    if dataclasses.is_dataclass(value) or (isinstance(value, list) and t.startswith("list[Any]")):
        return value  # already-built sub-configs
    if value is None:
        if "None" in t:
            return None
        raise ConfigError(f"{where} must not be empty")
    kind = re.split(r"[\[ |]", t, maxsplit=1)[0]
    try:
        out = _COERCE[kind](value) if kind in _COERCE else value
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(
            f"{where} = {_short(value)}: expected {_EXPECTED.get(kind, t)}{' (or empty)' if 'None' in t else ''}"
        ) from None
    if isinstance(out, float) and not math.isfinite(out):
        raise ConfigError(f"{where} = {_short(value)}: must be a finite number")
    return out


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(value)


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, float):
        if not value.is_integer():  # also NaN and the infinities
            raise ValueError(value)
        return int(value)
    if isinstance(value, (int, str)):
        return int(value)
    raise TypeError(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(value)
    return float(value)  # YAML 1.1 reads `1e-4` (no dot) as a string: float() takes it


def _to_str(value: Any) -> str:
    if isinstance(value, os.PathLike):  # library callers pass pathlib paths
        value = os.fspath(value)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(value)  # `data: yes` is a YAML bool, not the path "yes"
    return str(value)


def _to_str_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise TypeError(value)
    return [_to_str(v) for v in value]


def _to_dict(value: Any) -> dict:
    if not isinstance(value, dict):
        raise TypeError(value)
    return value


_COERCE = {"bool": _to_bool, "int": _to_int, "float": _to_float, "str": _to_str, "list": _to_str_list, "dict": _to_dict}


def config_from_dict(data: dict) -> RunConfig:
    """Build and validate the config tree (structure and values; the model-dependent checks are each stage's
    `setup`, engine.pipeline.make_stages)."""
    if not isinstance(data, dict):
        raise ConfigError("recipe: expected a mapping at the top level")
    check_plain_data(data)
    data = dict(data)
    for key in ("model", "output", "calibration"):
        if key not in data:
            raise ConfigError(f"recipe: `{key}` is required")
    calib = _build(CalibrationConfig, data.pop("calibration"), "calibration")
    runtime = _build(RuntimeConfig, data.pop("runtime", {}) or {}, "runtime")
    export = _build(ExportConfig, data.pop("export", {}) or {}, "export")
    stages_raw = data.pop("prune", []) or []
    if not isinstance(stages_raw, list):
        raise ConfigError("prune: expected a list of stages")
    stages = [_build_stage(s, f"prune[{i}]") for i, s in enumerate(stages_raw)]
    cfg = _build(
        RunConfig, {**data, "calibration": calib, "runtime": runtime, "export": export, "prune": stages}, "recipe"
    )
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
    """Checks of the run-level keys (the stages validate themselves)."""
    if cfg.version != CONFIG_VERSION:
        raise ConfigError(f"version = {cfg.version}: this blockprune reads recipe version {CONFIG_VERSION}")
    for key in ("model", "output"):
        if not getattr(cfg, key).strip():
            # an empty output would be the working directory (and `overwrite` would clear it)
            raise ConfigError(f"{key} is empty: give a directory path")
    cfg.runtime.validate("runtime")
    cfg.export.validate("export", cfg.prune)
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
    """'5GB' / '500MB' / '20KB' / '1GiB' / a byte count -> bytes (the writer's rule); ConfigError otherwise."""
    from sharding.writer import WriterError
    from sharding.writer import parse_size as _parse

    try:
        return _parse(size)
    except (WriterError, ValueError, OverflowError) as e:
        raise ConfigError(f"{e}" if "max_shard_size" in str(e) else f"max_shard_size = {size!r}: {e}") from None


# ------------------------------------------------------------------------------------------ loading recipes
#
# A recipe is small, plain data: a few dozen keys. Everything below keeps it that way before any copy or walk, so
# a hostile or broken file fails in milliseconds with one line: at most MAX_RECIPE_BYTES, no YAML anchors or
# aliases (a 700-byte "billion laughs" file is a DAG that expands to gigabytes when copied), at most
# MAX_RECIPE_NODES values nested at most MAX_RECIPE_DEPTH deep, string keys, finite numbers, no duplicate keys.

MAX_RECIPE_BYTES = 1 << 18  # 256 KiB: parsed in about 0.2 s at worst; real recipes are a few hundred bytes
MAX_RECIPE_NODES = 10_000
MAX_RECIPE_DEPTH = 32


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader (standard tags only; `!!python/...` fails) that also refuses anchors, aliases,
    nesting deeper than MAX_RECIPE_DEPTH, more than MAX_RECIPE_NODES nodes, and a key written twice."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            what = f"alias *{event.anchor}" if isinstance(event, yaml.AliasEvent) else f"anchor &{event.anchor}"
            raise yaml.composer.ComposerError(
                None,
                None,
                f"{what}: anchors and aliases are not allowed in a recipe; write the value out",
                event.start_mark,
            )
        self._nodes += 1
        if self._depth >= MAX_RECIPE_DEPTH or self._nodes > MAX_RECIPE_NODES:
            raise yaml.composer.ComposerError(None, None, _too_big(self._depth), event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        mapping = super().construct_mapping(node, deep=deep)
        if len(mapping) != len(node.value):  # a key written twice: YAML would silently keep the last
            seen: set = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is written twice", key_node.start_mark
                    )
                seen.add(key)
        return mapping


class _PlainDumper(yaml.SafeDumper):
    """Writes every value out (no `&anchor`/`*alias` for shared objects), so the saved recipe loads with the recipe
    loader, which refuses aliases; quotes a string that either the recipe loader or a stock YAML 1.1 reader would
    take for a number."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


# YAML 1.2 numbers in recipes: PyYAML (YAML 1.1) reads an unquoted `2:4` as the base-60 integer 124 (so
# `pattern: 2:4` became "124") and `1e-4` (no dot) as a string; the recipe loader keeps `2:4` a string and reads
# `1e-4` as a float. The dumper knows both rules, so what it writes reads back the same in either.
_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_INT_RE = re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$")
_FLOAT_RE = re.compile(
    r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
    r"|[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_PlainDumper.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeDumper.yaml_implicit_resolvers.items()}
for _cls in (_RecipeLoader, _PlainDumper):
    _cls.add_implicit_resolver(_INT_TAG, _INT_RE, list("-+0123456789"))
    _cls.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+0123456789."))


def _too_big(depth: int) -> str:
    if depth >= MAX_RECIPE_DEPTH:
        return f"more than {MAX_RECIPE_DEPTH} levels of nesting; not a recipe"
    return f"more than {MAX_RECIPE_NODES} values; not a recipe"


def load_yaml_text(text: str, where: str) -> Any:
    """`text` parsed with the recipe loader; ConfigError `"<where>: <problem> (line L, column C)"`."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: {_yaml_problem(e)}") from None
    except RecursionError:  # cannot happen below MAX_RECIPE_DEPTH; kept so that no traceback escapes
        raise ConfigError(f"{where}: nested too deeply") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.MarkedYAMLError):
        text = "; ".join(str(p) for p in (e.context, e.problem) if p) or type(e).__name__
        if isinstance(e, (yaml.scanner.ScannerError, yaml.parser.ParserError)):
            text = f"invalid YAML: {text}"
        mark = e.problem_mark or e.context_mark
        return text if mark is None else f"{text} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(e).split()) or type(e).__name__


def read_yaml_file(path: str | Path, what: str = "recipe") -> Any:
    """The YAML document in `path`, size-checked before it is read and parsed with the recipe loader. ConfigError
    naming `what` and the path for a missing, special, unreadable, oversized, non-UTF-8 or malformed file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} {path}: no such file")
    if not path.is_file():
        raise ConfigError(f"{what} {path}: not a regular file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1) if size <= MAX_RECIPE_BYTES else b""
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read it ({e.strerror or e})") from None
    if size > MAX_RECIPE_BYTES or len(raw) > MAX_RECIPE_BYTES:
        raise ConfigError(f"{what} {path}: {max(size, len(raw))} bytes; a recipe is at most {MAX_RECIPE_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path}: not UTF-8 text (byte {e.start})") from None
    return load_yaml_text(text, f"{what} {path}")


def check_plain_data(data: Any, where: str = "recipe") -> None:
    """ConfigError unless `data` is plain recipe data: mappings with string keys, lists, strings, bools, finite
    numbers and empties; at most MAX_RECIPE_NODES values, MAX_RECIPE_DEPTH deep.

    Also for recipe dicts built in Python, which may share sub-objects: the walk stops at the node limit, so a
    shared-reference bomb costs O(MAX_RECIPE_NODES), never its expanded size."""
    budget = [MAX_RECIPE_NODES]

    def walk(node: Any, key: str, depth: int) -> None:
        budget[0] -= 1
        if depth >= MAX_RECIPE_DEPTH or budget[0] < 0:
            raise ConfigError(f"{where}: {_too_big(depth)}")
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    raise ConfigError(f"{key or where}: key {_short(k)} is not a name (keys are strings)")
                walk(v, f"{key}.{k}" if key else k, depth + 1)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{key}.{i}" if key else str(i), depth + 1)
        elif isinstance(node, float) and not math.isfinite(node):
            raise ConfigError(f"{key or where} = {node}: must be a finite number")
        elif not (node is None or isinstance(node, (str, int, float, os.PathLike))):  # bool is an int
            raise ConfigError(f"{key or where} = {_short(node)}: a {type(node).__name__} is not a recipe value")

    walk(data, "", 0)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """A copy of `data` with `a.b=c` overrides set (values parsed as YAML with the recipe loader);
    `prune.0.sparsity=0.6` indexes into lists. `data` is checked (`check_plain_data`) before it is copied, and the
    result after the overrides; a malformed override is a ConfigError naming it."""
    if not isinstance(data, dict):
        raise ConfigError(f"recipe: expected a mapping at the top level, got {_kind(data)}")
    check_plain_data(data)
    data = copy.deepcopy(data)  # bounded: plain data, at most MAX_RECIPE_NODES values
    for item in overrides:
        key, value = _parse_override(item)
        _set_override(data, key, value, item)
    check_plain_data(data)
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value (e.g. prune.0.sparsity=0.6)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p.strip() for p in key.split(".")):
        raise ConfigError(f"override {item!r}: the key has an empty part; write dotted keys like runtime.threads")
    if len(raw) > MAX_RECIPE_BYTES:
        raise ConfigError(f"override {key!r}: value of {len(raw)} characters; at most {MAX_RECIPE_BYTES}")
    return key, (load_yaml_text(raw, f"override {item!r}") if raw.strip() else None)


def _set_override(data: dict, key: str, value: Any, item: str) -> None:
    parts = key.split(".")
    node: Any = data
    for depth, p in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            i = _index(p, key, len(node))
            if last:
                node[i] = value
            node = node[i]
        elif isinstance(node, dict):
            if last:
                node[p] = value
            elif node.get(p) is None:
                node[p] = {}  # a missing or empty section (`runtime:`) becomes a mapping
            node = node[p]
        else:
            parent = ".".join(parts[:depth])
            raise ConfigError(f"override {item!r}: {parent} is {_kind(node)}, not a mapping or a list")


def _index(p: str, key: str, n: int) -> int:
    if not p.isdigit() or int(p) >= n:
        raise ConfigError(f"override {key!r}: {p!r} is not an index below {n}")
    return int(p)


def _kind(value: Any) -> str:
    """`value`'s kind in recipe words, for messages."""
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    names: dict[type, str] = {str: "a string", dict: "a mapping", list: "a list"}
    return names.get(type(value), f"a {type(value).__name__}")


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 4, 4, 60, 60


def _short(value: Any, keep: int = 80) -> str:
    """A bounded `repr(value)` of at most `keep` characters: messages stay one short line, and building one costs
    O(1) even for a value that shares sub-objects (a full repr of a reference bomb would never finish)."""
    text = _REPR.repr(value)
    return text if len(text) <= keep else text[: keep - 3] + "..."


def read_recipe(path: str | Path, overrides: list[str] | None = None, *, what: str = "recipe") -> dict:
    """The recipe mapping in the YAML file `path` with `overrides` applied: the one loader of `blockprune run`,
    `plan`, `submit` and `distill` recipes (`load_recipe`, `engine.distill.run.load_distill_recipe`)."""
    data = read_yaml_file(path, what)
    return apply_overrides({} if data is None else data, overrides or [])


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The validated RunConfig of recipe file `path` with `key=value` overrides; ConfigError naming the key."""
    return config_from_dict(read_recipe(path, overrides))


def config_to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: config_to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, list):
        return [config_to_dict(v) for v in obj]
    return obj


# Keys of how a run was started, not of what it writes: left out of the saved recipe, so that a resumed or
# overwriting run saves the same `blockprune_recipe.yaml` as a fresh one.
RUN_ONLY_KEYS: tuple[str, ...] = ("overwrite", "resume")


def config_to_yaml(cfg: Any) -> str:
    """A resolved recipe saved beside its output (`blockprune_recipe.yaml`, `blockprune_distill.yaml`): every
    default filled in, without RUN_ONLY_KEYS, no YAML aliases. Loads back with its loader to the same run."""
    d = cfg.to_dict()
    for key in RUN_ONLY_KEYS:
        d.pop(key, None)
    return yaml.dump(d, Dumper=_PlainDumper, sort_keys=False)
