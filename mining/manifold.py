"""Mining on manifolds (Iscen, Tolias, Avrithis, Chum, CVPR 2018), as pure array functions.

No labels and no verification: the disagreement between Euclidean and manifold similarity of
off-the-shelf descriptors gives training examples.

1. A kNN graph of the descriptors (k=30, weights max(x_i . x_j, 0)^3, mutual neighbours;
   `raytrieval.retrieval.diffusion.build_affinity`).
2. Anchors: images at local maxima of the stationary distribution of the random walk on that
   graph (well connected images, spread over the collection, one per "mode").
3. For an anchor, manifold similarity is the diffusion from the anchor,
   ``f = (I - alpha S)^-1 e_anchor`` (`raytrieval.retrieval.diffusion.diffuse`), and Euclidean similarity
   the descriptor dot product. In a collection larger than `truncate`, an anchor diffuses on
   the subgraph of its `truncate` nearest descriptors (Iscen et al. 2017): the anchors grow
   with N, and diffusing each over the whole graph made mining quadratic in N
   (benchmarks/scale.md).
4. Positives: manifold neighbours that are not Euclidean neighbours (far on the same manifold).
   Negatives: Euclidean neighbours that are not manifold neighbours (close, but on another
   manifold).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import scipy.sparse as sp

from raytrieval.retrieval.diffusion import affinity_from_knn, diffuse, normalize_affinity, subgraph_diffusion
from raytrieval.retrieval.knn import knn_graph, search

__all__ = [
    "ManifoldPools",
    "local_maxima",
    "manifold_pools",
    "manifold_tuples",
    "stationary_distribution",
]

_ANCHOR_CHUNK = 256  # anchors diffused together (bounds the (N, chunk) dense block)


@dataclass
class ManifoldPools:
    """Per-anchor pools of hard positives and hard negatives.

    Args:
        anchors: (A,) int64 anchor indices, by decreasing stationary probability.
        positives: A arrays of int64 indices, manifold neighbours not among the Euclidean
            ones, by decreasing manifold similarity.
        negatives: A arrays of int64 indices, Euclidean neighbours not among the manifold
            ones, by decreasing descriptor similarity.
        stationary: (N,) float64 stationary distribution of the random walk.
    """

    anchors: np.ndarray
    positives: list[np.ndarray] = field(default_factory=list)
    negatives: list[np.ndarray] = field(default_factory=list)
    stationary: np.ndarray | None = None


def stationary_distribution(W: sp.spmatrix | np.ndarray) -> np.ndarray:
    """Stationary distribution of the random walk ``P = D^-1 W`` on a symmetric affinity.

    For symmetric non-negative W the walk is reversible and ``pi_i = d_i / sum_j d_j`` with
    ``d = W 1`` (pi P = pi holds exactly); isolated nodes get 0.

    Args:
        W: (N, N) symmetric non-negative affinity.

    Returns:
        (N,) float64, sums to 1 (all zeros for a graph without edges).
    """
    W = sp.csr_matrix(W)
    if W.shape[0] != W.shape[1]:
        raise ValueError(f"W: expected a square matrix, got shape {W.shape}")
    if W.nnz and (W.data.min() < 0 or abs(W - W.T).max() > 1e-6 * abs(W).max()):
        raise ValueError("W: expected a symmetric non-negative affinity")
    deg = np.asarray(W.sum(axis=1), dtype=np.float64).ravel()
    total = deg.sum()
    return deg / total if total > 0 else deg


def local_maxima(W: sp.spmatrix | np.ndarray, values: np.ndarray) -> np.ndarray:
    """Nodes whose value beats every neighbour's (ties go to the lower index); positive values only.

    Args:
        W: (N, N) affinity; its non-zeros define the neighbours.
        values: (N,) node values (e.g. the stationary distribution).

    Returns:
        (M,) int64 node indices, by decreasing value (ties by index).
    """
    W = sp.csr_matrix(W)
    values = np.asarray(values, dtype=np.float64)
    n = W.shape[0]
    if values.shape != (n,):
        raise ValueError(f"values: expected shape ({n},), got {values.shape}")
    coo = W.tocoo()
    i, j = coo.row, coo.col
    # i loses to neighbour j when j's value is larger, or equal with a lower index
    loses = (values[j] > values[i]) | ((values[j] == values[i]) & (j < i))
    beaten = np.zeros(n, bool)
    beaten[i[loses & (i != j)]] = True
    winners = np.flatnonzero(~beaten & (values > 0))
    return winners[np.lexsort((winners, -values[winners]))].astype(np.int64)


def manifold_pools(
    X: np.ndarray,
    k: int = 30,
    gamma: float = 3.0,
    alpha: float = 0.99,
    k_euclidean: int = 50,
    k_manifold: int = 50,
    num_anchors: int | None = None,
    maxiter: int = 20,
    tol: float = 1e-6,
    mutual: bool = True,
    truncate: int | None = 1000,
) -> ManifoldPools:
    """Anchors and their hard positive / hard negative pools.

    Args:
        X: (N, D) L2-normalised descriptors.
        k: neighbours per node of the graph (clipped to N - 1).
        gamma: power on the similarities of the graph.
        alpha: diffusion parameter in [0, 1).
        k_euclidean: Euclidean neighbours per anchor (clipped to N - 1).
        k_manifold: manifold neighbours per anchor (clipped to N - 1).
        num_anchors: keep the anchors with the largest stationary probability; None for all
            local maxima.
        maxiter: conjugate-gradient iterations of the diffusion (each reaches one hop further).
        tol: conjugate-gradient tolerance.
        mutual: mutual kNN graph (else union).
        truncate: with more images than this, diffuse each anchor on the subgraph of its
            `truncate` nearest descriptors (cost per anchor independent of N); None: always
            on the whole graph.

    Returns:
        A ManifoldPools.
    """
    X = np.ascontiguousarray(np.asarray(X, dtype=np.float32))
    if X.ndim != 2 or X.shape[0] < 2:
        raise ValueError(f"X: expected (N, D) descriptors with N >= 2, got shape {X.shape}")
    n = X.shape[0]
    for name, value in (("k", k), ("k_euclidean", k_euclidean), ("k_manifold", k_manifold)):
        if value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")
    if num_anchors is not None and num_anchors < 1:
        raise ValueError(f"num_anchors: must be >= 1 or None, got {num_anchors}")
    if truncate is not None and truncate <= k_manifold:
        raise ValueError(f"truncate: must be > k_manifold ({k_manifold}) or None, got {truncate}")
    k, ke = min(k, n - 1), min(k_euclidean, n - 1)
    sims, nbrs = knn_graph(X, max(k, ke), exclude_self=True)  # one search for the graph and the Euclidean pools
    W = affinity_from_knn(sims[:, :k], nbrs[:, :k], gamma=gamma, mutual=mutual)
    pi = stationary_distribution(W)
    anchors = local_maxima(W, pi)
    if num_anchors is not None:
        anchors = anchors[:num_anchors]
    euclid = nbrs[:, :ke]  # (N, ke)
    S = normalize_affinity(W)
    km = min(k_manifold, n - 1)
    positives: list[np.ndarray] = []
    negatives: list[np.ndarray] = []
    for start in range(0, anchors.size, _ANCHOR_CHUNK):
        chunk = anchors[start : start + _ANCHOR_CHUNK]
        for r, (nodes, f) in zip(chunk, _diffusions(S, X, chunk, alpha, tol, maxiter, truncate)):
            f = f.copy()
            f[nodes == r] = -np.inf
            order = np.lexsort((nodes, -f))  # decreasing f, ties by index
            reached = nodes[order][f[order] > 0][:km]
            e = euclid[r]
            positives.append(reached[~np.isin(reached, e)].astype(np.int64))
            negatives.append(e[~np.isin(e, reached)].astype(np.int64))
    return ManifoldPools(anchors=anchors, positives=positives, negatives=negatives, stationary=pi)


def _diffusions(S: sp.csr_matrix, X: np.ndarray, chunk: np.ndarray, alpha: float, tol: float, maxiter: int,
                truncate: int | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(nodes, f) of the diffusion from each anchor of `chunk`: over the whole graph, or on the
    subgraph of the anchor's `truncate` nearest descriptors when the graph is larger."""
    n = S.shape[0]
    if truncate is not None and truncate < n:
        _, top = search(X, X[chunk], truncate)
        missing = ~(top == chunk[:, None]).any(axis=1)  # an anchor tied with duplicates of itself
        top[missing, -1] = chunk[missing]
        Y = sp.csr_matrix((np.ones(chunk.size), (np.arange(chunk.size), chunk)), shape=(chunk.size, n))
        yield from subgraph_diffusion(S, Y, top, alpha, tol, maxiter)
        return
    Y = np.zeros((n, chunk.size))
    Y[chunk, np.arange(chunk.size)] = 1.0
    F = diffuse(S, Y, alpha=alpha, tol=tol, maxiter=maxiter)  # (N, c)
    nodes = np.arange(n)
    for col in range(chunk.size):
        yield nodes, F[:, col]


def manifold_tuples(
    pools: ManifoldPools,
    num_negatives: int = 5,
    positives_per_anchor: int = 1,
    seed: int | np.random.Generator = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training tuples from manifold pools.

    Every anchor with a non-empty positive and negative pool gives `positives_per_anchor`
    tuples (fewer if its pool is smaller): positives drawn at random from its positive pool
    without replacement, negatives the first `num_negatives` of its negative pool (the most
    similar by descriptor: the hardest).

    Args:
        pools: from `manifold_pools`.
        num_negatives: negatives per tuple.
        positives_per_anchor: tuples per anchor.
        seed: seed or Generator of the positive draw.

    Returns:
        (queries (T,), positives (T,), negatives (T, num_negatives) with -1 padding), int64.
    """
    if num_negatives < 1 or positives_per_anchor < 1:
        raise ValueError("num_negatives and positives_per_anchor: must be >= 1")
    rng = np.random.default_rng(seed)
    q, p, neg = [], [], []
    for anchor, pos, negs in zip(pools.anchors, pools.positives, pools.negatives):
        if pos.size == 0 or negs.size == 0:
            continue
        row = np.full(num_negatives, -1, np.int64)
        row[: min(num_negatives, negs.size)] = negs[:num_negatives]
        for chosen in rng.choice(pos, size=min(positives_per_anchor, pos.size), replace=False):
            q.append(int(anchor))
            p.append(int(chosen))
            neg.append(row)
    if not q:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, num_negatives), np.int64)
    return np.array(q, np.int64), np.array(p, np.int64), np.stack(neg)
