"""Training data: the collection, its pairs and clusters, per-epoch tuples, image tensors.

Everything but `ImageStore` is a pure function over index arrays, the same on every Ray Train
worker (all randomness is seeded by (seed, epoch)), so the workers agree on the tuples of an
epoch without talking to each other.

Negative mining goes through `mine_negatives`, a small interface over `raytrieval.mining.hardneg`:
(query descriptors, pool descriptors, query labels, pool labels, n) -> pool indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from raytrieval.retrieval.extract import Box, prepare_image
from raytrieval.trainers.config import TrainConfig


@dataclass
class TrainingSet:
    """The unlabeled collection with what mining found in it, as index arrays.

    Args:
        ids: (N,) manifest image ids (status 'ok' rows, manifest order).
        paths: (N,) image files.
        labels: (N,) int64 cluster id of each image, -1 for none (from clusters.parquet, or
            the connected components of the tuples' query-positive graph).
        pairs: (P, 2) int64 (query, positive) rows of tuples.parquet; (0, 2) for clusters.
        listed: per pair, the int64 negatives listed in tuples.parquet; None for clusters.
        links: (E, 2) int64 image pairs whose clusters may not be each other's negatives
            (kNN edges, `TrainConfig.exclude_knn`); (0, 2) for none.
    """

    ids: list[str]
    paths: list[str]
    labels: np.ndarray
    pairs: np.ndarray
    listed: list[np.ndarray] | None = None
    links: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))

    def __post_init__(self) -> None:
        n = len(self.ids)
        if len(self.paths) != n or self.labels.shape != (n,):
            raise ValueError(f"training set: {n} ids, {len(self.paths)} paths, labels {self.labels.shape}")
        if self.pairs.ndim != 2 or self.pairs.shape[1] != 2:
            raise ValueError(f"pairs: expected (P, 2), got {self.pairs.shape}")

    @property
    def num_images(self) -> int:
        return len(self.ids)


def _index_of(ids: Sequence[str]) -> dict[str, int]:
    return {image_id: i for i, image_id in enumerate(ids)}


def _lookup(index: dict[str, int], values: Sequence[str], what: str) -> np.ndarray:
    missing = [v for v in values if v not in index]
    if missing:
        raise ValueError(f"{what}: {len(missing)} image ids are not 'ok' images of the manifest, e.g. {missing[0]!r}")
    return np.array([index[v] for v in values], dtype=np.int64)


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of a pair graph: (N,) labels, -1 for images in no pair.

    Args:
        n: number of images.
        pairs: (P, 2) int image indices.
    """
    labels = np.full(n, -1, np.int64)
    if pairs.size == 0:
        return labels
    a, b = pairs[:, 0], pairs[:, 1]
    graph = coo_matrix((np.ones(a.size), (a, b)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    used = np.unique(pairs)
    _, relabelled = np.unique(comp[used], return_inverse=True)
    labels[used] = relabelled
    return labels


def load_training_set(cfg: TrainConfig) -> TrainingSet:
    """Read the manifest, clusters and/or tuples named by the config."""
    from raytrieval.retrieval.manifest import ok_images, read_manifest

    table = ok_images(read_manifest(cfg.manifest))
    ids = table.column("image_id").to_pylist()
    paths = table.column("uri").to_pylist()
    if len(ids) < 2:
        raise ValueError(f"manifest: {cfg.manifest} has {len(ids)} usable images; need at least 2")
    index = _index_of(ids)
    labels = np.full(len(ids), -1, np.int64)
    if cfg.clusters:
        from raytrieval.mining.cleaning import read_clusters

        clusters = read_clusters(cfg.clusters)
        rows = _lookup(index, clusters.column("image_id").to_pylist(), f"clusters {cfg.clusters}")
        labels[rows] = clusters.column("cluster_id").to_numpy().astype(np.int64)
    pairs = np.zeros((0, 2), np.int64)
    listed = None
    if cfg.pairs == "tuples":
        from raytrieval.mining.tuples import read_tuples

        tuples = read_tuples(cfg.tuples)
        where = f"tuples {cfg.tuples}"
        q = _lookup(index, tuples.column("query").to_pylist(), where)
        p = _lookup(index, tuples.column("positive").to_pylist(), where)
        pairs = np.stack([q, p], axis=1)
        listed = [_lookup(index, negs, where) for negs in tuples.column("negatives").to_pylist()]
        if pairs.shape[0] == 0:
            raise ValueError(f"tuples: {cfg.tuples} holds no tuples")
        if not cfg.clusters:
            labels = components(len(ids), pairs)
    elif not np.any(_has_mate(labels)):
        raise ValueError(f"clusters: {cfg.clusters} has no cluster with two images of the manifest")
    links = _knn_links(cfg, index) if cfg.exclude_knn else np.zeros((0, 2), np.int64)
    return TrainingSet(ids=ids, paths=paths, labels=labels, pairs=pairs, listed=listed, links=links)


def _knn_links(cfg: TrainConfig, index: dict[str, int]) -> np.ndarray:
    """(E, 2) edges of the first `exclude_knn` neighbours of every image in knn.parquet."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(cfg.knn, columns=["src", "dst", "rank"])
    table = table.filter(pc.less(table.column("rank"), cfg.exclude_knn))
    where = f"knn {cfg.knn}"
    src = _lookup(index, table.column("src").to_pylist(), where)
    dst = _lookup(index, table.column("dst").to_pylist(), where)
    return np.stack([src, dst], axis=1).reshape(-1, 2)


def _has_mate(labels: np.ndarray) -> np.ndarray:
    """(N,) bool: the image is in a cluster of at least two images."""
    ok = labels >= 0
    counts = np.bincount(labels[ok], minlength=1) if ok.any() else np.zeros(1, np.int64)
    out = np.zeros(labels.shape, bool)
    out[ok] = counts[labels[ok]] >= 2
    return out


def singleton_labels(labels: np.ndarray) -> np.ndarray:
    """Cluster labels where every unclustered image is a cluster of its own (>= 0)."""
    from raytrieval.mining.hardneg import singleton_labels as _singletons

    return _singletons(labels)


def mine_negatives(
    query_desc: np.ndarray,
    pool_desc: np.ndarray,
    query_labels: np.ndarray,
    pool_labels: np.ndarray,
    num_negatives: int,
    links=None,
) -> np.ndarray:
    """Hardest negatives per query, at most one per cluster, never from the query's cluster.

    Args:
        query_desc: (Nq, D) L2-normalised descriptors.
        pool_desc: (Np, D) L2-normalised descriptors.
        query_labels: (Nq,) cluster labels (>= 0).
        pool_labels: (Np,) cluster labels (>= 0).
        num_negatives: negatives per query.
        links: optional (L, L) label adjacency (`raytrieval.mining.hardneg.link_labels`): no negative
            from a cluster linked to the query's.

    Returns:
        (Nq, num_negatives) int64 pool positions, most similar first, -1 padding.
    """
    from raytrieval.mining.hardneg import mine_hard_negatives

    return mine_hard_negatives(query_desc, pool_desc, query_labels, pool_labels, num_negatives, links=links)


@dataclass
class EpochPlan:
    """What an epoch needs before its negatives can be mined.

    Args:
        queries: (T,) query indices.
        positives: (T,) positive indices; -1 where the positive is chosen by descriptor.
        candidates: per query, the int64 indices its negatives may come from (cluster
            constraints still apply).
        embed: sorted unique indices whose descriptors the epoch needs.
    """

    queries: np.ndarray
    positives: np.ndarray
    candidates: list[np.ndarray]
    embed: np.ndarray


def plan_epoch(ts: TrainingSet, cfg: TrainConfig, epoch: int) -> EpochPlan:
    """Draw the queries, positives and negative candidates of an epoch (seeded by epoch)."""
    rng = np.random.default_rng([cfg.seed, epoch])
    n = ts.num_images
    if cfg.pairs == "clusters":
        eligible = np.flatnonzero(_has_mate(ts.labels))
        queries = np.sort(rng.choice(eligible, size=min(cfg.num_queries, eligible.size), replace=False))
        positives = np.full(queries.size, -1, np.int64)
        if cfg.positive == "random":
            for t, q in enumerate(queries):
                mates = np.flatnonzero(ts.labels == ts.labels[q])
                mates = mates[mates != q]
                positives[t] = mates[rng.integers(mates.size)]
            needed = [queries, positives]
        else:  # descriptor: every mate of every query must be embedded
            needed = [queries, np.flatnonzero(np.isin(ts.labels, ts.labels[queries]))]
        rows = None
    else:
        rows = np.sort(rng.choice(ts.pairs.shape[0], size=min(cfg.num_queries, ts.pairs.shape[0]), replace=False))
        queries, positives = ts.pairs[rows, 0].copy(), ts.pairs[rows, 1].copy()
        needed = [queries, positives]
    if cfg.negatives == "listed":
        assert ts.listed is not None and rows is not None
        candidates = [ts.listed[r] for r in rows]
        needed.extend(candidates)
    else:
        pool_from = np.arange(n) if (cfg.unclustered_negatives or not np.any(ts.labels >= 0)) else np.flatnonzero(ts.labels >= 0)
        pool = np.sort(rng.choice(pool_from, size=min(cfg.pool_size, pool_from.size), replace=False))
        candidates = [pool] * queries.size
        needed.append(pool)
    embed = np.unique(np.concatenate([np.asarray(a, np.int64).ravel() for a in needed]))
    return EpochPlan(queries=queries, positives=positives, candidates=candidates, embed=embed)


def build_tuples(ts: TrainingSet, cfg: TrainConfig, plan: EpochPlan, desc: np.ndarray) -> np.ndarray:
    """Choose descriptor positives (if asked) and mine the hardest negatives of an epoch.

    Args:
        ts: the training set.
        cfg: the config (num_negatives, positive).
        plan: from `plan_epoch`.
        desc: (len(plan.embed), D) descriptors of `plan.embed` under the current model.

    Returns:
        (T', 2 + num_negatives) int64 rows (query, positive, negatives...) with -1 padding;
        tuples for which no negative was found are dropped.
    """
    if desc.shape[0] != plan.embed.size:
        raise ValueError(f"desc: expected {plan.embed.size} rows, got {desc.shape[0]}")
    row_of = np.full(ts.num_images, -1, np.int64)
    row_of[plan.embed] = np.arange(plan.embed.size)
    labels = singleton_labels(ts.labels)
    links = None
    if ts.links.size:
        from raytrieval.mining.hardneg import link_labels

        links = link_labels(labels, ts.links[:, 0], ts.links[:, 1])
    positives = plan.positives.copy()
    for t in np.flatnonzero(positives < 0):
        q = plan.queries[t]
        mates = np.flatnonzero(ts.labels == ts.labels[q])
        mates = mates[mates != q]
        sims = desc[row_of[mates]] @ desc[row_of[q]]
        positives[t] = mates[np.argmax(sims)]
    out = np.full((plan.queries.size, 2 + cfg.num_negatives), -1, np.int64)
    out[:, 0], out[:, 1] = plan.queries, positives
    shared = all(c is plan.candidates[0] for c in plan.candidates)
    if shared and plan.candidates:
        pool = plan.candidates[0]
        picked = mine_negatives(desc[row_of[plan.queries]], desc[row_of[pool]], labels[plan.queries],
                                labels[pool], cfg.num_negatives, links)
        out[:, 2:] = np.where(picked >= 0, pool[np.maximum(picked, 0)], -1)
    else:
        for t, (q, pool) in enumerate(zip(plan.queries, plan.candidates)):
            if pool.size == 0:
                continue
            picked = mine_negatives(desc[row_of[[q]]], desc[row_of[pool]], labels[[q]], labels[pool],
                                    cfg.num_negatives, links)[0]
            out[t, 2:] = np.where(picked >= 0, pool[np.maximum(picked, 0)], -1)
    # a negative must never be the positive (possible when labels do not cover the pair)
    out[:, 2:][out[:, 2:] == out[:, 1:2]] = -1
    keep = (out[:, 2:] >= 0).any(axis=1)
    return out[keep]


def shard_batches(num_tuples: int, batch_size: int, rank: int, world: int, seed: int, epoch: int) -> list[np.ndarray]:
    """This rank's batches of tuple rows; every rank gets the same number of batches.

    The rows are shuffled (seeded by epoch), padded by wrapping to a multiple of world (as
    `DistributedSampler` does) and dealt round-robin, then cut into batches.
    """
    if num_tuples == 0:
        return []
    order = np.random.default_rng([seed, epoch, 1]).permutation(num_tuples)
    per_rank = -(-num_tuples // world)
    order = np.resize(order, per_rank * world)
    mine = order[rank::world]
    return [mine[s : s + batch_size] for s in range(0, mine.size, batch_size)]


class ImageStore:
    """Prepared image tensors (3, H, W) in [0, 1], decoded once and kept as uint8.

    Args:
        paths: image files.
        size: longer side after resizing (never upscaled).
        boxes: optional crop box per image.
        cache: keep decoded images in memory.
    """

    def __init__(self, paths: Sequence[str], size: int, boxes: Sequence[Box | None] | None = None, cache: bool = True):
        self.paths = list(paths)
        self.size = size
        self.boxes = list(boxes) if boxes is not None else [None] * len(self.paths)
        self.cache = cache
        self._store: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, i: int) -> torch.Tensor:
        """Image i as a float (3, H, W) tensor in [0, 1]."""
        u8 = self._store.get(i)
        if u8 is None:
            u8 = prepare_image(self.paths[i], self.boxes[i], self.size).mul_(255).round_().to(torch.uint8)
            if self.cache:
                self._store[i] = u8
        return u8.float().div_(255.0)
