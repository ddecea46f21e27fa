"""Training data: the collection and what mining found in it, the validation set, image tensors.

The tuples of an epoch come from the one tuple builder of `raytrieval.mining.tuples`
(`plan_epoch`, `build_tuples`), the same the mine stage runs for epoch 0; this module only
reads the artifacts into its `TupleSource`, keeping the validation clusters of `split.parquet`
out of it: their images are not in the training set at all, so no tuple can use them as query,
positive or negative, in any epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from raytrieval.mining.tuples import TupleSource, components, has_mate, knn_links
from raytrieval.retrieval.extract import Box, prepare_image
from raytrieval.trainers.config import TrainConfig


@dataclass
class TrainingSet(TupleSource):
    """The unlabeled collection with what mining found in it, as index arrays.

    Args:
        ids: (N,) manifest image ids (status 'ok' rows in manifest order, validation images
            left out).
        labels: (N,) cluster ids (clusters.parquet, or the connected components of the
            tuples' query-positive graph), -1 for none.
        pairs: (P, 2) (query, positive) rows of tuples.parquet; (0, 2) for clusters.
        listed: per pair, the negatives listed in tuples.parquet; None for clusters.
        links: (E, 2) kNN edges (`TrainConfig.exclude_knn`); (0, 2) for none.
        paths: (N,) image files.
    """

    paths: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.paths) != len(self.ids):
            raise ValueError(f"training set: {len(self.ids)} ids, {len(self.paths)} paths")


def _index_of(ids: Sequence[str]) -> dict[str, int]:
    return {image_id: i for i, image_id in enumerate(ids)}


def _lookup(index: dict[str, int], values: Sequence[str], what: str) -> np.ndarray:
    missing = [v for v in values if v not in index]
    if missing:
        raise ValueError(f"{what}: {len(missing)} image ids are not 'ok' images of the manifest, e.g. {missing[0]!r}")
    return np.array([index[v] for v in values], dtype=np.int64)


def held_out(cfg: TrainConfig) -> set[str]:
    """Image ids of the validation clusters (`cfg.split`), kept out of training."""
    return held_out_ids(cfg.split) if cfg.split else set()


def read_knn(path: str, index: dict[str, int], what: str, skip: set[str] = frozenset()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src, dst, rank) index arrays of knn.parquet, rows touching `skip` ids dropped."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["src", "dst", "rank"])
    src, dst = table.column("src").to_pylist(), table.column("dst").to_pylist()
    keep = [i for i, (a, b) in enumerate(zip(src, dst)) if a not in skip and b not in skip]
    rank = table.column("rank").to_numpy()[keep]
    return (_lookup(index, [src[i] for i in keep], what), _lookup(index, [dst[i] for i in keep], what), rank)


def load_training_set(cfg: TrainConfig) -> TrainingSet:
    """Read the manifest, clusters, tuples and kNN graph named by the config (validation
    images of `cfg.split` left out)."""
    from raytrieval.retrieval.manifest import ok_images, read_manifest

    table = ok_images(read_manifest(cfg.manifest))
    skip = held_out(cfg)
    rows = [i for i, image_id in enumerate(table.column("image_id").to_pylist()) if image_id not in skip]
    ids = [table.column("image_id")[i].as_py() for i in rows]
    paths = [table.column("uri")[i].as_py() for i in rows]
    if len(ids) < 2:
        raise ValueError(f"manifest: {cfg.manifest} has {len(ids)} usable training images; need at least 2")
    index = _index_of(ids)
    labels = np.full(len(ids), -1, np.int64)
    if cfg.clusters:
        from raytrieval.mining.cleaning import read_clusters

        clusters = read_clusters(cfg.clusters)
        kept = [(i, c) for i, c in zip(clusters.column("image_id").to_pylist(), clusters.column("cluster_id").to_pylist())
                if i not in skip]
        found = _lookup(index, [i for i, _ in kept], f"clusters {cfg.clusters}")
        labels[found] = np.array([c for _, c in kept], np.int64)
    pairs = np.zeros((0, 2), np.int64)
    listed = None
    if cfg.pairs == "tuples":
        from raytrieval.mining.tuples import read_tuples

        tuples = [t for t in read_tuples(cfg.tuples).to_pylist() if t["query"] not in skip and t["positive"] not in skip]
        where = f"tuples {cfg.tuples}"
        q = _lookup(index, [t["query"] for t in tuples], where)
        p = _lookup(index, [t["positive"] for t in tuples], where)
        pairs = np.stack([q, p], axis=1).reshape(-1, 2)
        listed = [_lookup(index, [n for n in t["negatives"] if n not in skip], where) for t in tuples]
        if pairs.shape[0] == 0:
            raise ValueError(f"tuples: {cfg.tuples} holds no tuples outside the validation clusters")
        if not cfg.clusters:
            labels = components(len(ids), pairs)
    elif not np.any(has_mate(labels)):
        raise ValueError(f"clusters: {cfg.clusters} has no training cluster with two images of the manifest")
    links = np.zeros((0, 2), np.int64)
    if cfg.exclude_knn:
        links = knn_links(*read_knn(cfg.knn, index, f"knn {cfg.knn}", skip), cfg.exclude_knn)
    return TrainingSet(ids=ids, paths=paths, labels=labels, pairs=pairs, listed=listed, links=links)


def load_selfval(cfg: TrainConfig):
    """The self-validation of a run: (image files of the whole collection, `SelfValSet`), or
    None without `cfg.split` (or when it holds no validation cluster).

    The database is every 'ok' image of the manifest (validation images included).
    """
    if not cfg.split:
        return None
    from raytrieval.retrieval.manifest import ok_images, read_manifest

    table = ok_images(read_manifest(cfg.manifest))
    sv = selfval_for(table.column("image_id").to_pylist(), cfg.clusters, cfg.split, cfg.knn)
    return (table.column("uri").to_pylist(), sv) if sv.num_queries else None


def selfval_for(ids: Sequence[str], clusters: str | None, split: str, knn: str | None):
    """The `SelfValSet` over `ids` from the stage artifacts: cluster labels and verified boxes
    (clusters.parquet), validation clusters (split.parquet) and junk links (every edge of
    knn.parquet, when given: an unclustered neighbour of a query's cluster is junk,
    `raytrieval.evaluation.selfval`)."""
    from raytrieval.evaluation.selfval import selfval_set
    from raytrieval.mining.cleaning import read_clusters

    index = _index_of(ids)
    labels = np.full(len(ids), -1, np.int64)
    boxes: list = [None] * len(ids)
    if clusters:
        table = read_clusters(clusters)
        for i, c, box in zip(table.column("image_id").to_pylist(), table.column("cluster_id").to_pylist(),
                             table.column("box").to_pylist()):
            if i in index:
                labels[index[i]] = c
                boxes[index[i]] = tuple(box) if box is not None else None
    val = np.zeros(len(ids), bool)
    val[[index[i] for i in held_out_ids(split) if i in index]] = True
    val &= labels >= 0
    links = np.zeros((0, 2), np.int64)
    if knn:
        known = set(index)
        src, dst, _ = read_knn(knn, index, f"knn {knn}", skip=_unknown(knn, known))
        links = np.stack([src, dst], axis=1)
    return selfval_set(labels, val, links, boxes)


def held_out_ids(split: str) -> set[str]:
    from raytrieval.mining.split import validation_ids

    return validation_ids(split)


def _unknown(knn: str, known: set[str]) -> set[str]:
    """Ids of knn.parquet that are not in `known` (images that failed later on)."""
    import pyarrow.parquet as pq

    table = pq.read_table(knn, columns=["src", "dst"])
    return (set(table.column("src").to_pylist()) | set(table.column("dst").to_pylist())) - known


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
        cache_bytes: decoded images kept in memory up to this many bytes (None: all); images
            beyond it are decoded at every `get`.
    """

    def __init__(self, paths: Sequence[str], size: int, boxes: Sequence[Box | None] | None = None,
                 cache_bytes: int | None = None):
        self.paths = list(paths)
        self.size = size
        self.boxes = list(boxes) if boxes is not None else [None] * len(self.paths)
        self.cache_bytes = cache_bytes
        self._store: dict[int, torch.Tensor] = {}
        self._cached = 0

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, i: int) -> torch.Tensor:
        """Image i as a float (3, H, W) tensor in [0, 1]."""
        u8 = self._store.get(i)
        if u8 is None:
            u8 = prepare_image(self.paths[i], self.boxes[i], self.size).mul_(255).round_().to(torch.uint8)
            if self.cache_bytes is None or self._cached + u8.numel() <= self.cache_bytes:
                self._store[i] = u8
                self._cached += u8.numel()
        return u8.float().div_(255.0)
