"""Tests of solvers.clustering: distances, complete-linkage clustering (vs a brute-force loop), representatives."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.testing import assert_close

from solvers.clustering import (
    choose_representatives,
    cluster_experts,
    coactivation_counts,
    coactivation_distance,
    experts_to_keep,
    merge_average,
    mixed_distance,
    n_keep_for_target,
    router_distance,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _canonical(labels: list[int]) -> torch.Tensor:
    order = {lab: i for i, lab in enumerate(dict.fromkeys(labels))}
    return torch.tensor([order[lab] for lab in labels])


def _planted(sizes: list[int], H: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router rows in clusters of near-duplicates (1e-3 relative noise), experts shuffled; (rows, planted ids)."""
    g = _gen(seed)
    centers = torch.randn(len(sizes), H, generator=g, dtype=torch.float64)
    truth = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    truth = truth[torch.randperm(truth.numel(), generator=g)]
    noise = 1e-3 * centers[truth].norm(dim=1, keepdim=True) / H**0.5
    rows = centers[truth] + noise * torch.randn(truth.numel(), H, generator=g, dtype=torch.float64)
    return rows, _canonical(truth.tolist())


def _cofiring_top_k(truth: torch.Tensor, k: int, T: int, seed: int, noise: float = 0.1) -> torch.Tensor:
    """Top-k ids where a token picks a cluster and fires k of its members (random experts for a ``noise`` share)."""
    g = _gen(seed)
    E, rows = truth.numel(), []
    members = [torch.nonzero(truth == c).reshape(-1) for c in range(int(truth.max()) + 1)]
    for _ in range(T):
        if torch.rand(1, generator=g) < noise:
            rows.append(torch.randperm(E, generator=g)[:k])
            continue
        m = members[int(torch.randint(len(members), (1,), generator=g))]
        rows.append(m[torch.randperm(m.numel(), generator=g)[:k]])
    return torch.stack(rows)


def _brute_complete_linkage(D: torch.Tensor, n_keep: int) -> tuple[torch.Tensor, float]:
    """Greedy loop: merge the two clusters with the smallest max cross distance; (labels, last merge height)."""
    clusters, height = [[i] for i in range(D.shape[0])], 0.0
    while len(clusters) > n_keep:
        best = min(
            itertools.combinations(range(len(clusters)), 2),
            key=lambda p: max(float(D[i, j]) for i in clusters[p[0]] for j in clusters[p[1]]),
        )
        a, b = best
        height = max(float(D[i, j]) for i in clusters[a] for j in clusters[b])
        clusters[a] = clusters[a] + clusters.pop(b)
    labels = [0] * D.shape[0]
    for c, members in enumerate(clusters):
        for i in members:
            labels[i] = c
    return _canonical(labels), height


def _random_distance(E: int, g: torch.Generator, integer: bool = False) -> torch.Tensor:
    X = torch.randint(0, 3, (E, E), generator=g).double() if integer else torch.rand(E, E, generator=g).double()
    D = X + X.T
    D.fill_diagonal_(0.0)
    return D


# ---------------------------------------------------------------- distances


def test_router_distance_matches_reference() -> None:
    W = torch.randn(6, 5, generator=_gen(0))
    D = router_distance(W)
    ref = torch.tensor(
        [[float((W[i].double() - W[j].double()).norm()) for j in range(6)] for i in range(6)], dtype=torch.float64
    )
    assert_close(D, ref, atol=1e-12, rtol=0)
    assert torch.equal(D, D.T) and bool((D.diagonal() == 0).all())
    Wn = W.double() / W.double().norm(dim=1, keepdim=True)
    assert_close(router_distance(W, normalize=True), router_distance(Wn), atol=1e-12, rtol=0)
    scaled = W * torch.tensor([1.0, 3.0, 0.5, 2.0, 7.0, 1.0])[:, None]
    assert_close(router_distance(scaled, normalize=True), router_distance(W, normalize=True), atol=1e-6, rtol=0)


def test_coactivation_counts_hand_example_and_distance() -> None:
    a = coactivation_counts(torch.tensor([[0, 1], [1, 2], [0, 1]]), 4)
    assert torch.equal(a, torch.tensor([[2, 2, 0, 0], [2, 3, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]))
    d = coactivation_distance(a)
    assert_close(d[0, 1], torch.tensor(1 - 2 / 6**0.5, dtype=torch.float64))
    assert d[0, 2] == 1.0 and d[3, 0] == 1.0 and d[3, 3] == 0.0  # expert 3 never fired
    assert bool((d >= 0).all()) and bool((d <= 1).all())


def test_coactivation_counts_accumulate_over_batches() -> None:
    g = _gen(1)
    idx = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(300)])
    whole = coactivation_counts(idx, 8)
    parts = sum(coactivation_counts(chunk, 8) for chunk in idx.split(77))
    assert torch.equal(whole, parts)
    assert torch.equal(whole.diagonal(), torch.bincount(idx.reshape(-1), minlength=8))


@pytest.mark.parametrize(
    ("idx", "match"),
    [
        (torch.tensor([[0, 8]]), "must lie in"),
        (torch.tensor([[1, 1]]), "same expert twice"),
        (torch.tensor([[0.0, 1.0]]), "integer"),
        (torch.tensor([0, 1]), "integer"),
    ],
)
def test_coactivation_counts_errors(idx: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        coactivation_counts(idx, 8)


def test_mixed_distance() -> None:
    g = _gen(2)
    d1, d2 = 10 * _random_distance(5, g), _random_distance(5, g)
    assert_close(mixed_distance(d1, d2, alpha=1.0), d1 / d1.max())
    assert_close(mixed_distance(d1, d2, alpha=0.0), d2 / d2.max())
    assert_close(mixed_distance(d1, d2), 0.5 * d1 / d1.max() + 0.5 * d2 / d2.max())
    with pytest.raises(ValueError, match="alpha"):
        mixed_distance(d1, d2, alpha=1.5)
    with pytest.raises(ValueError, match="shapes differ"):
        mixed_distance(d1, d2[:4, :4])


# ---------------------------------------------------------------- planted clusters


@pytest.mark.parametrize("sizes", [[2, 2, 2, 2], [3, 2, 2, 1], [4, 4, 4, 4]])
def test_planted_router_clusters_recovered(sizes: list[int]) -> None:
    rows, truth = _planted(sizes, H=16, seed=sum(sizes))
    assert torch.equal(cluster_experts(router_distance(rows), len(sizes)), truth)
    assert torch.equal(cluster_experts(router_distance(rows, normalize=True), len(sizes)), truth)


@pytest.mark.parametrize(("sizes", "k"), [([2, 2, 2, 2], 2), ([3, 3, 2], 2), ([4, 4, 4, 4], 3)])
def test_planted_coactivation_and_mixed_recovered(sizes: list[int], k: int) -> None:
    rows, truth = _planted(sizes, H=16, seed=10 + k)
    top_k = _cofiring_top_k(truth, k, T=2000, seed=k)
    d_co = coactivation_distance(sum(coactivation_counts(b, truth.numel()) for b in top_k.split(500)))
    assert torch.equal(cluster_experts(d_co, len(sizes)), truth)
    assert torch.equal(cluster_experts(mixed_distance(router_distance(rows), d_co), len(sizes)), truth)


@pytest.mark.parametrize("sizes", [[2, 2, 2, 2], [3, 4, 3, 5]])
def test_experts_to_keep_one_per_planted_cluster(sizes: list[int]) -> None:
    rows, truth = _planted(sizes, H=16, seed=3)
    keep = experts_to_keep(router_distance(rows), len(sizes), rows)
    assert keep == sorted(keep) and sorted(truth[keep].tolist()) == list(range(len(sizes)))
    if min(sizes) > 2:  # a pair's members tie for the centroid; larger clusters do not
        assert experts_to_keep(router_distance(rows), len(sizes)) == keep  # D-based rule: Σ_j D_ij² identity


# ---------------------------------------------------------------- exact count and complete linkage


@pytest.mark.parametrize("integer", [False, True])
def test_exactly_n_keep_clusters(integer: bool) -> None:
    g = _gen(4)
    for E in (1, 2, 5, 9, 16):
        D = _random_distance(E, g, integer)
        for n_keep in range(1, E + 1):
            labels = cluster_experts(D, n_keep)
            assert labels.shape == (E,) and torch.equal(torch.unique(labels), torch.arange(n_keep))
    all_tied = torch.ones(6, 6, dtype=torch.float64) - torch.eye(6, dtype=torch.float64)
    assert [int(cluster_experts(all_tied, n).max()) + 1 for n in range(1, 7)] == [1, 2, 3, 4, 5, 6]


def test_complete_linkage_matches_brute_force_and_separates() -> None:
    g = _gen(5)
    for _ in range(25):
        E = int(torch.randint(2, 9, (1,), generator=g))
        D = _random_distance(E, g)
        for n_keep in range(1, E + 1):
            labels = cluster_experts(D, n_keep)
            ref, height = _brute_complete_linkage(D, n_keep)
            assert torch.equal(labels, ref)
            same = labels[:, None] == labels[None, :]
            diameter = float(D[same].max())
            assert diameter <= height + 1e-12
            for a, b in itertools.combinations(range(n_keep), 2):  # merging any two clusters costs >= the threshold
                assert float(D[labels == a][:, labels == b].max()) >= height - 1e-12


@pytest.mark.parametrize(
    ("D", "n_keep", "match"),
    [
        (torch.zeros(3, 4), 1, "square"),
        (torch.tensor([[0.0, 1.0], [2.0, 0.0]]), 1, "not symmetric"),
        (torch.tensor([[0.0, -1.0], [-1.0, 0.0]]), 1, "negative"),
        (torch.tensor([[0.0, float("nan")], [float("nan"), 0.0]]), 1, "NaN"),
        (torch.zeros(3, 3), 0, "n_keep"),
        (torch.zeros(3, 3), 4, "n_keep"),
    ],
)
def test_cluster_experts_errors(D: torch.Tensor, n_keep: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cluster_experts(D, n_keep)


def test_n_keep_for_target() -> None:
    assert n_keep_for_target(8, 0.25) == 6
    assert n_keep_for_target(60, 0.25) == 45
    assert n_keep_for_target(4, 0.9) == 1
    with pytest.raises(ValueError, match="target"):
        n_keep_for_target(8, 1.0)


# ---------------------------------------------------------------- representatives


def test_representatives_are_centroid_closest_members() -> None:
    g = _gen(6)
    features = torch.randn(12, 7, generator=g, dtype=torch.float64)
    D = router_distance(features)
    clusters = cluster_experts(D, 4)
    reps = choose_representatives(clusters, features)
    assert reps.merged is None and len(reps.keep) == 4 and reps.keep == sorted(reps.keep)
    assert sorted(clusters[reps.keep].tolist()) == [0, 1, 2, 3]  # one member of each cluster
    for e in reps.keep:
        members = torch.nonzero(clusters == clusters[e]).reshape(-1)
        centroid = features[members].mean(0)
        dist = (features[members] - centroid).norm(dim=1)
        assert e == int(members[torch.argmin(dist)])
    # without features, argmin Σ_j D_ij² picks an expert equally close to the centroid (ties aside: the same one)
    for e in choose_representatives(clusters, None, D=D).keep:
        members = torch.nonzero(clusters == clusters[e]).reshape(-1)
        dist = (features[members] - features[members].mean(0)).norm(dim=1)
        assert float((features[e] - features[members].mean(0)).norm()) <= float(dist.min()) + 1e-12


def test_average_mode_and_merge_average() -> None:
    g = _gen(7)
    weights = torch.randn(6, 3, 4, generator=g)
    clusters = torch.tensor([1, 0, 1, 2, 0, 1])
    merged = merge_average(weights, clusters)
    assert_close(merged[1], weights[[0, 2, 5]].mean(0))
    counts = torch.tensor([1.0, 3.0, 0.0, 5.0, 1.0, 1.0])
    assert_close(merge_average(weights, clusters, counts)[0], (3 * weights[1] + weights[4]) / 4)
    assert_close(merge_average(weights, clusters, torch.zeros(6))[2], weights[3])  # zero counts: plain mean
    reps = choose_representatives(clusters, weights.reshape(6, -1), "average")
    for i, e in enumerate(reps.keep):
        assert_close(reps.merged[i].reshape(3, 4), merged[int(clusters[e])])


def test_representative_errors() -> None:
    with pytest.raises(ValueError, match="0..k-1"):
        choose_representatives(torch.tensor([0, 2, 2]), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="mode"):
        choose_representatives(torch.tensor([0, 1]), torch.zeros(2, 2), "medoid")
    with pytest.raises(ValueError, match="needs features"):
        choose_representatives(torch.tensor([0, 1]), None, "average", D=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="experts"):
        merge_average(torch.zeros(3, 2), torch.tensor([0, 1]))
