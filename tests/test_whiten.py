"""Whitening against direct numpy computations (covariance identity, cirtorch Lw recipe)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raytrieval.retrieval.whiten import Whitening, learn_lw_whitening, learn_pca_whitening


def _l2n(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    rng = np.random.default_rng(0)
    A = rng.standard_normal((16, 16)) * np.linspace(2.0, 0.1, 16)  # correlated, anisotropic
    return _l2n(rng.standard_normal((600, 16)) @ A + 0.3).astype(np.float32)


def _project(w: Whitening, X: np.ndarray) -> np.ndarray:
    """Whitened vectors before the final L2 normalisation, in float64."""
    return (X.astype(np.float64) - w.mean) @ w.proj.astype(np.float64).T


def test_pca_full_whitening_gives_identity_covariance(X):
    w = learn_pca_whitening(X)
    assert w.mean.dtype == np.float32 and w.proj.dtype == np.float32
    assert w.proj.shape == (16, 16) and w.dim == 16 and w.input_dim == 16
    Y = _project(w, X)
    cov = Y.T @ Y / len(X)
    np.testing.assert_allclose(cov, np.eye(16), atol=1e-4)
    np.testing.assert_allclose(w.mean, X.mean(axis=0), atol=1e-6)


def test_pca_shrinkage_and_rotation(X):
    C = np.cov(X.astype(np.float64).T, bias=True)
    eigval = np.sort(np.linalg.eigvalsh(C))[::-1]
    rot = learn_pca_whitening(X, shrinkage=0.0)  # plain PCA rotation
    np.testing.assert_allclose(rot.proj @ rot.proj.T, np.eye(16), atol=1e-5)
    Y = _project(rot, X)
    np.testing.assert_allclose(Y.T @ Y / len(X), np.diag(eigval), atol=1e-6)
    half = learn_pca_whitening(X, shrinkage=0.5)  # variances become sqrt(eigval)
    Y = _project(half, X)
    np.testing.assert_allclose(Y.T @ Y / len(X), np.diag(np.sqrt(eigval)), rtol=1e-3, atol=1e-6)


def test_dimension_reduction_apply_and_truncate(X):
    full = learn_pca_whitening(X)
    w5 = learn_pca_whitening(X, dim=5)
    np.testing.assert_allclose(w5.proj, full.proj[:5], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(full.truncate(5).proj, w5.proj, rtol=1e-5, atol=1e-6)
    out = w5.apply(X)
    assert out.shape == (600, 5) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out, _l2n(_project(w5, X)), atol=1e-5)
    for dim in (1, 16):
        assert learn_pca_whitening(X, dim=dim).dim == dim
    with pytest.raises(ValueError, match="dim"):
        learn_pca_whitening(X, dim=17)
    with pytest.raises(ValueError, match="dim"):
        learn_pca_whitening(X, dim=0)
    with pytest.raises(ValueError, match="dim"):
        full.truncate(17)


def test_dimension_beyond_rank_is_an_error(X):
    few = X[:10]  # 10 centred vectors span at most 9 dimensions
    assert learn_pca_whitening(few, dim=9).dim == 9
    with pytest.raises(ValueError, match="rank"):
        learn_pca_whitening(few, dim=10)
    with pytest.raises(ValueError, match="rank"):
        learn_pca_whitening(few)


def _cirtorch_lw(X: np.ndarray, qidxs: np.ndarray, pidxs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cirtorch's whitenlearn, written directly on a (D, N) matrix."""
    Xt = X.T.astype(np.float64)
    m = Xt[:, qidxs].mean(axis=1, keepdims=True)
    df = Xt[:, qidxs] - Xt[:, pidxs]
    S = df @ df.T / df.shape[1]
    P = np.linalg.inv(np.linalg.cholesky(S))
    df = P @ (Xt - m)
    eigval, eigvec = np.linalg.eig(df @ df.T)
    order = eigval.argsort()[::-1]
    return m.ravel(), eigvec[:, order].T.real @ P


@pytest.fixture(scope="module")
def lw_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((60, 12))
    labels = np.repeat(np.arange(60), 5)
    noise = rng.standard_normal((300, 12)) * np.linspace(0.05, 0.5, 12)
    X = _l2n(centers[labels] + noise).astype(np.float32)
    pairs = np.array([(i, j) for c in range(60) for i in range(5 * c, 5 * c + 5) for j in range(i + 1, 5 * c + 5)])
    return X, pairs


def test_lw_matches_direct_computation(lw_data):
    X, pairs = lw_data
    w = learn_lw_whitening(X, pairs)
    m_ref, P_ref = _cirtorch_lw(X, pairs[:, 0], pairs[:, 1])
    np.testing.assert_allclose(w.mean, m_ref, atol=1e-6)
    # eigenvectors are defined up to sign: align each row before comparing
    signs = np.sign(np.sum(w.proj * P_ref, axis=1))
    np.testing.assert_allclose(w.proj * signs[:, None], P_ref, rtol=1e-3, atol=1e-3 * np.abs(P_ref).max())
    # the intra-class covariance of the pairs becomes the identity
    diff = (X[pairs[:, 0]] - X[pairs[:, 1]]).astype(np.float64)
    Sw = diff.T @ diff / len(pairs)
    P = w.proj.astype(np.float64)
    np.testing.assert_allclose(P @ Sw @ P.T, np.eye(12), atol=1e-4)
    # reduced dimension keeps the leading rows
    np.testing.assert_allclose(learn_lw_whitening(X, pairs, dim=4).proj, w.proj[:4], rtol=1e-5, atol=1e-6)


def test_lw_validation(lw_data):
    X, pairs = lw_data
    with pytest.raises(ValueError, match="pairs"):
        learn_lw_whitening(X, pairs[:, :1])
    with pytest.raises(ValueError, match="pairs"):
        learn_lw_whitening(X, np.array([[0, 300]]))
    with pytest.raises(ValueError, match="pairs"):
        learn_lw_whitening(X, pairs.astype(np.float32))
    with pytest.raises(ValueError, match="pairs"):
        learn_lw_whitening(X, np.array([[0, 0], [1, 1]]))  # no intra-class variance
    with pytest.raises(ValueError, match="dim"):
        learn_lw_whitening(X, pairs, dim=13)
    # 10 vectors (2 objects) span an affine space of dimension 9 < D = 12
    few_pairs = pairs[np.all(pairs < 10, axis=1)]
    assert learn_lw_whitening(X[:10], few_pairs, dim=9).dim == 9
    with pytest.raises(ValueError, match="rank"):
        learn_lw_whitening(X[:10], few_pairs)
    with pytest.raises(ValueError, match="rank"):
        learn_lw_whitening(X[:10], few_pairs, dim=10)


def test_serialisation_round_trip(X):
    w = learn_pca_whitening(X, dim=8)
    d = json.loads(json.dumps(w.to_dict()))
    back = Whitening.from_dict(d)
    np.testing.assert_array_equal(back.mean, w.mean)
    np.testing.assert_array_equal(back.proj, w.proj)
    np.testing.assert_array_equal(back.apply(X), w.apply(X))
    npz_like = {"mean": w.mean, "proj": w.proj}
    np.testing.assert_array_equal(Whitening.from_dict(npz_like).proj, w.proj)
    with pytest.raises(ValueError, match="proj"):
        Whitening.from_dict({"mean": [0.0, 1.0]})
    with pytest.raises(ValueError, match="proj"):
        Whitening(mean=np.zeros(3), proj=np.zeros((2, 4)))


def test_linear_params_and_input_checks(X):
    w = learn_pca_whitening(X, dim=6)
    weight, bias = w.linear_params()
    np.testing.assert_allclose(X @ weight.T + bias, _project(w, X), atol=1e-4)
    with pytest.raises(ValueError, match="X"):
        w.apply(X[:, :8])
    with pytest.raises(ValueError, match="X"):
        learn_pca_whitening(X[0])
    with pytest.raises(ValueError, match="shrinkage"):
        learn_pca_whitening(X, shrinkage=1.5)
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        learn_pca_whitening(bad)
