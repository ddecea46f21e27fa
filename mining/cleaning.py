"""Cleaning an unlabeled collection into pseudo-landmarks (Gordo et al. 2016; Radenović et al. 2016).

Pure functions over arrays; no Ray here (the verification that produces the match graph runs in
`raytrieval.mining.verify`, the orchestration in `raytrieval.mining.stages`).

    kNN graph of global descriptors -> candidate pairs (`candidate_pairs`)
    -> spatial verification (raytrieval.mining.verify) -> match graph (`matches.parquet`)
    -> connected components over pairs with >= min_inliers (`connected_clusters`)
    -> clusters of at least min_size images -> one box per image (`cluster_boxes`)
    -> a positive per clustered image (`select_positives`)

Images are indices 0..N-1 into an id list (manifest image_ids); the artifacts hold the ids.

`matches.parquet`:

| column | type | content |
|---|---|---|
| a, b | string | image ids of a verified candidate pair (a before b in the id list) |
| inliers | int32 | inlier correspondences of the fitted model (0: none fitted) |
| model | string | 'homography' or 'fundamental'; null when nothing was fitted |
| box_a, box_b | list<float32> | (x0, y0, x1, y1) of the inlier keypoints in a / b, pixels of the stored upright image; null when nothing was fitted |

`clusters.parquet`: image_id (string), cluster_id (int64, 0 is the largest cluster), box
(list<float32> x0, y0, x1, y1 or null). Only images of clusters with at least `min_size`
members are listed. Its schema, reader and writer are in `raytrieval.retrieval.clusters`
(re-exported here).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from raytrieval.retrieval.artifacts import conform_table
from raytrieval.retrieval.clusters import BOX_TYPE as _BOX
from raytrieval.retrieval.clusters import CLUSTERS_SCHEMA, read_clusters, write_clusters

__all__ = [
    "CLUSTERS_SCHEMA",
    "MATCHES_SCHEMA",
    "MODELS",
    "POSITIVE_METHODS",
    "MatchArrays",
    "candidate_pairs",
    "canonical_labels",
    "cluster_boxes",
    "clusters_table",
    "connected_clusters",
    "match_arrays",
    "read_clusters",
    "read_matches",
    "select_positives",
    "validate_matches",
    "write_clusters",
]

MODELS = ("homography", "fundamental")
POSITIVE_METHODS = ("inliers", "descriptor", "random")

MATCHES_SCHEMA = pa.schema(
    [
        pa.field("a", pa.string(), nullable=False),
        pa.field("b", pa.string(), nullable=False),
        pa.field("inliers", pa.int32(), nullable=False),
        pa.field("model", pa.string()),
        pa.field("box_a", _BOX),
        pa.field("box_b", _BOX),
    ]
)



# ---------------------------------------------------------------------------------------------
# validation helpers


def _edges(n: int, a: np.ndarray, b: np.ndarray, name: str = "pairs") -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"{name}: a and b must be (P,) arrays of the same length, got {a.shape} and {b.shape}")
    if a.size and not (np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer)):
        raise ValueError(f"{name}: expected integer image indices, got {a.dtype} and {b.dtype}")
    a = a.astype(np.int64, copy=False)
    b = b.astype(np.int64, copy=False)
    if a.size and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= n):
        raise ValueError(f"{name}: image index outside 0..{n - 1}")
    return a, b


def _per_pair(values: np.ndarray, p: int, name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.shape != (p,):
        raise ValueError(f"{name}: expected shape ({p},) (one value per pair), got {values.shape}")
    return values


def _check_labels(labels: np.ndarray, n: int | None = None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels: expected a (N,) int array, got shape {labels.shape} dtype {labels.dtype}")
    if n is not None and labels.shape[0] != n:
        raise ValueError(f"labels: expected {n} entries, got {labels.shape[0]}")
    return labels.astype(np.int64, copy=False)


# ---------------------------------------------------------------------------------------------
# pairs and graph


def candidate_pairs(
    knn_ids: np.ndarray,
    sims: np.ndarray | None = None,
    min_similarity: float | None = None,
) -> np.ndarray:
    """Undirected candidate pairs from a kNN graph.

    Args:
        knn_ids: (N, k) int neighbour indices of every node (self excluded), e.g. from
            `raytrieval.retrieval.knn.knn_graph`; negative entries (faiss padding) are ignored.
        sims: (N, k) similarities aligned with knn_ids, needed with min_similarity.
        min_similarity: keep only edges with at least this similarity.

    Returns:
        (P, 2) int64 pairs (i, j) with i < j, unique, sorted lexicographically.
    """
    knn_ids = np.asarray(knn_ids)
    if knn_ids.ndim != 2 or not np.issubdtype(knn_ids.dtype, np.integer):
        raise ValueError(f"knn_ids: expected a (N, k) int array, got shape {knn_ids.shape} dtype {knn_ids.dtype}")
    n, k = knn_ids.shape
    src = np.repeat(np.arange(n, dtype=np.int64), k)
    dst = knn_ids.astype(np.int64).ravel()
    keep = (dst >= 0) & (dst != src)
    if min_similarity is not None:
        if sims is None:
            raise ValueError("sims: needed when min_similarity is given")
        sims = np.asarray(sims)
        if sims.shape != knn_ids.shape:
            raise ValueError(f"sims: expected shape {knn_ids.shape}, got {sims.shape}")
        keep &= sims.ravel() >= min_similarity
    if dst[keep].size and dst[keep].max() >= n:
        raise ValueError(f"knn_ids: neighbour index outside 0..{n - 1}")
    lo = np.minimum(src[keep], dst[keep])
    hi = np.maximum(src[keep], dst[keep])
    pairs = np.unique(np.stack([lo, hi], axis=1), axis=0) if lo.size else np.zeros((0, 2), np.int64)
    return np.ascontiguousarray(pairs, dtype=np.int64)


def connected_clusters(
    n: int,
    a: np.ndarray,
    b: np.ndarray,
    inliers: np.ndarray,
    min_inliers: int = 15,
    min_size: int = 2,
) -> np.ndarray:
    """Clusters: connected components of the graph of pairs with at least `min_inliers` inliers.

    Components with fewer than `min_size` images are dropped. Cluster ids are deterministic:
    0 is the largest cluster, ties broken by the smallest image index of the cluster.

    Args:
        n: number of images.
        a: (P,) int image index of the first image of each verified pair.
        b: (P,) int image index of the second image.
        inliers: (P,) inlier counts.
        min_inliers: inliers needed for an edge.
        min_size: smallest cluster kept (>= 1; 1 keeps every image as at least a singleton).

    Returns:
        labels (N,) int64: cluster id of each image, -1 for images in no kept cluster.
    """
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    if min_size < 1:
        raise ValueError(f"min_size: must be >= 1, got {min_size}")
    a, b = _edges(n, a, b)
    inliers = _per_pair(inliers, a.size, "inliers")
    if n == 0:
        return np.zeros(0, np.int64)
    keep = inliers >= min_inliers
    graph = sp.coo_matrix((np.ones(int(keep.sum()), np.int8), (a[keep], b[keep])), shape=(n, n)).tocsr()
    _, comp = connected_components(graph, directed=False)  # (N,)
    return canonical_labels(comp, min_size)


def canonical_labels(groups: np.ndarray, min_size: int = 2) -> np.ndarray:
    """Deterministic cluster ids from arbitrary group ids.

    Groups with fewer than `min_size` members are dropped; 0 is the largest kept group, ties
    broken by the smallest image index of the group.

    Args:
        groups: (N,) int group of each image, -1 for none.
        min_size: smallest group kept (>= 1).

    Returns:
        labels (N,) int64: cluster id of each image, -1 for images in no kept group.
    """
    groups = np.asarray(groups, dtype=np.int64).reshape(-1)
    if min_size < 1:
        raise ValueError(f"min_size: must be >= 1, got {min_size}")
    n = groups.size
    member = groups >= 0
    if not member.any():
        return np.full(n, -1, np.int64)
    _, comp = np.unique(groups[member], return_inverse=True)  # dense 0..G-1
    sizes = np.bincount(comp)
    first = np.full(sizes.shape, n, np.int64)
    np.minimum.at(first, comp, np.flatnonzero(member))
    kept = np.flatnonzero(sizes >= min_size)
    order = kept[np.lexsort((first[kept], -sizes[kept]))]
    remap = np.full(sizes.shape, -1, np.int64)
    remap[order] = np.arange(order.size, dtype=np.int64)
    labels = np.full(n, -1, np.int64)
    labels[member] = remap[comp]
    return labels


def cluster_boxes(
    labels: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    inliers: np.ndarray,
    box_a: np.ndarray,
    box_b: np.ndarray,
    min_inliers: int = 15,
    quantile: float = 0.0,
) -> np.ndarray:
    """One box per clustered image, consistent with all its verified pairs inside its cluster.

    Every verified pair (inliers >= min_inliers, both images in the same cluster) gives a box
    in each of its two images (the extent of the inlier keypoints). An image's box is the
    extent of all the boxes it gets: with ``quantile=0`` their union (min x0, min y0, max x1,
    max y1); with ``quantile=q > 0`` the q-quantile of the x0/y0 corners and the (1-q)-quantile
    of the x1/y1 corners, which ignores a few outlying pairs.

    Args:
        labels: (N,) cluster ids (-1: no cluster), from `connected_clusters`.
        a: (P,) int first image of each pair.
        b: (P,) int second image.
        inliers: (P,) inlier counts.
        box_a: (P, 4) boxes in a (NaN rows where nothing was fitted).
        box_b: (P, 4) boxes in b.
        min_inliers: inliers needed for a pair to count.
        quantile: robustness in [0, 0.5).

    Returns:
        (N, 4) float32 (x0, y0, x1, y1); NaN rows for images with no box (no cluster).
    """
    labels = _check_labels(labels)
    n = labels.shape[0]
    a, b = _edges(n, a, b)
    p = a.size
    inliers = _per_pair(inliers, p, "inliers")
    box_a = np.asarray(box_a, dtype=np.float64).reshape(p, 4) if p else np.zeros((0, 4))
    box_b = np.asarray(box_b, dtype=np.float64).reshape(p, 4) if p else np.zeros((0, 4))
    if not 0.0 <= quantile < 0.5:
        raise ValueError(f"quantile: must be in [0, 0.5), got {quantile}")
    use = (inliers >= min_inliers) & (labels[a] >= 0) & (labels[a] == labels[b])
    use &= np.all(np.isfinite(box_a), axis=1) & np.all(np.isfinite(box_b), axis=1)
    img = np.concatenate([a[use], b[use]])  # (2U,)
    boxes = np.concatenate([box_a[use], box_b[use]])  # (2U, 4)
    out = np.full((n, 4), np.nan, np.float64)
    if img.size == 0:
        return out.astype(np.float32)
    if quantile == 0.0:
        for col, reduce in ((0, np.minimum), (1, np.minimum), (2, np.maximum), (3, np.maximum)):
            init = np.inf if reduce is np.minimum else -np.inf
            acc = np.full(n, init)
            reduce.at(acc, img, boxes[:, col])
            out[:, col] = acc
        out[~np.isfinite(out).all(axis=1)] = np.nan
        return out.astype(np.float32)
    order = np.argsort(img, kind="stable")
    img, boxes = img[order], boxes[order]
    starts = np.flatnonzero(np.r_[True, img[1:] != img[:-1]])
    ends = np.r_[starts[1:], img.size]
    for s, e in zip(starts, ends):
        group = boxes[s:e]
        out[img[s]] = [
            np.quantile(group[:, 0], quantile), np.quantile(group[:, 1], quantile),
            np.quantile(group[:, 2], 1.0 - quantile), np.quantile(group[:, 3], 1.0 - quantile),
        ]
    return out.astype(np.float32)


def select_positives(
    labels: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    inliers: np.ndarray,
    method: str = "inliers",
    descriptors: np.ndarray | None = None,
    tau: int = 15,
    seed: int = 0,
) -> np.ndarray:
    """A positive for every clustered image, chosen inside its cluster.

    Methods (Radenović et al. 2016 discuss the trade-offs):
        ``'inliers'``: the cluster mate with the most inliers with the query (ties: lower index).
        ``'descriptor'``: the cluster mate with the largest descriptor similarity (smallest
        distance) to the query, verified pair or not (ties: lower index).
        ``'random'``: a uniformly random image among the cluster mates sharing at least
        `tau` inliers with the query (seeded).

    Args:
        labels: (N,) cluster ids, -1 for unclustered images.
        a: (P,) int first image of each verified pair.
        b: (P,) int second image.
        inliers: (P,) inlier counts.
        method: one of POSITIVE_METHODS.
        descriptors: (N, D) L2-normalised descriptors, required for 'descriptor'.
        tau: inliers a 'random' positive needs (also the edge threshold for 'inliers').
        seed: seed of the 'random' choice.

    Returns:
        (N,) int64 index of the positive of each image; -1 where there is none (unclustered,
        or no cluster mate qualifies).
    """
    if method not in POSITIVE_METHODS:
        raise ValueError(f"method: expected one of {POSITIVE_METHODS}, got {method!r}")
    labels = _check_labels(labels)
    n = labels.shape[0]
    a, b = _edges(n, a, b)
    inliers = _per_pair(inliers, a.size, "inliers").astype(np.int64)
    out = np.full(n, -1, np.int64)
    if method == "descriptor":
        if descriptors is None:
            raise ValueError("descriptors: required for method 'descriptor'")
        X = np.asarray(descriptors, dtype=np.float32)
        if X.ndim != 2 or X.shape[0] != n:
            raise ValueError(f"descriptors: expected shape ({n}, D), got {X.shape}")
        for c in np.unique(labels[labels >= 0]):
            members = np.flatnonzero(labels == c)
            if members.size < 2:
                continue
            sims = X[members] @ X[members].T  # (m, m)
            np.fill_diagonal(sims, -np.inf)
            out[members] = members[np.argmax(sims, axis=1)]  # argmax: first (lowest index) of ties
        return out
    # pairs inside a cluster, both directions
    same = (labels[a] >= 0) & (labels[a] == labels[b]) & (a != b)
    q = np.concatenate([a[same], b[same]])
    p = np.concatenate([b[same], a[same]])
    w = np.concatenate([inliers[same], inliers[same]])
    ok = w >= tau
    q, p, w = q[ok], p[ok], w[ok]
    if q.size == 0:
        return out
    if method == "inliers":
        order = np.lexsort((p, -w, q))  # by query, most inliers first, then lowest index
        q, p = q[order], p[order]
        first = np.r_[True, q[1:] != q[:-1]]
        out[q[first]] = p[first]
        return out
    rng = np.random.default_rng(seed)
    order = np.lexsort((p, q))
    q, p = q[order], p[order]
    keep = np.r_[True, (q[1:] != q[:-1]) | (p[1:] != p[:-1])]  # duplicated pairs count once
    q, p = q[keep], p[keep]
    starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])
    ends = np.r_[starts[1:], q.size]
    picks = starts + (rng.random(starts.size) * (ends - starts)).astype(np.int64)
    out[q[starts]] = p[picks]
    return out


# ---------------------------------------------------------------------------------------------
# artifacts


def validate_matches(table: pa.Table, where: str = "matches") -> pa.Table:
    """Check a match table against MATCHES_SCHEMA (columns, types, models, box lengths).

    Args:
        table: the table.
        where: what to call it in errors (a path).

    Returns:
        The table cast to MATCHES_SCHEMA (column order normalised).
    """
    table = conform_table(table, MATCHES_SCHEMA, where, "matches")
    models = set(pc.unique(table.column("model")).to_pylist()) - {None}
    if not models <= set(MODELS):
        raise ValueError(f"{where}: column 'model' holds {sorted(models - set(MODELS))}, expected {MODELS}")
    for col in ("box_a", "box_b"):
        lengths = pc.list_value_length(table.column(col)).drop_null()
        if len(lengths) and (pc.min(lengths).as_py() != 4 or pc.max(lengths).as_py() != 4):
            raise ValueError(f"{where}: column {col!r} must hold 4 numbers (x0, y0, x1, y1) per row")
    return table


def read_matches(path: str | os.PathLike) -> pa.Table:
    """Read `matches.parquet`, validated, sorted by (a, b).

    Args:
        path: the Parquet file.

    Returns:
        A table with MATCHES_SCHEMA.
    """
    table = validate_matches(pq.read_table(path), where=os.fspath(path))
    return table.sort_by([("a", "ascending"), ("b", "ascending")])


class MatchArrays:
    """A match table as index arrays over an id list.

    Attributes:
        a: (P,) int64 index of the first image.
        b: (P,) int64 index of the second image.
        inliers: (P,) int64.
        box_a: (P, 4) float32, NaN rows where nothing was fitted.
        box_b: (P, 4) float32.
    """

    def __init__(self, a: np.ndarray, b: np.ndarray, inliers: np.ndarray, box_a: np.ndarray, box_b: np.ndarray):
        self.a, self.b, self.inliers, self.box_a, self.box_b = a, b, inliers, box_a, box_b

    def __len__(self) -> int:
        return int(self.a.shape[0])


def _boxes_array(column: pa.ChunkedArray) -> np.ndarray:
    out = np.full((len(column), 4), np.nan, np.float32)
    values = column.to_pylist()
    for i, v in enumerate(values):
        if v is not None:
            out[i] = v
    return out


def match_arrays(table: pa.Table, ids: Sequence[str]) -> MatchArrays:
    """Map a match table onto indices of `ids`; pairs naming an id outside `ids` are dropped.

    Args:
        table: a table with MATCHES_SCHEMA.
        ids: the image ids, index order.

    Returns:
        A MatchArrays.
    """
    index = {image_id: i for i, image_id in enumerate(ids)}
    a = np.array([index.get(x, -1) for x in table.column("a").to_pylist()], np.int64)
    b = np.array([index.get(x, -1) for x in table.column("b").to_pylist()], np.int64)
    keep = (a >= 0) & (b >= 0)
    inliers = table.column("inliers").to_numpy().astype(np.int64)
    box_a = _boxes_array(table.column("box_a"))
    box_b = _boxes_array(table.column("box_b"))
    return MatchArrays(a[keep], b[keep], inliers[keep], box_a[keep], box_b[keep])


def clusters_table(ids: Sequence[str], labels: np.ndarray, boxes: np.ndarray | None = None) -> pa.Table:
    """The clusters artifact: one row per clustered image, by cluster then image index.

    Args:
        ids: (N,) image ids.
        labels: (N,) cluster ids, -1 for unclustered images (not listed).
        boxes: optional (N, 4) boxes (NaN rows: null box).

    Returns:
        A table with CLUSTERS_SCHEMA.
    """
    labels = _check_labels(labels, len(ids))
    rows = np.flatnonzero(labels >= 0)
    rows = rows[np.lexsort((rows, labels[rows]))]
    box_list: list[list[float] | None] = [None] * rows.size
    if boxes is not None:
        boxes = np.asarray(boxes, dtype=np.float32)
        if boxes.shape != (len(ids), 4):
            raise ValueError(f"boxes: expected shape ({len(ids)}, 4), got {boxes.shape}")
        box_list = [None if not np.all(np.isfinite(boxes[i])) else boxes[i].tolist() for i in rows]
    return pa.Table.from_arrays(
        [
            pa.array([ids[i] for i in rows], pa.string()),
            pa.array(labels[rows], pa.int64()),
            pa.array(box_list, _BOX),
        ],
        schema=CLUSTERS_SCHEMA,
    )
