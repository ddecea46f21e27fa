"""Mining on manifolds on two interleaved spirals: positives along the same spiral, negatives across."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from raytrieval.mining.manifold import local_maxima, manifold_pools, manifold_tuples, stationary_distribution
from raytrieval.retrieval.diffusion import build_affinity

N = 600  # points per spiral


def spirals(n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved Archimedean spirals (r = a theta, the second turned by pi), 1.5 turns each.

    Points are spread evenly along the arc with a jitter (so the density has many small
    modes), then embedded as the L2-normalised 3-D vectors [x, y, 1] / ||.|| (a central
    projection onto the sphere: dot products decrease with planar distance).

    Returns:
        (X (2n, 3) float32, spiral (2n,) int: 0 or 1; within a spiral, index order is arc order).
    """
    rng = np.random.default_rng(seed)
    a = 1.0 / (4.0 * np.pi)
    pts, lab = [], []
    for s in (0, 1):
        u = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) / n  # uniform in arc length
        theta = np.sqrt(np.pi**2 + u * 15.0 * np.pi**2)
        pts.append(np.c_[a * theta * np.cos(theta + s * np.pi), a * theta * np.sin(theta + s * np.pi)])
        lab.append(np.full(n, s))
    P = np.concatenate(pts)
    X = np.c_[P, np.ones(len(P))]
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32), np.concatenate(lab)


def test_stationary_distribution_is_that_of_the_random_walk():
    X, _ = spirals(60)
    W = build_affinity(X, k=5)
    pi = stationary_distribution(W)
    P = sp.diags(1.0 / np.maximum(np.asarray(W.sum(axis=1)).ravel(), 1e-300)) @ W  # transition matrix
    np.testing.assert_allclose(P.T @ pi, pi, atol=1e-12)  # pi P = pi
    assert abs(pi.sum() - 1.0) < 1e-12
    # power iteration of the lazy walk from the uniform start agrees (connected graph)
    assert sp.csgraph.connected_components(W)[0] == 1
    v = np.full(W.shape[0], 1.0 / W.shape[0])
    for _ in range(20000):
        v = 0.5 * v + 0.5 * (P.T @ v)
    np.testing.assert_allclose(v, pi, atol=1e-6)


def test_local_maxima_against_a_loop():
    rng = np.random.default_rng(0)
    A = sp.random(40, 40, density=0.1, random_state=1)
    W = sp.csr_matrix(A + A.T)
    values = rng.integers(0, 5, 40).astype(float)  # many ties
    got = local_maxima(W, values)
    brute = []
    for i in range(40):
        nbrs = [j for j in W[i].indices if j != i]
        if values[i] > 0 and all(values[i] > values[j] or (values[i] == values[j] and i < j) for j in nbrs):
            brute.append(i)
    assert sorted(got.tolist()) == brute
    assert np.all(np.diff(values[got]) <= 0)


@pytest.mark.parametrize("truncate", [None, 300])
def test_manifold_mining_on_two_spirals(truncate):
    X, spiral = spirals()
    # the paper's settings: k=30, sim^3, 50 Euclidean / manifold neighbours; on the whole graph
    # or each anchor on the subgraph of its 300 nearest points
    pools = manifold_pools(X, truncate=truncate)
    useful = [(r, p, q) for r, p, q in zip(pools.anchors, pools.positives, pools.negatives) if p.size and q.size]
    assert {int(spiral[r]) for r, _, _ in useful} == {0, 1} and len(useful) >= 8
    arc = np.r_[np.arange(N), np.arange(N)]
    for r, pos, neg in zip(pools.anchors, pools.positives, pools.negatives):
        assert np.all(spiral[pos] == spiral[r])  # positives: along the anchor's own spiral ...
        assert np.all(np.abs(arc[pos] - arc[r]) > 10)  # ... and not next to it (the Euclidean ones)
        assert not np.isin(pos, neg).any() and r not in pos and r not in neg
        if 100 <= arc[r] < N - 100:  # away from the ends, where diffusion piles up
            assert np.all(spiral[neg] != spiral[r])  # negatives: the neighbouring arm of the other spiral
    all_neg = np.concatenate([q for _, _, q in useful])
    share = np.mean(np.concatenate([spiral[q] != spiral[r] for r, _, q in useful]))
    assert all_neg.size > 100 and share > 0.8  # the same-spiral ones come from anchors near the ends
    # plain Euclidean neighbours would mix the spirals: the mining is not trivial here
    sims = X @ X.T
    np.fill_diagonal(sims, -np.inf)
    top = np.argsort(-sims[pools.anchors], axis=1)[:, :50]
    assert np.mean(spiral[top] != spiral[pools.anchors][:, None]) > 0.1


def test_truncated_mining_diffuses_on_each_anchors_subgraph():
    """Against a dense solve of (I - alpha S_sub) f = e_anchor on the anchor's 200 nearest points."""
    from raytrieval.retrieval.diffusion import normalize_affinity

    X, _ = spirals(300)
    T, km, ke, alpha = 200, 40, 20, 0.9
    pools = manifold_pools(X, truncate=T, k_manifold=km, k_euclidean=ke, alpha=alpha, maxiter=500, tol=1e-12)
    S = normalize_affinity(build_affinity(X, 30, gamma=3.0)).toarray()
    sims = X @ X.T
    assert pools.anchors.size >= 4
    for r, pos, neg in zip(pools.anchors, pools.positives, pools.negatives):
        nodes = np.sort(np.argsort(-sims[r], kind="stable")[:T])
        sub = S[np.ix_(nodes, nodes)]
        f = np.linalg.solve(np.eye(T) - alpha * sub, (nodes == r).astype(float))
        f[nodes == r] = -np.inf
        reached = [n for n in nodes[np.argsort(-f, kind="stable")] if f[nodes == n][0] > 1e-12][:km]
        row = sims[r].copy()
        row[r] = -np.inf
        euclid = np.argsort(-row, kind="stable")[:ke]
        assert set(pos.tolist()) == set(reached) - set(euclid.tolist())
        assert set(neg.tolist()) == set(euclid.tolist()) - set(reached)
    whole = manifold_pools(X, truncate=None, k_manifold=km, k_euclidean=ke, alpha=alpha)
    assert not all(np.array_equal(a, b) for a, b in zip(whole.positives, pools.positives))  # it did truncate
    with pytest.raises(ValueError, match="truncate"):
        manifold_pools(X, truncate=km)


def test_manifold_tuples():
    X, spiral = spirals(300)
    pools = manifold_pools(X, k=10, k_euclidean=30, k_manifold=30, num_anchors=6)
    assert pools.anchors.size == 6 and np.all(np.diff(pools.stationary[pools.anchors]) <= 0)
    q, p, n = manifold_tuples(pools, num_negatives=3, positives_per_anchor=2, seed=0)
    assert q.shape == p.shape and n.shape == (q.size, 3) and q.size >= 6
    for qi, pi_, row in zip(q, p, n):
        k = int(np.flatnonzero(pools.anchors == qi)[0])
        assert pi_ in pools.positives[k]
        assert row[row >= 0].tolist() == pools.negatives[k][:3].tolist()
    q2, p2, _ = manifold_tuples(pools, num_negatives=3, positives_per_anchor=2, seed=0)
    np.testing.assert_array_equal(p, p2)
    with pytest.raises(ValueError, match="X"):
        manifold_pools(X[:1])
