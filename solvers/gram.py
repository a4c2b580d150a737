"""Linear algebra on a layer's Gram ``H = XᵀX``: checks, damping, jittered Cholesky, symmetric inverse.

Shared by the structured solvers (:mod:`solvers.groups`, :mod:`solvers.obs`, :mod:`solvers.admm`) and the ADMM
unstructured solver. Notation (DESIGN.md §4): weight ``W [d_out, d_in]``, ``H [d_in, d_in]`` (a sum over tokens),
damped ``H_λ = H + λ·mean(diag H)·I`` with ``λ = percdamp``. An input ``j`` with ``H_jj = 0`` is *dead* (never
nonzero in the calibration data): its diagonal is set to 1 before damping so that ``H_λ`` stays positive definite,
and the solvers zero or ignore its weights.

Worked example: ``H = [[4, 0], [0, 0]]``, ``percdamp = 0.5``: input 1 is dead, ``H_jj ← 1`` gives
``diag = [4, 1]``, mean 2.5, so ``H_λ = [[5.25, 0], [0, 2.25]]``; as a :class:`DampedGram` that is ``H`` itself and
``δ = [1.25, 2.25]`` (``H_λ = H + diag(δ)``), read block by block.

Precision: the structured solvers work in ``dtype`` = float32 for float32 (and bfloat16) weights, float64 for float64
weights or on request (``dtype=torch.float64``); :class:`DampedGram` reads ``H`` (kept in its own dtype) in that
dtype block by block, so no ``d×d`` copy of ``H`` is made except where a full inverse is needed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from solvers.masks import all_finite

__all__ = [
    "check_weight_gram",
    "damped_gram",
    "DampedGram",
    "gram_left",
    "work_dtype",
    "cholesky_jittered",
    "cholesky_block",
    "cholesky_inplace",
    "solve_cholesky_",
    "col_sq_norms",
    "frob_dot",
    "spd_inverse",
    "spd_inverse_",
]

logger = logging.getLogger(__name__)

_JITTER_STEPS = 6


def check_weight_gram(W: Tensor, H: Tensor, where: str) -> None:
    """``W`` a finite 2-D floating ``[d_out, d_in]`` tensor and ``H`` of shape ``[d_in, d_in]``."""
    if W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"{where}: weight must be a 2-D floating tensor, got {tuple(W.shape)} {W.dtype}")
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"{where}: Gram shape {tuple(H.shape)} does not match the weight's {W.shape[1]} inputs")
    if not all_finite(W):
        raise ValueError(f"{where}: weight {tuple(W.shape)} contains NaN or inf")


def work_dtype(W: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The solvers' working dtype: ``dtype`` when given, else float32 (float64 for float64 weights)."""
    return dtype if dtype is not None else torch.promote_types(W.dtype, torch.float32)


def _check_gram(H: Tensor, percdamp: float, where: str) -> None:
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"{where}: Gram must be square, got {tuple(H.shape)}")
    if not all_finite(H):
        raise ValueError(f"{where}: Gram {tuple(H.shape)} contains NaN or inf")
    if percdamp < 0:
        raise ValueError(f"{where}: percdamp must be >= 0, got {percdamp}")


def damped_gram(H: Tensor, percdamp: float, *, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """``(H_λ, dead)``: a copy of ``H`` in ``dtype`` with ``H_jj = 1`` for dead inputs (``H_jj = 0``) and
    ``λ·mean(diag H)`` added to the diagonal; ``dead`` is the ``[d_in]`` bool mask of dead inputs."""
    _check_gram(H, percdamp, "damped_gram")
    Hd = H.to(dtype=dtype, copy=True)
    dead = Hd.diagonal() == 0
    Hd.diagonal()[dead] = 1.0
    if percdamp > 0:
        Hd.diagonal().add_(percdamp * Hd.diagonal().mean())
    return Hd, dead


_COLS = 4096  # columns of H converted to the working dtype at a time


def gram_left(W: Tensor, H: Tensor) -> Tensor:
    """``W·H`` in ``W``'s dtype; ``H`` converted a block of columns at a time when its dtype differs (no ``d×d``
    copy)."""
    if H.dtype == W.dtype:
        return W @ H
    out = torch.empty(W.shape[0], H.shape[1], dtype=W.dtype, device=W.device)
    for c in range(0, H.shape[1], _COLS):
        out[:, c : c + _COLS] = W @ H[:, c : c + _COLS].to(W.dtype)
    return out


@dataclass
class DampedGram:
    """``H_λ = H + diag(δ)`` without a ``d×d`` copy: ``H`` is the caller's Gram (read only, any float dtype, on the
    solve's device), ``δ_j = λ·mean(diag H') + [H_jj = 0]`` with ``diag H'`` the diagonal whose dead entries are 1
    (exactly :func:`damped_gram`'s matrix); blocks come out in ``dtype``."""

    H: Tensor
    delta: Tensor
    dead: Tensor
    dtype: torch.dtype

    @classmethod
    def of(
        cls, H: Tensor, percdamp: float, *, dtype: torch.dtype, device: torch.device | str | None = None
    ) -> DampedGram:
        _check_gram(H, percdamp, "DampedGram")
        H = H.to(device) if device is not None else H
        diag = H.diagonal().to(dtype)
        dead = diag == 0
        lam = percdamp * float(torch.where(dead, torch.ones_like(diag), diag).mean()) if percdamp > 0 else 0.0
        return cls(H, dead.to(dtype) + lam, dead, dtype)

    @property
    def d(self) -> int:
        return self.H.shape[0]

    def block(self, rows: Tensor, cols: Tensor | None = None) -> Tensor:
        """``(H_λ)[rows][:, cols]`` (a new tensor); without ``cols`` the square block on ``rows`` (its diagonal
        damped), else ``rows`` and ``cols`` must not share an index (no damping added)."""
        if cols is None:
            B = self.H[rows[:, None], rows].to(self.dtype)
            B.diagonal().add_(self.delta[rows])
            return B
        return self.H[rows[:, None], cols].to(self.dtype)

    def rows(self, rows: Tensor) -> Tensor:
        """``(H_λ)[rows, :]`` (``[len(rows), d]``)."""
        R = self.H[rows].to(self.dtype)
        R[torch.arange(rows.numel(), device=R.device), rows] += self.delta[rows]
        return R

    def diag(self, idx: Tensor) -> Tensor:
        """``(H_λ)_jj`` for ``j`` in ``idx``."""
        return self.H.diagonal()[idx].to(self.dtype) + self.delta[idx]

    def left(self, W: Tensor) -> Tensor:
        """``W·H_λ`` for ``W [r, d]`` in ``dtype`` (:func:`gram_left`, then the damping)."""
        return gram_left(W, self.H).addcmul_(W, self.delta)

    def full(self, out: Tensor | None = None) -> Tensor:
        """``H_λ`` as one ``d×d`` tensor in ``dtype`` (written into ``out`` when given)."""
        out = self.H.to(self.dtype, copy=True) if out is None else out.copy_(self.H)
        out.diagonal().add_(self.delta)
        return out

    def inverse(self, where: str) -> Tensor:
        """``H_λ⁻¹`` (symmetric) in one ``d×d`` tensor: :func:`spd_inverse_` on :meth:`full`."""
        return spd_inverse_(self.full(), where, restore=self.full)


def cholesky_jittered(A: Tensor, where: str) -> Tensor:
    """Lower Cholesky factor of the SPD ``A``; on failure a growing jitter ``ε·mean(diag A)`` is added (warned),
    ``ε = 1e-10, 1e-8, …, 1``; a ``RuntimeError`` if even that fails."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return L
    scale = float(A.diagonal().mean().abs()) or 1.0
    for step in range(_JITTER_STEPS):
        eps = 10.0 ** (-10 + 2 * step)
        logger.warning(
            "%s: Cholesky of a %dx%d Gram block failed; adding jitter %.1e·mean(diag)",
            where,
            A.shape[0],
            A.shape[0],
            eps,
        )
        L, info = torch.linalg.cholesky_ex(A + eps * scale * torch.eye(A.shape[0], dtype=A.dtype, device=A.device))
        if int(info) == 0:
            return L
    raise RuntimeError(
        f"{where}: the {A.shape[0]}x{A.shape[0]} Gram block is not positive definite even with jitter; "
        "check the calibration statistics or raise percdamp"
    )


def _cholesky_(A: Tensor, info: Tensor) -> bool:
    """In place: the symmetric, contiguous ``A`` becomes its lower Cholesky factor ``L`` (row-major, strict upper
    triangle zero). LAPACK works column-major: ``A.mT`` is that layout over the same storage, so factorising it as
    ``RᵀR`` with ``out=`` itself writes ``R = Lᵀ`` there (read from ``A``'s lower triangle). True on success."""
    F = A.mT
    torch.linalg.cholesky_ex(F, upper=True, out=(F, info))
    return int(info) == 0


def cholesky_inplace(build: Callable[[], Tensor], where: str) -> Tensor:
    """Lower Cholesky factor of the SPD matrix ``build()`` returns (a new contiguous tensor), factorised in that
    tensor's own storage; on failure ``build()`` again with the growing jitter of :func:`cholesky_jittered`."""
    A = build()
    info = torch.zeros((), dtype=torch.int32, device=A.device)
    scale = float(A.diagonal().mean().abs()) or 1.0
    for step in range(-1, _JITTER_STEPS):
        if step >= 0:
            eps = 10.0 ** (-10 + 2 * step)
            logger.warning(
                "%s: Cholesky of a %dx%d Gram block failed; adding jitter %.1e·mean(diag)", where, *A.shape, eps
            )
            A = build()
            A.diagonal().add_(eps * scale)
        if _cholesky_(A, info):
            return A
    raise RuntimeError(
        f"{where}: the {A.shape[0]}x{A.shape[0]} Gram block is not positive definite even with jitter; "
        "check the calibration statistics or raise percdamp"
    )


def cholesky_block(G: DampedGram, rows: Tensor, where: str) -> Tensor:
    """Lower Cholesky factor of the block ``(H_λ)[rows][:, rows]``, made in the block's own storage (one
    ``|rows|²`` tensor): :func:`cholesky_inplace`."""
    return cholesky_inplace(lambda: G.block(rows), where)


def solve_cholesky_(L: Tensor, B: Tensor) -> Tensor:
    """``B ← (L Lᵀ)⁻¹ B`` in place by two triangular solves (no copy of ``L``, unlike ``torch.cholesky_solve``);
    ``B`` column-major (e.g. the transpose of a row-major matrix) so that LAPACK solves in its storage."""
    torch.linalg.solve_triangular(L, B, upper=False, out=B)
    return torch.linalg.solve_triangular(L.T, B, upper=True, out=B)


def frob_dot(A: Tensor, B: Tensor, rows: int = 128) -> float:
    """``Σ_ij A_ij·B_ij`` summed in float64, a block of rows at a time (no temporary of ``A``'s size)."""
    return sum(float((A[r : r + rows] * B[r : r + rows]).sum(dtype=torch.float64)) for r in range(0, A.shape[0], rows))


def col_sq_norms(W: Tensor, rows: int = 1024) -> Tensor:
    """``Σ_i W_ij²`` per column, a block of rows at a time (no temporary of ``W``'s size)."""
    out = torch.zeros(W.shape[1], dtype=W.dtype, device=W.device)
    for r in range(0, W.shape[0], rows):
        out += W[r : r + rows].square().sum(dim=0)
    return out


def spd_inverse(A: Tensor, where: str) -> Tensor:
    """``A⁻¹`` of the SPD ``A`` through its (jittered) Cholesky factor, symmetrised: ``(A⁻¹ + A⁻ᵀ)/2``."""
    Ainv = torch.cholesky_inverse(cholesky_jittered(A, where))
    return (Ainv + Ainv.T) / 2


def spd_inverse_(A: Tensor, where: str, *, restore: Callable[[Tensor], object]) -> Tensor:
    """:func:`spd_inverse` written over the contiguous ``A`` (Cholesky and ``cholesky_inverse`` in its storage;
    on CUDA ``cholesky_inverse`` clones its input, ``d²``). A failed factorisation is retried with the growing jitter
    of :func:`cholesky_jittered` after ``restore(A)`` has rewritten ``A``."""
    info = torch.zeros((), dtype=torch.int32, device=A.device)
    scale = float(A.diagonal().mean().abs()) or 1.0
    for step in range(-1, _JITTER_STEPS):
        if step >= 0:
            eps = 10.0 ** (-10 + 2 * step)
            logger.warning("%s: Cholesky of a %dx%d Gram failed; adding jitter %.1e·mean(diag)", where, *A.shape, eps)
            restore(A)
            A.diagonal().add_(eps * scale)
        if _cholesky_(A, info):
            F = A.mT  # Lᵀ, column-major: the upper factor of A = (Lᵀ)ᵀ(Lᵀ)
            torch.cholesky_inverse(F, upper=True, out=F)
            _symmetrize_(A)
            return A
    raise RuntimeError(
        f"{where}: the {A.shape[0]}x{A.shape[0]} Gram is not positive definite even with jitter; "
        "check the calibration statistics or raise percdamp"
    )


_SYM_BLOCK = 1024


def _symmetrize_(A: Tensor) -> None:
    """``A ← (A + Aᵀ)/2`` in place, block pair by block pair (``cholesky_inverse`` on CUDA solves for the inverse,
    which is symmetric only up to rounding)."""
    d = A.shape[0]
    for a in range(0, d, _SYM_BLOCK):
        a1 = min(a + _SYM_BLOCK, d)
        for b in range(a, d, _SYM_BLOCK):
            b1 = min(b + _SYM_BLOCK, d)
            X = A[a:a1, b:b1].add(A[b:b1, a:a1].T).mul_(0.5)
            A[a:a1, b:b1] = X
            A[b:b1, a:a1] = X.T
