"""Linear algebra on a layer's Gram ``H = XᵀX``: checks, damping, jittered Cholesky, symmetric inverse.

Shared by the structured solvers (:mod:`solvers.groups`, :mod:`solvers.obs`, :mod:`solvers.admm`) and the ADMM
unstructured solver. Notation (DESIGN.md §4): weight ``W [d_out, d_in]``, ``H [d_in, d_in]`` (a sum over tokens),
damped ``H_λ = H + λ·mean(diag H)·I`` with ``λ = percdamp``. An input ``j`` with ``H_jj = 0`` is *dead* (never
nonzero in the calibration data): its diagonal is set to 1 before damping so that ``H_λ`` stays positive definite,
and the solvers zero or ignore its weights.

Worked example: ``H = [[4, 0], [0, 0]]``, ``percdamp = 0.5``: input 1 is dead, ``H_jj ← 1`` gives
``diag = [4, 1]``, mean 2.5, so ``H_λ = [[5.25, 0], [0, 2.25]]``.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

__all__ = ["check_weight_gram", "damped_gram", "cholesky_jittered", "spd_inverse"]

logger = logging.getLogger(__name__)

_JITTER_STEPS = 6


def check_weight_gram(W: Tensor, H: Tensor, where: str) -> None:
    """``W`` a finite 2-D floating ``[d_out, d_in]`` tensor and ``H`` of shape ``[d_in, d_in]``."""
    if W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"{where}: weight must be a 2-D floating tensor, got {tuple(W.shape)} {W.dtype}")
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"{where}: Gram shape {tuple(H.shape)} does not match the weight's {W.shape[1]} inputs")
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{where}: weight {tuple(W.shape)} contains NaN or inf")


def damped_gram(H: Tensor, percdamp: float, *, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """``(H_λ, dead)``: a copy of ``H`` in ``dtype`` with ``H_jj = 1`` for dead inputs (``H_jj = 0``) and
    ``λ·mean(diag H)`` added to the diagonal; ``dead`` is the ``[d_in]`` bool mask of dead inputs."""
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"damped_gram: Gram must be square, got {tuple(H.shape)}")
    if not bool(torch.isfinite(H).all()):
        raise ValueError(f"damped_gram: Gram {tuple(H.shape)} contains NaN or inf")
    if percdamp < 0:
        raise ValueError(f"damped_gram: percdamp must be >= 0, got {percdamp}")
    Hd = H.to(dtype=dtype, copy=True)
    dead = Hd.diagonal() == 0
    Hd.diagonal()[dead] = 1.0
    if percdamp > 0:
        Hd.diagonal().add_(percdamp * Hd.diagonal().mean())
    return Hd, dead


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


def spd_inverse(A: Tensor, where: str) -> Tensor:
    """``A⁻¹`` of the SPD ``A`` through its (jittered) Cholesky factor, symmetrised: ``(A⁻¹ + A⁻ᵀ)/2``."""
    Ainv = torch.cholesky_inverse(cholesky_jittered(A, where))
    return (Ainv + Ainv.T) / 2
