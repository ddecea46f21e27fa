"""Diffusion on a kNN graph of the database (Iscen et al., CVPR 2017 and CVPR 2018).

"Efficient diffusion on region manifolds" ranks the database by the solution ``f`` of
``(I - alpha S) f = y``, where ``S = D^-1/2 W D^-1/2`` is the normalised affinity of a mutual
kNN graph with weights ``max(x_i . x_j, 0)^gamma`` and ``y`` holds the query's top-``kq``
similarities to the database raised to ``gamma``. The system is solved by conjugate gradient,
for many queries at once.

Regional descriptors are supported: database rows (regions) map to images through ``x_ids`` and
query rows through ``q_ids``; the query vector of an image is the sum of its regions' vectors,
and image scores pool the region scores of ``f`` (sum as in the paper, or max).

`TruncatedDiffusion` precomputes an approximation of ``(I - alpha S)^-1`` offline so that a
query costs a sparse/thin product: a rank-r spectral approximation ("fast spectral ranking",
Iscen et al. 2018) or the top-``trunc`` entries of every column of the exact inverse.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from raytrieval.retrieval.knn import knn_graph, search
from raytrieval.retrieval.arrays import as_descriptors, check_int

_AGGREGATIONS = ("sum", "max")
_MODES = ("spectral", "truncated")
_QUERY_CHUNK = 256  # queries diffused together (bounds the (N, chunk) dense right-hand side)


# ---------------------------------------------------------------------------------------------
# validation helpers


def _check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha: must be in [0, 1), got {alpha}")
    return float(alpha)


def _check_gamma(gamma: float) -> float:
    if not gamma > 0.0:
        raise ValueError(f"gamma: must be > 0, got {gamma}")
    return float(gamma)


def _check_ids(ids: np.ndarray | None, n: int, name: str) -> tuple[np.ndarray, int]:
    """Validate an optional (n,) row -> image id map; None is the identity. Returns (ids, n_images)."""
    if ids is None:
        return np.arange(n, dtype=np.int64), n
    ids = np.asarray(ids)
    if ids.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},) (one image id per row), got {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name}: expected integer image ids, got dtype {ids.dtype}")
    if ids.min() < 0:
        raise ValueError(f"{name}: image ids must be >= 0")
    return ids.astype(np.int64, copy=False), int(ids.max()) + 1


def _check_square(M: sp.spmatrix | np.ndarray, name: str) -> sp.csr_matrix:
    M = sp.csr_matrix(M)
    if M.shape[0] != M.shape[1]:
        raise ValueError(f"{name}: expected a square (N, N) matrix, got shape {M.shape}")
    return M


# ---------------------------------------------------------------------------------------------
# graph


def build_affinity(
    X: np.ndarray, k: int, gamma: float = 3.0, mutual: bool = True, nlist: int | None = None
) -> sp.csr_matrix:
    """Sparse affinity matrix of the kNN graph of X.

    ``W_ij = max(x_i . x_j, 0)^gamma`` when j is among the k nearest neighbours of i and (mutual)
    i among those of j, or (not mutual) either way. Symmetric, non-negative, zero diagonal.

    Args:
        X: (N, D) L2-normalised descriptors.
        k: neighbours per node, 1..N-1.
        gamma: power on the similarities.
        mutual: keep only reciprocal neighbours (intersection) instead of the union.
        nlist: build the kNN graph with an approximate IVF index of this many lists.

    Returns:
        (N, N) float32 CSR matrix.
    """
    X = as_descriptors(X, "X")
    k = check_int(k, "k", 1, max(X.shape[0] - 1, 1))
    sims, ids = knn_graph(X, k, exclude_self=True, nlist=nlist)  # (N, k)
    return affinity_from_knn(sims, ids, gamma, mutual)


def affinity_from_knn(sims: np.ndarray, ids: np.ndarray, gamma: float = 3.0, mutual: bool = True) -> sp.csr_matrix:
    """`build_affinity` from a kNN graph already searched: (N, k) similarities and neighbours
    (no self loops), decreasing similarity."""
    gamma = _check_gamma(gamma)
    n, k = ids.shape
    vals = np.clip(sims, 0.0, None) ** gamma
    rows = np.repeat(np.arange(n), k)
    A = sp.csr_matrix((vals.ravel(), (rows, ids.ravel())), shape=(n, n), dtype=np.float32)
    # the structure decides mutual vs union; min/max also make the values exactly symmetric
    W = A.minimum(A.T) if mutual else A.maximum(A.T)
    W = sp.csr_matrix(W, dtype=np.float32)
    W.setdiag(0.0)
    W.eliminate_zeros()
    W.sort_indices()
    return W


def normalize_affinity(W: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
    """Symmetric normalisation ``S = D^-1/2 W D^-1/2`` with ``D = diag(W 1)``.

    Isolated nodes (zero degree) keep zero rows and columns.

    Args:
        W: (N, N) symmetric non-negative affinity.

    Returns:
        (N, N) CSR matrix of the same float dtype (float32 for integer input).
    """
    W = _check_square(W, "W")
    if W.nnz and W.data.min() < 0:
        raise ValueError("W: affinities must be non-negative")
    if W.nnz and abs(W - W.T).max() > 1e-6 * max(float(abs(W).max()), 1e-30):
        raise ValueError("W: the affinity matrix must be symmetric")
    dtype = W.dtype if np.issubdtype(W.dtype, np.floating) else np.float32
    deg = np.asarray(W.sum(axis=1), dtype=np.float64).ravel()  # (N,)
    inv_sqrt = np.zeros_like(deg)
    nz = deg > 0
    inv_sqrt[nz] = 1.0 / np.sqrt(deg[nz])
    Dm = sp.diags(inv_sqrt)
    S = sp.csr_matrix(Dm @ W.astype(np.float64) @ Dm, dtype=dtype)
    S.sort_indices()
    return S


# ---------------------------------------------------------------------------------------------
# linear solve


def _block_cg(
    matvec: Callable[[np.ndarray], np.ndarray],
    B: np.ndarray,
    tol: float,
    maxiter: int,
) -> tuple[np.ndarray, int]:
    """Conjugate gradient for an SPD operator, independently on every column of B.

    A column stops when ``||r|| <= tol ||b||``.

    Args:
        matvec: maps (N, m') -> (N, m'), the SPD matrix times a block of columns.
        B: (N, m) float64 right-hand sides.
        tol: relative residual tolerance.
        maxiter: maximum iterations.

    Returns:
        (X (N, m) float64 solutions, iterations run).
    """
    X = np.zeros_like(B)
    R = B.copy()
    P = R.copy()
    rs = np.einsum("ij,ij->j", R, R)  # (m,)
    thresh = (tol**2) * rs  # squared residual targets, relative to ||b||^2
    active = rs > thresh
    it = 0
    while it < maxiter and active.any():
        idx = np.flatnonzero(active)
        full = idx.size == B.shape[1]
        Pa = P if full else P[:, idx]
        APa = matvec(Pa)
        step = rs[idx] / np.einsum("ij,ij->j", Pa, APa)
        Ra = R if full else R[:, idx]
        Xa = X if full else X[:, idx]
        Xa += step * Pa
        Ra -= step * APa
        rs_new = np.einsum("ij,ij->j", Ra, Ra)
        Pa = Ra + (rs_new / rs[idx]) * Pa
        if full:
            P = Pa
        else:
            X[:, idx], R[:, idx], P[:, idx] = Xa, Ra, Pa
        rs[idx] = rs_new
        active[idx] = rs_new > thresh[idx]
        it += 1
    return X, it


def _diffusion_operator(S: sp.csr_matrix, alpha: float) -> Callable[[np.ndarray], np.ndarray]:
    S64 = S.astype(np.float64)

    def matvec(V: np.ndarray) -> np.ndarray:
        return V - alpha * (S64 @ V)

    return matvec


def diffuse(
    S: sp.spmatrix | np.ndarray,
    y: np.ndarray,
    alpha: float = 0.99,
    tol: float = 1e-6,
    maxiter: int = 20,
) -> np.ndarray:
    """Solve ``(I - alpha S) f = y`` by conjugate gradient.

    Args:
        S: (N, N) normalised affinity (`normalize_affinity`), symmetric with spectrum in [-1, 1].
        y: (N,) or (N, m) right-hand side(s), e.g. one column per query.
        alpha: diffusion parameter in [0, 1); closer to 1 spreads further on the manifold.
        tol: relative residual tolerance per column.
        maxiter: maximum CG iterations (20 is the paper's setting for ranking; an exact solve
            with alpha=0.99 needs about 100).

    Returns:
        f, float64 with the shape of y.
    """
    S = _check_square(S, "S")
    alpha = _check_alpha(alpha)
    maxiter = check_int(maxiter, "maxiter", 1)
    if not tol > 0:
        raise ValueError(f"tol: must be > 0, got {tol}")
    y = np.asarray(y)
    if y.ndim not in (1, 2) or y.shape[0] != S.shape[0]:
        raise ValueError(f"y: expected shape ({S.shape[0]},) or ({S.shape[0]}, m), got {y.shape}")
    B = y.astype(np.float64).reshape(S.shape[0], -1)
    f, _ = _block_cg(_diffusion_operator(S, alpha), B, tol, maxiter)
    return f.reshape(y.shape)


# ---------------------------------------------------------------------------------------------
# queries and pooling


def _query_matrix(
    Q: np.ndarray,
    X: np.ndarray,
    kq: int,
    gamma: float,
    q_ids: np.ndarray,
    n_queries: int,
) -> sp.csr_matrix:
    """Sparse query vectors: (n_queries, N), row g = sum over regions of image g of their top-kq sims^gamma."""
    sims, ids = search(X, Q, kq)  # (Nq_rows, kq)
    vals = (np.clip(sims.astype(np.float64), 0.0, None) ** gamma).ravel()
    rows = np.repeat(q_ids, kq)
    Y = sp.csr_matrix((vals, (rows, ids.ravel())), shape=(n_queries, X.shape[0]))
    Y.sum_duplicates()
    return Y


def _pool(F: np.ndarray, x_ids: np.ndarray, n_images: int, agg: str, identity: bool) -> np.ndarray:
    """Pool region scores into image scores: (m, N) -> (m, n_images); empty images get -inf."""
    if identity:
        return F
    if agg == "sum":
        M = sp.csr_matrix((np.ones(x_ids.size), (np.arange(x_ids.size), x_ids)), shape=(x_ids.size, n_images))
        out = np.asarray((M.T @ F.T).T)
    else:
        order = np.argsort(x_ids, kind="stable")
        sorted_ids = x_ids[order]
        starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
        out = np.full((F.shape[0], n_images), -np.inf)
        out[:, sorted_ids[starts]] = np.maximum.reduceat(F[:, order], starts, axis=1)
        return out
    present = np.bincount(x_ids, minlength=n_images) > 0
    out[:, ~present] = -np.inf
    return out


def _rank(scores: np.ndarray, tiebreak: np.ndarray | None) -> np.ndarray:
    """Rows by decreasing score; ties by decreasing tiebreak, then by index."""
    if tiebreak is None:
        return np.argsort(-scores, axis=1, kind="stable").astype(np.int64)
    return np.lexsort((-tiebreak, -scores), axis=-1).astype(np.int64)


class _Problem:
    """Validated inputs shared by the online and offline rerankers."""

    def __init__(self, X: np.ndarray, x_ids: np.ndarray | None, agg: str) -> None:
        if agg not in _AGGREGATIONS:
            raise ValueError(f"agg: expected one of {_AGGREGATIONS}, got {agg!r}")
        self.X = as_descriptors(X, "X")
        self.regional = x_ids is not None
        self.x_ids, self.n_images = _check_ids(x_ids, self.X.shape[0], "x_ids")
        self.agg = agg

    def graph(self, S: sp.spmatrix | None, k: int, gamma: float, mutual: bool) -> sp.csr_matrix:
        n = self.X.shape[0]
        if S is None:
            if n < 2:
                raise ValueError(f"X: need at least 2 database rows for a graph, got {n}")
            k = check_int(k, "k", 1)
            return normalize_affinity(build_affinity(self.X, min(k, n - 1), gamma, mutual))
        S = _check_square(S, "S")
        if S.shape[0] != n:
            raise ValueError(f"S: expected shape ({n}, {n}) to match X, got {S.shape}")
        return S

    def queries(self, Q: np.ndarray, q_ids: np.ndarray | None, kq: int, gamma: float) -> sp.csr_matrix:
        """Validated sparse query vectors (n_query_images, N)."""
        Q = as_descriptors(Q, "Q", dim=self.X.shape[1])
        kq = min(check_int(kq, "kq", 1), self.X.shape[0])
        ids, n_queries = _check_ids(q_ids, Q.shape[0], "q_ids")
        return _query_matrix(Q, self.X, kq, gamma, ids, n_queries)

    def ranks(self, Q: np.ndarray, q_ids: np.ndarray | None, scores: np.ndarray) -> np.ndarray:
        """Ranks from (G, n_images) scores; global descriptors break ties by plain similarity."""
        if self.regional or q_ids is not None:
            return _rank(scores, None)
        Q = as_descriptors(Q, "Q", dim=self.X.shape[1])
        return _rank(scores, Q @ self.X.T)


def diffusion_scores(
    Q: np.ndarray,
    X: np.ndarray,
    k: int = 50,
    kq: int = 10,
    gamma: float = 3.0,
    alpha: float = 0.99,
    maxiter: int = 20,
    tol: float = 1e-6,
    *,
    mutual: bool = True,
    x_ids: np.ndarray | None = None,
    q_ids: np.ndarray | None = None,
    agg: str = "sum",
    S: sp.spmatrix | None = None,
    truncate: int | None = None,
) -> np.ndarray:
    """Diffusion scores of every database image for every query (see `diffusion_rerank`).

    Returns:
        (n_query_images, n_db_images) float64 scores, higher is better; -inf for image ids
        without any region, and (with `truncate`) for images outside a query's subgraph.
    """
    problem = _Problem(X, x_ids, agg)
    alpha = _check_alpha(alpha)
    gamma = _check_gamma(gamma)
    maxiter = check_int(maxiter, "maxiter", 1)
    if not tol > 0:
        raise ValueError(f"tol: must be > 0, got {tol}")
    S = problem.graph(S, k, gamma, mutual)
    Y = problem.queries(Q, q_ids, kq, gamma)  # (G, N)
    if truncate is not None:
        truncate = check_int(truncate, "truncate", min(kq, S.shape[0]))
        if problem.regional or q_ids is not None:
            raise ValueError("truncate: supported for global descriptors only (x_ids and q_ids None)")
        if truncate < S.shape[0]:
            return _truncated_scores(as_descriptors(Q, "Q", dim=problem.X.shape[1]), problem.X, S, Y, alpha,
                                     tol, maxiter, truncate)
    matvec = _diffusion_operator(S, alpha)
    out = np.empty((Y.shape[0], problem.n_images))
    for start in range(0, Y.shape[0], _QUERY_CHUNK):
        B = Y[start : start + _QUERY_CHUNK].T.toarray()  # (N, c)
        F, _ = _block_cg(matvec, B, tol, maxiter)
        out[start : start + B.shape[1]] = _pool(F.T, problem.x_ids, problem.n_images, agg, not problem.regional)
    return out


def subgraph_diffusion(S: sp.csr_matrix, Y: sp.csr_matrix, top: np.ndarray, alpha: float, tol: float,
                       maxiter: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Diffusion of each row of `Y` on its own subgraph (Iscen et al. 2017): for row i, the
    nodes `top[i]` (sorted) and the rows and columns of `S` between them.

    A row then costs O(T k maxiter) for T = top.shape[1], whatever the graph's size.

    Yields:
        (nodes (T,), f (T,)) per row of `Y`, f solving ``(I - alpha S_sub) f = y_sub``.
    """
    S64 = S.astype(np.float64)
    for i, idx in enumerate(np.sort(top, axis=1)):
        sub = S64[idx][:, idx]  # (T, T) rows and columns of the subgraph
        y = Y[i, idx].toarray().T  # (T, 1)
        f, _ = _block_cg(lambda V, sub=sub: V - alpha * (sub @ V), y, tol, maxiter)
        yield idx, f[:, 0]


def _truncated_scores(Q: np.ndarray, X: np.ndarray, S: sp.csr_matrix, Y: sp.csr_matrix, alpha: float,
                      tol: float, maxiter: int, truncate: int) -> np.ndarray:
    """Diffusion on each query's subgraph, its `truncate` nearest database items; items outside
    the subgraph score -inf (ranked after it, by plain similarity)."""
    _, top = search(X, Q, truncate)  # (Nq, T); the kq seeds are among them (kq <= T)
    out = np.full((Q.shape[0], X.shape[0]), -np.inf)
    for i, (idx, f) in enumerate(subgraph_diffusion(S, Y, top, alpha, tol, maxiter)):
        out[i, idx] = f
    return out


def diffusion_rerank(
    Q: np.ndarray,
    X: np.ndarray,
    k: int = 50,
    kq: int = 10,
    gamma: float = 3.0,
    alpha: float = 0.99,
    maxiter: int = 20,
    tol: float = 1e-6,
    *,
    mutual: bool = True,
    x_ids: np.ndarray | None = None,
    q_ids: np.ndarray | None = None,
    agg: str = "sum",
    S: sp.spmatrix | None = None,
    truncate: int | None = None,
) -> np.ndarray:
    """Rank the database by diffusion from each query (online, conjugate gradient).

    The query vector ``y`` holds the top-``kq`` database similarities of the query raised to
    ``gamma`` (summed over the regions of a query image); the database is ranked by
    ``f = (I - alpha S)^-1 y`` pooled per image. Global descriptors break ties (e.g. images
    the diffusion does not reach) by plain similarity; regional ones by image index.

    Args:
        Q: (Nq, D) query descriptors (global, or regions when q_ids is given).
        X: (N, D) database descriptors (global, or regions when x_ids is given).
        k: neighbours per node of the database graph (clipped to N - 1).
        kq: database neighbours that seed each query row (clipped to N).
        gamma: power on similarities, for both the graph and the query.
        alpha: diffusion parameter in [0, 1).
        maxiter: CG iterations.
        tol: CG relative residual tolerance.
        mutual: mutual kNN graph (else union).
        x_ids: (N,) int image id of every database row; None for global descriptors.
        q_ids: (Nq,) int query image id of every query row; None for global descriptors.
        agg: pooling of region scores per database image, ``'sum'`` (paper) or ``'max'``.
        S: a precomputed normalised affinity of X (skips the graph construction).
        truncate: solve each query on the subgraph of its `truncate` nearest database items
            (>= kq; global descriptors only): the per-query cost no longer grows with the
            database; None (default) diffuses over the whole graph.

    Returns:
        ranks (n_query_images, n_db_images) int64, best first.
    """
    problem = _Problem(X, x_ids, agg)
    scores = diffusion_scores(
        Q, problem.X, k, kq, gamma, alpha, maxiter, tol, mutual=mutual, x_ids=x_ids, q_ids=q_ids, agg=agg, S=S,
        truncate=truncate,
    )
    return problem.ranks(Q, q_ids, scores)


# ---------------------------------------------------------------------------------------------
# offline


class TruncatedDiffusion:
    """Diffusion with the inverse ``(I - alpha S)^-1`` approximated offline.

    Modes:
        ``'spectral'``: fast spectral ranking (Iscen et al. 2018). The ``n_eigen`` largest
        eigenpairs (lambda, U) of S give ``f = U diag(1 / (1 - alpha lambda)) U^T y``; a query
        costs O(N n_eigen). Exact when n_eigen = N (n_eigen >= N - 1 uses a dense eigh).
        ``'truncated'``: every column of the exact inverse is computed by CG (``maxiter``,
        ``tol``) and only its ``trunc`` largest entries are kept in a sparse (N, N) matrix; a
        query costs O(kq trunc). Offline cost O(N maxiter nnz(S)): for up to ~10^4-10^5 nodes.

    Args:
        X: (N, D) database descriptors (regions when x_ids is given).
        k: neighbours per node of the graph (clipped to N - 1).
        gamma: power on similarities.
        alpha: diffusion parameter in [0, 1).
        kq: database neighbours that seed each query row (clipped to N).
        mode: ``'spectral'`` or ``'truncated'``.
        n_eigen: eigenpairs kept (spectral), clipped to N.
        trunc: entries kept per column (truncated), clipped to N.
        maxiter: CG iterations per column (truncated).
        tol: CG tolerance (truncated).
        mutual: mutual kNN graph.
        x_ids: (N,) image id of every database row, or None.
        agg: region pooling, ``'sum'`` or ``'max'``.
        S: precomputed normalised affinity of X.
    """

    def __init__(
        self,
        X: np.ndarray,
        k: int = 50,
        gamma: float = 3.0,
        alpha: float = 0.99,
        kq: int = 10,
        mode: str = "spectral",
        n_eigen: int = 256,
        trunc: int = 1000,
        maxiter: int = 100,
        tol: float = 1e-6,
        *,
        mutual: bool = True,
        x_ids: np.ndarray | None = None,
        agg: str = "sum",
        S: sp.spmatrix | None = None,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
        self._problem = _Problem(X, x_ids, agg)
        n = self._problem.X.shape[0]
        self.alpha = _check_alpha(alpha)
        self.gamma = _check_gamma(gamma)
        self.kq = min(check_int(kq, "kq", 1), n)
        self.mode = mode
        self.S = self._problem.graph(S, k, self.gamma, mutual)
        self.eigval: np.ndarray | None = None  # (r,)
        self.eigvec: np.ndarray | None = None  # (N, r)
        self.inverse: sp.csr_matrix | None = None  # (N, N), row j = truncated column j
        if mode == "spectral":
            self._fit_spectral(min(check_int(n_eigen, "n_eigen", 1), n))
        else:
            if not tol > 0:
                raise ValueError(f"tol: must be > 0, got {tol}")
            self._fit_truncated(min(check_int(trunc, "trunc", 1), n), check_int(maxiter, "maxiter", 1), tol)

    def _fit_spectral(self, r: int) -> None:
        n = self.S.shape[0]
        S64 = self.S.astype(np.float64)
        if r >= n - 1:
            eigval, eigvec = np.linalg.eigh(S64.toarray())
        else:
            v0 = np.random.default_rng(0).standard_normal(n)
            eigval, eigvec = spla.eigsh(S64, k=r, which="LA", v0=v0)
        order = np.argsort(eigval)[::-1][:r]
        self.eigval = eigval[order]
        self.eigvec = np.ascontiguousarray(eigvec[:, order])

    def _fit_truncated(self, trunc: int, maxiter: int, tol: float) -> None:
        n = self.S.shape[0]
        matvec = _diffusion_operator(self.S, self.alpha)
        rows, cols, vals = [], [], []
        for start in range(0, n, _QUERY_CHUNK):
            stop = min(start + _QUERY_CHUNK, n)
            B = np.zeros((n, stop - start))
            B[np.arange(start, stop), np.arange(stop - start)] = 1.0
            L, _ = _block_cg(matvec, B, tol, maxiter)  # (N, c): columns start..stop of the inverse
            if trunc < n:
                top = np.argpartition(-L, trunc - 1, axis=0)[:trunc]  # (trunc, c) row indices
            else:
                top = np.tile(np.arange(n)[:, None], (1, stop - start))
            cols.append(top.T.ravel())
            rows.append(np.repeat(np.arange(start, stop), top.shape[0]))
            vals.append(np.take_along_axis(L, top, axis=0).T.ravel())
        self.inverse = sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
        )

    def scores(self, Q: np.ndarray, q_ids: np.ndarray | None = None) -> np.ndarray:
        """Approximate diffusion scores.

        Args:
            Q: (Nq, D) query descriptors (regions when q_ids is given).
            q_ids: (Nq,) query image id of every query row, or None.

        Returns:
            (n_query_images, n_db_images) float64 scores, higher is better.
        """
        problem = self._problem
        Y = problem.queries(Q, q_ids, self.kq, self.gamma)  # (G, N) sparse
        if self.mode == "spectral":
            h = 1.0 / (1.0 - self.alpha * self.eigval)  # (r,)
            F = np.asarray(Y @ self.eigvec) * h @ self.eigvec.T  # (G, N)
        else:
            F = np.asarray((Y @ self.inverse).todense())  # (G, N)
        return _pool(F, problem.x_ids, problem.n_images, problem.agg, not problem.regional)

    def rerank(self, Q: np.ndarray, q_ids: np.ndarray | None = None) -> np.ndarray:
        """Rank the database for each query.

        Args:
            Q: (Nq, D) query descriptors (regions when q_ids is given).
            q_ids: (Nq,) query image id of every query row, or None.

        Returns:
            ranks (n_query_images, n_db_images) int64, best first (ties as in `diffusion_rerank`).
        """
        return self._problem.ranks(Q, q_ids, self.scores(Q, q_ids))
