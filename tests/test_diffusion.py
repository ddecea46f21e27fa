"""Diffusion: affinity structure, CG against a dense solve, offline modes, regional pooling."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from raytrieval.retrieval.diffusion import (
    TruncatedDiffusion,
    build_affinity,
    diffuse,
    diffusion_rerank,
    diffusion_scores,
    normalize_affinity,
)

ALPHA = 0.99


def _clusters(rng: np.random.Generator, n: int, d: int = 24, c: int = 8, noise: float = 0.6) -> np.ndarray:
    centers = rng.standard_normal((c, d))
    X = centers[rng.integers(0, c, n)] + noise * rng.standard_normal((n, d))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = _clusters(rng, 300)
    Q = (X[rng.choice(300, 6, replace=False)] + 0.1 * rng.standard_normal((6, 24))).astype(np.float32)
    return (Q / np.linalg.norm(Q, axis=1, keepdims=True)).astype(np.float32), X


def _dense_scores(Q: np.ndarray, X: np.ndarray, k: int, kq: int, gamma: float = 3.0) -> np.ndarray:
    """Reference: dense graph, dense query vectors, np.linalg.solve. Returns (Nq, N)."""
    S = normalize_affinity(build_affinity(X, k, gamma)).toarray().astype(np.float64)
    sims = Q.astype(np.float64) @ X.T.astype(np.float64)
    Y = np.zeros_like(sims)
    for i in range(len(Q)):
        top = np.argsort(-sims[i], kind="stable")[:kq]
        Y[i, top] = np.clip(sims[i, top], 0, None) ** gamma
    return np.linalg.solve(np.eye(len(X)) - ALPHA * S, Y.T).T


def test_affinity_symmetric_mutual_and_weighted(data):
    _, X = data
    k, gamma = 10, 3.0
    W = build_affinity(X, k, gamma=gamma)
    assert sp.isspmatrix_csr(W) and W.dtype == np.float32 and W.shape == (300, 300)
    Wd = W.toarray()
    np.testing.assert_array_equal(Wd, Wd.T)
    assert np.all(np.diag(Wd) == 0) and Wd.min() >= 0
    S = X.astype(np.float64) @ X.T.astype(np.float64)
    np.fill_diagonal(S, -np.inf)
    knn = np.zeros_like(Wd, dtype=bool)
    np.put_along_axis(knn, np.argsort(-S, axis=1)[:, :k], True, axis=1)
    mutual = knn & knn.T
    np.fill_diagonal(S, 0)
    expected = np.where(mutual, np.clip(S, 0, None) ** gamma, 0.0)
    np.testing.assert_allclose(Wd, expected, atol=1e-6)
    union = build_affinity(X, k, gamma=gamma, mutual=False).toarray()
    np.testing.assert_array_equal(union, union.T)
    np.testing.assert_allclose(union, np.where(knn | knn.T, np.clip(S, 0, None) ** gamma, 0.0), atol=1e-6)
    assert (union > 0).sum() > (Wd > 0).sum()


def test_normalize_affinity_dense_formula(data):
    _, X = data
    W = build_affinity(X, 8)
    W = W.tolil()
    W[0, :] = 0  # an isolated node must not produce NaN
    W[:, 0] = 0
    W = W.tocsr()
    S = normalize_affinity(W).toarray().astype(np.float64)
    Wd = W.toarray().astype(np.float64)
    d = Wd.sum(1)
    inv = np.where(d > 0, 1 / np.sqrt(np.where(d > 0, d, 1)), 0)
    np.testing.assert_allclose(S, inv[:, None] * Wd * inv[None, :], rtol=1e-5, atol=1e-7)
    assert np.isfinite(S).all() and not S[0].any()
    with pytest.raises(ValueError, match="symmetric"):
        normalize_affinity(sp.csr_matrix(np.triu(Wd)))
    with pytest.raises(ValueError, match="square"):
        normalize_affinity(sp.csr_matrix(np.ones((3, 4))))


@pytest.mark.parametrize("k", [5, 15])
def test_cg_equals_dense_solve(k):
    rng = np.random.default_rng(k)
    X = _clusters(rng, 250, c=5, noise=1.0)
    S = normalize_affinity(build_affinity(X, k))
    A = np.eye(250) - ALPHA * S.toarray().astype(np.float64)
    y = np.abs(rng.standard_normal(250)) * (rng.random(250) < 0.05)
    Y = np.abs(rng.standard_normal((250, 4))) * (rng.random((250, 4)) < 0.05)
    f = diffuse(S, y, alpha=ALPHA, tol=1e-12, maxiter=2000)
    assert f.shape == (250,) and f.dtype == np.float64
    np.testing.assert_allclose(f, np.linalg.solve(A, y), atol=1e-5)
    F = diffuse(S, Y, alpha=ALPHA, tol=1e-12, maxiter=2000)
    assert F.shape == (250, 4)
    np.testing.assert_allclose(F, np.linalg.solve(A, Y), atol=1e-5)
    # a zero right-hand side column stays zero
    Y[:, 2] = 0
    np.testing.assert_array_equal(diffuse(S, Y, alpha=ALPHA, maxiter=50)[:, 2], 0)


def test_diffuse_validation(data):
    _, X = data
    S = normalize_affinity(build_affinity(X, 5))
    with pytest.raises(ValueError, match="alpha"):
        diffuse(S, np.ones(300), alpha=1.0)
    with pytest.raises(ValueError, match="y"):
        diffuse(S, np.ones(299))
    with pytest.raises(ValueError, match="maxiter"):
        diffuse(S, np.ones(300), maxiter=0)


def test_diffusion_rerank_matches_dense_reference(data):
    Q, X = data
    ref = _dense_scores(Q, X, k=10, kq=5)
    scores = diffusion_scores(Q, X, k=10, kq=5, alpha=ALPHA, maxiter=1000, tol=1e-12)
    np.testing.assert_allclose(scores, ref, atol=1e-5)
    ranks = diffusion_rerank(Q, X, k=10, kq=5, alpha=ALPHA, maxiter=1000, tol=1e-12)
    assert ranks.shape == (6, 300) and ranks.dtype == np.int64
    for i in range(len(Q)):
        assert sorted(ranks[i]) == list(range(300))
        reached = np.sum(ref[i] > 1e-8)
        top = min(reached, 30)
        assert set(ranks[i, :top]) == set(np.argsort(-ref[i], kind="stable")[:top])
        # nodes the diffusion does not reach are ordered by plain similarity
        rest = ranks[i, reached:]
        sims = (Q[i] @ X[rest].T)
        assert np.all(np.diff(sims) <= 1e-6)


def test_precomputed_graph_is_reused(data):
    Q, X = data
    S = normalize_affinity(build_affinity(X, 10))
    a = diffusion_rerank(Q, X, k=10, kq=5, maxiter=50, S=S)
    b = diffusion_rerank(Q, X, k=10, kq=5, maxiter=50)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="S"):
        diffusion_rerank(Q, X, S=S[:10, :10])


def test_spectral_mode(data):
    Q, X = data
    ref = _dense_scores(Q, X, k=10, kq=5)
    exact = TruncatedDiffusion(X, k=10, kq=5, alpha=ALPHA, n_eigen=300)  # all eigenpairs: exact
    np.testing.assert_allclose(exact.scores(Q), ref, atol=1e-6)
    low = TruncatedDiffusion(X, k=10, kq=5, alpha=ALPHA, n_eigen=60)  # Lanczos, rank 60
    assert low.eigvec.shape == (300, 60)
    ranks = low.rerank(Q)
    assert ranks.shape == (6, 300) and ranks.dtype == np.int64
    for i in range(len(Q)):
        truth = set(np.argsort(-ref[i])[:10])
        assert len(truth & set(ranks[i, :10])) >= 8


def test_truncated_mode(data):
    Q, X = data
    ref = _dense_scores(Q, X, k=10, kq=5)
    full = TruncatedDiffusion(X, k=10, kq=5, alpha=ALPHA, mode="truncated", trunc=300, maxiter=1000, tol=1e-12)
    np.testing.assert_allclose(full.scores(Q), ref, atol=1e-5)
    trunc = TruncatedDiffusion(X, k=10, kq=5, alpha=ALPHA, mode="truncated", trunc=40, maxiter=200)
    assert trunc.inverse.nnz == 300 * 40
    ranks = trunc.rerank(Q)
    for i in range(len(Q)):
        truth = set(np.argsort(-ref[i])[:10])
        assert len(truth & set(ranks[i, :10])) >= 8
    with pytest.raises(ValueError, match="mode"):
        TruncatedDiffusion(X, mode="lowrank")


def test_online_truncation_solves_each_querys_subgraph(data):
    Q, X = data
    S = normalize_affinity(build_affinity(X, 10)).toarray().astype(np.float64)
    sims = Q.astype(np.float64) @ X.T.astype(np.float64)
    scores = diffusion_scores(Q, X, k=10, kq=5, alpha=ALPHA, maxiter=1000, tol=1e-12, truncate=60)
    ref = _dense_scores(Q, X, k=10, kq=5)
    for i in range(len(Q)):
        sub = np.sort(np.argsort(-sims[i], kind="stable")[:60])  # the query's 60 nearest items
        y = np.zeros(60)
        top = np.argsort(-sims[i], kind="stable")[:5]
        y[np.searchsorted(sub, top)] = np.clip(sims[i, top], 0, None) ** 3
        f = np.linalg.solve(np.eye(60) - ALPHA * S[np.ix_(sub, sub)], y)  # dense solve on the subgraph
        np.testing.assert_allclose(scores[i, sub], f, atol=1e-6)
        outside = np.setdiff1d(np.arange(300), sub)
        assert np.all(np.isneginf(scores[i, outside]))
        # the top of the ranking agrees with diffusion over the whole graph
        assert len(set(np.argsort(-scores[i])[:10]) & set(np.argsort(-ref[i])[:10])) >= 8
    ranks = diffusion_rerank(Q, X, k=10, kq=5, truncate=60)
    for i in range(len(Q)):
        rest = ranks[i, 60:]  # outside the subgraph: by plain similarity
        assert np.all(np.diff(Q[i] @ X[rest].T) <= 1e-6)
    whole = diffusion_scores(Q, X, k=10, kq=5, maxiter=50, truncate=300)  # >= N: the whole graph
    np.testing.assert_array_equal(whole, diffusion_scores(Q, X, k=10, kq=5, maxiter=50))
    with pytest.raises(ValueError, match="truncate"):
        diffusion_scores(Q, X, kq=5, truncate=3)
    with pytest.raises(ValueError, match="truncate"):
        diffusion_scores(Q, X, x_ids=np.arange(300), q_ids=np.arange(6), truncate=50)


def test_regional_pooling(data):
    _, X = data
    rng = np.random.default_rng(5)
    x_ids = rng.integers(0, 80, 300)
    x_ids[:80] = np.arange(80)  # every image has at least one region
    rng.shuffle(x_ids)
    Qr = X[[3, 7, 11, 20]] + 0.05 * rng.standard_normal((4, 24)).astype(np.float32)
    Qr = (Qr / np.linalg.norm(Qr, axis=1, keepdims=True)).astype(np.float32)
    q_ids = np.array([0, 0, 1, 1])
    S = normalize_affinity(build_affinity(X, 10)).toarray().astype(np.float64)
    sims = Qr.astype(np.float64) @ X.T.astype(np.float64)
    Y = np.zeros((2, 300))
    for r in range(4):
        top = np.argsort(-sims[r])[:5]
        Y[q_ids[r], top] += sims[r, top] ** 3
    F = np.linalg.solve(np.eye(300) - ALPHA * S, Y.T).T  # (2, N regions)
    for agg in ("sum", "max"):
        ref = np.zeros((2, 80)) if agg == "sum" else np.full((2, 80), -np.inf)
        for n in range(300):
            img = x_ids[n]
            ref[:, img] = ref[:, img] + F[:, n] if agg == "sum" else np.maximum(ref[:, img], F[:, n])
        kw = dict(k=10, kq=5, alpha=ALPHA, maxiter=1000, tol=1e-12, x_ids=x_ids, q_ids=q_ids, agg=agg)
        np.testing.assert_allclose(diffusion_scores(Qr, X, **kw), ref, atol=1e-5)
        ranks = diffusion_rerank(Qr, X, **kw)
        assert ranks.shape == (2, 80)
        np.testing.assert_array_equal(ranks[:, :5], np.argsort(-ref, axis=1, kind="stable")[:, :5])
        spectral = TruncatedDiffusion(X, k=10, kq=5, alpha=ALPHA, n_eigen=300, x_ids=x_ids, agg=agg)
        np.testing.assert_allclose(spectral.scores(Qr, q_ids), ref, atol=1e-5)
    with pytest.raises(ValueError, match="x_ids"):
        diffusion_rerank(Qr, X, x_ids=x_ids[:10])
    with pytest.raises(ValueError, match="agg"):
        diffusion_rerank(Qr, X, x_ids=x_ids, agg="mean")


def test_diffusion_follows_the_manifold():
    """On a chain of points, diffusion from one end reaches along the chain (Euclidean does not)."""
    t = np.linspace(0, np.pi, 200)
    chain = np.stack([np.cos(t), np.sin(t), 0.4 * np.ones_like(t)], axis=1)  # an arc
    blob = np.array([np.cos(0.3), np.sin(0.3), 1.5]) + 0.02 * np.random.default_rng(0).standard_normal((60, 3))
    X = np.concatenate([chain, blob])
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    q = X[:1] + 0.001
    ranks = diffusion_rerank(q, X, k=5, kq=3, maxiter=200)
    # the first 100 results stay on the chain although the blob is closer in plain similarity
    assert np.all(ranks[0, :100] < 200)
    assert np.any(np.argsort(-(q @ X.T)[0])[:100] >= 200)
