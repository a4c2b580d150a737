"""Structured pruning of one consumer linear by groups of input columns: the dispatcher for the engine.

:func:`prune_groups` chooses which groups to remove by a score (:mod:`solvers.scores`, or greedy OBS in
:mod:`solvers.obs`), optionally re-selects them by ADMM (:mod:`solvers.admm`), and refits the kept columns
(closed form, :mod:`solvers.groups`) with optional bias compensation. Notation as in :mod:`solvers.groups`.
``SCORES`` and ``SOLVERS`` are the names a recipe may use (the engine's config reads them from here).

Imports flow one way: ``gram ← groups ← {scores, obs} ← admm ← group_prune``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from solvers.admm import admm_group_prune
from solvers.gram import frob_dot, gram_left, work_dtype
from solvers.groups import (
    check_count,
    check_groups,
    closed_form_reconstruct,
    closed_form_with_bias,
    group_columns,
    groups_contiguous,
)
from solvers.obs import obs_group_prune
from solvers.scores import SCORES, flap_bias_compensation, group_scores, input_mean, select_lowest
from solvers.stats import InputStats

__all__ = ["SCORES", "SOLVERS", "GroupPruneResult", "prune_groups", "groups_contiguous", "workspace_bytes"]

SOLVERS = ("none", "closed_form", "admm")


@dataclass
class GroupPruneResult:
    """Outcome of :func:`prune_groups` for one consumer linear.

    keep_groups: sorted kept group ids. keep_cols: sorted kept input columns (kept groups plus ungrouped columns),
    the order of ``weight``'s columns. weight: ``[d_out, |keep_cols|]`` new consumer weight (``W.dtype``).
    bias: ``[d_out]`` to *add* to the consumer's bias (``None`` without bias compensation). info: ``score``,
    ``solver``, ``removed_groups``, ``error`` (mean per-token ``‖W x − W_S x_S − b‖²`` on the calibration
    statistics, ``None`` when ``H`` is absent), ``error_dense_drop`` (same for plainly dropping the columns).
    """

    keep_groups: Tensor
    keep_cols: Tensor
    weight: Tensor
    bias: Tensor | None
    info: dict = field(default_factory=dict)


_ROWS = 256  # rows of the weight difference per product with H in `_error`


def _error(
    W: Tensor, stats: InputStats, keep_cols: Tensor, W_S: Tensor | None, bias: Tensor | None, dtype: torch.dtype
) -> float | None:
    """Mean per-token ``‖W x − W_S x_S − b‖²`` from the Gram: ``tr(D H Dᵀ) − 2 bᵀ D Σx + n‖b‖²`` with
    ``D = W − [W_S on S]`` (``W_S = None``: the columns dropped as they are), in ``dtype`` (float64 sums), a block of
    rows of ``D`` at a time, ``H`` as stored."""
    if stats.H is None or stats.n == 0:
        return None
    if bias is not None and stats.sum is None:
        return None
    cols = keep_cols.to(W.device)
    D = W.to(dtype, copy=True)
    if W_S is None:
        D.index_fill_(1, cols, 0.0)
    else:
        D.index_add_(1, cols, W_S.to(dtype), alpha=-1.0)
    H = stats.H.to(W.device)
    total = 0.0
    for r in range(0, D.shape[0], _ROWS):
        Dr = D[r : r + _ROWS]
        total += frob_dot(gram_left(Dr, H), Dr)
    if bias is not None:
        assert stats.sum is not None
        b = bias.to(dtype)
        total += -2.0 * float(b @ (D @ stats.sum.to(W.device, dtype))) + stats.n * float(b.square().sum())
    return total / stats.n


def _select(
    W: Tensor,
    stats: InputStats,
    groups: list[Tensor],
    k_remove: int,
    score: str,
    percdamp: float,
    dtype: torch.dtype | None,
) -> Tensor:
    if score == "obs":
        if stats.H is None:
            raise ValueError("prune_groups: score 'obs' needs the Gram matrix H (init_stats(..., gram=True))")
        return obs_group_prune(W, stats.H, groups, k_remove, percdamp=percdamp, dtype=dtype, weights=False)[0]
    return select_lowest(group_scores(score, W, stats, groups), k_remove)


def _reconstruct(
    W: Tensor,
    stats: InputStats,
    keep_cols: Tensor,
    solver: str,
    bias_compensation: bool,
    percdamp: float,
    dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor | None]:
    if solver == "none":
        W_S = W[:, keep_cols.to(W.device)].clone()
        if not bias_compensation:
            return W_S, None
        removed = torch.ones(W.shape[1], dtype=torch.bool)
        removed[keep_cols] = False
        return W_S, flap_bias_compensation(W, input_mean(stats), torch.nonzero(removed).flatten())
    assert stats.H is not None
    if not bias_compensation:
        return closed_form_reconstruct(W, stats.H, keep_cols, percdamp=percdamp, dtype=dtype), None
    if stats.sum is None:
        raise ValueError("prune_groups: bias compensation needs the input sums (init_stats(..., track_moments=True))")
    return closed_form_with_bias(W, stats.H, stats.sum, stats.n, keep_cols, percdamp=percdamp, dtype=dtype)


def prune_groups(
    W: Tensor,
    stats: InputStats,
    groups: list[Tensor],
    k_remove: int,
    *,
    score: str = "obs",
    solver: str = "closed_form",
    bias_compensation: bool = False,
    percdamp: float = 0.01,
    admm_options: dict | None = None,
    dtype: torch.dtype | None = None,
) -> GroupPruneResult:
    """Remove ``k_remove`` groups of input columns of ``W`` and return the shrunk weight (and bias to add).

    Selection by ``score``: ``magnitude`` / ``wanda`` / ``fluctuation`` remove the lowest scores
    (:func:`solvers.scores.group_scores`); ``obs`` runs greedy OBS-group removal and swap refinement
    (:func:`obs_group_prune`). ``percdamp`` damps ``H`` for selection and refit (a ridge toward the old weights).
    ``solver``: ``none`` keeps the surviving columns as they are; ``closed_form`` refits them
    (:func:`closed_form_reconstruct`); ``admm`` re-selects the support by ADMM started from the score's selection
    (:func:`solvers.admm.admm_group_prune`, ``admm_options`` passed on; never worse than the start) and refits.
    ``bias_compensation``: without reconstruction FLAP's ``b = W_{:,P} x̄_P``; with it the bias is fitted jointly
    (:func:`closed_form_with_bias`). Both make the mean output over the calibration tokens exact.

    Precision: ``dtype`` (default float32, float64 for float64 weights) for every solve and for ``info["error"]``
    (float64 sums); ``H`` is read as stored and never copied whole except for OBS's one inverse (made in place).
    Peak memory beyond ``W`` and the statistics: :func:`workspace_bytes`.
    """
    work = work_dtype(W, dtype)
    if score not in SCORES:
        raise ValueError(f"prune_groups: unknown score {score!r}; choose one of: {', '.join(SCORES)}")
    if solver not in SOLVERS:
        raise ValueError(f"prune_groups: unknown solver {solver!r}; choose one of: {', '.join(SOLVERS)}")
    check_groups(groups, W.shape[1], "prune_groups")
    check_count(k_remove, len(groups), "k_remove", "prune_groups")
    if stats.n == 0:
        raise ValueError("prune_groups: calibration statistics hold no tokens")
    if solver != "none" and stats.H is None:
        raise ValueError(f"prune_groups: solver {solver!r} needs the Gram matrix H (init_stats(..., gram=True))")
    keep = _select(W, stats, groups, k_remove, score, percdamp, dtype)
    if solver == "admm":
        assert stats.H is not None
        opts = {"percdamp": percdamp, **(admm_options or {})}
        keep = admm_group_prune(W, stats.H, groups, len(groups) - k_remove, init_keep=keep, dtype=dtype, **opts)[0]
    keep_cols = group_columns(groups, keep, W.shape[1])
    W_S, bias = _reconstruct(W, stats, keep_cols, solver, bias_compensation, percdamp, dtype)
    info = {
        "score": score,
        "solver": solver,
        "bias_compensation": bias_compensation,
        "removed_groups": k_remove,
        "error": _error(W, stats, keep_cols, W_S, bias, work),
        "error_dense_drop": _error(W, stats, keep_cols, None, None, work),
    }
    return GroupPruneResult(keep_groups=keep, keep_cols=keep_cols, weight=W_S, bias=bias, info=info)


def workspace_bytes(
    d_out: int, d_in: int, score: str, solver: str, n_groups: int, *, cuda: bool = True, kept: int | None = None
) -> int:
    """Peak bytes :func:`prune_groups` allocates for one ``[d_out, d_in]`` consumer (float32 work, ``n_groups``
    groups) beyond ``W`` and the statistics: the largest of its steps, times 1.15 plus 32 MiB for what the allocator
    and LAPACK keep beyond the live tensors (``d² = d_in²``, ``wd = d_out·d_in``, 4 bytes each). ``kept``: the
    input columns that survive, when known (``None``: any removal fraction, ``kept = d_in``).

    - ``obs`` greedy: the inverse, made in place (``d²``; on CUDA ``cholesky_inverse`` clones it: ``+d²``), and the
      target and updated weights (``2·wd``).
    - ``obs`` swap search: the kept block's inverse and the kept-by-removed products (``|S|² + 3·|S|·|P| <=
      1.15·d²``; groups wider than one column: ``H_SS⁻¹·H_{S,:}`` and its operand, ``+2·d²``), the target,
      ``W·H``, its kept and removed columns and the kept weights (``3.5·wd``, measured; at most ``4.5·wd``).
    - ``closed_form``: the kept block (``kept²``), ``W·H`` and its kept columns, solved in place (``2·wd``).
    - ``admm``: the normalised Gram, its eigenvectors and ``syevd``'s workspace (``4·d²``) beside the target and
      scaled weights (``2·wd``); then the iterates (``8·wd``) beside the eigenvectors; then the swap search.
    - the reported errors: the difference and one block of rows of its product (``wd + 1024·d_in``).
    - other scores: the float32 scores (``2·wd``).

    Measured (CPU, fresh process, obs + closed_form, 20% of single-column groups removed; in d² floats):
    d_out = d_in = 4096: 5.41 (this estimate 5.85; the float64 code before: 17.98); d_in = 8192, d_out = 2048: 2.22
    (2.45; before: 9.46; with ``dtype=torch.float64``: 4.29). Peaks vary by ~±10% from run to run (allocator).
    """
    d2, wd = d_in * d_in, d_out * d_in
    k = d_in if kept is None else min(max(kept, 0), d_in) + 1  # + 1: the bias column of a fit with bias
    swap = 1.15 * d2 + (2 * d2 if n_groups < d_in else 0) + 3.5 * wd
    steps: list[float] = [2 * wd, wd + 1024 * d_in]
    if score == "obs":
        steps += [d2 * (2 if cuda else 1) + 2 * wd, swap]
    if solver in ("closed_form", "admm"):
        steps.append(k * k + 2 * wd)
    if solver == "admm":
        steps += [4 * d2 + 2 * wd, d2 + 8 * wd, swap]
    return int(1.15 * 4 * max(steps)) + 32 * 2**20
