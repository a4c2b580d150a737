"""Tests of solvers.stats, solvers.masks, solvers.sparsegpt and solvers.registry against float64 references."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from solvers.masks import PruneResult, magnitude_prune, nm_mask, parse_pattern, prune_lowest, wanda_prune
from solvers.registry import available_solvers, get_solver, needs_gram, needs_stats
from solvers.sparsegpt import sparsegpt_prune, sparsegpt_prune_many
from solvers.stats import accumulate, col_norm_sq, init_stats, layer_error, merge


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated_inputs(seed: int, n: int = 256, d: int = 32) -> torch.Tensor:
    """``X = Z A`` with a random mixing ``A`` and spread column scales: an ill-conditioned Gram."""
    g = _gen(seed)
    Z = torch.randn(n, d, generator=g, dtype=torch.float64)
    A = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.randn(d, generator=g, dtype=torch.float64).exp()
    return Z @ A


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _margin(scores: np.ndarray, k: int) -> float:
    """Smallest relative gap, over the rows of ``scores``, between the ``k``-th lowest score (last pruned) and the
    next (first kept): ``inf`` when nothing or everything is pruned. Two computations of the same mask that differ
    only by rounding (another BLAS, thread count, blocking or precision) must agree when their score errors stay
    below this gap; tests that compare masks of two paths assert a wide gap first, so they cannot fail on a
    near-tie that either answer would resolve correctly."""
    if k <= 0 or k >= scores.shape[1]:
        return math.inf
    s = np.sort(scores, axis=1)
    scale = np.maximum(np.abs(s).max(axis=1), 1e-300)
    return float(((s[:, k] - s[:, k - 1]) / scale).min())


# ---------------------------------------------------------------- numpy / python references


def _ref_prune_lowest_rows(scores: np.ndarray, k: int) -> np.ndarray:
    keep = np.ones(scores.shape, dtype=bool)
    for r in range(scores.shape[0]):
        keep[r, np.argsort(scores[r], kind="stable")[:k]] = False
    return keep


def _ref_nm(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    keep = np.ones(scores.shape, dtype=bool)
    for r in range(scores.shape[0]):
        for g0 in range(0, scores.shape[1], m):
            keep[r, g0 + np.argsort(scores[r, g0 : g0 + m], kind="stable")[: m - n]] = False
    return keep


def _ref_obs(W: torch.Tensor, H: torch.Tensor, sparsity: float, nm, blocksize: int, percdamp: float):
    """Float64 OBS, column by column, full-matrix update, no lazy blocks and no Cholesky trick.

    Column i is pruned against the inverse of the Hessian of the not-yet-processed columns, ``F = (H_{i:, i:})⁻¹``:
    ``W_{:, i:} −= (w − q) F_{0,:} / F_00``. Scores ``w_j² / F⁽ʲ⁾_00`` are taken at block (unstructured) or group
    (N:M) starts on the current weights. Returns ``(W, keep, loss, margin)``, ``margin`` the smallest
    :func:`_margin` of its selections.
    """
    W = W.double().clone()
    H = H.double().clone()
    d_out, d_in = W.shape
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(percdamp * H.diagonal().mean())
    dsq = torch.stack([torch.linalg.inv(H[j:, j:])[0, 0] for j in range(d_in)])
    keep = np.ones((d_out, d_in), dtype=bool)
    loss, margin = 0.0, math.inf
    for i in range(d_in):
        if nm is None and i % blocksize == 0:
            i2 = min(i + blocksize, d_in)
            k = _round_half_up(sparsity * d_out * i2) - _round_half_up(sparsity * d_out * i)
            sc = (W[:, i:i2] ** 2 / dsq[i:i2]).numpy()
            flat = np.ones(sc.size, dtype=bool)
            flat[np.argsort(sc.reshape(-1), kind="stable")[:k]] = False
            margin = min(margin, _margin(sc.reshape(1, -1), k))
            keep[:, i:i2] = flat.reshape(sc.shape)
        if nm is not None and i % nm[1] == 0:
            sc = (W[:, i : i + nm[1]] ** 2 / dsq[i : i + nm[1]]).numpy()
            keep[:, i : i + nm[1]] = _ref_nm(sc, *nm)
            margin = min(margin, _margin(sc, nm[1] - nm[0]))
        F = torch.linalg.inv(H[i:, i:])
        w = W[:, i].clone()
        q = w * torch.from_numpy(keep[:, i]).double()
        W[:, i:] -= torch.outer((w - q) / F[0, 0], F[0, :])
        W[:, i] = q
        loss += float(((w - q) ** 2).sum() / F[0, 0])
    return W, torch.from_numpy(keep), loss, margin


# ---------------------------------------------------------------- stats


def test_accumulate_chunks_equals_float64_gram():
    g = _gen(0)
    chunks = [torch.randn(2, 5, 16, generator=g), torch.randn(7, 16, generator=g).bfloat16(), torch.randn(3, 16)]
    X = torch.cat([c.double().reshape(-1, 16) for c in chunks])
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        st = init_stats(16, dtype=dtype, track_moments=True)
        for c in chunks:
            accumulate(st, c)
        assert st.n == X.shape[0] == 20
        assert_close(st.H, (X.T @ X).to(dtype), rtol=tol, atol=tol)
        assert_close(st.sum, X.sum(0).to(dtype), rtol=tol, atol=tol)
        assert_close(st.sumsq, (X**2).sum(0).to(dtype), rtol=tol, atol=tol)
        assert_close(col_norm_sq(st), (X**2).sum(0).to(dtype), rtol=tol, atol=tol)


def test_stats_without_gram_keep_column_norms():
    X = torch.randn(30, 8, generator=_gen(1), dtype=torch.float64)
    st = init_stats(8, dtype=torch.float64, gram=False)
    accumulate(st, X)
    assert st.H is None and st.sum is None
    assert_close(col_norm_sq(st), X.norm(dim=0) ** 2)


def test_merge_equals_accumulating_everything():
    g = _gen(2)
    A, B = torch.randn(11, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    sa, sb, sall = (init_stats(6, dtype=torch.float64, track_moments=True) for _ in range(3))
    accumulate(sa, A)
    accumulate(sb, B)
    accumulate(sall, torch.cat([A, B]))
    m = merge(sa, sb)
    assert m.n == 15
    for f in ("H", "sum", "sumsq"):
        assert_close(getattr(m, f), getattr(sall, f))
    assert sa.n == 11  # inputs untouched
    with pytest.raises(ValueError, match="sum"):
        merge(sa, init_stats(6, dtype=torch.float64))


def test_stats_reject_bad_input():
    st = init_stats(4)
    with pytest.raises(ValueError, match="width 5"):
        accumulate(st, torch.ones(3, 5))
    with pytest.raises(ValueError):
        init_stats(0)


def test_layer_error_is_output_error():
    g = _gen(3)
    X = torch.randn(40, 12, generator=g, dtype=torch.float64)
    W0, W = torch.randn(5, 12, generator=g, dtype=torch.float64), torch.randn(5, 12, generator=g, dtype=torch.float64)
    expected = float(((W - W0) @ X.T).pow(2).sum())
    assert layer_error(W0, W, X.T @ X) == pytest.approx(expected, rel=1e-12)
    assert layer_error(W0, W0, X.T @ X) == 0.0


# ---------------------------------------------------------------- patterns and masks


def test_parse_pattern():
    assert parse_pattern(None) is None
    assert parse_pattern("unstructured") is None
    assert parse_pattern("2:4") == (2, 4)
    assert parse_pattern(" 4 : 8 ") == (4, 8)
    for bad in ("3:2", "0:4", "4:4", "2-4", "a:b", "2:4:8", "", "50%"):
        with pytest.raises(ValueError, match="pattern"):
            parse_pattern(bad)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_magnitude_matches_numpy_reference(sparsity):
    W = torch.randn(6, 20, generator=_gen(4))
    a = W.abs().numpy()
    res = magnitude_prune(W, sparsity, per_row=True)
    assert np.array_equal(res.mask.numpy(), _ref_prune_lowest_rows(a, _round_half_up(sparsity * 20)))
    assert (res.mask.sum(1) == 20 - _round_half_up(sparsity * 20)).all()
    res = magnitude_prune(W, sparsity)
    flat = _ref_prune_lowest_rows(a.reshape(1, -1), _round_half_up(sparsity * 120)).reshape(a.shape)
    assert np.array_equal(res.mask.numpy(), flat)
    assert res.info["sparsity"] == pytest.approx(_round_half_up(sparsity * 120) / 120)
    assert torch.equal(res.weight, W * res.mask)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_wanda_matches_numpy_reference(sparsity):
    g = _gen(5)
    W = torch.randn(7, 24, generator=g, dtype=torch.float64)
    X = torch.randn(50, 24, generator=g, dtype=torch.float64) * torch.rand(24, generator=g, dtype=torch.float64)
    st = init_stats(24, dtype=torch.float64, gram=False)
    accumulate(st, X)
    res = wanda_prune(W, col_norm_sq(st), sparsity)
    scores = (W.abs() * X.norm(dim=0)).numpy()
    k = _round_half_up(sparsity * 24)
    assert _margin(scores, k) > 1e-8  # the reference's norms are rounded differently: no near-tie to flip
    assert np.array_equal(res.mask.numpy(), _ref_prune_lowest_rows(scores, k))
    assert (res.mask.sum(1) == 24 - k).all()
    assert torch.equal(res.weight, W * res.mask)
    assert res.weight.dtype == W.dtype


def test_wanda_ties_are_deterministic():
    W = torch.tensor([[1.0, -1.0, 1.0, 2.0, 1.0, -2.0]]).bfloat16()
    res = wanda_prune(W, torch.ones(6), 0.5)
    # equal scores: the lower index is pruned first
    assert res.mask.tolist() == [[False, False, False, True, True, True]]
    assert res.weight.dtype == torch.bfloat16


def test_wanda_worked_example():
    res = wanda_prune(torch.tensor([[4.0, -1.0, 2.0, 3.0]]), torch.tensor([1.0, 25.0, 1.0, 1.0]), 0.5)
    assert res.mask.tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_nm_masks_keep_n_largest_of_every_m(pattern):
    n, m = parse_pattern(pattern)
    g = _gen(6)
    W = torch.randn(5, 32, generator=g)
    cns = torch.rand(32, generator=g) + 0.1
    for res, scores in (
        (magnitude_prune(W, 0.5, pattern=pattern), W.abs()),
        (wanda_prune(W, cns, 0.5, pattern=pattern), W.abs() * cns.sqrt()),
    ):
        groups_keep = res.mask.reshape(5, -1, m)
        assert (groups_keep.sum(-1) == n).all()
        sg = scores.reshape(5, -1, m)
        kept_min = torch.where(groups_keep, sg, torch.inf).amin(-1)
        pruned_max = torch.where(~groups_keep, sg, -torch.inf).amax(-1)
        assert (kept_min >= pruned_max).all()
        assert np.array_equal(res.mask.numpy(), _ref_nm(scores.numpy(), n, m))
        assert res.info["sparsity"] == pytest.approx(1 - n / m)


@pytest.mark.parametrize("m", [4, 8, 16])
def test_selection_with_many_ties_matches_the_stable_sort(m):
    """Integer scores (ties everywhere): the fast paths (threshold when no tie straddles it, pairwise ranks for
    small N:M groups) choose exactly the stable sort's set."""
    g = _gen(30 + m)
    scores = torch.randint(0, 4, (6, 8 * m), generator=g).float()
    for k in (0, 1, 5, 8 * m - 1, 8 * m):
        assert np.array_equal(prune_lowest(scores, k).numpy(), _ref_prune_lowest_rows(scores.numpy(), k)), k
    continuous = torch.rand(6, 8 * m, generator=g)
    assert np.array_equal(prune_lowest(continuous, 13).numpy(), _ref_prune_lowest_rows(continuous.numpy(), 13))
    for n in (1, m // 2, m - 1):
        assert np.array_equal(nm_mask(scores, n, m).numpy(), _ref_nm(scores.numpy(), n, m)), n


def test_nm_mask_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of M=4"):
        nm_mask(torch.ones(2, 10), 2, 4)
    with pytest.raises(ValueError):
        nm_mask(torch.ones(2, 8), 4, 4)
    with pytest.raises(ValueError, match="pattern"):
        magnitude_prune(torch.ones(2, 8), 0.5, pattern="3:2")
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_prune(torch.ones(2, 8), 1.5)
    with pytest.raises(ValueError, match="NaN"):
        wanda_prune(torch.tensor([[float("nan"), 1.0]]), torch.ones(2), 0.5)


# ---------------------------------------------------------------- sparsegpt


def _sgpt_problem(seed: int, d_out: int = 8, d_in: int = 32, n: int = 128):
    g = _gen(seed)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64) @ (
        torch.eye(d_in, dtype=torch.float64) + 0.5 * torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    )
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    return W, X.T @ X


@pytest.mark.parametrize("pattern,sparsity", [(None, 0.5), (None, 0.3), ("2:4", 0.5), ("1:4", 0.75)])
@pytest.mark.parametrize("blocksize", [8, 32])
def test_sparsegpt_matches_float64_obs_reference(pattern, sparsity, blocksize):
    W, H = _sgpt_problem(7)
    res = sparsegpt_prune(W, H, sparsity, pattern=pattern, blocksize=blocksize)
    W_ref, keep_ref, loss_ref, margin = _ref_obs(W, H, sparsity, parse_pattern(pattern), blocksize, 0.01)
    assert margin > 1e-8  # far above float64 rounding: the blocked and the plain recurrence must choose alike
    assert torch.equal(res.mask, keep_ref)
    assert_close(res.weight, W_ref, rtol=1e-9, atol=1e-9)
    assert res.info["loss"] == pytest.approx(loss_ref, rel=1e-9)
    assert torch.equal(res.weight == 0, ~res.mask)
    k = _round_half_up(sparsity * W.numel())
    assert res.info["sparsity"] == pytest.approx(k / W.numel())


def test_sparsegpt_loss_is_damped_layer_error():
    W, H = _sgpt_problem(8)
    res = sparsegpt_prune(W, H, 0.5, blocksize=8)
    H_damped = H + 0.01 * H.diagonal().mean() * torch.eye(32, dtype=torch.float64)
    assert res.info["loss"] == pytest.approx(layer_error(W, res.weight, H_damped), rel=1e-9)
    scaled = sparsegpt_prune(W, H, 0.5, blocksize=8, n_tokens=128)  # scale of H does not change the solution
    assert_close(scaled.weight, res.weight, rtol=1e-9, atol=1e-9)
    assert scaled.info["loss"] == pytest.approx(res.info["loss"] / 128, rel=1e-9)


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_sparsegpt_float32_close_to_float64(pattern):
    W, H = _sgpt_problem(9)
    # every selection's gap is far above float32 rounding of the scores (~1e-6), so the masks must agree
    assert _ref_obs(W, H, 0.5, parse_pattern(pattern), 16, 0.01)[3] > 1e-5
    r64 = sparsegpt_prune(W, H, 0.5, pattern=pattern, blocksize=16)
    r32 = sparsegpt_prune(W.float(), H.float(), 0.5, pattern=pattern, blocksize=16)
    assert r32.weight.dtype == torch.float32
    assert torch.equal(r32.mask, r64.mask)
    assert_close(r32.weight.double(), r64.weight, rtol=1e-4, atol=1e-4)
    rbf = sparsegpt_prune(W.bfloat16(), H.float(), 0.5, pattern=pattern, blocksize=16)
    assert rbf.weight.dtype == torch.bfloat16
    assert bool((rbf.weight[~rbf.mask] == 0).all())


def test_sparsegpt_nm_independent_of_blocksize():
    W, H = _sgpt_problem(10, d_out=6, d_in=48)
    assert _ref_obs(W, H, 0.5, (2, 4), 48, 0.01)[3] > 1e-8  # no near-tie for the regrouped sums to flip
    results = [sparsegpt_prune(W, H, 0.5, pattern="2:4", blocksize=b) for b in (4, 12, 48)]
    for r in results[1:]:
        assert torch.equal(r.mask, results[0].mask)
        assert_close(r.weight, results[0].weight, rtol=1e-10, atol=1e-10)
    assert (results[0].mask.reshape(6, -1, 4).sum(-1) == 2).all()


def test_sparsegpt_sparsity_zero_is_identity():
    W, H = _sgpt_problem(11)
    H[:, 3] = 0.0
    H[3, :] = 0.0  # a dead input must not be zeroed when nothing is pruned
    for Wt in (W, W.float(), W.bfloat16()):
        res = sparsegpt_prune(Wt, H, 0.0)
        assert torch.equal(res.weight, Wt) and bool(res.mask.all())
        assert res.info["sparsity"] == 0.0


def test_sparsegpt_dead_inputs():
    W, H = _sgpt_problem(12)
    H[:, [0, 5]] = 0.0
    H[[0, 5], :] = 0.0
    res = sparsegpt_prune(W, H, 0.5, blocksize=8, percdamp=0.0)
    assert bool(torch.isfinite(res.weight).all())
    assert bool((res.weight[:, [0, 5]] == 0).all())
    assert not bool(res.mask[:, [0, 5]].any())  # zero score: pruned first
    assert res.info["dead_inputs"] == 2
    assert res.info["damp"] == 0.0  # H_jj = 1 alone makes the singular H factorise


def test_sparsegpt_cholesky_retry(caplog):
    W = torch.randn(4, 8, generator=_gen(13), dtype=torch.float64)
    H = torch.eye(8, dtype=torch.float64)
    H[7, 7] = -0.5  # indefinite: needs damping ≥ 0.5/mean(diag) ≈ 0.62 to factorise
    with caplog.at_level(logging.WARNING, logger="solvers.sparsegpt"):
        res = sparsegpt_prune(W, H, 0.5, percdamp=0.0)
    assert res.info["damp"] == pytest.approx(1.0)
    assert sum("Cholesky" in r.getMessage() for r in caplog.records) == 3
    H[7, 7] = -1e6
    with pytest.raises(RuntimeError, match="Cholesky"):
        sparsegpt_prune(W, H, 0.5)
    H[7, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sparsegpt_prune(W, H, 0.5)


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_sparsegpt_consuming_H_equals_copying(pattern):
    """``consume_H=True`` factorises the caller's Gram in its own storage: the same masks and weights as the copying
    path (float32, to 1e-6 relative), the Gram overwritten; without it the caller's Gram is bit-for-bit untouched."""
    g = _gen(50)
    X = torch.randn(256, 64, generator=g) @ torch.randn(64, 64, generator=g)
    H = X.T @ X
    H[:, 5] = 0.0
    H[5, :] = 0.0  # a dead input
    Ws = [torch.randn(r, 64, generator=g) for r in (24, 8)]
    H0 = H.clone()
    copying = sparsegpt_prune_many(Ws, H, 0.5, pattern=pattern, blocksize=16, n_tokens=256)
    assert torch.equal(H, H0)
    consumed = sparsegpt_prune_many(Ws, H, 0.5, pattern=pattern, blocksize=16, n_tokens=256, consume_H=True)
    assert not torch.equal(H, H0)  # its storage held the factor
    for a, b in zip(copying, consumed):
        assert torch.equal(a.mask, b.mask)
        assert_close(b.weight, a.weight, rtol=1e-6, atol=1e-6 * float(a.weight.abs().max()))
        assert b.info["loss"] == pytest.approx(a.info["loss"], rel=1e-6)
        assert b.info["damp"] == a.info["damp"] and b.info["dead_inputs"] == 1
    # a Gram the solver cannot use in place (another dtype) is copied even when offered
    H64 = H0.double()
    sparsegpt_prune(Ws[0], H64, 0.5, blocksize=16, consume_H=True)
    assert torch.equal(H64, H0.double())


@pytest.mark.parametrize("consume", [False, True])
def test_sparsegpt_retry_restores_the_gram(monkeypatch, consume):
    """A failed factorisation is retried on the undamped Gram: restored from the caller's copy, or (consumed) from
    the backup of its lower triangle in blocks of rows; either way the result equals a solve at the final damping."""
    import solvers.sparsegpt as sg

    monkeypatch.setattr(sg, "_BACKUP_ROWS", 5)
    W, H = _sgpt_problem(51, d_out=6, d_in=23)
    H[7, 7] = -0.2 * float(H.diagonal().mean())  # indefinite: needs damping ≥ ~0.2 to factorise
    ref = sparsegpt_prune(W, H.clone(), 0.5, blocksize=8, percdamp=1.0)
    res = sparsegpt_prune(W, H.clone(), 0.5, blocksize=8, percdamp=0.0, consume_H=consume)
    assert res.info["damp"] == pytest.approx(1.0)
    assert torch.equal(res.mask, ref.mask)
    assert_close(res.weight, ref.weight, rtol=1e-9, atol=1e-9)


def test_inverse_hessian_cholesky_in_place():
    """``U`` with ``UᵀU = (H + λ·mean(diag H)·I)⁻¹`` is written over ``H`` (same storage), lower triangle zero."""
    from solvers.sparsegpt import inverse_hessian_cholesky

    _, H = _sgpt_problem(52, d_in=40)
    ref = H + 0.05 * H.diagonal().mean() * torch.eye(40, dtype=torch.float64)
    ptr = H.data_ptr()
    U, damp = inverse_hessian_cholesky(H, 0.05)
    assert U.data_ptr() == ptr and damp == 0.05
    assert torch.equal(U, U.triu())
    assert_close(U.T @ U, torch.linalg.inv(ref), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="contiguous"):
        inverse_hessian_cholesky(torch.eye(4, dtype=torch.float64).T[:, :3], 0.01)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparsegpt_error_without_the_gram(dtype):
    """``info["error"]`` (OBS sum minus the damping's share) is the undamped ``tr(ΔW H ΔWᵀ)/n``: what the registry
    reports with ``consume_gram=True``, when no Gram is left to measure it."""
    from solvers.registry import get_solver

    X = _correlated_inputs(53, n=256, d=48).to(dtype)
    W = torch.randn(20, 48, generator=_gen(54), dtype=dtype)
    st = init_stats(48, dtype=dtype)
    accumulate(st, X)
    st.H[:, 3] = 0.0
    st.H[3, :] = 0.0
    exact = get_solver("sparsegpt")(W, st, 0.5, None, blocksize=16, compute_error=True)
    consumed = get_solver("sparsegpt")(W, st, 0.5, None, blocksize=16, compute_error=True, consume_gram=True)
    assert st.H is None  # consumed: nobody reads it as a Gram again
    rel = 1e-9 if dtype == torch.float64 else 1e-4
    assert exact.info["error"] == pytest.approx(float(layer_error(W, exact.weight, _gram(X, 3)) / 256), rel=rel)
    assert consumed.info["error"] == pytest.approx(exact.info["error"], rel=rel)


def _gram(X: torch.Tensor, dead: int) -> torch.Tensor:
    H = X.double().T @ X.double()
    H[:, dead] = 0.0
    H[dead, :] = 0.0
    return H


def test_sparsegpt_rejects_bad_arguments():
    W, H = _sgpt_problem(14)
    with pytest.raises(ValueError, match="Hessian shape"):
        sparsegpt_prune(W, H[:16, :16], 0.5)
    with pytest.raises(ValueError, match="multiples of M=4"):
        sparsegpt_prune(W, H, 0.5, pattern="2:4", blocksize=6)
    with pytest.raises(ValueError, match="blocksize"):
        sparsegpt_prune(W, H, 0.5, blocksize=0)


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_error_order_sparsegpt_wanda_magnitude(pattern):
    for seed in range(5):
        X = _correlated_inputs(100 + seed)
        W = torch.randn(16, 32, generator=_gen(200 + seed), dtype=torch.float64)
        st = init_stats(32, dtype=torch.float64)
        accumulate(st, X)
        errs = {}
        for name in ("magnitude", "wanda", "sparsegpt"):
            res = get_solver(name)(W, st, 0.5, pattern, compute_error=True)
            errs[name] = res.info["error"]
            assert res.info["error"] == pytest.approx(layer_error(W, res.weight, st.H) / st.n)
        assert errs["sparsegpt"] <= errs["wanda"] <= errs["magnitude"], (seed, errs)


# ---------------------------------------------------------------- registry


def test_registry():
    assert available_solvers() == ("admm", "magnitude", "sparsegpt", "wanda")
    assert not needs_stats("magnitude") and not needs_gram("magnitude")
    assert needs_stats("wanda") and not needs_gram("wanda")
    assert needs_stats("sparsegpt") and needs_gram("sparsegpt")
    with pytest.raises(ValueError, match="admm, magnitude, sparsegpt, wanda"):
        get_solver("obs")
    with pytest.raises(ValueError, match="admm, magnitude, sparsegpt, wanda"):
        needs_gram("Wanda")


def test_registry_solvers_run_with_minimal_stats():
    g = _gen(15)
    W = torch.randn(4, 16, generator=g)
    X = torch.randn(3, 10, 16, generator=g)
    assert isinstance(get_solver("magnitude")(W, None, 0.5, None), PruneResult)
    light = init_stats(16, gram=needs_gram("wanda"))
    accumulate(light, X)
    res = get_solver("wanda")(W, light, 0.5, "2:4")
    assert torch.equal(res.mask, wanda_prune(W, (X.reshape(-1, 16) ** 2).sum(0), 0.5, pattern="2:4").mask)
    with pytest.raises(ValueError, match="Gram"):
        get_solver("sparsegpt")(W, light, 0.5, None)
    with pytest.raises(ValueError, match="statistics"):
        get_solver("wanda")(W, None, 0.5, None)
    full = init_stats(16)
    accumulate(full, X)
    res = get_solver("sparsegpt")(W, full, 0.5, None, blocksize=8, percdamp=0.05)
    assert res.info["sparsity"] == pytest.approx(0.5)
    assert res.info["damp"] == pytest.approx(0.05)


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_sparsegpt_many_equals_one_by_one(pattern):
    """Stacking matrices that share H (q/k/v, gate/up) gives the same masks and weights as solving each alone."""
    from solvers.sparsegpt import sparsegpt_prune, sparsegpt_prune_many

    g = torch.Generator().manual_seed(5)
    X = torch.randn(256, 32, generator=g) @ torch.randn(32, 32, generator=g)
    H = X.T @ X
    Ws = [torch.randn(r, 32, generator=g) for r in (16, 8, 8)]
    # float32 products over 32 stacked rows and over 16 may round differently: assert the selections have gaps
    # far above that rounding, so the masks must agree
    assert min(_ref_obs(W, H, 0.5, parse_pattern(pattern), 8, 0.01)[3] for W in Ws) > 1e-5
    many = sparsegpt_prune_many(Ws, H, 0.5, pattern=pattern, blocksize=8)
    for W, res in zip(Ws, many):
        one = sparsegpt_prune(W, H, 0.5, pattern=pattern, blocksize=8)
        assert torch.equal(one.mask, res.mask)
        torch.testing.assert_close(one.weight, res.weight, rtol=1e-5, atol=1e-6)
        assert one.info["loss"] == pytest.approx(res.info["loss"], rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d", [8, 255, 256, 577, 1031])
def test_gram_add_upper_blocks_equal_the_full_product(d, dtype):
    """Close to the full product; exactly symmetric by construction (the lower triangle is copied), on any BLAS."""
    from solvers.stats import gram_add_

    g = torch.Generator().manual_seed(d)
    X = torch.randn(300, d, generator=g, dtype=dtype)
    H = torch.randn(d, d, generator=g, dtype=dtype)
    H = H + H.T
    ref = H.double() + X.double().T @ X.double()
    gram_add_(H, X)
    tol = {"rtol": 1e-12, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-3}
    torch.testing.assert_close(H.double(), ref, **tol)
    assert torch.equal(H, H.T)


def test_gram_add_is_symmetric_even_from_an_asymmetric_start():
    """Every entry below the diagonal is a copy of the one above it, so symmetry does not depend on the input."""
    from solvers.stats import gram_add_

    g = torch.Generator().manual_seed(3)
    X = torch.randn(64, 300, generator=g)
    H = torch.randn(300, 300, generator=g)
    upper = torch.triu(H + X.T @ X)
    gram_add_(H, X)
    assert torch.equal(H, H.T)
    torch.testing.assert_close(torch.triu(H), upper, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- selection internals (chunks, straddling ties)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_kth_smallest_numpy_and_torch_agree(monkeypatch, dtype):
    """The CPU selection (numpy introselect) and the torch one (other devices) give the same threshold and the same
    rows with a tie straddling it, on integer-valued scores (ties everywhere) and continuous ones."""
    import solvers.masks as masks
    from solvers.masks import _kth_smallest_torch, kth_smallest

    monkeypatch.setattr(masks, "_PARALLEL_MIN", 1)  # rows partitioned on 3 threads
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    g = _gen(40)
    for scores in (torch.randint(0, 5, (9, 37), generator=g).to(dtype), torch.rand(9, 37, generator=g).to(dtype)):
        for k in (1, 2, 18, 36, 37):
            thr, straddle = kth_smallest(scores, k)
            ref_thr, ref_straddle = _kth_smallest_torch(scores, k)
            assert thr.dtype == scores.dtype and thr.shape == (9, 1)
            assert torch.equal(thr, ref_thr) and torch.equal(straddle, ref_straddle), k
            s = np.sort(scores.float().numpy(), axis=1)
            assert np.array_equal(thr[:, 0].float().numpy(), s[:, k - 1])


@pytest.mark.parametrize("per_row", [True, False])
def test_masks_in_chunks_of_rows_equal_one_chunk(monkeypatch, per_row):
    """Wanda and magnitude select row chunk by row chunk (`_CHUNK` entries): the same masks and weights as one chunk,
    with bfloat16 weights (ties straddling many rows' thresholds) and an N:M pattern."""
    import solvers.masks as masks

    g = _gen(41)
    W = torch.randint(-3, 4, (23, 40), generator=g).bfloat16()
    norms = torch.randint(1, 3, (40,), generator=g).float()
    runs = []
    for chunk in (1 << 22, 40, 3 * 40 + 7):
        monkeypatch.setattr(masks, "_CHUNK", chunk)
        runs.append(
            [
                masks.wanda_prune(W, norms, 0.5),
                masks.wanda_prune(W, norms, 0.5, pattern="2:4"),
                masks.magnitude_prune(W, 0.3, per_row=per_row),
                masks.magnitude_prune(W, 0.5, pattern="4:8"),
            ]
        )
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight) and a.info == b.info
    scores = (W.float().abs() * norms.sqrt()).numpy()
    assert np.array_equal(runs[1][0].mask.numpy(), _ref_prune_lowest_rows(scores, 20))
    assert runs[1][0].weight.dtype == torch.bfloat16 and torch.equal(runs[1][0].weight, W * runs[1][0].mask)


def test_all_finite():
    from solvers.masks import all_finite

    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = torch.randn(50, 7).to(dtype)
        assert all_finite(x) and all_finite(x[:0])
        for bad in (math.nan, math.inf, -math.inf):
            y = x.clone()
            y[31, 4] = bad
            assert not all_finite(y)
            # transposed views (SparseGPT checks its column-major factor): reduced through the storage, same answer
            assert not all_finite(y.mT) and all_finite(x.mT) and not all_finite(y[1::2].mT)


def test_all_finite_of_a_transposed_view_copies_nothing(monkeypatch):
    """``aminmax`` sees the contiguous storage of ``H.mT`` (a copy of a d x d factor would cost d² floats)."""
    import solvers.masks as masks

    seen = []
    real = torch.aminmax
    monkeypatch.setattr(masks.torch, "aminmax", lambda t: (seen.append(t.is_contiguous()), real(t))[1])
    H = torch.randn(64, 64)
    assert masks.all_finite(H.mT) and seen == [True]


def test_long_rows_break_ties_by_position(monkeypatch):
    """A row longer than `_CHUNK` (a layer flattened for one global threshold) breaks its straddling ties from the
    positions of its tied entries instead of a cumulative count: the same set as the stable sort."""
    import solvers.masks as masks

    monkeypatch.setattr(masks, "_CHUNK", 30)
    scores = torch.randint(0, 3, (3, 100), generator=_gen(42)).float()
    for k in (1, 33, 50, 99):
        assert np.array_equal(masks.prune_lowest(scores, k).numpy(), _ref_prune_lowest_rows(scores.numpy(), k)), k
    W = torch.randint(-2, 3, (7, 13), generator=_gen(43)).bfloat16()
    for sparsity in (0.2, 0.5, 0.9):
        res = masks.magnitude_prune(W, sparsity)  # streamed over chunks of 2 rows, ties in row-major order
        ref = _ref_prune_lowest_rows(W.float().abs().numpy().reshape(1, -1), _round_half_up(sparsity * 91))
        assert np.array_equal(res.mask.numpy(), ref.reshape(7, 13)), sparsity


_PEAK_SCRIPT = """
import sys, torch
from solvers.sparsegpt import sparsegpt_prune
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
sparsegpt_prune(torch.randn(64, 256), torch.eye(256), 0.5)  # warm-up: library code pages
d, consume = int(sys.argv[1]), sys.argv[2] == "1"
g = torch.Generator().manual_seed(0)
W = torch.randn(d, d, generator=g)
B = torch.randn(d, 64, generator=g)
H = B @ B.T
H.diagonal().add_(1.0)
del B
rss = status("VmRSS")
sparsegpt_prune(W, H, 0.5, n_tokens=100, consume_H=consume)
print(status("VmHWM") - rss)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS from Linux's /proc/self/status")
@pytest.mark.parametrize("consume", [False, True])
def test_sparsegpt_workspace_estimate_bounds_the_measured_peak(consume):
    """The memory plan's number (`workspace_bytes`, CPU) bounds the peak RSS increase of a solve in a fresh
    process from above, within ~20% (d = d_out = 3072, float32)."""
    from solvers.registry import workspace_bytes

    d = 3072
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(d), str(int(consume))], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    measured = int(out.stdout.split()[-1])
    estimate = workspace_bytes("sparsegpt", d, d, consume_gram=consume, cuda=False)
    assert measured <= estimate <= 1.25 * measured, (measured, estimate)
    gram = (
        4 * 8192**2
    )  # CUDA: cholesky_inverse's clone of the Gram while factorising (the larger phase when d_out << d)
    assert workspace_bytes("sparsegpt", 64, 8192, consume_gram=consume) == int(1.15 * (1.5 if consume else 2) * gram)
