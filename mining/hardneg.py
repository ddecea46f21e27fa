"""Hard-negative mining, cirtorch style (Radenović et al. 2016/2018), as pure array functions.

Every epoch the trainer embeds the queries and a random pool of images with the current model
and calls `mine_hard_negatives`: for each query, the pool is ranked by descriptor similarity and
the top-ranked images whose cluster differs from the query's are taken, at most one per
cluster, until `num_negatives` are found. Taking one image per cluster keeps the negatives of a
query diverse (not five views of the same wrong landmark).

Cluster labels are non-negative ints; an image in no cluster is its own cluster
(`singleton_labels` gives such images distinct labels), so an image can never be its own
negative as long as the query and the pool use the same labelling.

Clusters split a landmark whenever verification misses the links between its parts, and then
"another cluster" is often the same landmark: on a collection of a few landmarks most hard
negatives are false (benchmarks/mining.md). `links` (from `link_labels`, e.g. over the kNN
graph of the descriptors) marks clusters that are near each other; a query never takes a
negative from a cluster linked to its own, and the hardest of the rest are still taken.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["link_labels", "mine_hard_negatives", "random_negatives", "sample_pool", "singleton_labels"]

_CHUNK = 256  # queries ranked together (bounds the (chunk, Npool) similarity block)


def singleton_labels(labels: np.ndarray) -> np.ndarray:
    """Give every image with a negative label (no cluster) a label of its own.

    Args:
        labels: (N,) int cluster ids, -1 (or any negative) for unclustered images.

    Returns:
        (N,) int64 labels where clustered images keep theirs and each unclustered image gets a
        distinct new label above the largest one.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels: expected a (N,) int array, got shape {labels.shape} dtype {labels.dtype}")
    out = labels.astype(np.int64, copy=True)
    lonely = np.flatnonzero(out < 0)
    start = int(out.max()) + 1 if out.size and out.max() >= 0 else 0
    out[lonely] = start + np.arange(lonely.size, dtype=np.int64)
    return out


def link_labels(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> sp.csr_matrix:
    """Which clusters are linked: label x label adjacency from image pairs.

    Args:
        labels: (N,) non-negative labels (see `singleton_labels`).
        a: (P,) int image indices.
        b: (P,) int image indices, e.g. the kNN graph as (repeat(arange(N), k), ids.ravel()).

    Returns:
        (L, L) symmetric boolean CSR matrix, L = labels.max() + 1; the diagonal is not set.
    """
    labels = np.asarray(labels, np.int64)
    a = np.asarray(a, np.int64).ravel()
    b = np.asarray(b, np.int64).ravel()
    if labels.ndim != 1 or (labels.size and labels.min() < 0):
        raise ValueError("labels: expected (N,) non-negative labels (see singleton_labels)")
    if a.shape != b.shape:
        raise ValueError(f"a, b: expected the same shape, got {a.shape} and {b.shape}")
    n_labels = int(labels.max()) + 1 if labels.size else 0
    la, lb = labels[a], labels[b]
    M = sp.csr_matrix((np.ones(la.size, bool), (la, lb)), shape=(n_labels, n_labels))
    M = (M + M.T).astype(bool).tocsr()
    M.sort_indices()
    return M


def sample_pool(n: int, pool_size: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """A random pool of image indices (cirtorch's `poolsize`), sorted.

    Args:
        n: number of images.
        pool_size: pool size; clipped to n.
        seed: seed or Generator.

    Returns:
        (min(pool_size, n),) int64 distinct indices, increasing.
    """
    if pool_size < 1:
        raise ValueError(f"pool_size: must be >= 1, got {pool_size}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(pool_size, n), replace=False)).astype(np.int64)


def _forbidden(links: sp.csr_matrix | None, label: int) -> np.ndarray:
    """The query's own label and the labels linked to it."""
    if links is None or label >= links.shape[0]:
        return np.array([label], np.int64)
    return np.r_[label, links.indices[links.indptr[label] : links.indptr[label + 1]]].astype(np.int64)


def _check_links(links, q_labels: np.ndarray, pool_labels: np.ndarray):
    if links is None:
        return None
    links = sp.csr_matrix(links, dtype=bool)
    top = max(int(q_labels.max(initial=-1)), int(pool_labels.max(initial=-1))) + 1
    if links.shape[0] != links.shape[1] or links.shape[0] < top:
        raise ValueError(f"links: expected a square matrix over at least {top} labels, got {links.shape}")
    links.sort_indices()
    return links


def _check(q_desc, pool_desc, q_labels, pool_labels, num_negatives):
    q_desc = np.asarray(q_desc)
    pool_desc = np.asarray(pool_desc)
    if q_desc.ndim != 2 or pool_desc.ndim != 2 or q_desc.shape[1] != pool_desc.shape[1]:
        raise ValueError(
            f"descriptors: expected (Nq, D) queries and (Np, D) pool, got {q_desc.shape} and {pool_desc.shape}"
        )
    q_labels = np.asarray(q_labels)
    pool_labels = np.asarray(pool_labels)
    if q_labels.shape != (q_desc.shape[0],):
        raise ValueError(f"query_labels: expected shape ({q_desc.shape[0]},), got {q_labels.shape}")
    if pool_labels.shape != (pool_desc.shape[0],):
        raise ValueError(f"pool_labels: expected shape ({pool_desc.shape[0]},), got {pool_labels.shape}")
    for name, lab in (("query_labels", q_labels), ("pool_labels", pool_labels)):
        if lab.size and (not np.issubdtype(lab.dtype, np.integer) or lab.min() < 0):
            raise ValueError(f"{name}: expected non-negative int cluster labels (see singleton_labels)")
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, (int, np.integer)) or num_negatives < 1:
        raise ValueError(f"num_negatives: must be an int >= 1, got {num_negatives!r}")
    return (
        np.ascontiguousarray(q_desc, np.float32),
        np.ascontiguousarray(pool_desc, np.float32),
        q_labels.astype(np.int64),
        pool_labels.astype(np.int64),
        int(num_negatives),
    )


def _first_per_cluster(ranked: np.ndarray, labels_ranked: np.ndarray, forbidden: np.ndarray, m: int) -> np.ndarray:
    """The first m entries of ranked from distinct clusters outside `forbidden`."""
    other = np.flatnonzero(~np.isin(labels_ranked, forbidden))
    _, first = np.unique(labels_ranked[other], return_index=True)
    return ranked[other[np.sort(first)[:m]]]


def mine_hard_negatives(
    query_desc: np.ndarray,
    pool_desc: np.ndarray,
    query_labels: np.ndarray,
    pool_labels: np.ndarray,
    num_negatives: int = 5,
    links: sp.spmatrix | None = None,
) -> np.ndarray:
    """Hardest negatives of each query from a pool, at most one per cluster.

    Args:
        query_desc: (Nq, D) L2-normalised descriptors of the queries (current model).
        pool_desc: (Np, D) L2-normalised descriptors of the pool (current model).
        query_labels: (Nq,) cluster label of each query (>= 0, see `singleton_labels`).
        pool_labels: (Np,) cluster label of each pool image.
        num_negatives: negatives per query.
        links: optional (L, L) label adjacency (`link_labels`): no negative from a cluster
            linked to the query's.

    Returns:
        (Nq, num_negatives) int64 pool indices, most similar first; -1 padding where the pool
        holds fewer eligible clusters. Ties in similarity go to the lower pool index.
    """
    Q, P, ql, pl, m = _check(query_desc, pool_desc, query_labels, pool_labels, num_negatives)
    links = _check_links(links, ql, pl)
    n_pool = P.shape[0]
    out = np.full((Q.shape[0], m), -1, np.int64)
    top = min(n_pool, max(64, 16 * m))  # usually enough; a row that needs more is sorted in full
    for start in range(0, Q.shape[0], _CHUNK):
        sims = Q[start : start + _CHUNK] @ P.T  # (c, Np)
        if top < n_pool:
            cand = np.argpartition(-sims, top - 1, axis=1)[:, :top]  # (c, top), unordered
        else:
            cand = np.broadcast_to(np.arange(n_pool), sims.shape)
        for r in range(sims.shape[0]):
            row = sims[r]
            c = np.sort(cand[r])  # ascending index, so the stable sort below breaks ties by index
            ranked = c[np.argsort(-row[c], kind="stable")]
            forbidden = _forbidden(links, int(ql[start + r]))
            picked = _first_per_cluster(ranked, pl[ranked], forbidden, m)
            # exact unless the shortlist ran out, or a pick ties with its last (cut) similarity
            if top < n_pool and (picked.size < m or np.any(row[picked] <= row[ranked[-1]])):
                ranked = np.argsort(-row, kind="stable")
                picked = _first_per_cluster(ranked, pl[ranked], forbidden, m)
            out[start + r, : picked.size] = picked
    return out


def random_negatives(
    query_labels: np.ndarray,
    pool_labels: np.ndarray,
    num_negatives: int = 5,
    seed: int | np.random.Generator = 0,
    links: sp.spmatrix | None = None,
) -> np.ndarray:
    """Random negatives from a pool: other clusters only, at most one per cluster.

    Args:
        query_labels: (Nq,) cluster label of each query (>= 0).
        pool_labels: (Np,) cluster label of each pool image (>= 0).
        num_negatives: negatives per query.
        seed: seed or Generator.
        links: optional (L, L) label adjacency: no negative from a cluster linked to the query's.

    Returns:
        (Nq, num_negatives) int64 pool indices, -1 padding.
    """
    ql = np.asarray(query_labels)
    pl = np.asarray(pool_labels)
    _, _, ql, pl, m = _check(np.zeros((ql.size, 1)), np.zeros((pl.size, 1)), ql, pl, num_negatives)
    links = _check_links(links, ql, pl)
    rng = np.random.default_rng(seed)
    out = np.full((ql.size, m), -1, np.int64)
    for i in range(ql.size):
        ranked = rng.permutation(pl.size)
        picked = _first_per_cluster(ranked, pl[ranked], _forbidden(links, int(ql[i])), m)
        out[i, : picked.size] = picked
    return out
