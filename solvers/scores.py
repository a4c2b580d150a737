"""Importance of groups of input channels, FLAP bias compensation and depth scores (DESIGN.md §4).

Notation: consumer ``W [d_out, d_in]``, calibration inputs ``X [n, d_in]`` summarised by :class:`InputStats`
(``H = XᵀX``, ``Σx``, ``Σx²``, ``n``); a group ``G`` is a set of input columns (see :mod:`solvers.groups`).
Low score = cheap to remove. Scores per group (``‖X_j‖ = √H_jj``, ``x̄ = Σx / n``):

- ``magnitude``:   ``Σ_{i, j∈G} W_ij²`` (squared Frobenius norm of the group's columns)
- ``wanda``:       ``Σ_{i, j∈G} |W_ij|·‖X_j‖₂`` (structured Wanda: the unstructured scores summed over the group)
- ``fluctuation``: ``mean_{j∈G} Var_n(X_j)·‖W_{:,j}‖²`` with ``Var_n(X_j) = Σx_j²/n − x̄_j²`` (FLAP, An et al. 2024;
  one channel: the channel's value, a head group: the mean over its columns); standardise with
  :func:`standardize` before comparing layers.
- ``obs``:         ``tr(W_{:,G}([H_λ⁻¹]_{GG})⁻¹W_{:,G}ᵀ) / n``: the per-token error increase of removing ``G`` alone
  with optimal reconstruction of the rest (single shot; :func:`solvers.obs.obs_group_prune` is greedy).

Worked example (one output row, two single-column groups): ``W = [[2, −1]]``, ``X = [[1, 0], [1, 2]]``:
``magnitude = [4, 1]``, ``wanda = [2·√2, 1·2] = [2.83, 2]``, ``Var = [0, 1]`` so ``fluctuation = [0, 1]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from solvers.groups import check_groups, group_ids, obs_group_costs
from solvers.stats import InputStats, col_norm_sq

__all__ = [
    "SCORES",
    "group_scores",
    "group_reduce",
    "standardize",
    "select_lowest",
    "input_mean",
    "input_variance",
    "flap_bias_compensation",
    "block_influence",
    "output_change",
]

SCORES = ("magnitude", "wanda", "fluctuation", "obs")  # the structured scores a recipe may name


def group_reduce(per_col: Tensor, groups: list[Tensor], how: str = "sum") -> Tensor:
    """Per-group ``sum`` or ``mean`` of per-column values ``[d_in]`` -> ``[n_groups]``."""
    if how not in ("sum", "mean"):
        raise ValueError(f"group_reduce: 'how' must be 'sum' or 'mean', got {how!r}")
    gid = group_ids(groups, per_col.numel(), per_col.device)
    out = torch.zeros(len(groups) + 1, dtype=per_col.dtype, device=per_col.device).index_add_(0, gid, per_col)[:-1]
    if how == "mean":
        sizes = torch.tensor([g.numel() for g in groups], dtype=per_col.dtype, device=per_col.device)
        out = out / sizes
    return out


def input_mean(stats: InputStats) -> Tensor:
    """``x̄ = Σx / n`` (``[d_in]``); needs ``init_stats(..., track_moments=True)``."""
    if stats.sum is None or stats.n == 0:
        raise ValueError("input_mean: statistics lack input sums or tokens; build them with track_moments=True")
    return stats.sum / stats.n


def input_variance(stats: InputStats) -> Tensor:
    """Population variance over tokens ``Σx²/n − x̄²`` (``[d_in]``, clamped at 0); needs ``track_moments=True``."""
    if stats.sumsq is None:
        raise ValueError("input_variance: statistics lack squared sums; build them with track_moments=True")
    mean = input_mean(stats)
    return (stats.sumsq / stats.n - mean.square()).clamp_min(0)


def _col_scores(method: str, W: Tensor, stats: InputStats) -> tuple[Tensor, str]:
    """Per-column contributions (float64 sums of float32 or float64 terms) and how they combine over a group."""
    Wf = W.to(torch.promote_types(W.dtype, torch.float32))
    f64 = torch.float64
    if method == "magnitude":
        return Wf.square().sum(dim=0, dtype=f64), "sum"
    if method == "wanda":
        if stats.n == 0:
            raise ValueError("group_scores: 'wanda' needs calibration statistics with at least one token")
        norms = col_norm_sq(stats).to(W.device, Wf.dtype).clamp_min(0).sqrt()
        return (Wf.abs() * norms).sum(dim=0, dtype=f64), "sum"
    var = input_variance(stats).to(W.device, f64)
    return var * Wf.square().sum(dim=0, dtype=f64), "mean"


def group_scores(
    method: str,
    W: Tensor,
    stats: InputStats | None,
    groups: list[Tensor],
    *,
    percdamp: float = 0.01,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Importance of each group (``[n_groups]``, float64; formulas in the module docstring). Low = remove first.

    ``magnitude`` needs no statistics (``stats`` may be ``None``); ``wanda`` needs column norms; ``fluctuation``
    needs ``track_moments=True``; ``obs`` needs the Gram ``H`` (damped by ``percdamp``; computed in float32, float64
    for float64 weights or ``dtype``: :func:`solvers.groups.obs_group_costs`).
    """
    if method not in SCORES:
        raise ValueError(f"group_scores: unknown score {method!r}; choose one of: {', '.join(SCORES)}")
    if W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"group_scores: weight must be a 2-D floating tensor, got {tuple(W.shape)} {W.dtype}")
    check_groups(groups, W.shape[1], "group_scores")
    if method != "magnitude" and stats is None:
        raise ValueError(f"group_scores: score {method!r} needs calibration statistics")
    if stats is not None and stats.d != W.shape[1]:
        raise ValueError(f"group_scores: statistics have width {stats.d}, weight has {W.shape[1]} inputs")
    if method == "obs":
        assert stats is not None
        if stats.H is None or stats.n == 0:
            raise ValueError(
                "group_scores: score 'obs' needs the Gram matrix H (init_stats(..., gram=True)) and tokens"
            )
        return obs_group_costs(W, stats.H, groups, percdamp=percdamp, dtype=dtype) / stats.n
    per_col, how = _col_scores(method, W, stats)  # type: ignore[arg-type]
    return group_reduce(per_col, groups, how)


def standardize(scores: Tensor) -> Tensor:
    """``(s − mean(s)) / std(s)`` along the last dimension (FLAP's per-layer normaliser for global search).

    ``std`` is the sample standard deviation (``torch.std``, as FLAP); a constant row gives zeros.
    """
    s = scores.to(torch.promote_types(scores.dtype, torch.float32))
    centred = s - s.mean(dim=-1, keepdim=True)
    if s.shape[-1] < 2:
        return torch.zeros_like(s)
    std = s.std(dim=-1, keepdim=True)
    return torch.where(std > 0, centred / torch.where(std > 0, std, torch.ones_like(std)), torch.zeros_like(s))


def select_lowest(scores: Tensor, k_remove: int) -> Tensor:
    """Sorted ids of the groups kept after removing the ``k_remove`` lowest ``scores`` (ties: lower id removed)."""
    if scores.dim() != 1:
        raise ValueError(f"select_lowest: scores must be 1-D, got {tuple(scores.shape)}")
    if not 0 <= k_remove <= scores.numel():
        raise ValueError(f"select_lowest: k_remove = {k_remove} is outside [0, {scores.numel()}]")
    if bool(torch.isnan(scores).any()):
        raise ValueError("select_lowest: scores contain NaN")
    order = torch.sort(scores.cpu(), stable=True).indices
    return torch.sort(order[k_remove:]).values


def flap_bias_compensation(W: Tensor, mean_x: Tensor, removed_cols: Tensor) -> Tensor:
    """FLAP's bias ``b = W_{:,P}·x̄_P`` (``[d_out]``) to *add* after removing input columns ``P``.

    Then ``mean_t(W_S x_{t,S} + b) = W x̄``: the mean output over the calibration tokens is unchanged.
    Example: ``W = [[1, 2]]``, ``x̄ = [3, 4]``, ``P = [1]`` gives ``b = [8]``.
    """
    if mean_x.shape != (W.shape[1],):
        raise ValueError(
            f"flap_bias_compensation: mean input has shape {tuple(mean_x.shape)}, weight has {W.shape[1]} inputs"
        )
    P = removed_cols.long().to(W.device)
    dtype = torch.promote_types(W.dtype, torch.float32)
    b = W[:, P].to(dtype) @ mean_x.to(W.device, dtype)[P]
    return b.to(W.dtype)


def _tokens(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]).to(torch.float64)


def block_influence(x_in: Tensor, x_out: Tensor) -> float:
    """ShortGPT block influence ``BI = 1 − mean_t cos(x_in_t, x_out_t)`` over tokens (``[..., d]`` each).

    0 when the block leaves every hidden state's direction unchanged (a candidate for removal), up to 2.
    """
    if x_in.shape != x_out.shape:
        raise ValueError(f"block_influence: input {tuple(x_in.shape)} and output {tuple(x_out.shape)} differ in shape")
    cos = torch.nn.functional.cosine_similarity(_tokens(x_in), _tokens(x_out), dim=-1, eps=1e-12)
    return float(1.0 - cos.mean())


def output_change(y_ref: Tensor, y: Tensor) -> float:
    """Relative output change ``‖y − y_ref‖² / ‖y_ref‖²`` (FinerCut's criterion for removing a sublayer)."""
    if y_ref.shape != y.shape:
        raise ValueError(f"output_change: reference {tuple(y_ref.shape)} and output {tuple(y.shape)} differ in shape")
    ref = _tokens(y_ref)
    denom = float(ref.square().sum())
    return float((_tokens(y) - ref).square().sum()) / (denom if denom > 0 else 1.0)
