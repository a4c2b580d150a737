"""Unstructured and N:M masks from importance scores: magnitude and Wanda.

Convention everywhere: a mask is ``bool``, ``True`` = kept. Pruning removes the lowest scores; ties are broken
deterministically toward the lower index (stable sort), so the same inputs always give the same mask.
Counts are exact: ``round(sparsity · count)`` entries are pruned (halves round up).

Worked example (Wanda, one row): ``W = [[4, −1, 2, 3]]``, ``‖X_j‖₂ = [1, 5, 1, 1]`` give
``S = [4, 5, 2, 3]``; at 50% the two lowest (columns 2 and 3) are pruned: ``mask = [[T, T, F, F]]``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "PruneResult",
    "parse_pattern",
    "magnitude_prune",
    "wanda_prune",
    "wanda_scores",
    "nm_mask",
    "prune_lowest",
    "n_pruned",
    "check_inputs",
]

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass
class PruneResult:
    """Pruned ``weight`` (same shape and dtype as the input), ``mask`` (bool, True = kept), solver ``info``.

    ``weight[~mask] == 0`` exactly. ``info["sparsity"]`` is the achieved pruned fraction ``1 − mean(mask)``.
    """

    weight: Tensor
    mask: Tensor
    info: dict = field(default_factory=dict)


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """``None`` / ``"unstructured"`` -> ``None``; ``"n:m"`` -> ``(n, m)``: keep ``n`` of every ``m`` (``0 < n < m``)."""
    if pattern is None or pattern.strip().lower() == "unstructured":
        return None
    match = _PATTERN.match(pattern)
    if match is None:
        raise ValueError(f"sparsity pattern {pattern!r} is neither 'unstructured' nor 'N:M' (e.g. '2:4')")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"sparsity pattern {pattern!r}: need 0 < N < M (N kept of every M)")
    return n, m


def n_pruned(sparsity: float, count: int) -> int:
    """Number of entries to prune: ``round(sparsity · count)`` with halves rounded up."""
    return int(math.floor(sparsity * count + 0.5))


def check_inputs(W: Tensor, sparsity: float, where: str) -> None:
    """Validate a ``[d_out, d_in]`` floating, finite weight and a sparsity in ``[0, 1]``."""
    if W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"{where}: weight must be a 2-D floating tensor, got {tuple(W.shape)} {W.dtype}")
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"{where}: sparsity must lie in [0, 1], got {sparsity}")
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{where}: weight {tuple(W.shape)} contains NaN or inf")


def prune_lowest(scores: Tensor, k: int) -> Tensor:
    """Keep-mask that prunes the ``k`` lowest scores in each row of ``scores [r, c]`` (stable: lower index first).

    Selection, not a sort: the k-th smallest value per row is the threshold; everything below it is pruned, and of
    the entries equal to it the first ``k − #below`` by index (the same set as a stable sort's first ``k``)."""
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if k >= scores.shape[1]:
        return torch.zeros_like(scores, dtype=torch.bool)
    thr = torch.kthvalue(scores, k, dim=1, keepdim=True).values
    keep = scores > thr
    if bool(((~keep).sum(dim=1) == k).all()):  # no tie straddles the threshold (the usual case): done
        return keep
    below = scores < thr
    tie = scores == thr
    need = k - below.sum(dim=1, keepdim=True)
    return ~(below | (tie & (tie.cumsum(dim=1) <= need)))


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive inputs of each row (``"2:4"`` keeps 2 of 4: 50%).

    ``scores [d_out, d_in]`` with ``d_in % m == 0``; ties prune the lower index first.
    """
    if not 0 < n < m:
        raise ValueError(f"nm_mask: need 0 < n < m, got n={n}, m={m}")
    d_out, d_in = scores.shape
    if d_in % m != 0:
        raise ValueError(f"nm_mask: input width {d_in} is not a multiple of M={m} for an {n}:{m} pattern")
    groups = scores.reshape(d_out * (d_in // m), m)
    if m > _PAIRWISE_MAX_M:
        return prune_lowest(groups, m - n).reshape(d_out, d_in)
    return (_stable_ranks(groups) >= m - n).reshape(d_out, d_in)


_PAIRWISE_MAX_M = 8  # up to this group size, ranks by pairwise comparisons beat a selection over tiny rows (~3x)


def _stable_ranks(groups: Tensor) -> Tensor:
    """Position of every entry in its row's stable ascending order (``uint8``, rows of at most 255 entries):
    entry ``j`` is preceded by every ``i`` with ``s_i < s_j``, or ``s_i == s_j`` and ``i < j``."""
    m = groups.shape[1]
    rank = torch.zeros(groups.shape, dtype=torch.uint8, device=groups.device)
    for j in range(m):
        for i in range(m):
            if i != j:
                rank[:, j] += groups[:, i] <= groups[:, j] if i < j else groups[:, i] < groups[:, j]
    return rank


def _mask_from_scores(scores: Tensor, sparsity: float, nm: tuple[int, int] | None, per_row: bool) -> Tensor:
    if nm is not None:
        return nm_mask(scores, *nm)
    if per_row:
        return prune_lowest(scores, n_pruned(sparsity, scores.shape[1]))
    flat = scores.reshape(1, -1)
    return prune_lowest(flat, n_pruned(sparsity, flat.shape[1])).reshape(scores.shape)


def _result(W: Tensor, mask: Tensor, method: str, nm: tuple[int, int] | None) -> PruneResult:
    weight = W * mask.to(W.dtype)
    info = {
        "method": method,
        "pattern": "unstructured" if nm is None else f"{nm[0]}:{nm[1]}",
        "sparsity": 1.0 - mask.float().mean().item(),
    }
    return PruneResult(weight=weight, mask=mask, info=info)


def magnitude_prune(W: Tensor, sparsity: float, *, pattern: str | None = None, per_row: bool = False) -> PruneResult:
    """Prune the smallest ``|W_ij|``: one threshold over the whole layer (default), per output row, or N:M.

    With an N:M ``pattern`` the pattern fixes the sparsity (``1 − N/M``) and ``sparsity`` is ignored.
    """
    check_inputs(W, sparsity, "magnitude_prune")
    nm = parse_pattern(pattern)
    mask = _mask_from_scores(W.abs(), sparsity, nm, per_row)
    return _result(W, mask, "magnitude", nm)


def wanda_scores(W: Tensor, col_norm_sq: Tensor) -> Tensor:
    """Wanda importance ``S_ij = |W_ij| · ‖X_{:,j}‖₂`` (Sun et al. 2023), in float32 or float64."""
    if col_norm_sq.shape != (W.shape[1],):
        raise ValueError(f"wanda: column norms have shape {tuple(col_norm_sq.shape)}, weight has {W.shape[1]} inputs")
    dtype = torch.promote_types(torch.promote_types(W.dtype, col_norm_sq.dtype), torch.float32)
    norms = col_norm_sq.to(device=W.device, dtype=dtype).clamp_min(0).sqrt()
    return W.to(dtype).abs() * norms


def wanda_prune(W: Tensor, col_norm_sq: Tensor, sparsity: float, *, pattern: str | None = None) -> PruneResult:
    """Wanda: prune exactly ``round(sparsity · d_in)`` lowest ``|W_ij|·‖X_j‖₂`` in each output row (or N:M).

    ``col_norm_sq [d_in]`` is ``‖X_{:,j}‖²`` (see :func:`solvers.stats.col_norm_sq`); with an N:M ``pattern``
    the pattern fixes the sparsity and ``sparsity`` is ignored.
    """
    check_inputs(W, sparsity, "wanda_prune")
    nm = parse_pattern(pattern)
    mask = _mask_from_scores(wanda_scores(W, col_norm_sq), sparsity, nm, per_row=True)
    return _result(W, mask, "wanda", nm)
