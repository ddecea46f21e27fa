"""Query expansion and DBA against direct Python loops."""

from __future__ import annotations

import numpy as np
import pytest

from raytrieval.retrieval.knn import rank_all
from raytrieval.retrieval.qe import alpha_qe, average_qe, dba


def _l2n(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = _l2n(rng.standard_normal((200, 16))).astype(np.float32)
    Q = _l2n(rng.standard_normal((12, 16))).astype(np.float32)
    return Q, X, rank_all(Q, X)


def test_average_qe_against_loop(data):
    Q, X, ranks = data
    out = average_qe(Q, X, ranks, 5)
    assert out.shape == Q.shape and out.dtype == np.float32 and out.flags.c_contiguous
    for i in range(len(Q)):
        vecs = [Q[i].astype(np.float64)] + [X[j].astype(np.float64) for j in ranks[i, :5]]
        np.testing.assert_allclose(out[i], _l2n(np.mean(vecs, axis=0)), atol=1e-6)
    np.testing.assert_allclose(average_qe(Q, X, ranks, 0), Q, atol=1e-6)


def test_alpha_qe_against_loop(data):
    Q, X, ranks = data
    # use ranks that include negative similarities (bottom of the list) to exercise the clipping
    mixed = np.concatenate([ranks[:, :3], ranks[:, -3:]], axis=1)
    for alpha in (0.0, 1.0, 3.0):
        out = alpha_qe(Q, X, mixed, 6, alpha=alpha)
        for i in range(len(Q)):
            acc = Q[i].astype(np.float64).copy()
            for j in mixed[i]:
                s = float(Q[i].astype(np.float64) @ X[j].astype(np.float64))
                acc += max(s, 0.0) ** alpha * X[j]
            np.testing.assert_allclose(out[i], _l2n(acc), atol=1e-6)
    np.testing.assert_allclose(alpha_qe(Q, X, ranks, 4, alpha=0.0), average_qe(Q, X, ranks, 4), atol=1e-6)


def test_dba_against_loop(data):
    _, X, _ = data
    for k, alpha in ((1, 0.0), (4, 0.0), (4, 3.0)):
        out = dba(X, k, alpha=alpha)
        assert out.shape == X.shape and out.dtype == np.float32
        for i in range(len(X)):
            sims = X.astype(np.float64) @ X[i].astype(np.float64)
            sims[i] = -np.inf
            neigh = np.argsort(-sims, kind="stable")[: k - 1]
            acc = X[i].astype(np.float64).copy()
            for j in neigh:
                acc += max(sims[j], 0.0) ** alpha * X[j]
            np.testing.assert_allclose(out[i], _l2n(acc), atol=1e-6)
    np.testing.assert_allclose(dba(X, 1), X, atol=1e-6)


def test_validation(data):
    Q, X, ranks = data
    with pytest.raises(ValueError, match="k"):
        average_qe(Q, X, ranks[:, :3], 4)
    with pytest.raises(ValueError, match="ranks"):
        average_qe(Q, X, ranks[:5], 2)
    with pytest.raises(ValueError, match="ranks"):
        average_qe(Q, X, ranks + 1000, 2)
    with pytest.raises(ValueError, match="Q"):
        alpha_qe(Q[:, :8], X, ranks, 2)
    with pytest.raises(ValueError, match="alpha"):
        alpha_qe(Q, X, ranks, 2, alpha=-1.0)
    with pytest.raises(ValueError, match="k"):
        dba(X, 0)
    with pytest.raises(ValueError, match="k"):
        dba(X, 201)
