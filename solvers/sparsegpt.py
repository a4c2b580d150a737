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
from collections.abc import Callable

import torch
from torch import Tensor

from solvers.masks import PruneResult, all_finite, check_inputs, n_pruned, nm_mask, parse_pattern, prune_lowest

__all__ = ["sparsegpt_prune", "sparsegpt_prune_many", "inverse_hessian_cholesky", "sparsegpt_workspace_bytes"]

logger = logging.getLogger(__name__)

_MAX_RETRIES = 3


def inverse_hessian_cholesky(
    H: Tensor, percdamp: float, *, retries: int = _MAX_RETRIES, restore: Callable[[Tensor], None] | None = None
) -> tuple[Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + λ·mean(diag H)·I)⁻¹``, written over ``H``; returns ``(U, λ)``.

    In place: the square, contiguous ``H`` is damped, factorised (``H_λ = RᵀR``), inverted from its factor and
    factorised again in its own storage. LAPACK and cuSOLVER work column-major, so the three steps run on ``H.mT``
    (the same storage, no copy); the lower factor ``L₂`` of ``H_λ⁻¹ = L₂L₂ᵀ`` seen row-major is ``U = L₂ᵀ``
    (``H_λ⁻¹ = UᵀU``), so ``U`` *is* ``H`` (strict lower triangle zero). Memory beyond ``H``: none on the CPU;
    on CUDA ``cholesky_inverse`` clones its input (``d²``), plus the retry backup below.

    If a factorisation fails, ``λ`` grows tenfold (from at least 1e-3), up to ``retries`` times, with a warning
    each time; after that a ``RuntimeError`` is raised. A retry needs the undamped ``H`` back: ``restore(H)``
    rewrites it (e.g. from the caller's copy); without ``restore`` the lower triangle of ``H`` is kept aside
    (block rows, ~``d²/2``) until the factorisations succeed.
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1] or not H.is_contiguous():
        raise ValueError(f"inverse_hessian_cholesky: need a square contiguous matrix, got {tuple(H.shape)}")
    mean_diag = H.diagonal().mean()
    backup = _lower_blocks(H) if restore is None and retries > 0 else None
    A = H.mT  # column-major view of the same storage
    info = torch.zeros((), dtype=torch.int32, device=H.device)
    for attempt in range(retries + 1):
        damp = percdamp if attempt == 0 else max(percdamp, 1e-3) * 10.0**attempt
        if attempt > 0:
            restore(H) if restore is not None else _restore_lower_blocks(H, backup)
        A.diagonal().add_(damp * mean_diag)
        if _cholesky_of_inverse_(A, info):
            return H, damp
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
        f"damping {damp:.3g}·mean(diag H); check the calibration statistics"
    )


def _cholesky_of_inverse_(A: Tensor, info: Tensor) -> bool:
    """``A ← L₂``, the lower Cholesky factor of ``A⁻¹``, in place on the column-major ``A``; True on success.

    ``out=`` the input itself with matching (column-major) strides: torch then factorises and inverts in the
    given storage (``triu``/``tril``/``copy_`` onto itself, LAPACK ``potrf``/``potri`` in place). The first
    factorisation reads ``A``'s upper triangle, i.e. the lower triangle of the row-major ``H``, as
    ``torch.linalg.cholesky(H)`` does."""
    torch.linalg.cholesky_ex(A, upper=True, out=(A, info))
    if int(info) != 0:
        return False
    torch.cholesky_inverse(A, upper=True, out=A)
    torch.linalg.cholesky_ex(A, out=(A, info))
    return int(info) == 0 and all_finite(A)


_BACKUP_ROWS = 1024  # rows per block of the retry backup


def _lower_blocks(H: Tensor) -> list[Tensor]:
    """Copies of ``H[r0:r1, :r1]`` per block of rows: the lower triangle and diagonal blocks, ~d²/2 entries."""
    d = H.shape[0]
    return [H[r0 : min(r0 + _BACKUP_ROWS, d), : min(r0 + _BACKUP_ROWS, d)].clone() for r0 in range(0, d, _BACKUP_ROWS)]


def _restore_lower_blocks(H: Tensor, blocks: list[Tensor] | None) -> None:
    """``H`` symmetric again from :func:`_lower_blocks`: the blocks written back, the rest mirrored."""
    assert blocks is not None
    d = H.shape[0]
    for r0, block in zip(range(0, d, _BACKUP_ROWS), blocks):
        H[r0 : r0 + block.shape[0], : block.shape[1]] = block
    for r0 in range(0, d, _BACKUP_ROWS):
        r1 = min(r0 + _BACKUP_ROWS, d)
        H[r0:r1, r1:] = H[r1:, r0:r1].T


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
    if blocksize <= 0:
        raise ValueError(f"sparsegpt_prune: blocksize must be positive, got {blocksize}")
    if nm is not None and (blocksize % nm[1] != 0 or d_in % nm[1] != 0):
        raise ValueError(
            f"sparsegpt_prune: blocksize {blocksize} and input width {d_in} must be multiples of "
            f"M={nm[1]} for an {nm[0]}:{nm[1]} pattern"
        )


def _prepare_(H: Tensor, n_tokens: int | None) -> Tensor:
    """In place: ``H /= n_tokens`` and ``H_jj = 1`` for dead inputs (``H_jj == 0``); returns the dead mask."""
    if n_tokens:
        H /= n_tokens
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    return dead


def _factor(
    H: Tensor, dtype: torch.dtype, device: torch.device, n_tokens: int | None, percdamp: float, consume: bool
) -> tuple[Tensor, float, float, Tensor]:
    """``(U, damp, mean_diag, dead)``: the upper Cholesky factor of the damped inverse Hessian (:func:`inverse_hessian_cholesky`)
    in ``H``'s own storage when ``consume`` allows it (same dtype and device, contiguous), else in one copy of ``H``
    (the caller's ``H`` then restores the copy for a retry)."""
    in_place = consume and H.dtype == dtype and H.device == device and H.is_contiguous()
    Hf = H if in_place else H.to(device=device, dtype=dtype, copy=True)
    dead = _prepare_(Hf, n_tokens)
    mean_diag = float(Hf.diagonal().mean())

    def restore(M: Tensor) -> None:
        M.copy_(H)
        _prepare_(M, n_tokens)

    U, damp = inverse_hessian_cholesky(Hf, percdamp, restore=None if in_place else restore)
    return U, damp, mean_diag, dead


def _moved(W1: Tensor, Ws: list[Tensor], bounds: list[int], cols: slice, dead: Tensor) -> Tensor:
    """``‖W_new − W‖²`` per matrix over the block's live columns (``W1``: the block's final stacked weights)."""
    out = []
    for W, r0, r1 in zip(Ws, bounds[:-1], bounds[1:]):
        diff = W1[r0:r1] - W[:, cols].to(W1.dtype)
        out.append(diff.masked_fill_(dead[None, :], 0.0).square().sum())
    return torch.stack(out)


def sparsegpt_prune(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    *,
    pattern: str | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    n_tokens: int | None = None,
    consume_H: bool = False,
) -> PruneResult:
    """Prune ``W [d_out, d_in]`` given ``H = XᵀX [d_in, d_in]`` (the sum over tokens) by SparseGPT.

    Dead inputs (``H_jj == 0``) get ``W_{:,j} = 0`` and ``H_jj = 1``. Computed in float32 (float64 when ``W`` is
    float64) and cast back to ``W.dtype``. ``n_tokens`` divides ``H`` first (same solution, better float range;
    then ``info["loss"]`` is per token). With an N:M ``pattern`` the pattern fixes the sparsity.

    ``consume_H=True``: the caller no longer needs ``H``; when it already has the working dtype and device it is
    overwritten (divided, damped, factorised in place: its contents are garbage afterwards) instead of copied,
    which saves ``d²`` floats. ``H`` is left untouched otherwise.

    The returned ``mask`` is the pruning decision: ``weight[~mask] == 0`` exactly; kept entries of dead inputs
    are zero too. ``info``: ``sparsity`` (achieved), ``loss`` (``tr(ΔW H_damped ΔWᵀ)``, OBS sum), ``damp``,
    ``error`` (``tr(ΔW H ΔWᵀ)``, undamped, in the units of ``loss``: ``loss − λ·mean(diag H)·‖ΔW‖²`` over live
    inputs, so no Gram is needed afterwards; float32 rounding of the OBS sum makes it approximate to ~1e-5
    relative of ``loss``).
    """
    return sparsegpt_prune_many(
        [W],
        H,
        sparsity,
        pattern=pattern,
        blocksize=blocksize,
        percdamp=percdamp,
        n_tokens=n_tokens,
        consume_H=consume_H,
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
    consume_H: bool = False,
) -> list[PruneResult]:
    """`sparsegpt_prune` of several matrices that read the same input (q/k/v; gate/up): identical results to
    solving each alone, since OBS updates are row-independent given ``H`` and each matrix selects its mask among
    its own rows, but with one Cholesky factorisation and one column loop over the stacked rows.

    Memory beyond the inputs (``r`` stacked rows, ``d = d_in``, float32): the stacked weights and the mask
    (``5·r·d`` bytes, made after the factorisation), per block ``~10·r·blocksize`` floats, and for ``H``: with
    ``consume_H`` nothing but the retry backup (``d²/2`` floats while factorising), else one copy (``d²``); on CUDA
    ``cholesky_inverse`` adds a transient ``d²`` (see :func:`sparsegpt_workspace_bytes`)."""
    nm = parse_pattern(pattern)
    for W in Ws:
        _validate(W, H, sparsity, nm, blocksize)
    if not all_finite(H):
        raise ValueError(f"sparsegpt_prune: Hessian {tuple(H.shape)} contains NaN or inf")
    info: dict = {"method": "sparsegpt", "pattern": "unstructured" if nm is None else f"{nm[0]}:{nm[1]}"}
    d_in = H.shape[0]
    if nm is None and all(n_pruned(sparsity, W.numel()) == 0 for W in Ws):
        return [
            PruneResult(W.clone(), torch.ones_like(W, dtype=torch.bool), {**info, "sparsity": 0.0, "loss": 0.0})
            for W in Ws
        ]
    dtype = torch.float64 if any(W.dtype == torch.float64 for W in Ws) else torch.float32
    device = Ws[0].device
    U, damp, mean_diag, dead = _factor(H, dtype, device, n_tokens, percdamp, consume_H)
    bounds = torch.tensor([0] + [W.shape[0] for W in Ws]).cumsum(0).tolist()
    Wf = torch.empty(bounds[-1], d_in, dtype=dtype, device=device)
    for W, r0, r1 in zip(Ws, bounds[:-1], bounds[1:]):
        Wf[r0:r1] = W
    Wf[:, dead] = 0.0
    mask = torch.ones(Wf.shape, dtype=torch.bool, device=device)
    losses = torch.zeros(len(Ws), dtype=dtype, device=device)
    moved = torch.zeros(len(Ws), dtype=dtype, device=device)  # ‖ΔW‖² on live inputs, for info["error"]
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
        moved += _moved(W1, Ws, bounds, slice(i1, i2), dead[i1:i2])
    del U
    out = []
    for j, (W, r0, r1) in enumerate(zip(Ws, bounds[:-1], bounds[1:])):
        m = mask[r0:r1]
        out.append(
            PruneResult(
                weight=Wf[r0:r1].to(W.dtype),
                mask=m,
                info={
                    **info,
                    "sparsity": 1.0 - int(torch.count_nonzero(m)) / max(m.numel(), 1),
                    "loss": float(losses[j]),
                    "error": max(float(losses[j]) - damp * mean_diag * float(moved[j]), 0.0),
                    "damp": damp,
                    "dead_inputs": int(dead.sum()),
                },
            )
        )
    return out


def sparsegpt_workspace_bytes(
    rows: int, d_in: int, *, consume_H: bool = False, cuda: bool = True, blocksize: int = 128, itemsize: int = 4
) -> int:
    """Peak bytes :func:`sparsegpt_prune_many` allocates beyond its inputs (weights in ``itemsize``, the Gram) for
    ``rows`` stacked rows of width ``d_in``: the larger of its two phases, times 1.15.

    factorising: the retry backup of ``H``'s lower triangle (``d²/2``) when ``consume_H``, else the working copy
    (``d²``); on CUDA also the clone ``cholesky_inverse`` makes (``d²``).
    pruning: the factor when it is a copy (``d²``), the stacked weights and the mask (``(itemsize + 1)·rows·d``)
    and the block loop's temporaries (``16·rows·blocksize`` floats).
    The factor 1.15 covers what the allocator and the BLAS keep beyond the live tensors: peaks measured in fresh
    processes (CPU, float32, d_out = d = 2048 … 8192) were 0.96 to 1.12 times the live sum. Measured (fresh process,
    VmRSS sampled every 3 ms, float32): d_out = d = 4096: 2.07·d² floats consuming, 2.99 copying (this estimate:
    2.01 / 3.16); d = 8192: 1.60 / 2.55 (1.72 / 2.88); d = 8192, d_out = 2048, consuming: 0.60 (0.57) — the
    factorising phase, in place since the finiteness check of the factor stopped copying its transposed view.
    """
    gram = itemsize * d_in * d_in
    factorising = (gram // 2 if consume_H else gram) + (gram if cuda else 0)
    pruning = (0 if consume_H else gram) + (itemsize + 1) * rows * d_in + 16 * itemsize * rows * min(blocksize, d_in)
    return int(1.15 * max(factorising, pruning))
