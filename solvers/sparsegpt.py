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

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import Tensor

from solvers.unstructured import PruneResult, check_inputs, n_pruned, nm_mask, parse_pattern, prune_lowest

__all__ = ["sparsegpt_prune", "inverse_hessian_cholesky"]

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
            logger.warning("sparsegpt: Cholesky of the %dx%d Hessian failed with damping %.3g; retrying with %.3g",
                           H.shape[0], H.shape[0], damp, max(percdamp, 1e-3) * 10.0 ** (attempt + 1))
    raise RuntimeError(f"sparsegpt: Cholesky of the {H.shape[0]}x{H.shape[0]} Hessian failed even with "
                       f"damping {applied:.3g}·mean(diag H); check the calibration statistics")


@contextlib.contextmanager
def _few_threads(t: Tensor) -> Iterator[None]:
    """The column loop is thousands of tiny vector ops: on CPU, intra-op threads only add synchronisation (and
    under load, spinning workers make it 10x slower), so it runs on one thread; the previous count is restored."""
    if t.device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _prune_block(W1: Tensor, U1: Tensor, mask1: Tensor, k: int, nm: tuple[int, int] | None) -> tuple[Tensor, Tensor]:
    """OBS on one block in place: ``W1 [r, b]`` weights, ``U1 [b, b]`` its Cholesky block, ``mask1`` filled.

    Returns ``(Err1 [r, b], loss)``; ``k`` is the number to prune in the block (unstructured only).
    """
    d = U1.diagonal()
    if nm is None:
        scores = (W1.square() / d.square()).reshape(1, -1)
        mask1.copy_(prune_lowest(scores, k).reshape(W1.shape))
    Err1 = torch.zeros_like(W1)
    with _few_threads(W1):
        _column_loop(W1, U1, mask1, d, Err1, nm)
    return Err1, Err1.square().sum()


def _column_loop(W1: Tensor, U1: Tensor, mask1: Tensor, d: Tensor, Err1: Tensor, nm: tuple[int, int] | None) -> None:
    for i in range(W1.shape[1]):
        if nm is not None and i % nm[1] == 0:
            mask1[:, i:i + nm[1]] = nm_mask(W1[:, i:i + nm[1]].square() / d[i:i + nm[1]].square(), *nm)
        w = W1[:, i].clone()
        q = torch.where(mask1[:, i], w, torch.zeros_like(w))
        err = (w - q) / d[i]
        W1[:, i + 1:].addr_(err, U1[i, i + 1:], alpha=-1.0)
        W1[:, i] = q
        Err1[:, i] = err


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
        raise ValueError(f"sparsegpt_prune: blocksize {blocksize} and input width {d_in} must be multiples of "
                         f"M={nm[1]} for an {nm[0]}:{nm[1]} pattern")


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
    nm = parse_pattern(pattern)
    _validate(W, H, sparsity, nm, blocksize)
    d_out, d_in = W.shape
    info: dict = {"method": "sparsegpt", "pattern": "unstructured" if nm is None else f"{nm[0]}:{nm[1]}"}
    if nm is None and n_pruned(sparsity, d_out * d_in) == 0:
        return PruneResult(W.clone(), torch.ones_like(W, dtype=torch.bool), {**info, "sparsity": 0.0, "loss": 0.0})
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    Wf = W.to(dtype=dtype, copy=True)
    Hf = H.to(device=W.device, dtype=dtype, copy=True)
    if n_tokens:
        Hf /= n_tokens
    dead = Hf.diagonal() == 0
    Hf.diagonal()[dead] = 1.0
    Wf[:, dead] = 0.0
    U, damp = inverse_hessian_cholesky(Hf, percdamp)
    del Hf
    mask = torch.ones(d_out, d_in, dtype=torch.bool, device=W.device)
    loss = torch.zeros((), dtype=dtype, device=W.device)
    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        k = n_pruned(sparsity, d_out * i2) - n_pruned(sparsity, d_out * i1)
        W1 = Wf[:, i1:i2].clone()  # contiguous copy: the column loop is the hot path
        Err1, block_loss = _prune_block(W1, U[i1:i2, i1:i2], mask[:, i1:i2], k, nm)
        Wf[:, i1:i2] = W1
        Wf[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)
        loss += block_loss
    info.update(sparsity=1.0 - mask.float().mean().item(), loss=float(loss), damp=damp, dead_inputs=int(dead.sum()))
    return PruneResult(weight=Wf.to(W.dtype), mask=mask, info=info)
