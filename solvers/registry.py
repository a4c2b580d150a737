"""Registry of unstructured / semi-structured solvers keyed by method name.

Every entry is a callable ``solve(W, stats, sparsity, pattern, **options) -> PruneResult`` and declares which
statistics it needs, so the engine can skip hooks (magnitude: none) or the ``d×d`` Gram (Wanda: column norms only,
``init_stats(d, gram=False)``). ``options`` are solver keywords (SparseGPT: ``blocksize``, ``percdamp``;
magnitude: ``per_row``); every solver also takes ``compute_error=True`` to add ``info["error"]``, the mean
per-token reconstruction error ``tr(ΔW H ΔWᵀ) / n`` (needs the Gram).

    solve = get_solver("wanda")
    stats = init_stats(d, gram=needs_gram("wanda")); accumulate(stats, X)
    res = solve(W, stats, 0.5, "2:4")
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from solvers.masks import PruneResult, magnitude_prune, wanda_prune
from solvers.sparsegpt import sparsegpt_prune, sparsegpt_prune_many
from solvers.stats import InputStats, col_norm_sq, layer_error

__all__ = [
    "SolverFn",
    "SolverSpec",
    "get_solver",
    "get_group_solver",
    "solver_options",
    "needs_gram",
    "needs_stats",
    "available_solvers",
    "register_solver",
    "describe",
]

SolverFn = Callable[..., PruneResult]
# ``solve_many(Ws, stats, sparsity, pattern, **options) -> [PruneResult]``: several matrices that read one input, solved
# together (one factorisation of H), with the same results as one by one
GroupSolverFn = Callable[..., list[PruneResult]]


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver and the statistics it reads."""

    name: str
    fn: SolverFn
    needs_stats: bool
    needs_gram: bool
    many: GroupSolverFn | None = None


def _with_error(W: Tensor, stats: InputStats | None, res: PruneResult, compute_error: bool) -> PruneResult:
    if compute_error:
        if stats is None or stats.H is None or stats.n == 0:
            raise ValueError("compute_error=True needs InputStats with a Gram matrix (init_stats(..., gram=True))")
        res.info["error"] = layer_error(W, res.weight, stats.H) / stats.n
    return res


def _require(stats: InputStats | None, name: str, gram: bool) -> InputStats:
    if stats is None or stats.n == 0:
        raise ValueError(f"solver '{name}' needs calibration statistics with at least one token")
    if gram and stats.H is None:
        raise ValueError(f"solver '{name}' needs the Gram matrix H; build the statistics with gram=True")
    return stats


def _magnitude(
    W: Tensor,
    stats: InputStats | None,
    sparsity: float,
    pattern: str | None,
    *,
    per_row: bool = False,
    compute_error: bool = False,
) -> PruneResult:
    res = magnitude_prune(W, sparsity, pattern=pattern, per_row=per_row)
    return _with_error(W, stats, res, compute_error)


def _wanda(
    W: Tensor, stats: InputStats | None, sparsity: float, pattern: str | None, *, compute_error: bool = False
) -> PruneResult:
    stats = _require(stats, "wanda", gram=False)
    res = wanda_prune(W, col_norm_sq(stats), sparsity, pattern=pattern)
    return _with_error(W, stats, res, compute_error)


def _sparsegpt(
    W: Tensor,
    stats: InputStats | None,
    sparsity: float,
    pattern: str | None,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    compute_error: bool = False,
) -> PruneResult:
    stats = _require(stats, "sparsegpt", gram=True)
    assert stats.H is not None
    res = sparsegpt_prune(
        W, stats.H, sparsity, pattern=pattern, blocksize=blocksize, percdamp=percdamp, n_tokens=stats.n
    )
    return _with_error(W, stats, res, compute_error)


def _sparsegpt_many(
    Ws: list[Tensor],
    stats: InputStats | None,
    sparsity: float,
    pattern: str | None,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> list[PruneResult]:
    stats = _require(stats, "sparsegpt", gram=True)
    assert stats.H is not None
    return sparsegpt_prune_many(
        Ws, stats.H, sparsity, pattern=pattern, blocksize=blocksize, percdamp=percdamp, n_tokens=stats.n
    )


_REGISTRY: dict[str, SolverSpec] = {}


def register_solver(
    name: str, fn: SolverFn, *, needs_stats: bool, needs_gram: bool, many: GroupSolverFn | None = None
) -> None:
    """Add a solver under ``name`` (and optionally its shared-input group form ``many``); a name can be registered
    only once."""
    if name in _REGISTRY:
        raise ValueError(f"solver '{name}' is already registered")
    _REGISTRY[name] = SolverSpec(name=name, fn=fn, needs_stats=needs_stats, needs_gram=needs_gram, many=many)


register_solver("magnitude", _magnitude, needs_stats=False, needs_gram=False)
register_solver("wanda", _wanda, needs_stats=True, needs_gram=False)
register_solver("sparsegpt", _sparsegpt, needs_stats=True, needs_gram=True, many=_sparsegpt_many)


def available_solvers() -> tuple[str, ...]:
    """Registered method names, sorted."""
    return tuple(sorted(_REGISTRY))


def _spec(name: str) -> SolverSpec:
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ValueError(f"unknown pruning method {name!r}; choose one of: {', '.join(available_solvers())}")
    return spec


def get_solver(name: str) -> SolverFn:
    """The callable ``(W, stats, sparsity, pattern, **options) -> PruneResult`` registered as ``name``."""
    return _spec(name).fn


def needs_stats(name: str) -> bool:
    """Whether ``name`` reads calibration statistics at all (magnitude does not)."""
    return _spec(name).needs_stats


def needs_gram(name: str) -> bool:
    """Whether ``name`` needs the full ``d×d`` Gram ``H`` (SparseGPT) rather than column norms only."""
    return _spec(name).needs_gram


def get_group_solver(name: str) -> GroupSolverFn | None:
    """The shared-input group form of ``name`` (None when it has none: its matrices are solved one by one)."""
    return _spec(name).many


def solver_options(name: str) -> tuple[str, ...]:
    """The keyword options ``name`` accepts besides ``compute_error`` (e.g. SparseGPT: blocksize, percdamp)."""
    params = inspect.signature(_spec(name).fn).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "compute_error")


def describe(name: str) -> dict[str, Any]:
    """The registry entry of ``name`` as a plain dict (for reports)."""
    spec = _spec(name)
    return {"name": spec.name, "needs_stats": spec.needs_stats, "needs_gram": spec.needs_gram}
