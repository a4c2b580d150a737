"""MoE expert pruning by behavioural similarity (STUN, Lee et al. 2024): distances, clustering, representatives.

Pipeline for one MoE block with ``E`` routed experts (shared experts are never passed in here):

1. a distance ``D [E, E]`` between experts: router rows (:func:`router_distance`), top-k co-activation
   (:func:`coactivation_counts` → :func:`coactivation_distance`), or both (:func:`mixed_distance`);
2. complete-linkage agglomerative clustering into exactly ``n_keep`` clusters (:func:`cluster_experts`): STUN's
   greedy rule "merge the closest pair only if *every* cross distance is below the threshold", with the threshold
   bisected to hit the budget, is complete linkage cut at ``n_keep`` clusters;
3. per cluster one representative, the member closest to the cluster centroid (:func:`choose_representatives`),
   whose weights and router row are kept; or the cluster average written into that slot (:func:`merge_average`).

All functions are pure and run in float64 on CPU for the ``[E, E]`` matrices (``E`` is at most a few hundred).
Worked example: router rows ``[[0, 0], [0, 1e-3], [5, 0], [5, 1e-3]]``, ``n_keep = 2`` → clusters ``[0, 0, 1, 1]``.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from torch import Tensor

__all__ = [
    "Representatives",
    "choose_representatives",
    "cluster_experts",
    "cluster_experts_grouped",
    "coactivation_counts",
    "coactivation_distance",
    "experts_to_keep",
    "merge_average",
    "mixed_distance",
    "n_keep_for_target",
    "router_distance",
]

logger = logging.getLogger(__name__)


class Representatives(NamedTuple):
    """``keep``: one expert per cluster, ascending. ``merged``: ``[n_keep, ...]`` cluster averages aligned with
    ``keep`` (``merged[i]`` replaces expert ``keep[i]``), only in ``mode="average"``, else ``None``."""

    keep: list[int]
    merged: Tensor | None


# ---------------------------------------------------------------- distances


def _finish(D: Tensor) -> Tensor:
    """Exact symmetry and a zero diagonal (removes matmul rounding)."""
    D = 0.5 * (D + D.T)
    D.fill_diagonal_(0.0)
    return D


def router_distance(W_gate: Tensor, *, normalize: bool = False) -> Tensor:
    """``D_ij = ‖w_i − w_j‖₂`` between router rows ``W_gate [E, H]`` (float64).

    ``normalize=True`` first scales each row to unit norm (a zero row stays zero), so ``D_ij = sqrt(2 − 2 cos_ij)``:
    it compares routing *directions* and ignores a per-expert logit scale. The default keeps raw rows, which is
    what a kept router row stands in for.
    """
    if W_gate.dim() != 2 or not W_gate.is_floating_point():
        raise ValueError(f"router_distance: W_gate must be a 2-D float [E, H] tensor, got {tuple(W_gate.shape)}")
    W = W_gate.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"router_distance: W_gate {tuple(W.shape)} contains NaN or inf")
    if normalize:
        W = W / W.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return _finish(torch.cdist(W, W, compute_mode="donot_use_mm_for_euclid_dist"))


def coactivation_counts(top_k_index: Tensor, E: int) -> Tensor:
    """``a_ij`` = number of tokens whose top-k holds both ``i`` and ``j``; ``a_ii`` = tokens routed to ``i``.

    ``top_k_index [T, k]`` integer expert ids (distinct within a row). Returns int64 ``[E, E]``; counts are additive,
    so summing the result over calibration batches equals one call on all tokens.
    """
    if top_k_index.dim() != 2 or top_k_index.is_floating_point() or top_k_index.dtype == torch.bool:
        raise ValueError(
            f"coactivation_counts: top_k_index must be an integer [T, k] tensor, got "
            f"{tuple(top_k_index.shape)} {top_k_index.dtype}"
        )
    idx = top_k_index.detach().to("cpu", torch.int64)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= E):
        raise ValueError(
            f"coactivation_counts: expert ids must lie in [0, {E}), got [{int(idx.min())}, {int(idx.max())}]"
        )
    srt = idx.sort(dim=1).values
    if bool((srt[:, 1:] == srt[:, :-1]).any()):
        raise ValueError("coactivation_counts: a token lists the same expert twice in its top-k")
    pairs = (idx[:, :, None] * E + idx[:, None, :]).reshape(-1)  # every ordered pair (p, q) of each token
    return torch.bincount(pairs, minlength=E * E).reshape(E, E)


def _check_square(D: Tensor, name: str) -> Tensor:
    if D.dim() != 2 or D.shape[0] != D.shape[1]:
        raise ValueError(f"{name}: expected a square [E, E] matrix, got {tuple(D.shape)}")
    D = D.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(D).all()):
        raise ValueError(f"{name}: matrix {tuple(D.shape)} contains NaN or inf")
    if bool((D < 0).any()):
        raise ValueError(f"{name}: matrix has negative entries")
    scale = max(float(D.abs().max()), 1.0)
    if float((D - D.T).abs().max()) > 1e-9 * scale:
        raise ValueError(f"{name}: matrix is not symmetric (max |D - D^T| = {float((D - D.T).abs().max()):.3g})")
    return D


def coactivation_distance(a: Tensor, tokens_per_expert: Tensor | None = None) -> Tensor:
    """``d_ij = 1 − a_ij / sqrt(n_i n_j)`` (0 on the diagonal), in ``[0, 1]``; ``n`` defaults to ``diag(a)``.

    ``a_ij / sqrt(n_i n_j)`` is the cosine between the two experts' token-indicator vectors: 1 when they always fire
    together, 0 when never. An expert that got no token is at distance 1 from all others.
    """
    a = _check_square(a, "coactivation_distance")
    n = a.diagonal().clone() if tokens_per_expert is None else tokens_per_expert.detach().to("cpu", torch.float64)
    if n.shape != (a.shape[0],) or bool((n < 0).any()):
        raise ValueError(f"coactivation_distance: tokens_per_expert must be [E={a.shape[0]}] and >= 0")
    denom = (n[:, None] * n[None, :]).sqrt()
    sim = torch.where(denom > 0, a / denom.clamp_min(1e-300), torch.zeros_like(a))
    return _finish((1.0 - sim).clamp(0.0, 1.0))


def mixed_distance(d1: Tensor, d2: Tensor, alpha: float = 0.5) -> Tensor:
    """``α · d1 / max d1 + (1 − α) · d2 / max d2``: each scaled to ``[0, 1]`` by its largest entry (0 stays 0)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"mixed_distance: alpha must lie in [0, 1], got {alpha}")
    d1, d2 = _check_square(d1, "mixed_distance d1"), _check_square(d2, "mixed_distance d2")
    if d1.shape != d2.shape:
        raise ValueError(f"mixed_distance: shapes differ, {tuple(d1.shape)} vs {tuple(d2.shape)}")
    unit = lambda d: d / float(d.max()) if float(d.max()) > 0 else d
    return _finish(alpha * unit(d1) + (1.0 - alpha) * unit(d2))


# ---------------------------------------------------------------- clustering


def n_keep_for_target(E: int, target: float) -> int:
    """Experts kept when a fraction ``target`` of ``E`` routed experts is removed: ``E − round(target · E)``
    (halves round up), at least 1. The caller enforces ``top_k ≤ n_keep``."""
    if not 0.0 <= target < 1.0:
        raise ValueError(f"n_keep_for_target: target must lie in [0, 1), got {target}")
    return max(E - int(math.floor(target * E + 0.5)), 1)


def _canonical(labels: np.ndarray) -> Tensor:
    """Relabel clusters 0..k-1 in the order of their smallest member."""
    order = {lab: i for i, lab in enumerate(dict.fromkeys(labels.tolist()))}
    return torch.tensor([order[lab] for lab in labels.tolist()], dtype=torch.int64)


def _cut_by_merges(Z: np.ndarray, E: int, n_keep: int) -> np.ndarray:
    """Apply the first ``E − n_keep`` merges of the linkage ``Z`` (union-find): exactly ``n_keep`` clusters."""
    parent = list(range(2 * E - 1))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for step in range(E - n_keep):
        a, b = int(Z[step, 0]), int(Z[step, 1])
        parent[root(a)] = parent[root(b)] = E + step
    return np.array([root(i) for i in range(E)])


def cluster_experts(D: Tensor, n_keep: int) -> Tensor:
    """Complete-linkage clusters of the experts, exactly ``n_keep`` of them: int64 ``[E]`` ids in ``0..n_keep-1``,
    numbered by each cluster's smallest expert index.

    ``scipy.cluster.hierarchy.linkage(squareform(D), "complete")`` then ``fcluster(t=n_keep, "maxclust")``; when tied
    merge heights keep ``fcluster`` from reaching exactly ``n_keep``, the dendrogram is cut after ``E − n_keep``
    merges instead. Every cluster's diameter (largest intra distance) is then at most the complete-linkage distance
    between any two clusters.
    """
    D = _check_square(D, "cluster_experts")
    E = D.shape[0]
    if not 1 <= n_keep <= E:
        raise ValueError(f"cluster_experts: n_keep must lie in [1, {E}], got {n_keep}")
    if n_keep == E:
        return torch.arange(E)
    if n_keep == 1:
        return torch.zeros(E, dtype=torch.int64)
    Z = linkage(squareform(_finish(D).numpy(), checks=False), method="complete")
    labels = fcluster(Z, t=n_keep, criterion="maxclust")
    if len(set(labels.tolist())) != n_keep:
        logger.debug(
            "cluster_experts: tied merge heights, fcluster gave %d clusters for %d; cutting by merge count",
            len(set(labels.tolist())),
            n_keep,
        )
        labels = _cut_by_merges(Z, E, n_keep)
    return _canonical(labels)


def cluster_experts_grouped(D: Tensor, n_keep: int, n_group: int = 1) -> Tensor:
    """:func:`cluster_experts` within each of ``n_group`` contiguous groups of experts (group ``c`` holds experts
    ``[c·g, (c+1)·g)``, ``g = E / n_group``, as DeepSeek-V3's group-limited routing sees them): ``n_keep / n_group``
    clusters per group, so no cluster spans two groups and every group keeps the same number. Ids as
    :func:`cluster_experts` (numbered by smallest member; group ``c``'s clusters are ``c·k .. c·k + k − 1``).

    Example: E = 4, ``n_group = 2``, ``n_keep = 2``: experts 0 and 1 form one cluster and 2 and 3 the other, whatever
    ``D`` says across the groups."""
    D = _check_square(D, "cluster_experts_grouped")
    E = D.shape[0]
    if n_group < 1 or E % n_group or n_keep % n_group:
        raise ValueError(
            f"cluster_experts_grouped: n_group = {n_group} must divide the experts ({E}) and n_keep ({n_keep})"
        )
    g, k = E // n_group, n_keep // n_group
    return torch.cat([cluster_experts(D[c * g : (c + 1) * g, c * g : (c + 1) * g], k) + c * k for c in range(n_group)])


# ---------------------------------------------------------------- representatives


def _members(clusters: Tensor) -> list[Tensor]:
    clusters = clusters.detach().to("cpu", torch.int64)
    ids = torch.unique(clusters)
    if clusters.dim() != 1 or not torch.equal(ids, torch.arange(ids.numel())):
        raise ValueError(f"experts: cluster ids must be a 1-D tensor holding 0..k-1, got {ids.tolist()}")
    return [torch.nonzero(clusters == c).reshape(-1) for c in range(ids.numel())]


def merge_average(weights: Tensor, clusters: Tensor, counts: Tensor | None = None) -> Tensor:
    """Per-cluster mean of ``weights [E, ...]`` → ``[k, ...]`` in cluster-id order (input dtype).

    ``counts [E]`` (e.g. tokens per expert) gives the weighted mean ``Σ c_i W_i / Σ c_i``; a cluster whose counts
    sum to 0 falls back to the plain mean.
    """
    if weights.shape[0] != clusters.numel():
        raise ValueError(f"merge_average: weights have {weights.shape[0]} experts, clusters {clusters.numel()}")
    W = weights.detach().to(torch.float64)
    out = []
    for m in _members(clusters):
        c = torch.ones(m.numel(), dtype=torch.float64) if counts is None else counts.detach().double().cpu()[m]
        if float(c.sum()) <= 0:
            c = torch.ones_like(c)
        c = (c / c.sum()).to(W.device).reshape(-1, *([1] * (W.dim() - 1)))
        out.append((W[m.to(W.device)] * c).sum(0))
    return torch.stack(out).to(weights.dtype)


def _closest(members: Tensor, features: Tensor | None, D: Tensor | None) -> int:
    """The member closest to the centroid of ``features``; without features, ``argmin_i Σ_j D_ij²`` over the
    members, which is the same expert when ``D`` holds Euclidean distances of the features. Ties: lowest index."""
    if features is not None:
        X = features[members].reshape(members.numel(), -1).double()
        return int(members[torch.argmin(((X - X.mean(0)) ** 2).sum(1))])
    assert D is not None  # choose_representatives checks that one of them is given
    return int(members[torch.argmin((D[members][:, members] ** 2).sum(1))])


def choose_representatives(
    clusters: Tensor, features: Tensor | None = None, mode: str = "centroid", *, D: Tensor | None = None
) -> Representatives:
    """One expert per cluster: the member closest to the centroid of ``features [E, F]`` (flattened expert weights
    or router rows), or with ``features=None`` the member minimising ``Σ_j D_ij²`` within its cluster.

    ``mode="centroid"``: keep the representative as is. ``mode="average"``: also return ``merged`` = the cluster
    averages of ``features`` (pass flattened expert weights), aligned with ``keep``; the representative's slot (and
    router row) receives them.
    """
    if mode not in ("centroid", "average"):
        raise ValueError(f"choose_representatives: mode must be 'centroid' or 'average', got {mode!r}")
    if features is None and (D is None or mode == "average"):
        raise ValueError("choose_representatives: needs features (and, without them, D; 'average' needs features)")
    if features is not None and features.shape[0] != clusters.numel():
        raise ValueError(f"choose_representatives: features have {features.shape[0]} rows, clusters {clusters.numel()}")
    Dm = None if D is None else _check_square(D, "choose_representatives")
    feats = None if features is None else features.detach().cpu()
    reps = [_closest(m, feats, Dm) for m in _members(clusters)]
    order = sorted(range(len(reps)), key=lambda c: reps[c])
    merged = None if mode == "centroid" or features is None else merge_average(features, clusters)[order]
    return Representatives(keep=[reps[c] for c in order], merged=merged)


def experts_to_keep(D: Tensor, n_keep: int, features: Tensor | None = None) -> list[int]:
    """Cluster with :func:`cluster_experts` and return the representatives (:func:`choose_representatives`,
    centroid rule; ``features=None`` uses ``D`` itself), ascending."""
    clusters = cluster_experts(D, n_keep)
    return choose_representatives(clusters, features, "centroid", D=D).keep
