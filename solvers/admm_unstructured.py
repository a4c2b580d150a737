"""ADMM pruning with a gradual mask (Boža 2024, "Fast and Effective Weight Update for Pruned Large Language Models",
arXiv 2401.02938), unstructured or N:M, then an exact update on the final support; a pure function.

Problem (DESIGN.md §4 notation, ``W [d_out, d_in]``, ``H = XᵀX``): ``min_{M, Ŵ} ‖X Wᵀ − X (M⊙Ŵ)ᵀ‖²`` with ``M`` of
the target sparsity. Everything runs in the paper's normalised coordinates: ``D = diag(H)^½``, ``H̃ = D⁻¹HD⁻¹`` (unit
diagonal), ``W̃ = W D``, and damping ``H̃_λ = H̃ + λI`` (``λ = percdamp``; ``= H + λ·diag(H)`` in the original
coordinates). The objective ``f(V) = ½ tr((V − W̃) H̃_λ (V − W̃)ᵀ)`` is split as ``V = Z``, ``Z`` masked (scaled dual
``U``, penalty ``ρ``), with one factorisation of ``H̃_λ + ρI`` for the whole run:

    M ← select(|V + U|, s_t)                      (only while t < schedule_iterations)
    Z ← (V + U) ⊙ M,   U ← (V + U) ⊙ (1 − M)       (= U + V − Z)
    V ← (W̃H̃_λ + ρ(Z − U)) (H̃_λ + ρI)⁻¹             (one matrix product per iteration)

Gradual pruning: the sparsity grows along the cubic schedule ``s_t = s·(1 − (1 − (t+1)/T)³)`` (``T`` =
``schedule_iterations``), reaching ``s`` at ``t = T − 1``; the mask is then fixed for the remaining iterations. The
score ``|V + U|`` in normalised coordinates is activation-aware (``|W_ij|·‖X_j‖`` at ``t = 0``, Wanda's score).
N:M: the ``N`` largest of every ``M`` are always kept, and the gradual count prunes among the other ``M − N``, so
the final mask is exactly N:M. Selection counts are exact (``round(s·count)``, ties to the lower index, as
:func:`solvers.masks.prune_lowest`): per layer (default; each matrix of a stacked call counts its own) or per row.

Final exact update: ADMM's ``Z`` is close to, but not at, the least-squares optimum on its support, so the weights
are finished by conjugate gradients on the support, warm-started at ``Z``: per row ``i`` with kept set ``S_i`` the
minimiser is ``V_{i,S} = W̃_i H̃_λ[:, S] (H̃_λ[S, S])⁻¹`` (in original coordinates ``W_{i,S} = W_i H_{:,S} H_{S,S}⁻¹``
with ``H ← H + λ·diag(H)``); every CG step is one ``[d_out, d_in] × [d_in, d_in]`` product for all rows at once,
stopping once a step lowers the objective by less than ``refine_tol`` of it (or after ``refine_iterations``). On
SmolLM2's layers ADMM's ``Z`` is already within 0.01-0.06% of the support's optimum, so the default usually stops
after one step; ``refine_tol=0`` with enough steps reaches the optimum to rounding (tested against float64).

Cost: one ``[d_in, d_in]`` factorisation and inverse, then one ``[d_out, d_in] × [d_in, d_in]`` product per
iteration and per refinement step (about 25 in all with the defaults), against SparseGPT's ``≈ d_out·d_in²`` flops
in total: on a CPU the solve takes several times SparseGPT's; it is all dense matrix products, which is what GPUs
and many threads are best at.

Worked example: ``W = [[2, 1]]``, ``H = [[1, 0.5], [0.5, 1]]`` (unit diagonal, so ``W̃ = W``), 50%, ``λ = 0``: the
first mask keeps ``|2| > |1|``; the exact update on ``S = {0}`` gives ``W_0 = (2·1 + 1·0.5)/1 = 2.5`` (the kept
weight absorbs the correlated input), loss ``tr(ΔW H ΔWᵀ) = [0.5, −1] H [0.5, −1]ᵀ = 0.75`` versus ``1`` for plain
``[2, 0]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from solvers.gram import cholesky_jittered
from solvers.masks import PruneResult, check_inputs, n_pruned, nm_mask, parse_pattern, prune_lowest

__all__ = ["ADMMOptions", "admm_prune", "admm_prune_many"]


@dataclass(frozen=True)
class ADMMOptions:
    """Iteration settings (paper defaults: 20 iterations, the first 15 growing the mask, ``λ = 0.1``, ``ρ = 1``)."""

    iterations: int = 20
    schedule_iterations: int = 15
    percdamp: float = 0.1
    rho: float = 1.0
    per_row: bool = False
    refine_iterations: int = 10
    refine_tol: float = 1e-4

    def __post_init__(self) -> None:
        if self.iterations < 0 or not 0 <= self.schedule_iterations <= self.iterations:
            raise ValueError(
                f"admm_prune: need 0 <= schedule_iterations <= iterations, got {self.schedule_iterations} "
                f"and {self.iterations}"
            )
        if self.percdamp < 0 or self.rho <= 0 or self.refine_iterations < 0 or self.refine_tol < 0:
            raise ValueError(
                f"admm_prune: need percdamp >= 0, rho > 0, refine_iterations >= 0, refine_tol >= 0; got {self}"
            )


def admm_prune(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    *,
    pattern: str | None = None,
    mask: Tensor | None = None,
    n_tokens: int | None = None,
    options: ADMMOptions | None = None,
    **kwargs: float | int | bool,
) -> PruneResult:
    """Prune ``W [d_out, d_in]`` given ``H = XᵀX [d_in, d_in]`` (see the module docstring).

    ``pattern``: ``None`` / ``"unstructured"`` or ``"N:M"`` (then the pattern fixes the sparsity). ``mask`` (bool,
    True = kept): skip the selection and only update the weights for this mask (the paper's weight update for a
    given mask, e.g. Wanda's). Settings come from ``options`` or as keywords (``iterations``,
    ``schedule_iterations``, ``percdamp``, ``rho``, ``per_row``, ``refine_iterations``, ``refine_tol``).
    ``n_tokens`` only scales ``info["loss"]`` (the solution does not depend on the scale of ``H``).

    Computed in float32 (float64 when ``W`` is float64), returned in ``W.dtype``; ``weight[~mask] == 0`` exactly;
    inputs with ``H_jj = 0`` get zero weights. ``info``: ``sparsity``, ``loss`` (``tr(ΔW H_λ ΔWᵀ)`` with
    ``H_λ = H + λ·diag(H)``, per token with ``n_tokens``), ``error`` (the undamped ``tr(ΔW H ΔWᵀ)`` in the units of
    ``loss``: ``loss − λ·Σ_j H_jj‖ΔW_{:,j}‖²``), ``damp``, ``refine_steps``, ``dead_inputs``.
    """
    masks = None if mask is None else [mask]
    return admm_prune_many(
        [W], H, sparsity, pattern=pattern, masks=masks, n_tokens=n_tokens, options=options, **kwargs
    )[0]


def admm_prune_many(
    Ws: list[Tensor],
    H: Tensor,
    sparsity: float,
    *,
    pattern: str | None = None,
    masks: list[Tensor] | None = None,
    n_tokens: int | None = None,
    options: ADMMOptions | None = None,
    **kwargs: float | int | bool,
) -> list[PruneResult]:
    """:func:`admm_prune` of several matrices that read the same input (q/k/v; gate/up): the rows are stacked, so
    there is one factorisation and one matrix product per iteration for all of them. Rows are independent given
    ``H`` and each matrix selects its mask among its own rows, so the results equal solving each alone (up to
    rounding)."""
    opts = options if options is not None else ADMMOptions(**kwargs)  # type: ignore[arg-type]
    if options is not None and kwargs:
        raise ValueError("admm_prune: pass settings either as options=ADMMOptions(...) or as keywords, not both")
    nm = parse_pattern(pattern)
    _validate(Ws, H, sparsity, nm, masks)
    if masks is None and nm is None and all(_nothing_pruned(W, sparsity, opts.per_row) for W in Ws):
        info = {"method": "admm", "pattern": "unstructured", "sparsity": 0.0, "loss": 0.0, "damp": opts.percdamp}
        return [PruneResult(W.clone(), torch.ones_like(W, dtype=torch.bool), dict(info)) for W in Ws]
    dtype = torch.float64 if any(W.dtype == torch.float64 for W in Ws) else torch.float32
    device = Ws[0].device
    bounds = torch.tensor([0] + [W.shape[0] for W in Ws]).cumsum(0).tolist()
    prob = _Normalised.of(torch.cat([W.to(dtype) for W in Ws]), H.to(device=device, dtype=dtype), opts.percdamp)
    segments = list(zip(bounds[:-1], bounds[1:]))
    if masks is not None:
        keep = torch.cat([m.to(device=device, dtype=torch.bool) for m in masks])
        V = _admm(prob, opts, lambda t, score: keep, 0)
    else:
        target = sparsity if nm is None else 1.0 - nm[0] / nm[1]
        select = _Selector(segments, target, nm, opts.per_row, opts.schedule_iterations)
        V = _admm(prob, opts, select, opts.schedule_iterations)
        keep = select.last
    V, R, steps = _refine(prob, V, keep, opts)
    return _results(Ws, prob, V, R, keep, segments, nm, n_tokens, opts, steps)


# ---------------------------------------------------------------- problem setup


@dataclass
class _Normalised:
    """The normalised problem: ``W̃ = W D``, ``H̃_λ``, ``B = W̃ H̃_λ``, ``D = diag(H)^½`` (1 for dead inputs, whose
    columns of ``W̃`` and rows/columns of ``H̃`` are zero) and the dead-input mask."""

    Wt: Tensor
    Hl: Tensor
    B: Tensor
    D: Tensor
    dead: Tensor

    @classmethod
    def of(cls, W: Tensor, H: Tensor, percdamp: float) -> _Normalised:
        diag = H.diagonal()
        dead = diag <= 0
        D = torch.where(dead, torch.ones_like(diag), diag.clamp_min(0).sqrt())
        Hl = H / D[:, None] / D[None, :]
        Hl[dead, :] = 0.0
        Hl[:, dead] = 0.0
        Hl.diagonal().copy_(torch.ones_like(diag))  # unit diagonal exactly (dead inputs included)
        Hl.diagonal().add_(percdamp)
        Wt = (W * D[None, :]).masked_fill(dead[None, :], 0.0)
        return cls(Wt=Wt, Hl=Hl, B=Wt @ Hl, D=D, dead=dead)


def _nothing_pruned(W: Tensor, sparsity: float, per_row: bool) -> bool:
    return n_pruned(sparsity, W.shape[1] if per_row else W.numel()) == 0


def _validate(
    Ws: list[Tensor], H: Tensor, sparsity: float, nm: tuple[int, int] | None, masks: list[Tensor] | None
) -> None:
    if not Ws:
        raise ValueError("admm_prune: no weight given")
    d_in = Ws[0].shape[1] if Ws[0].dim() == 2 else -1
    for W in Ws:
        check_inputs(W, sparsity, "admm_prune")
        if W.shape[1] != d_in:
            raise ValueError(f"admm_prune: stacked weights must share the input width {d_in}, got {tuple(W.shape)}")
    if H.shape != (d_in, d_in):
        raise ValueError(f"admm_prune: Gram shape {tuple(H.shape)} does not match weight inputs {d_in}")
    if not bool(torch.isfinite(H).all()):
        raise ValueError(f"admm_prune: Gram {tuple(H.shape)} contains NaN or inf")
    if nm is not None and d_in % nm[1] != 0:
        raise ValueError(
            f"admm_prune: input width {d_in} is not a multiple of M={nm[1]} for an {nm[0]}:{nm[1]} pattern"
        )
    if masks is not None and (
        len(masks) != len(Ws) or any(m.shape != W.shape or m.dtype != torch.bool for m, W in zip(masks, Ws))
    ):
        raise ValueError("admm_prune: masks must be bool tensors of the weights' shapes, one per weight")


# ---------------------------------------------------------------- mask selection


class _Selector:
    """The gradual mask: ``s_t`` on the cubic schedule; per layer (each stacked matrix its own count) or per row;
    N:M keeps each group's ``N`` largest and prunes among the rest.

    Counts are exact at the last schedule step (the mask that stays). Before it, a per-layer selection thresholds
    at the quantile of a fixed strided sample of about `_SAMPLE` scores (an exact selection over a whole layer costs
    as much as the iteration's matrix product; the intermediate sparsities are a schedule, not a constraint)."""

    def __init__(
        self,
        segments: list[tuple[int, int]],
        target: float,
        nm: tuple[int, int] | None,
        per_row: bool,
        steps: int,
    ) -> None:
        self.segments, self.target, self.nm, self.per_row, self.steps = segments, target, nm, per_row, steps
        self.last: Tensor = torch.empty(0, dtype=torch.bool)

    def sparsity_at(self, t: int) -> float:
        if self.steps == 0 or t >= self.steps - 1:
            return self.target
        return self.target * (1.0 - (1.0 - (t + 1) / self.steps) ** 3)

    def __call__(self, t: int, score: Tensor) -> Tensor:
        s = self.sparsity_at(t)
        exact = self.steps == 0 or t >= self.steps - 1
        if self.nm is not None:
            top = nm_mask(score, *self.nm)  # each group's N largest: always kept
            if exact:  # the full N:M target prunes every other entry
                self.last = top
                return top
            score = score.masked_fill(top, math.inf)
        keep = torch.empty(score.shape, dtype=torch.bool, device=score.device)
        for r0, r1 in self.segments:
            part = score[r0:r1]
            if self.per_row:
                keep[r0:r1] = prune_lowest(part, n_pruned(s, part.shape[1]))
            elif exact:
                keep[r0:r1] = prune_lowest(part.reshape(1, -1), n_pruned(s, part.numel())).reshape(part.shape)
            else:
                keep[r0:r1] = part > _sample_threshold(part, s)
        self.last = keep
        return keep


_SAMPLE = 1 << 16


def _sample_threshold(x: Tensor, q: float) -> Tensor:
    """A threshold that prunes about the fraction ``q`` of the entries of ``x [r, c]`` (``x <= thr``), from every
    ``stride``-th entry in row-major order, ``stride`` coprime with ``c`` so that the sample visits every column
    (scores scale with the column's input norm). ``+inf`` entries (N:M's always-kept) are never counted in: when
    the sample asks for more than its finite entries, the threshold is the largest finite one."""
    stride = max(1, x.numel() // _SAMPLE)
    while math.gcd(stride, x.shape[1]) != 1:
        stride += 1
    sample = x.reshape(-1)[::stride]
    k = round(q * sample.numel())
    finite = sample[torch.isfinite(sample)] if bool(torch.isinf(sample).any()) else sample
    if k <= 0 or finite.numel() == 0:
        return x.new_tensor(-math.inf)
    return torch.kthvalue(finite, min(k, finite.numel())).values


# ---------------------------------------------------------------- iterations


def _admm(prob: _Normalised, opts: ADMMOptions, select: Callable[[int, Tensor], Tensor], schedule: int) -> Tensor:
    """The ADMM loop; returns ``Z`` (masked) after the last iteration (``W̃`` masked when there are none). Without a
    schedule the mask is chosen once, from ``|W̃|`` (Wanda's score)."""
    keep = select(0, prob.Wt.abs())  # = |V + U| at t = 0
    if opts.iterations == 0:
        return prob.Wt * keep
    A = prob.Hl.clone()
    A.diagonal().add_(opts.rho)
    Ainv = torch.cholesky_inverse(cholesky_jittered(A, "admm_prune"))
    Ainv = (Ainv + Ainv.T) / 2
    BA = prob.B @ Ainv
    V, U = prob.Wt.clone(), torch.zeros_like(prob.Wt)
    signed = torch.empty_like(V)  # also holds the scores |V + U| while a mask is chosen
    for t in range(opts.iterations):
        if t > 0:
            V.add_(U)  # V + U, in place: V is rewritten below
            if t < schedule:
                keep = select(t, torch.abs(V, out=signed))
        if t == 0 or t < schedule:
            pruned = (~keep).to(V.dtype)
        torch.mul(V, pruned, out=U)  # U ← (V+U)⊙(1−M)
        torch.sub(V, U, alpha=2.0, out=signed)  # Z − U with Z = (V+U)⊙M
        torch.addmm(BA, signed, Ainv, alpha=opts.rho, out=V)
    return V.add_(U).mul_(keep.to(V.dtype))


def _refine(prob: _Normalised, V: Tensor, keep: Tensor, opts: ADMMOptions) -> tuple[Tensor, Tensor, int]:
    """Conjugate gradients for ``min f(V)`` over the support ``keep``, all rows at once (per-row step sizes).

    A step along ``P`` lowers ``f = tr(ΔV H̃_λ ΔVᵀ)`` by ``Σ_rows α‖r‖²``; the loop stops once a step lowers it by at
    most ``refine_tol·f`` (at least one step), or after ``refine_iterations``. Returns ``(V, R, steps)`` with
    ``R = (W̃H̃_λ − VH̃_λ) ⊙ M`` the final projected residual (kept by the recurrence)."""
    Mf = keep.to(V.dtype)
    R = (prob.B - V @ prob.Hl).mul_(Mf)
    f = _objective(prob, V, R).sum()
    P = R.clone()
    rs = R.square().sum(dim=1)
    for step in range(opts.refine_iterations):
        Q = (P @ prob.Hl).mul_(Mf)
        pq = (P * Q).sum(dim=1)
        alpha = torch.where(pq > 0, rs / torch.where(pq > 0, pq, torch.ones_like(pq)), torch.zeros_like(pq))
        V.addcmul_(alpha[:, None], P)
        R.addcmul_(alpha[:, None], Q, value=-1.0)
        decrease = (alpha * rs).sum()
        f = f - decrease
        rs_new = R.square().sum(dim=1)
        if float(decrease) <= opts.refine_tol * float(f) or not bool((rs_new > 0).any()):
            return V, R, step + 1
        beta = torch.where(rs > 0, rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)), torch.zeros_like(rs))
        P.mul_(beta[:, None]).add_(R)
        rs = rs_new
    return V, R, opts.refine_iterations


def _objective(prob: _Normalised, V: Tensor, R: Tensor) -> Tensor:
    """``tr(ΔV H̃_λ ΔVᵀ)`` per row (``= tr(ΔW (H + λ·diag H) ΔWᵀ)``: ``ΔV = ΔW D``) with no further product: ``V`` is
    zero off the support, where ``V H̃_λ = B − R``, so ``tr(V H̃_λ Vᵀ) = Σ V⊙(B − R)`` and the row's value is
    ``Σ (W̃ − V)⊙B − Σ V⊙R``."""
    return ((prob.Wt - V) * prob.B).sum(dim=1) - (V * R).sum(dim=1)


# ---------------------------------------------------------------- results


def _results(
    Ws: list[Tensor],
    prob: _Normalised,
    V: Tensor,
    R: Tensor,
    keep: Tensor,
    segments: list[tuple[int, int]],
    nm: tuple[int, int] | None,
    n_tokens: int | None,
    opts: ADMMOptions,
    steps: int,
) -> list[PruneResult]:
    losses = _objective(prob, V, R)
    V = V.masked_fill(~keep | prob.dead[None, :], 0.0)
    # the damping's part of the loss: λ·Σ_j H_jj‖ΔW_{:,j}‖² = λ‖ΔV‖² in normalised coordinates
    damping = opts.percdamp * (prob.Wt - V).square().sum(dim=1)
    scale = 1.0 / n_tokens if n_tokens else 1.0
    W_new = V / prob.D[None, :]
    out = []
    for W, (r0, r1) in zip(Ws, segments):
        m = keep[r0:r1]
        info = {
            "method": "admm",
            "pattern": "unstructured" if nm is None else f"{nm[0]}:{nm[1]}",
            "sparsity": 1.0 - m.float().mean().item(),
            "loss": float(losses[r0:r1].sum()) * scale,
            "error": max(float((losses[r0:r1] - damping[r0:r1]).sum()) * scale, 0.0),
            "damp": opts.percdamp,
            "refine_steps": steps,
            "dead_inputs": int(prob.dead.sum()),
        }
        out.append(PruneResult(weight=W_new[r0:r1].to(W.dtype), mask=m, info=info))
    return out
