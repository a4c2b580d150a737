"""Registry of unstructured / semi-structured solvers keyed by method name.

Every entry is a callable ``solve(W, stats, sparsity, pattern, **options) -> PruneResult`` and declares which
statistics it needs, so the engine can skip hooks (magnitude: none) or the ``d×d`` Gram (Wanda: column norms only,
``init_stats(d, gram=False)``). ``options`` are solver keywords (SparseGPT: ``blocksize``, ``percdamp``;
ADMM: ``iterations``, ``schedule_iterations``, ``percdamp``, ``rho``, ``per_row``, ``refine_iterations``,
``refine_tol``; magnitude: ``per_row``); every solver also takes ``compute_error=True`` to add ``info["error"]``, the
mean per-token reconstruction error ``tr(ΔW H ΔWᵀ) / n`` (needs the Gram). SparseGPT also takes
``consume_gram=True``: the caller will not read ``stats.H`` again, so its storage becomes the factorisation's
workspace (``d²`` floats saved; ``stats.H`` is then set to ``None``, and ``info["error"]`` comes from the OBS sum).

    solve = get_solver("wanda")
    stats = init_stats(d, gram=needs_gram("wanda")); accumulate(stats, X)
    res = solve(W, stats, 0.5, "2:4")

``get_solver_many(name)`` solves several matrices that read the same input at once,
``(Ws, stats, sparsity, pattern, **options) -> list[PruneResult]``: one factorisation for SparseGPT and ADMM, a
loop for the others.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from solvers.admm_unstructured import ADMMOptions, admm_prune_many
from solvers.masks import PruneResult, magnitude_prune, mask_workspace_bytes, wanda_prune
from solvers.sparsegpt import sparsegpt_prune_many, sparsegpt_workspace_bytes
from solvers.stats import InputStats, col_norm_sq, layer_error

__all__ = [
    "SolverFn",
    "SolverManyFn",
    "SolverSpec",
    "get_solver",
    "get_solver_many",
    "get_group_solver",
    "solver_options",
    "workspace_bytes",
    "needs_gram",
    "needs_stats",
    "available_solvers",
    "register_solver",
    "describe",
]

SolverFn = Callable[..., PruneResult]
SolverManyFn = Callable[..., list[PruneResult]]
WorkspaceFn = Callable[..., int]  # (d_out, d_in, *, consume_gram: bool, cuda: bool) -> bytes


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver, its shared-input variant (``None``: solve one by one) and the statistics it reads."""

    name: str
    fn: SolverFn
    needs_stats: bool
    needs_gram: bool
    many: SolverManyFn | None = None
    workspace: WorkspaceFn | None = None


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


def _sparsegpt_many(
    Ws: list[Tensor],
    stats: InputStats | None,
    sparsity: float,
    pattern: str | None,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    compute_error: bool = False,
    consume_gram: bool = False,
) -> list[PruneResult]:
    stats = _require(stats, "sparsegpt", gram=True)
    assert stats.H is not None
    res = sparsegpt_prune_many(
        Ws,
        stats.H,
        sparsity,
        pattern=pattern,
        blocksize=blocksize,
        percdamp=percdamp,
        n_tokens=stats.n,
        consume_H=consume_gram,
    )
    if consume_gram:  # its storage was the workspace: nobody may read it as a Gram again
        stats.H = None
        return res  # info["error"]: sparsegpt's undamped error from its OBS sum (per token), no Gram needed
    return [_with_error(W, stats, r, compute_error) for W, r in zip(Ws, res)]


def _admm_many(
    Ws: list[Tensor],
    stats: InputStats | None,
    sparsity: float,
    pattern: str | None,
    *,
    iterations: int = 20,
    schedule_iterations: int = 15,
    percdamp: float = 0.1,
    rho: float = 1.0,
    per_row: bool = False,
    refine_iterations: int = 10,
    refine_tol: float = 1e-4,
    compute_error: bool = False,
    consume_gram: bool = False,
) -> list[PruneResult]:
    # consume_gram: accepted for the engine's shared-input call; ADMM reads H and works on a normalised copy
    stats = _require(stats, "admm", gram=True)
    assert stats.H is not None
    opts = ADMMOptions(iterations, schedule_iterations, percdamp, rho, per_row, refine_iterations, refine_tol)
    res = admm_prune_many(Ws, stats.H, sparsity, pattern=pattern, n_tokens=stats.n, options=opts)
    return [_with_error(W, stats, r, compute_error) for W, r in zip(Ws, res)]


def _one(many: SolverManyFn) -> SolverFn:
    """The single-matrix form of a shared-input solver."""

    def solve(W: Tensor, stats: InputStats | None, sparsity: float, pattern: str | None, **options: Any) -> PruneResult:
        return many([W], stats, sparsity, pattern, **options)[0]

    return solve


_REGISTRY: dict[str, SolverSpec] = {}


def register_solver(
    name: str,
    fn: SolverFn,
    *,
    needs_stats: bool,
    needs_gram: bool,
    many: SolverManyFn | None = None,
    workspace: WorkspaceFn | None = None,
) -> None:
    """Add a solver under ``name`` (``many``: its shared-input variant, if it has one; ``workspace(d_out, d_in, *,
    consume_gram, cuda)``: the bytes it allocates beyond ``W`` and the statistics, for the memory plan); a name can
    be registered once."""
    if name in _REGISTRY:
        raise ValueError(f"solver '{name}' is already registered")
    _REGISTRY[name] = SolverSpec(
        name=name, fn=fn, needs_stats=needs_stats, needs_gram=needs_gram, many=many, workspace=workspace
    )


def _mask_workspace(d_out: int, d_in: int, *, consume_gram: bool = False, cuda: bool = True) -> int:
    """The pruned weight, the mask and one chunk of rows' scores (:func:`solvers.masks.mask_workspace_bytes`)."""
    return mask_workspace_bytes(d_out, d_in)


def _sparsegpt_workspace(d_out: int, d_in: int, *, consume_gram: bool = False, cuda: bool = True) -> int:
    """:func:`solvers.sparsegpt.sparsegpt_workspace_bytes`: with ``consume_gram`` the Gram's storage is the
    factor's (~d²/2 floats of retry backup), else one copy of it (d²); CUDA's ``cholesky_inverse`` clones (d²);
    the stacked float32 weights, the mask and the block loop's temporaries."""
    return sparsegpt_workspace_bytes(d_out, d_in, consume_H=consume_gram, cuda=cuda)


def _admm_workspace(d_out: int, d_in: int, *, consume_gram: bool = False, cuda: bool = True) -> int:
    """The normalised damped Gram and its inverse (2·d² floats) and the ADMM iterates W, Z, U, scores and the
    products (~6·d_out·d_in floats)."""
    return 4 * (2 * d_in * d_in + 6 * d_out * d_in)


register_solver("magnitude", _magnitude, needs_stats=False, needs_gram=False, workspace=_mask_workspace)
register_solver("wanda", _wanda, needs_stats=True, needs_gram=False, workspace=_mask_workspace)
register_solver(
    "sparsegpt",
    _one(_sparsegpt_many),
    needs_stats=True,
    needs_gram=True,
    many=_sparsegpt_many,
    workspace=_sparsegpt_workspace,
)
register_solver("admm", _one(_admm_many), needs_stats=True, needs_gram=True, many=_admm_many, workspace=_admm_workspace)


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


def get_solver_many(name: str) -> SolverManyFn:
    """``(Ws, stats, sparsity, pattern, **options) -> list[PruneResult]`` for matrices that read the same input:
    the registered shared-input variant (SparseGPT, ADMM: one factorisation, stacked rows), else one by one."""
    spec = _spec(name)
    if spec.many is not None:
        return spec.many

    def one_by_one(
        Ws: list[Tensor], stats: InputStats | None, sparsity: float, pattern: str | None, **options: Any
    ) -> list[PruneResult]:
        return [spec.fn(W, stats, sparsity, pattern, **options) for W in Ws]

    return one_by_one


def get_group_solver(name: str) -> SolverManyFn | None:
    """The registered shared-input variant of ``name`` (one factorisation for matrices that read one input), None
    when it has none (its matrices are then solved one by one, each its own task)."""
    return _spec(name).many


_ENGINE_FLAGS = ("compute_error", "consume_gram")  # keywords for the caller, not recipe options


def solver_options(name: str) -> tuple[str, ...]:
    """The keyword options ``name`` accepts besides ``compute_error`` and ``consume_gram`` (e.g. SparseGPT:
    blocksize, percdamp)."""
    spec = _spec(name)
    params = inspect.signature(spec.many or spec.fn).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _ENGINE_FLAGS)


def workspace_bytes(name: str, d_out: int, d_in: int, *, consume_gram: bool = False, cuda: bool = True) -> int:
    """Bytes ``name`` allocates solving one ``[d_out, d_in]`` matrix (or a stacked group of that many rows) beyond
    the weights and statistics it is given (0 when the solver does not say). ``consume_gram``: the solve is called
    with ``consume_gram=True`` (its Gram's storage is reused); ``cuda``: on a CUDA device (whose
    ``cholesky_inverse`` clones its input; the default, an upper bound for the CPU)."""
    ws = _spec(name).workspace
    return int(ws(d_out, d_in, consume_gram=consume_gram, cuda=cuda)) if ws is not None else 0


def needs_stats(name: str) -> bool:
    """Whether ``name`` reads calibration statistics at all (magnitude does not)."""
    return _spec(name).needs_stats


def needs_gram(name: str) -> bool:
    """Whether ``name`` needs the full ``d×d`` Gram ``H`` (SparseGPT, ADMM) rather than column norms only."""
    return _spec(name).needs_gram


def describe(name: str) -> dict[str, Any]:
    """The registry entry of ``name`` as a plain dict (for reports)."""
    spec = _spec(name)
    return {"name": spec.name, "needs_stats": spec.needs_stats, "needs_gram": spec.needs_gram}
