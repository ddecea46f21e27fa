"""faiss kNN helpers against brute-force numpy."""

from __future__ import annotations

import numpy as np
import pytest

from raytrieval.retrieval.knn import gpu_available, knn_graph, rank_all, search


def _l2n(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return _l2n(rng.standard_normal((1000, 32))), _l2n(rng.standard_normal((25, 32)))


def test_search_matches_brute_force(data):
    X, Q = data
    sims, ids = search(X, Q, 10)
    assert sims.shape == ids.shape == (25, 10)
    assert sims.dtype == np.float32 and ids.dtype == np.int64
    S = Q.astype(np.float64) @ X.T.astype(np.float64)
    ref = np.argsort(-S, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_allclose(sims, np.take_along_axis(S, ref, axis=1), atol=1e-5)


def test_search_l2_metric(data):
    X, Q = data
    dist, ids = search(X, Q, 5, metric="l2")
    D = ((Q[:, None, :].astype(np.float64) - X[None].astype(np.float64)) ** 2).sum(-1)
    ref = np.argsort(D, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_allclose(dist, np.take_along_axis(D, ref, axis=1), atol=1e-4)


def test_search_validation(data):
    X, Q = data
    for k in (0, 1001):
        with pytest.raises(ValueError, match="k"):
            search(X, Q, k)
    with pytest.raises(ValueError, match="queries"):
        search(X, Q[:, :16], 3)
    with pytest.raises(ValueError, match="metric"):
        search(X, Q, 3, metric="cosine")
    with pytest.raises(ValueError, match="db"):
        search(X[0], Q, 3)
    if not gpu_available():
        with pytest.raises(ValueError, match="use_gpu"):
            search(X, Q, 3, use_gpu=True)
    sims, ids = search(X, Q[:0], 3)
    assert sims.shape == ids.shape == (0, 3)
    # float64 / non-contiguous input is accepted and converted
    sims64, ids64 = search(X.astype(np.float64), np.asfortranarray(Q), 4)
    np.testing.assert_array_equal(ids64, search(X, Q, 4)[1])


def test_knn_graph_excludes_self(data):
    X, _ = data
    sims, ids = knn_graph(X[:300], 7)
    assert sims.shape == ids.shape == (300, 7)
    S = X[:300].astype(np.float64) @ X[:300].T.astype(np.float64)
    np.fill_diagonal(S, -np.inf)
    ref = np.argsort(-S, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_allclose(sims, np.take_along_axis(S, ref, axis=1), atol=1e-5)
    sims_self, ids_self = knn_graph(X[:300], 7, exclude_self=False)
    np.testing.assert_array_equal(ids_self[:, 0], np.arange(300))
    with pytest.raises(ValueError, match="k"):
        knn_graph(X[:10], 10)


def test_knn_graph_with_duplicates(data):
    X, _ = data
    dup = np.concatenate([X[:50], X[:50]])  # every vector has an exact copy
    _, ids = knn_graph(dup, 3)
    n = len(dup)
    assert not np.any(ids == np.arange(n)[:, None])
    np.testing.assert_array_equal(ids[:, 0], (np.arange(n) + 50) % n)  # the copy comes first


def test_rank_all_matches_argsort(data):
    X, Q = data
    ranks = rank_all(Q, X)
    assert ranks.shape == (25, 1000) and ranks.dtype == np.int64
    np.testing.assert_array_equal(ranks, np.argsort(-(Q @ X.T), axis=1, kind="stable"))
    # in blocks of 4 queries BLAS may sum in another order: the same ranking up to float32 ties
    chunked = rank_all(Q, X, chunk=4)
    exact = np.take_along_axis(Q.astype(np.float64) @ X.T.astype(np.float64), chunked, axis=1)
    assert np.all(np.diff(exact, axis=1) <= 1e-6) and (chunked != ranks).mean() < 1e-3
    tied = np.concatenate([X[:5], X[:5]])  # ties are broken by index
    r = rank_all(tied[:1], tied)
    assert r[0, 0] == 0 and r[0, 1] == 5


def test_ivf_graph_close_to_exact():
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((20, 16))
    X = centres[rng.integers(0, 20, 2000)] + 0.3 * rng.standard_normal((2000, 16))
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    _, exact = knn_graph(X, 10)
    _, approx = knn_graph(X, 10, nlist=20)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, approx)])
    assert recall > 0.9
    with pytest.raises(ValueError, match="nlist"):
        search(X, X[:3], 5, nlist=0)
