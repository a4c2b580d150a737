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
from solvers.groups import (
    augmented_gram,
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

__all__ = ["SCORES", "SOLVERS", "GroupPruneResult", "prune_groups", "groups_contiguous"]

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


def _error(W: Tensor, stats: InputStats, keep_cols: Tensor, W_S: Tensor, bias: Tensor | None) -> float | None:
    """Mean per-token ``‖W x − W_S x_S − b‖²`` from the (augmented) Gram."""
    if stats.H is None or stats.n == 0:
        return None
    dtype = torch.float64
    D = W.to(dtype).clone()
    D[:, keep_cols.to(W.device)] -= W_S.to(dtype)
    H = stats.H.to(W.device, dtype)
    if bias is not None:
        if stats.sum is None:
            return None
        H = augmented_gram(H, stats.sum.to(W.device, dtype), stats.n)
        D = torch.cat([D, -bias.to(dtype)[:, None]], dim=1)
    return float(((D @ H) * D).sum()) / stats.n


def _select(W: Tensor, stats: InputStats, groups: list[Tensor], k_remove: int, score: str, percdamp: float) -> Tensor:
    if score == "obs":
        if stats.H is None:
            raise ValueError("prune_groups: score 'obs' needs the Gram matrix H (init_stats(..., gram=True))")
        return obs_group_prune(W, stats.H, groups, k_remove, percdamp=percdamp)[0]
    return select_lowest(group_scores(score, W, stats, groups), k_remove)


def _reconstruct(
    W: Tensor, stats: InputStats, keep_cols: Tensor, solver: str, bias_compensation: bool, percdamp: float
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
        return closed_form_reconstruct(W, stats.H, keep_cols, percdamp=percdamp), None
    if stats.sum is None:
        raise ValueError("prune_groups: bias compensation needs the input sums (init_stats(..., track_moments=True))")
    return closed_form_with_bias(W, stats.H, stats.sum, stats.n, keep_cols, percdamp=percdamp)


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
    """
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
    keep = _select(W, stats, groups, k_remove, score, percdamp)
    if solver == "admm":
        assert stats.H is not None
        opts = {"percdamp": percdamp, **(admm_options or {})}
        keep = admm_group_prune(W, stats.H, groups, len(groups) - k_remove, init_keep=keep, **opts)[0]
    keep_cols = group_columns(groups, keep, W.shape[1])
    W_S, bias = _reconstruct(W, stats, keep_cols, solver, bias_compensation, percdamp)
    info = {
        "score": score,
        "solver": solver,
        "bias_compensation": bias_compensation,
        "removed_groups": k_remove,
        "error": _error(W, stats, keep_cols, W_S, bias),
        "error_dense_drop": _error(W, stats, keep_cols, W[:, keep_cols.to(W.device)], None),
    }
    return GroupPruneResult(keep_groups=keep, keep_cols=keep_cols, weight=W_S, bias=bias, info=info)
