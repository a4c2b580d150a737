"""The vocabulary every recipe section shares: the config error, choices, N:M patterns, name selectors and the
`allocation` mapping. Stage files (`engine/stages/`) and the run config (`engine/config.py`) both build on it, so it
imports neither.
"""

from __future__ import annotations

import fnmatch
import math
import re
from typing import Any

from sharding.errors import BlockpruneError


class ConfigError(BlockpruneError, ValueError):
    """A recipe that cannot run: the message is one line naming the key and what is allowed."""


class PruningError(BlockpruneError, RuntimeError):
    """A block whose result differs from what the recipe asked (or that cannot be computed from its inputs, e.g.
    NaN/Inf): the run stops before the block is committed; the message names the block, the tensor or the linear."""


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
            choice([str(out[key])], allowed, f"{where}.{key}")
    for key in ("temperature", "min", "max", "lambda", "m"):
        try:
            out[key] = float(out[key])
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.{key} = {out[key]!r}: expected a number") from None
        if not math.isfinite(out[key]):
            raise ConfigError(f"{where}.{key} = {out[key]!r}: must be a finite number")
    if not out["temperature"] > 0:
        raise ConfigError(f"{where}.temperature = {out['temperature']}: must be > 0 (use a large value for uniform)")
    if not 0.0 <= out["min"] <= out["max"] <= 1.0:
        raise ConfigError(f"{where}: need 0 <= min <= max <= 1, got min = {out['min']}, max = {out['max']}")
    if out["lambda"] < 0 or out["m"] <= 0:
        raise ConfigError(f"{where}: OWL needs lambda >= 0 and m > 0, got lambda = {out['lambda']}, m = {out['m']}")
    return out


def choice(values: list[str], allowed: tuple[str, ...], where: str) -> None:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ConfigError(f"{where} = {bad[0]!r}: choose from {', '.join(allowed)}")


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
