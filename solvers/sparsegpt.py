"""SparseGPT (Frantar & Alistarh 2023): OBS pruning with lazy block updates, as a pure function.

Follows ``fasterprune`` of IST-DASLab/sparsegpt. With ``H = XᵀX + λ·mean(diag H)·I`` and ``U`` the upper Cholesky
factor of ``H⁻¹`` (``H⁻¹ = UᵀU``), columns are processed left to right; for column ``i`` with kept/pruned values
``q`` (pruned entries set to 0):

    err = (w − q) / U_ii,     W_{:, i:} −= err · U_{i, i:}        (optimal update of the not-yet-processed columns)
    loss += Σ_rows err²                                           (= exact increase of tr(ΔW H ΔWᵀ))

The update to columns beyond the current block of ``blocksize`` columns is deferred and applied once per block
(``W_{:, i2:} −= Err · U_{i1:i2, i2:}``), which is algebraically identical to the column-by-column update.

Mask selection (scores ``w² / U_jj²`` on the current, already updated weights):
- unstructured: per block, over all rows and the block's columns at once, prune exactly ``k_b`` lowest scores
  where ``k_b = round(s·d_out·i2) − round(s·d_out·i1)``; the layer total is therefore exactly
  ``round(s·d_out·d_in)`` (the reference takes a quantile per block, pruning ``⌊s·numel⌋+1`` plus ties).
  Rows may end with different sparsities, as in the reference.
- N:M: at the first column of each group of ``M``, keep the ``N`` largest scores per row (exact N:M).

Worked 1×2 example: ``W = [[1, 2]]``, ``H = I``, no damping: ``U = I``, scores ``[1, 4]``; at 50% column 0 is
pruned, ``err = 1``, column 1 gets ``−1·U_01 = 0``: result ``[[0, 2]]``, loss ``1``.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from solvers.masks import PruneResult, check_inputs, n_pruned, nm_mask, parse_pattern, prune_lowest

__all__ = ["sparsegpt_prune", "sparsegpt_prune_many", "inverse_hessian_cholesky"]

logger = logging.getLogger(__name__)

_MAX_RETRIES = 3


def inverse_hessian_cholesky(H: Tensor, percdamp: float, *, retries: int = _MAX_RETRIES) -> tuple[Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + λ·mean(diag H)·I)⁻¹``; returns ``(U, λ)`` with the damping used.

    ``H`` is modified in place (damped). If a factorisation fails, ``λ`` grows tenfold (from at least 1e-3),
    up to ``retries`` times, with a warning each time; after that a ``RuntimeError`` is raised.
    """
    mean_diag = H.diagonal().mean()
    applied = 0.0
    for attempt in range(retries + 1):
        damp = percdamp if attempt == 0 else max(percdamp, 1e-3) * 10.0**attempt
        H.diagonal().add_((damp - applied) * mean_diag)
        applied = damp
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U, damp
        if attempt < retries:
            logger.warning(
                "sparsegpt: Cholesky of the %dx%d Hessian failed with damping %.3g; retrying with %.3g",
                H.shape[0],
                H.shape[0],
                damp,
                max(percdamp, 1e-3) * 10.0 ** (attempt + 1),
            )
    raise RuntimeError(
        f"sparsegpt: Cholesky of the {H.shape[0]}x{H.shape[0]} Hessian failed even with "
        f"damping {applied:.3g}·mean(diag H); check the calibration statistics"
    )


_SUB = 16  # columns solved one by one between matrix-matrix updates inside a block


def _prune_block(
    W1: Tensor, U1: Tensor, mask1: Tensor, segments: list[tuple[int, int, int]], nm: tuple[int, int] | None
) -> tuple[Tensor, Tensor]:
    """OBS on one block in place: ``W1 [r, b]`` weights, ``U1 [b, b]`` its Cholesky block, ``mask1`` filled.

    ``segments``: ``(row_start, row_stop, k)`` per stacked matrix, ``k`` the number to prune in its part of the
    block (unstructured only; each matrix selects among its own rows, as if solved alone).
    Returns ``(Err1 [r, b], loss)``.
    """
    d = U1.diagonal()
    if nm is None:
        scores = W1.square() / d.square()
        for r0, r1, k in segments:
            mask1[r0:r1] = prune_lowest(scores[r0:r1].reshape(1, -1), k).reshape(r1 - r0, -1)
    Err1 = _column_updates(W1, U1, mask1, d, nm)
    return Err1, Err1.square().sum()


def _column_updates(W1: Tensor, U1: Tensor, mask1: Tensor, d: Tensor, nm: tuple[int, int] | None) -> Tensor:
    """The column-by-column OBS recurrence of one block, ``err_i = (w_i − q_i)/d_i``, ``W_{:, i+1:} −= err_i ·
    U_{i, i+1:}``, on the transposed block (each column a contiguous row), in sub-blocks of `_SUB` columns (of ``M``
    for N:M, whose mask is chosen at the first column of each group from the weights updated so far): inside a
    sub-block the rank-1 updates touch only its own columns, and the rest of the block gets one matrix-matrix
    update per sub-block (the same sums, grouped). Fills `mask1` for N:M; writes ``q`` into `W1`; returns Err."""
    WT = W1.T.contiguous()  # [b, r]
    ET = torch.empty_like(WT)
    b = WT.shape[0]
    step = nm[1] if nm is not None else _SUB
    pruned = None if nm is not None else (~mask1).T.to(WT.dtype) / d[:, None]  # [b, r]: 1/d_i where pruned
    for j1 in range(0, b, step):
        j2 = min(j1 + step, b)
        if nm is not None:
            keep = nm_mask((WT[j1:j2].square() / d[j1:j2, None].square()).T, *nm)  # [r, M]
            mask1[:, j1:j2] = keep
            part = (~keep).T.to(WT.dtype) / d[j1:j2, None]
        else:
            assert pruned is not None
            part = pruned[j1:j2]
        for i in range(j1, j2):
            torch.mul(WT[i], part[i - j1], out=ET[i])  # err_i (zero where kept)
            if i + 1 < j2:
                WT[i + 1 : j2].addr_(U1[i, i + 1 : j2], ET[i], alpha=-1.0)
        if j2 < b:
            WT[j2:].addmm_(U1[j1:j2, j2:].T, ET[j1:j2], alpha=-1.0)
    W1.copy_(torch.where(mask1, WT.T, torch.zeros((), dtype=WT.dtype, device=WT.device)))
    return ET.T


def _validate(W: Tensor, H: Tensor, sparsity: float, nm: tuple[int, int] | None, blocksize: int) -> None:
    check_inputs(W, sparsity, "sparsegpt_prune")
    d_in = W.shape[1]
    if H.shape != (d_in, d_in):
        raise ValueError(f"sparsegpt_prune: Hessian shape {tuple(H.shape)} does not match weight inputs {d_in}")
    if not bool(torch.isfinite(H).all()):
        raise ValueError(f"sparsegpt_prune: Hessian {tuple(H.shape)} contains NaN or inf")
    if blocksize <= 0:
        raise ValueError(f"sparsegpt_prune: blocksize must be positive, got {blocksize}")
    if nm is not None and (blocksize % nm[1] != 0 or d_in % nm[1] != 0):
        raise ValueError(
            f"sparsegpt_prune: blocksize {blocksize} and input width {d_in} must be multiples of "
            f"M={nm[1]} for an {nm[0]}:{nm[1]} pattern"
        )


def sparsegpt_prune(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    *,
    pattern: str | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    n_tokens: int | None = None,
) -> PruneResult:
    """Prune ``W [d_out, d_in]`` given ``H = XᵀX [d_in, d_in]`` (the sum over tokens) by SparseGPT.

    Dead inputs (``H_jj == 0``) get ``W_{:,j} = 0`` and ``H_jj = 1``. Computed in float32 (float64 when ``W`` is
    float64) and cast back to ``W.dtype``. ``n_tokens`` divides ``H`` first (same solution, better float range;
    then ``info["loss"]`` is per token). With an N:M ``pattern`` the pattern fixes the sparsity.

    The returned ``mask`` is the pruning decision: ``weight[~mask] == 0`` exactly; kept entries of dead inputs
    are zero too. ``info``: ``sparsity`` (achieved), ``loss`` (``tr(ΔW H_damped ΔWᵀ)``, OBS sum), ``damp``.
    """
    return sparsegpt_prune_many(
        [W], H, sparsity, pattern=pattern, blocksize=blocksize, percdamp=percdamp, n_tokens=n_tokens
    )[0]


def sparsegpt_prune_many(
    Ws: list[Tensor],
    H: Tensor,
    sparsity: float,
    *,
    pattern: str | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    n_tokens: int | None = None,
) -> list[PruneResult]:
    """`sparsegpt_prune` of several matrices that read the same input (q/k/v; gate/up): identical results to
    solving each alone, since OBS updates are row-independent given ``H`` and each matrix selects its mask among
    its own rows, but with one Cholesky factorisation and one column loop over the stacked rows."""
    nm = parse_pattern(pattern)
    for W in Ws:
        _validate(W, H, sparsity, nm, blocksize)
    info: dict = {"method": "sparsegpt", "pattern": "unstructured" if nm is None else f"{nm[0]}:{nm[1]}"}
    d_in = H.shape[0]
    if nm is None and all(n_pruned(sparsity, W.numel()) == 0 for W in Ws):
        return [
            PruneResult(W.clone(), torch.ones_like(W, dtype=torch.bool), {**info, "sparsity": 0.0, "loss": 0.0})
            for W in Ws
        ]
    dtype = torch.float64 if any(W.dtype == torch.float64 for W in Ws) else torch.float32
    device = Ws[0].device
    Wf = torch.cat([W.to(dtype=dtype) for W in Ws], dim=0)
    bounds = torch.tensor([0] + [W.shape[0] for W in Ws]).cumsum(0).tolist()
    Hf = H.to(device=device, dtype=dtype, copy=True)
    if n_tokens:
        Hf /= n_tokens
    dead = Hf.diagonal() == 0
    Hf.diagonal()[dead] = 1.0
    Wf[:, dead] = 0.0
    U, damp = inverse_hessian_cholesky(Hf, percdamp)
    del Hf
    mask = torch.ones(Wf.shape, dtype=torch.bool, device=device)
    losses = torch.zeros(len(Ws), dtype=dtype, device=device)
    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        segments = [
            (r0, r1, n_pruned(sparsity, (r1 - r0) * i2) - n_pruned(sparsity, (r1 - r0) * i1))
            for r0, r1 in zip(bounds[:-1], bounds[1:])
        ]
        W1 = Wf[:, i1:i2].clone()  # contiguous copy: the column loop is the hot path
        Err1, _ = _prune_block(W1, U[i1:i2, i1:i2], mask[:, i1:i2], segments, nm)
        Wf[:, i1:i2] = W1
        Wf[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)
        losses += torch.stack([Err1[r0:r1].square().sum() for r0, r1 in zip(bounds[:-1], bounds[1:])])
    out = []
    for j, (W, r0, r1) in enumerate(zip(Ws, bounds[:-1], bounds[1:])):
        m = mask[r0:r1]
        out.append(
            PruneResult(
                weight=Wf[r0:r1].to(W.dtype),
                mask=m,
                info={
                    **info,
                    "sparsity": 1.0 - m.float().mean().item(),
                    "loss": float(losses[j]),
                    "damp": damp,
                    "dead_inputs": int(dead.sum()),
                },
            )
        )
    return out
