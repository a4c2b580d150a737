"""ADMM for group-sparse reconstruction of one linear layer (StructPrune-style; Boža 2024 for the unstructured case).

Problem (DESIGN.md §4 notation): ``min_W ½ tr((W − W₀) H (W − W₀)ᵀ) = ½‖(W − W₀)Xᵀ‖²`` subject to at most ``k`` groups of
input columns being nonzero. Split ``W = Z`` with ``Z`` in the group-sparse set and iterate (scaled dual ``U``):

    W ← (W₀H + ρ(Z − U)) (H + ρI)⁻¹        (ridge step)
    Z ← Π_k(W + U)                         (keep the k groups of largest Frobenius norm, zero the rest)
    U ← U + W − Z

``ρ`` grows geometrically (``ρ ← γρ``, ``U ← U/γ`` so that the unscaled dual is kept) which drives ``W`` onto the
support; the run stops once the support has stayed the same for ``patience`` iterations with a small primal residual,
and finishes with the exact closed form on the final support (:func:`solvers.groups.closed_form_reconstruct`).

Two choices, and why:
- The iterations run in column-normalised coordinates ``W̃ = W D``, ``H̃ = D⁻¹ H D⁻¹`` with ``D = diag(H)^½`` (unit
  diagonal). The constraint (which groups are nonzero) is unchanged by this rescaling, ``ρ`` becomes dimensionless,
  and the projection ranks groups by ``‖W̃_G‖ = ‖W_G D_G‖`` (activation-aware, like Wanda) instead of raw weights.
- ``ρ`` changes every iteration, so instead of one Cholesky of ``H̃ + ρI`` per ``ρ`` a single eigendecomposition
  ``H̃ = QΛQᵀ`` gives ``(H̃ + ρI)⁻¹ = Q diag(1/(Λ + ρ)) Qᵀ`` for every ``ρ`` at the price of two matmuls per step.

Plain ADMM stops at a fixed point that is often not the best support (on 10-group test problems it is within 1% of
the brute-force optimum in only ~75% of cases). Two cheap finishing steps fix most of that: the best support seen
along the path (exact least-squares error; the start ``init_keep`` included, so the result is never worse than the
closed form on it), then single-swap local search (:func:`solvers.obs.swap_refine`); together ~98%.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from solvers.gram import DampedGram, check_weight_gram, frob_dot, work_dtype
from solvers.groups import check_count, check_groups, closed_form_reconstruct, group_columns, group_ids, kept_error
from solvers.obs import swap_refine

__all__ = ["admm_group_prune"]

logger = logging.getLogger(__name__)


def _mask_groups(V: Tensor, keep: Tensor, gid: Tensor, n_groups: int) -> Tensor:
    """``V`` with the columns of every group not in ``keep`` set to zero (ungrouped columns stay)."""
    col_kept = torch.zeros(n_groups + 1, dtype=torch.bool, device=V.device)
    col_kept[keep.to(V.device)] = True
    col_kept[n_groups] = True
    return V * col_kept[gid].to(V.dtype)[None, :]


def _project(V: Tensor, gid: Tensor, n_groups: int, k_keep: int) -> tuple[Tensor, Tensor]:
    """``Π_k``: keep the ``k_keep`` groups of largest ``‖V_G‖_F`` (ties: lower id); returns ``(Z, kept ids sorted)``."""
    norms = torch.zeros(n_groups + 1, dtype=V.dtype, device=V.device).index_add_(0, gid, V.square().sum(dim=0))
    order = torch.sort(-norms[:n_groups], stable=True).indices
    keep = torch.sort(order[:k_keep]).values
    return _mask_groups(V, keep, gid, n_groups), keep


def _initial_keep(init_keep: Tensor, n_groups: int, k_keep: int, device: torch.device) -> Tensor:
    keep = torch.sort(init_keep.long().flatten().to(device)).values
    if keep.numel() != k_keep:
        raise ValueError(f"admm_group_prune: init_keep has {keep.numel()} groups, k_keep is {k_keep}")
    if keep.numel() and (int(keep[0]) < 0 or int(keep[-1]) >= n_groups or keep.unique().numel() != keep.numel()):
        raise ValueError(f"admm_group_prune: init_keep must hold distinct group ids in [0, {n_groups})")
    return keep


@dataclass(frozen=True)
class _Schedule:
    """Penalty schedule and stopping rule of the iterations."""

    rho0: float
    rho_growth: float
    iters: int
    patience: int
    tol: float

    def __post_init__(self) -> None:
        if self.rho0 <= 0 or self.rho_growth < 1.0 or self.iters < 1 or self.patience < 1 or self.tol < 0:
            raise ValueError(
                f"admm_group_prune: need rho0 > 0, rho_growth >= 1, iters >= 1, patience >= 1, tol >= 0; got {self}"
            )


def admm_group_prune(
    W: Tensor,
    H: Tensor,
    groups: list[Tensor],
    k_keep: int,
    *,
    rho0: float = 0.01,
    rho_growth: float = 1.1,
    iters: int = 200,
    patience: int = 10,
    tol: float = 1e-3,
    percdamp: float = 0.01,
    init_keep: Tensor | None = None,
    best_of_path: bool = True,
    max_swaps: int = 16,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Keep ``k_keep`` groups of input columns of ``W [d_out, d_in]`` chosen by ADMM (see the module docstring).

    ``H`` is the Gram ``XᵀX`` (damped by ``percdamp`` for the iterations and the final closed form); ``init_keep``
    (sorted group ids) starts ``Z`` on that support (default: the ``k_keep`` groups of largest ``‖W_G D_G‖``).
    Stops after ``iters`` iterations, or once the support has been stable for ``patience`` iterations and
    ``‖W̃ − Z‖ ≤ tol·‖W̃‖``. ``best_of_path`` picks the best support visited rather than the last; ``max_swaps``
    rounds of :func:`solvers.obs.swap_refine` follow (``0``: none). Everything runs in float32 (float64 for
    float64 weights, or ``dtype``): the iterations only pick the support, whose exact errors then decide (best of
    path, swaps); memory: the normalised Gram and its eigendecomposition (~3·d² in ``dtype``, LAPACK's ``syevd``
    workspace included). Returns ``(keep_groups, W_new)``: sorted kept ids and the full-width ``[d_out, d_in]``
    closed-form weight on the kept columns (removed columns exactly zero), in ``W.dtype``.
    """
    check_weight_gram(W, H, "admm_group_prune")
    check_groups(groups, W.shape[1], "admm_group_prune")
    check_count(k_keep, len(groups), "k_keep", "admm_group_prune")
    schedule = _Schedule(rho0, rho_growth, iters, patience, tol)
    G = DampedGram.of(H, percdamp, dtype=work_dtype(W, dtype), device=W.device)
    keep, seen = _admm_support(W, G, groups, k_keep, schedule, init_keep)
    logger.debug("admm_group_prune: %d distinct supports visited", len(seen))
    if best_of_path:
        keep = _best_support(W, G, groups, seen)
    keep = swap_refine(W, H, groups, keep, max_swaps=max_swaps, percdamp=percdamp, dtype=G.dtype)
    cols = group_columns(groups, keep, W.shape[1]).to(W.device)
    W_new = torch.zeros_like(W)
    W_new[:, cols] = closed_form_reconstruct(W, H, cols, percdamp=percdamp, dtype=G.dtype)
    return keep.cpu(), W_new


def _admm_support(
    W: Tensor, G: DampedGram, groups: list[Tensor], k_keep: int, sch: _Schedule, init_keep: Tensor | None
) -> tuple[Tensor, set[tuple[int, ...]]]:
    """The iterations; returns the last support and every support visited (sorted id tuples)."""
    n_groups, d_in = len(groups), W.shape[1]
    N = G.full()
    Dg = N.diagonal().sqrt()
    N.div_(Dg[:, None]).div_(Dg[None, :])  # unit diagonal, in place
    evals, Q = torch.linalg.eigh(N)
    del N
    W0 = (W.to(G.dtype) * Dg).masked_fill(G.dead[None, :], 0.0)
    PQ = W0 @ Q * evals  # W̃₀ H̃ Q = W̃₀ Q Λ
    gid = group_ids(groups, d_in, W.device)
    if init_keep is None:
        Z, keep = _project(W0, gid, n_groups, k_keep)
    else:
        keep = _initial_keep(init_keep, n_groups, k_keep, W.device)
        Z = _mask_groups(W0, keep, gid, n_groups)
    seen = {tuple(keep.tolist())}
    U = torch.zeros_like(W0)
    rho, stable = sch.rho0, 0
    for it in range(sch.iters):
        Wt = ((PQ + rho * (Z - U) @ Q) / (evals + rho)) @ Q.T
        Z, new_keep = _project(Wt + U, gid, n_groups, k_keep)
        U += Wt - Z
        stable = stable + 1 if torch.equal(new_keep, keep) else 0
        keep = new_keep
        seen.add(tuple(keep.tolist()))
        residual = float((Wt - Z).norm()) / max(float(Wt.norm()), 1e-30)
        if stable >= sch.patience and residual <= sch.tol:
            logger.debug("admm_group_prune: converged after %d iterations (rho %.3g)", it + 1, rho)
            break
        rho *= sch.rho_growth
        U /= sch.rho_growth
    return keep, seen


def _best_support(W: Tensor, G: DampedGram, groups: list[Tensor], seen: set[tuple[int, ...]]) -> Tensor:
    """The visited support of least exact least-squares error (ties: first in sorted order)."""
    Wf = W.to(G.dtype).masked_fill(G.dead[None, :], 0.0)
    M = G.left(Wf)
    total = frob_dot(M, Wf)
    best, best_err = None, float("inf")
    for cand in sorted(seen):
        ids = torch.tensor(cand, dtype=torch.long)
        err = kept_error(M, total, G, group_columns(groups, ids, W.shape[1]).to(W.device), "admm_group_prune")[0]
        if err < best_err:
            best, best_err = ids, err
    assert best is not None
    return best
