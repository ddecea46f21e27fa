"""Exact nearest-neighbour search and full rankings over (N, D) float32 descriptors (faiss).

Brute force (``IndexFlatIP`` / ``IndexFlatL2``); on a machine where faiss sees GPUs (the
``faiss-gpu`` wheel and a CUDA device) the flat index is moved to GPU 0. The CPU wheel has no GPU
symbols, so every GPU call is guarded by ``faiss.get_num_gpus() > 0``.
"""

from __future__ import annotations

import functools
from typing import Any

import faiss
import numpy as np
from raytrieval.retrieval.arrays import as_descriptors

_METRICS = ("ip", "l2")


def _check_k(k: int, n: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"{name}: expected an int, got {k!r}")
    if not 1 <= k <= n:
        raise ValueError(f"{name}: must be in 1..{n} (the database size), got {k}")
    return int(k)


def gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees at least one GPU."""
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return get_num_gpus is not None and get_num_gpus() > 0 and hasattr(faiss, "StandardGpuResources")


@functools.lru_cache(maxsize=1)
def gpu_resources() -> Any:
    """One shared ``StandardGpuResources`` (its creation reserves scratch memory: do it once)."""
    return faiss.StandardGpuResources()


def _index(db: np.ndarray, metric: str, use_gpu: bool, nlist: int | None, nprobe: int) -> Any:
    """A filled index over db (N, D): exact, or IVF-Flat with `nlist` lists; on GPU 0 when use_gpu."""
    d = db.shape[1]
    flat = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
    index = flat
    if nlist:
        faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
        index = faiss.IndexIVFFlat(flat, d, nlist, faiss_metric)
        sample = db[np.random.default_rng(0).permutation(len(db))[: 64 * nlist]]
        index.train(sample)
        index.nprobe = nprobe
    if use_gpu:
        index = faiss.index_cpu_to_gpu(gpu_resources(), 0, index)
    index.add(db)
    return index


def search(
    db: np.ndarray,
    queries: np.ndarray,
    k: int,
    metric: str = "ip",
    use_gpu: bool | None = None,
    nlist: int | None = None,
    nprobe: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """k-nearest-neighbour search, exact or (with `nlist`) approximate by an IVF index.

    Args:
        db: (Ndb, D) database descriptors.
        queries: (Nq, D) query descriptors.
        k: neighbours per query, 1..Ndb.
        metric: ``'ip'`` (inner product, decreasing) or ``'l2'`` (squared L2 distance, increasing).
        use_gpu: None = GPU faiss when available; False = CPU; True = require a GPU.
        nlist: inverted lists of an approximate IVF-Flat index (None: exact search); for
            databases too large for brute force (e.g. a kNN graph over 10^6 vectors).
        nprobe: lists visited per query with `nlist`.

    Returns:
        (scores (Nq, k) float32, ids (Nq, k) int64): similarities (``'ip'``) or squared distances
        (``'l2'``), best first.
    """
    if metric not in _METRICS:
        raise ValueError(f"metric: expected one of {_METRICS}, got {metric!r}")
    db = as_descriptors(db, "db")
    queries = as_descriptors(queries, "queries", dim=db.shape[1], min_rows=0)
    k = _check_k(k, db.shape[0])
    has_gpu = gpu_available()
    if use_gpu and not has_gpu:
        raise ValueError("use_gpu: no GPU visible to faiss; install faiss-gpu (pip install 'raytrieval[gpu]')")
    gpu = has_gpu if use_gpu is None else bool(use_gpu)
    if queries.shape[0] == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    if nlist is not None and not 1 <= nlist <= db.shape[0]:
        raise ValueError(f"nlist: must be in 1..{db.shape[0]}, got {nlist}")
    index = _index(db, metric, gpu, nlist, nprobe)
    scores, ids = index.search(queries, k)
    return np.ascontiguousarray(scores, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64)


def knn_graph(
    X: np.ndarray,
    k: int,
    exclude_self: bool = True,
    use_gpu: bool | None = None,
    nlist: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """k-nearest-neighbour graph of a set of descriptors under the inner product.

    Args:
        X: (N, D) descriptors.
        k: neighbours per node (1..N-1 when exclude_self, else 1..N).
        exclude_self: drop each node from its own list (by index, so exact duplicates of a node
            are kept as neighbours).
        use_gpu: as in `search`.
        nlist: as in `search` (approximate graph).

    Returns:
        (sims (N, k) float32, ids (N, k) int64), decreasing similarity.
    """
    X = as_descriptors(X, "X")
    n = X.shape[0]
    if not exclude_self:
        return search(X, X, k, metric="ip", use_gpu=use_gpu, nlist=nlist)
    if n < 2:
        raise ValueError(f"X: need at least 2 vectors for a graph without self loops, got {n}")
    k = _check_k(k, n - 1)
    sims, ids = search(X, X, k + 1, metric="ip", use_gpu=use_gpu, nlist=nlist)  # (N, k+1)
    is_self = ids == np.arange(n)[:, None]
    # rows where self was not retrieved (ties with duplicates): drop the last column instead
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True
    # a row may hold self only once; keep the first occurrence only
    first = np.argmax(is_self, axis=1)
    drop = np.zeros_like(is_self)
    drop[np.arange(n), first] = True
    keep = ~drop
    return (
        np.ascontiguousarray(sims[keep].reshape(n, k)),
        np.ascontiguousarray(ids[keep].reshape(n, k)),
    )


def rank_all(Q: np.ndarray, X: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Full ranking of the database for every query, by decreasing inner product.

    Ties are broken by database index (stable sort), so the result is deterministic.

    Args:
        Q: (Nq, D) query descriptors.
        X: (Ndb, D) database descriptors.
        chunk: queries per block (bounds the (chunk, Ndb) similarity matrix in memory).

    Returns:
        ranks (Nq, Ndb) int64: database indices, most similar first.
    """
    X = as_descriptors(X, "X")
    Q = as_descriptors(Q, "Q", dim=X.shape[1], min_rows=0)
    if chunk < 1:
        raise ValueError(f"chunk: must be >= 1, got {chunk}")
    ranks = np.empty((Q.shape[0], X.shape[0]), dtype=np.int64)
    for start in range(0, Q.shape[0], chunk):
        sims = Q[start : start + chunk] @ X.T  # (c, Ndb)
        ranks[start : start + chunk] = np.argsort(-sims, axis=1, kind="stable")
    return ranks
