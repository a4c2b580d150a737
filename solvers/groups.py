"""Groups of input columns and the exact least-squares primitives on them: closed form and OBS-group costs.

Notation (DESIGN.md §4): consumer linear ``W [d_out, d_in]``, calibration inputs ``X [n, d_in]``, ``H = XᵀX`` (a sum
over tokens), damped ``H_λ = H + λ·mean(diag H)·I`` (``λ = percdamp``, :func:`solvers.gram.damped_gram`). A *group*
``G`` is a set of input columns of ``W``: a KV group of ``o_proj`` (the ``heads_per_group·head_dim`` columns of its
query heads) or one MLP channel of ``down_proj`` (one column). Removing ``G`` removes those columns (the engine also
drops the producing rows of q/k/v or gate/up). ``S`` is the kept column set, ``P`` the removed one. Groups are given
as a list of index tensors; a group id is its position in that list. Columns in no group are always kept.

- Closed form: ``W_S = W·H_{:,S}·(H_{S,S})⁻¹`` is the exact least-squares solution of
  ``min ‖W Xᵀ − W_S X_Sᵀ‖_F²``; its error is ``tr(W H Wᵀ) − tr(W H_{:,S} H_{S,S}⁻¹ H_{S,:} Wᵀ)``. With damping,
  ``W_S = W·(H_λ)_{:,S}·((H_λ)_{S,S})⁻¹`` is the ridge solution pulled toward the original ``W_{:,S}``.
- OBS-group cost (ZipLM, Kurtic et al. 2023): the exact error increase of removing ``G`` with optimal
  reconstruction of the rest is ``tr(W_{:,G} ([H⁻¹]_{GG})⁻¹ W_{:,G}ᵀ)``.

Everything here is used by the scores (:mod:`solvers.scores`), greedy OBS and swap search (:mod:`solvers.obs`),
ADMM (:mod:`solvers.admm`) and the dispatcher (:mod:`solvers.group_prune`); this module imports none of them.

Worked example: ``X = [[1, 1], [1, −1], [1, 1]]`` gives ``H = [[3, 1], [1, 3]]``. For ``W = [[1, 1]]`` and
``S = {0}``: ``W_S = (3 + 1)/3 = 4/3``, error ``tr(WHWᵀ) − 4²/3 = 8 − 16/3 = 8/3``. OBS: ``H⁻¹ = [[3, −1], [−1, 3]]/8``,
cost of removing column 1 ``= 1² / (3/8) = 8/3`` (equal, as it must be).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from solvers.gram import (
    DampedGram,
    check_weight_gram,
    cholesky_block,
    cholesky_inplace,
    frob_dot,
    solve_cholesky_,
    work_dtype,
)

__all__ = [
    "groups_contiguous",
    "check_groups",
    "check_count",
    "group_columns",
    "group_ids",
    "as_index",
    "solve_kept",
    "closed_form_reconstruct",
    "closed_form_with_bias",
    "augmented_gram",
    "kept_error",
    "support_error",
    "GroupBuckets",
    "bucket_costs",
    "obs_group_costs",
]

# ---------------------------------------------------------------- groups


def groups_contiguous(d_in: int, group_size: int) -> list[Tensor]:
    """``d_in / group_size`` groups of consecutive columns: ``groups_contiguous(6, 2) = [[0,1], [2,3], [4,5]]``.

    For ``o_proj`` with GQA use ``group_size = heads_per_group · head_dim`` (one KV group per group); for
    ``down_proj`` channels ``group_size = 1``.
    """
    if group_size <= 0 or d_in <= 0 or d_in % group_size != 0:
        raise ValueError(f"groups_contiguous: input width {d_in} is not a positive multiple of group size {group_size}")
    return list(torch.arange(d_in).reshape(d_in // group_size, group_size).unbind(0))


def check_groups(groups: list[Tensor], d_in: int, where: str) -> None:
    """Groups must be non-empty 1-D integer index tensors in ``[0, d_in)`` that do not overlap."""
    if not groups:
        raise ValueError(f"{where}: the list of groups is empty")
    seen = torch.zeros(d_in, dtype=torch.bool)
    for i, g in enumerate(groups):
        if g.dim() != 1 or g.numel() == 0 or g.dtype.is_floating_point or g.dtype == torch.bool:
            raise ValueError(
                f"{where}: group {i} must be a non-empty 1-D integer index tensor, got {tuple(g.shape)} {g.dtype}"
            )
        g = g.cpu()
        if int(g.min()) < 0 or int(g.max()) >= d_in:
            raise ValueError(f"{where}: group {i} has column indices outside [0, {d_in})")
        if bool(seen[g].any()) or g.unique().numel() != g.numel():
            raise ValueError(f"{where}: group {i} overlaps another group or repeats a column")
        seen[g] = True


def group_columns(groups: list[Tensor], ids: Tensor, d_in: int | None = None) -> Tensor:
    """Sorted columns of the groups ``ids``, plus every column in no group when ``d_in`` is given (kept columns)."""
    cols = [groups[i] for i in torch.as_tensor(ids).flatten().tolist()]
    if d_in is not None:
        grouped = torch.zeros(d_in, dtype=torch.bool)
        grouped[torch.cat(groups).cpu().long()] = True
        cols.append(torch.nonzero(~grouped).flatten())
    if not cols:
        return torch.zeros(0, dtype=torch.long)
    return torch.sort(torch.cat([c.cpu().long() for c in cols])).values


def group_ids(groups: list[Tensor], d_in: int, device: torch.device | str = "cpu") -> Tensor:
    """Group id per column (``[d_in]`` int64); ``len(groups)`` for columns in no group.

    Example: ``group_ids([[2], [0, 1]], 4) = [1, 1, 0, 2]``."""
    gid = torch.full((d_in,), len(groups), dtype=torch.long, device=device)
    for i, g in enumerate(groups):
        gid[g.to(device)] = i
    return gid


def check_count(k: int, n_groups: int, what: str, where: str) -> None:
    """``0 <= k <= n_groups`` (a number of groups to keep or remove)."""
    if not 0 <= k <= n_groups:
        raise ValueError(f"{where}: {what} = {k} is outside [0, {n_groups}] (number of groups)")


def as_index(keep: Tensor, d_in: int, where: str) -> Tensor:
    """``keep`` as a flat int64 index of distinct columns in ``[0, d_in)``."""
    keep = keep.long().flatten()
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= d_in or keep.unique().numel() != keep.numel()):
        raise ValueError(f"{where}: kept columns must be distinct indices in [0, {d_in})")
    return keep


# ---------------------------------------------------------------- closed form


def solve_kept(MS: Tensor, G: DampedGram, keep: Tensor, where: str) -> Tensor:
    """``MS·((H_λ)_{S,S})⁻¹`` (``[d_out, |S|]``, written over ``MS``) for ``MS = (W·H_λ)_{:,S}``: the closed form
    ``W·(H_λ)_{:,S}·((H_λ)_{S,S})⁻¹``. One ``|S|²`` block, factorised in place, and two triangular solves in
    ``MS``'s storage (no checks: the public entry points validate)."""
    if keep.numel() == 0:
        return MS.new_zeros(MS.shape[0], 0)
    return solve_cholesky_(cholesky_block(G, keep, where), MS.T).T


def closed_form_reconstruct(
    W: Tensor, H: Tensor, keep: Tensor, *, percdamp: float = 0.0, dtype: torch.dtype | None = None
) -> Tensor:
    """Optimal kept weights ``W_S = W·H_{:,S}·(H_{S,S})⁻¹`` (``[d_out, |S|]``, columns in the order of ``keep``).

    Exact least squares of ``min_{W_S} ‖W Xᵀ − W_S X_Sᵀ‖_F²`` (with ``percdamp > 0``: ``H`` replaced by ``H_λ``, the
    ridge solution toward ``W_{:,S}``). Dead inputs (``H_jj = 0``) keep their weights. Solved by Cholesky in
    float32 (float64 for float64 weights, or ``dtype``), returned in ``W.dtype``; memory: ``W·H`` and one
    ``|S|²`` block, no copy of ``H``.

    Example: ``W = [[1, 1]]``, ``H = [[3, 1], [1, 3]]``, ``keep = [0]`` gives ``[[4/3]]``.
    """
    check_weight_gram(W, H, "closed_form_reconstruct")
    keep = as_index(keep, W.shape[1], "closed_form_reconstruct").to(W.device)
    G = DampedGram.of(H, percdamp, dtype=work_dtype(W, dtype), device=W.device)
    MS = G.left(W.to(G.dtype))[:, keep]  # the full W·H_λ is freed here
    return solve_kept(MS, G, keep, "closed_form_reconstruct").to(W.dtype)


def augmented_gram(H: Tensor, x_sum: Tensor, n: int) -> Tensor:
    """Gram of ``[X, 1]``: ``[[H, Σx], [Σxᵀ, n]]`` (``[d_in+1, d_in+1]``), for fitting a bias with the weights."""
    if x_sum.shape != (H.shape[0],):
        raise ValueError(f"augmented_gram: input sum has shape {tuple(x_sum.shape)}, Gram has {H.shape[0]} inputs")
    if n <= 0:
        raise ValueError(f"augmented_gram: token count must be positive, got {n}")
    s = x_sum.to(H)
    top = torch.cat([H, s[:, None]], dim=1)
    bottom = torch.cat([s, s.new_tensor([float(n)])])[None, :]
    return torch.cat([top, bottom], dim=0)


def closed_form_with_bias(
    W: Tensor,
    H: Tensor,
    x_sum: Tensor,
    n: int,
    keep: Tensor,
    *,
    percdamp: float = 0.0,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Kept weights and a bias fitted together: ``min_{W_S, b} Σ_t ‖W x_t − W_S x_{t,S} − b‖²``.

    Closed form on the augmented Gram ``H̃ = [[H_λ, Σx], [Σxᵀ, n]]`` with ``W̃ = [W, 0]`` and ``S̃ = S ∪ {d_in}``:
    ``[W_S, b] = W̃ H̃_{:,S̃} (H̃_{S̃,S̃})⁻¹``. Returns ``(W_S [d_out, |S|], b [d_out])``; ``b`` is to be *added* to
    the layer's existing bias (which is unchanged by the fit). The mean output over the calibration tokens is
    then exact (the normal equation of ``b``): FLAP's bias compensation with reconstruction. Only the kept block of
    ``H̃`` is formed (``(|S|+1)²``), in the precision of :func:`closed_form_reconstruct`.
    """
    check_weight_gram(W, H, "closed_form_with_bias")
    d_in = W.shape[1]
    if x_sum.shape != (d_in,):
        raise ValueError(f"closed_form_with_bias: input sum has shape {tuple(x_sum.shape)}, Gram has {d_in} inputs")
    if n <= 0:
        raise ValueError(f"closed_form_with_bias: token count must be positive, got {n}")
    keep = as_index(keep, d_in, "closed_form_with_bias").to(W.device)
    G = DampedGram.of(H, percdamp, dtype=work_dtype(W, dtype), device=W.device)
    Wf, s = W.to(G.dtype), x_sum.to(W.device, G.dtype)
    k = keep.numel()

    def kept_block() -> Tensor:  # H̃_{S̃,S̃}
        A = torch.empty(k + 1, k + 1, dtype=G.dtype, device=W.device)
        A[:k, :k] = G.block(keep)
        A[:k, k] = A[k, :k] = s[keep]
        A[k, k] = float(n)
        return A

    rhs = torch.cat([G.left(Wf)[:, keep], (Wf @ s)[:, None]], dim=1)  # W̃ H̃_{:,S̃}
    sol = solve_cholesky_(cholesky_inplace(kept_block, "closed_form_with_bias"), rhs.T).T
    return sol[:, :-1].to(W.dtype), sol[:, -1].to(W.dtype)


def kept_error(M: Tensor, total: float, G: DampedGram, S: Tensor, where: str) -> tuple[float, Tensor]:
    """``E(S) = tr(W H Wᵀ) − ‖L⁻¹ (W H)_{:,S}ᵀ‖²`` with ``L Lᵀ = (H_λ)_SS``, from ``M = W H_λ`` and
    ``total = tr(W H_λ Wᵀ)``.

    Returns ``(E(S), L)``; for many supports of one layer, compute ``M`` and ``total`` once.
    """
    if S.numel() == 0:
        return total, M.new_zeros(0, 0)
    L = cholesky_block(G, S, where)
    Y = M[:, S].T  # a copy, column-major: solved in place
    fit = float(torch.linalg.vector_norm(torch.linalg.solve_triangular(L, Y, upper=False, out=Y))) ** 2
    return max(total - fit, 0.0), L


def support_error(
    W: Tensor, H: Tensor, keep: Tensor, *, percdamp: float = 0.0, dtype: torch.dtype | None = None
) -> float:
    """Least-squares error of the best reconstruction on ``keep``: ``tr(W H Wᵀ) − tr(W H_{:,S} H_{S,S}⁻¹ H_{S,:} Wᵀ)``.

    Equals ``tr(ΔW H ΔWᵀ)`` for ``ΔW`` = the closed form minus ``W`` (a sum over tokens, as ``H``).
    """
    check_weight_gram(W, H, "support_error")
    keep = as_index(keep, W.shape[1], "support_error").to(W.device)
    G = DampedGram.of(H, percdamp, dtype=work_dtype(W, dtype), device=W.device)
    Wf = W.to(G.dtype).masked_fill(G.dead[None, :], 0.0)  # dead inputs contribute nothing to the outputs
    M = G.left(Wf)
    return kept_error(M, frob_dot(M, Wf), G, keep, "support_error")[0]


# ---------------------------------------------------------------- OBS-group costs (ZipLM)


@dataclass
class GroupBuckets:
    """Groups of equal size stacked for batched block solves: per size, group ids ``[m]`` and columns ``[m, s]``."""

    items: list[tuple[Tensor, Tensor]]

    @classmethod
    def of(cls, groups: list[Tensor], device: torch.device) -> GroupBuckets:
        by_size: dict[int, list[int]] = {}
        for i, g in enumerate(groups):
            by_size.setdefault(g.numel(), []).append(i)
        items = [
            (torch.tensor(ids, device=device), torch.stack([groups[i].long() for i in ids]).to(device))
            for ids in by_size.values()
        ]
        return cls(items)


def bucket_costs(
    W: Tensor, Hinv: Tensor, buckets: GroupBuckets, removed: Tensor, update: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """``tr(W_G ([H⁻¹]_GG)⁻¹ W_Gᵀ)`` per group; ``inf`` for removed groups.

    ``update = (A, B)`` reads the blocks of ``H⁻¹ + A B Aᵀ`` instead (a low-rank update, never formed in full).
    """
    costs = torch.full((removed.numel(),), math.inf, dtype=W.dtype, device=W.device)
    for ids, idx in buckets.items:
        if idx.shape[1] == 1 and update is None:  # single columns: w² / [H⁻¹]_jj, no batched factorisations
            j = idx[:, 0]
            d = Hinv[j, j]
            ok = ~removed[ids] & (d > 0)
            c = W[:, j].square().sum(dim=0) / torch.where(ok, d, torch.ones_like(d))
            costs[ids] = torch.where(ok, c, torch.full_like(c, math.inf))
            continue
        Bk = Hinv[idx[:, :, None], idx[:, None, :]]  # [m, s, s]
        if update is not None:
            Ai = update[0][idx]  # [m, s, r]
            Bk = Bk + Ai @ update[1] @ Ai.transpose(1, 2)
        gone = removed[ids]
        Bk[gone] = torch.eye(idx.shape[1], dtype=Bk.dtype, device=Bk.device)
        L, info = torch.linalg.cholesky_ex(Bk)
        WG = W[:, idx].permute(1, 2, 0)  # [m, s, d_out]
        c = (WG * torch.cholesky_solve(WG, L)).sum(dim=(1, 2))
        bad = gone | (info != 0)
        costs[ids] = torch.where(bad, torch.full_like(c, math.inf), c)
    return costs


def obs_group_costs(
    W: Tensor, H: Tensor, groups: list[Tensor], *, percdamp: float = 0.0, dtype: torch.dtype | None = None
) -> Tensor:
    """Single-shot OBS-group costs ``c_G = tr(W_{:,G} ([H_λ⁻¹]_{GG})⁻¹ W_{:,G}ᵀ)`` (``[n_groups]``, float64).

    ``c_G`` is exactly the increase of ``tr(ΔW H ΔWᵀ)`` when group ``G`` alone is removed and all other columns are
    reconstructed optimally (closed form). Same units as ``H`` (a sum over tokens). Computed in float32 (float64
    for float64 weights, or ``dtype``) from one ``d×d`` inverse made in place.
    """
    check_weight_gram(W, H, "obs_group_costs")
    check_groups(groups, W.shape[1], "obs_group_costs")
    G = DampedGram.of(H, percdamp, dtype=work_dtype(W, dtype), device=W.device)
    Wf = W.to(G.dtype).masked_fill(G.dead[None, :], 0.0)
    removed = torch.zeros(len(groups), dtype=torch.bool, device=W.device)
    Hinv = G.inverse("obs_group_costs")
    return bucket_costs(Wf, Hinv, GroupBuckets.of(groups, W.device), removed).to(torch.float64)
