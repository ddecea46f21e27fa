"""Query expansion and database-side augmentation over L2-normalised descriptors.

- `average_qe`: AQE (Chum et al. 2007): query := l2n(q + sum of its top-k database vectors).
- `alpha_qe`: alpha-QE (Radenović et al. 2019): neighbours weighted by (q . x)^alpha, query by 1.
- `dba`: database-side augmentation (Arandjelović & Zisserman 2012; alpha-weighted as in
  Radenović et al.): every database vector := l2n(weighted sum of itself and its k-1 nearest
  neighbours).

All functions return new (N, D) float32 L2-normalised descriptors; the caller re-ranks.
"""

from __future__ import annotations

import numpy as np

from raytrieval.retrieval.knn import knn_graph
from raytrieval.retrieval.arrays import as_descriptors, l2_normalize


def _check_expansion(
    Q: np.ndarray, X: np.ndarray, ranks: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate QE inputs; return (Q, X, top-k ranks (Nq, k) int64)."""
    X = as_descriptors(X, "X")
    Q = as_descriptors(Q, "Q", dim=X.shape[1])
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[0] != Q.shape[0]:
        raise ValueError(f"ranks: expected shape ({Q.shape[0]}, K), got {ranks.shape}")
    if not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks: expected integer indices, got dtype {ranks.dtype}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= ranks.shape[1]:
        raise ValueError(f"k: must be an int in 0..{ranks.shape[1]} (columns of ranks), got {k!r}")
    top = ranks[:, :k].astype(np.int64, copy=False)
    if top.size and (top.min() < 0 or top.max() >= X.shape[0]):
        raise ValueError(f"ranks: indices must be in 0..{X.shape[0] - 1}")
    return Q, X, top


def average_qe(Q: np.ndarray, X: np.ndarray, ranks: np.ndarray, k: int) -> np.ndarray:
    """Average query expansion.

    Args:
        Q: (Nq, D) query descriptors.
        X: (Ndb, D) database descriptors.
        ranks: (Nq, K) database indices by decreasing similarity (K >= k).
        k: number of top database vectors averaged with the query (0: unchanged).

    Returns:
        (Nq, D) float32 L2-normalised expanded queries.
    """
    Q, X, top = _check_expansion(Q, X, ranks, k)
    expanded = Q.astype(np.float64)  # (Nq, D)
    for j in range(top.shape[1]):  # one neighbour rank at a time: memory stays O(Nq D)
        expanded += X[top[:, j]]
    return np.ascontiguousarray(l2_normalize(expanded), dtype=np.float32)


def alpha_qe(Q: np.ndarray, X: np.ndarray, ranks: np.ndarray, k: int, alpha: float = 3.0) -> np.ndarray:
    """Alpha query expansion: weights ``max(q . x, 0)^alpha`` on the top-k, 1 on the query.

    Args:
        Q: (Nq, D) query descriptors.
        X: (Ndb, D) database descriptors.
        ranks: (Nq, K) database indices by decreasing similarity (K >= k).
        k: number of top database vectors used.
        alpha: power on the similarities (0 = average QE).

    Returns:
        (Nq, D) float32 L2-normalised expanded queries.
    """
    if alpha < 0:
        raise ValueError(f"alpha: must be >= 0, got {alpha}")
    Q, X, top = _check_expansion(Q, X, ranks, k)
    expanded = Q.astype(np.float64)  # (Nq, D)
    for j in range(top.shape[1]):
        neigh = X[top[:, j]].astype(np.float64)  # (Nq, D)
        weight = np.clip(np.einsum("qd,qd->q", neigh, Q), 0.0, None) ** alpha  # (Nq,)
        expanded += weight[:, None] * neigh
    return np.ascontiguousarray(l2_normalize(expanded), dtype=np.float32)


def dba(X: np.ndarray, k: int, alpha: float = 0.0) -> np.ndarray:
    """Database-side augmentation.

    Each vector is replaced by the weighted sum of itself (weight 1) and its k-1 nearest other
    database vectors (weights ``max(sim, 0)^alpha``), then L2-normalised. ``k=1`` is the identity
    (up to normalisation); ``alpha=0`` is a plain average.

    Args:
        X: (N, D) database descriptors.
        k: vectors averaged per item, counting the item itself (1..N).
        alpha: power on the similarities.

    Returns:
        (N, D) float32 L2-normalised augmented database.
    """
    X = as_descriptors(X, "X")
    n = X.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= max(n, 1):
        raise ValueError(f"k: must be an int in 1..{n}, got {k!r}")
    if alpha < 0:
        raise ValueError(f"alpha: must be >= 0, got {alpha}")
    out = X.astype(np.float64)
    if k > 1:
        sims, ids = knn_graph(X, k - 1, exclude_self=True)  # (N, k-1)
        weights = np.clip(sims.astype(np.float64), 0.0, None) ** alpha  # (N, k-1)
        for j in range(k - 1):  # one neighbour rank at a time: memory stays O(N D)
            out += weights[:, j : j + 1] * X[ids[:, j]]
    return np.ascontiguousarray(l2_normalize(out), dtype=np.float32)
