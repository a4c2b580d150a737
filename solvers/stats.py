"""Per-input calibration statistics: Gram matrix ``H = XᵀX``, token count and first/second moments.

One :class:`InputStats` serves every linear that reads the same input (q/k/v share one, gate/up share one).
All fields are plain sums over tokens, never averages, so statistics from several chunks or several ranks
combine by addition (:func:`merge`, or an ``all_reduce(SUM)`` of each tensor field by the caller).

Worked example: two tokens ``x₁ = [1, 0]``, ``x₂ = [1, 2]`` give ``H = [[2, 2], [2, 4]]``, ``n = 2``,
``sum = [2, 2]``, ``sumsq = [2, 4]`` and ``col_norm_sq = diag(H) = [2, 4]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["InputStats", "init_stats", "accumulate", "merge", "col_norm_sq", "layer_error"]


@dataclass
class InputStats:
    """Sums over ``n`` calibration tokens of one input of width ``d``.

    H:     ``[d, d]`` ``Σ_t x_t x_tᵀ`` (``None`` when built with ``gram=False``); not divided by ``n``.
    n:     number of tokens accumulated.
    sum:   ``[d]`` ``Σ_t x_t`` (only with ``track_moments``), for means: ``x̄ = sum / n``.
    sumsq: ``[d]`` ``Σ_t x_t²`` (with ``track_moments`` or ``gram=False``), for variances and column norms.
    """

    H: Tensor | None
    n: int
    sum: Tensor | None = None
    sumsq: Tensor | None = None

    @property
    def d(self) -> int:
        """Input width."""
        ref = self.H if self.H is not None else self.sumsq
        assert ref is not None  # guaranteed by init_stats: one of H / sumsq always exists
        return ref.shape[-1]


def init_stats(
    d: int,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    track_moments: bool = False,
    gram: bool = True,
) -> InputStats:
    """Empty accumulators for an input of width ``d``.

    ``gram=False`` skips the ``d×d`` Gram (enough for Wanda) and keeps ``sumsq`` so column norms stay available.
    """
    if d <= 0:
        raise ValueError(f"init_stats: input width d must be positive, got {d}")
    if not dtype.is_floating_point:
        raise ValueError(f"init_stats: accumulator dtype must be floating point, got {dtype}")
    H = torch.zeros(d, d, device=device, dtype=dtype) if gram else None
    s = torch.zeros(d, device=device, dtype=dtype) if track_moments else None
    sq = torch.zeros(d, device=device, dtype=dtype) if (track_moments or not gram) else None
    return InputStats(H=H, n=0, sum=s, sumsq=sq)


def accumulate(stats: InputStats, X: Tensor) -> None:
    """Add the tokens of ``X [..., d]`` (any float dtype) to ``stats`` in place: ``H += XᵀX`` (one matmul)."""
    d = stats.d
    if X.shape[-1] != d:
        raise ValueError(f"accumulate: input has width {X.shape[-1]}, statistics expect {d}")
    ref = stats.H if stats.H is not None else stats.sumsq
    assert ref is not None
    X2 = X.reshape(-1, d).to(device=ref.device, dtype=ref.dtype)
    if stats.H is not None:
        gram_add_(stats.H, X2)
    if stats.sum is not None:
        stats.sum.add_(X2.sum(dim=0))
    if stats.sumsq is not None:
        stats.sumsq.add_(X2.square().sum(dim=0))
    stats.n += X2.shape[0]


_GRAM_SPLIT = 4  # column blocks of `gram_add_`
_GRAM_MIN_WIDTH = 256  # narrower inputs: one block


def gram_add_(H: Tensor, X: Tensor) -> None:
    """``H += XᵀX`` in place for ``X [n, d]``, computing only the blocks on and above the diagonal.

    The columns are split in `_GRAM_SPLIT` blocks ``a`` (one block below `_GRAM_MIN_WIDTH` columns):
    ``H[a, a:] += X[:, a]ᵀ X[:, a:]``; then the strict lower triangle of the diagonal block ``H[a, a]`` is overwritten
    by the transpose of its upper triangle, and the blocks below the diagonal are copied from their transposes. The
    result is therefore exactly symmetric by construction (every entry below the diagonal is a copy, never a
    computed value), whatever the BLAS kernel rounds (a GEMM's ``XᵀX`` is not bitwise symmetric on every CPU), and
    whether or not ``H`` was symmetric on entry. The 4-block upper triangle is 62.5% of the full product's flops.

    Example: ``H = 0``, ``X = [[1, 0], [1, 2]]`` gives ``H = [[2, 2], [2, 4]]``."""
    d = X.shape[1]
    split = _GRAM_SPLIT if d >= _GRAM_MIN_WIDTH else 1
    edges = [round(k * d / split) for k in range(split + 1)]
    for a, b in zip(edges[:-1], edges[1:]):
        H[a:b, a:].addmm_(X[:, a:b].T, X[:, a:])
        _mirror_upper_(H[a:b, a:b])
        if b < d:
            H[b:, a:b] = H[a:b, b:].T


def _mirror_upper_(B: Tensor) -> None:
    """Copy the strict upper triangle of the square ``B`` onto its lower triangle, in place (exact copies)."""
    upper = torch.ones(B.shape, dtype=torch.bool, device=B.device).triu_()
    B.copy_(torch.where(upper, B, B.mT))


def _add(a: Tensor | None, b: Tensor | None, field: str) -> Tensor | None:
    if (a is None) != (b is None):
        raise ValueError(f"merge: field '{field}' is tracked in one InputStats and not in the other")
    if a is None or b is None:
        return None
    if a.shape != b.shape:
        raise ValueError(f"merge: field '{field}' shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a + b.to(device=a.device, dtype=a.dtype)


def merge(a: InputStats, b: InputStats) -> InputStats:
    """Statistics of the union of both token sets (field-wise sums); inputs are left untouched."""
    return InputStats(
        H=_add(a.H, b.H, "H"),
        n=a.n + b.n,
        sum=_add(a.sum, b.sum, "sum"),
        sumsq=_add(a.sumsq, b.sumsq, "sumsq"),
    )


def col_norm_sq(stats: InputStats) -> Tensor:
    """``‖X_{:,j}‖² = H_jj`` per input column (from ``sumsq`` when no Gram is kept); shape ``[d]``."""
    if stats.H is not None:
        return stats.H.diagonal().clone()
    assert stats.sumsq is not None
    return stats.sumsq.clone()


def layer_error(W0: Tensor, W: Tensor, H: Tensor) -> float:
    """Reconstruction error ``tr((W−W₀) H (W−W₀)ᵀ) = ‖(W−W₀) Xᵀ‖_F²`` (a sum over tokens, not a mean).

    Computed in ``H``'s dtype (at least float32).
    """
    if W0.shape != W.shape or W.shape[-1] != H.shape[0] or H.shape[0] != H.shape[1]:
        raise ValueError(
            f"layer_error: shapes do not match: W0 {tuple(W0.shape)}, W {tuple(W.shape)}, H {tuple(H.shape)}"
        )
    dtype = torch.promote_types(H.dtype, torch.float32)
    D = W.to(device=H.device, dtype=dtype) - W0.to(device=H.device, dtype=dtype)
    return float(((D @ H.to(dtype)) * D).sum())
