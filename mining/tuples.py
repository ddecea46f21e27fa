"""Training tuples: `tuples.parquet`, the artifact between mining and training.

| column | type | content |
|---|---|---|
| query | string | image id of the query (anchor) |
| positive | string | image id of its positive |
| negatives | list<string> | image ids of its negatives (may be empty) |
| source | string | how the tuple was mined: 'sfm', 'hardneg', 'manifold', ... |
| epoch | int32 | the epoch the tuple was mined for (0: before training) |

Ids are manifest image_ids. A query never appears among its own positive or negatives, and a
negative is never the positive: `validate_tuples` checks that.

The tuple builder (`TupleRules`, `TupleSource`, `plan_epoch`, `build_tuples`) is the one rule
set that draws tuples from clusters: the mine stage calls it for epoch 0 with the off-the-shelf
descriptors, the trainer every epoch with the current model. Everything is a pure function of
index arrays and the seed, so every Ray Train rank draws the same tuples without talking to the
others, and the mine stage and the trainer agree for the same seed and descriptors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raytrieval.retrieval.artifacts import atomic_write_table, conform_table

__all__ = [
    "DEFAULT_EXCLUDE_KNN",
    "EpochPlan",
    "TUPLES_SCHEMA",
    "TupleRules",
    "TupleSource",
    "build_tuples",
    "components",
    "has_mate",
    "knn_links",
    "plan_epoch",
    "read_tuples",
    "tuples_from_indices",
    "tuples_table",
    "validate_tuples",
    "write_tuples",
]

# kNN neighbours whose clusters are not each other's negatives (benchmarks/finetune.md); the one
# default of the mine stage and of training
DEFAULT_EXCLUDE_KNN = 10
POSITIVE_RULES = ("random", "descriptor", "fixed")
NEGATIVE_RULES = ("hard", "random", "listed")

TUPLES_SCHEMA = pa.schema(
    [
        pa.field("query", pa.string(), nullable=False),
        pa.field("positive", pa.string(), nullable=False),
        pa.field("negatives", pa.list_(pa.string()), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("epoch", pa.int32(), nullable=False),
    ]
)


def tuples_table(
    queries: Sequence[str],
    positives: Sequence[str],
    negatives: Sequence[Sequence[str]],
    source: str,
    epoch: int = 0,
) -> pa.Table:
    """Build a validated tuples table from id lists.

    Args:
        queries: (T,) query ids.
        positives: (T,) positive ids.
        negatives: (T,) lists of negative ids.
        source: the mining method.
        epoch: the epoch the tuples are for.

    Returns:
        A table with TUPLES_SCHEMA.
    """
    t = len(queries)
    if len(positives) != t or len(negatives) != t:
        raise ValueError(f"tuples: {t} queries, {len(positives)} positives, {len(negatives)} negative lists")
    if not source:
        raise ValueError("source: must be a non-empty string")
    if epoch < 0:
        raise ValueError(f"epoch: must be >= 0, got {epoch}")
    table = pa.Table.from_arrays(
        [
            pa.array(list(queries), pa.string()),
            pa.array(list(positives), pa.string()),
            pa.array([list(n) for n in negatives], pa.list_(pa.string())),
            pa.array([source] * t, pa.string()),
            pa.array(np.full(t, epoch, np.int32), pa.int32()),
        ],
        schema=TUPLES_SCHEMA,
    )
    return validate_tuples(table)


def tuples_from_indices(
    ids: Sequence[str],
    queries: np.ndarray,
    positives: np.ndarray,
    negatives: np.ndarray,
    source: str,
    epoch: int = 0,
) -> pa.Table:
    """Tuples from index arrays over `ids`; rows without a positive (-1) are dropped.

    Args:
        ids: (N,) image ids.
        queries: (T,) int query indices.
        positives: (T,) int positive indices, -1 for none.
        negatives: (T, M) int negative indices, -1 padding.
        source: the mining method.
        epoch: the epoch.

    Returns:
        A table with TUPLES_SCHEMA.
    """
    queries = np.asarray(queries, np.int64)
    positives = np.asarray(positives, np.int64)
    negatives = np.asarray(negatives, np.int64)
    negatives = negatives.reshape(queries.shape[0], -1) if negatives.size else np.zeros((queries.shape[0], 0), np.int64)
    keep = positives >= 0
    q_ids = [ids[i] for i in queries[keep]]
    p_ids = [ids[i] for i in positives[keep]]
    n_ids = [[ids[j] for j in row if j >= 0] for row in negatives[keep]]
    return tuples_table(q_ids, p_ids, n_ids, source, epoch)


def validate_tuples(table: pa.Table, where: str = "tuples") -> pa.Table:
    """Check columns, types and that no tuple reuses its query or positive as a negative.

    Args:
        table: the table.
        where: what to call it in errors.

    Returns:
        The table cast to TUPLES_SCHEMA.
    """
    table = conform_table(table, TUPLES_SCHEMA, where, "tuples")
    for name in TUPLES_SCHEMA.names:
        if table.column(name).null_count:
            raise ValueError(f"{where}: column {name!r} has nulls")
    if pc.any(pc.equal(table.column("query"), table.column("positive"))).as_py():
        raise ValueError(f"{where}: a tuple uses its query as its positive")
    columns = (table.column(name).to_pylist() for name in ("query", "positive", "negatives"))
    for i, (q, p, negs) in enumerate(zip(*columns)):
        if q in negs or p in negs:
            raise ValueError(f"{where}: row {i} has its query or positive among its negatives")
    return table


def write_tuples(table: pa.Table, path: str | os.PathLike) -> os.PathLike:
    """Validate and atomically write `tuples.parquet`.

    Args:
        table: a tuples table.
        path: the destination.

    Returns:
        `path`.
    """
    return atomic_write_table(validate_tuples(table, os.fspath(path)), path)


def read_tuples(path: str | os.PathLike) -> pa.Table:
    """Read and validate `tuples.parquet`.

    Args:
        path: the Parquet file.

    Returns:
        A table with TUPLES_SCHEMA.
    """
    return validate_tuples(pq.read_table(path), os.fspath(path))


# ---------------------------------------------------------------------------------------------
# the tuple builder


@dataclass
class TupleRules:
    """How an epoch's tuples are drawn (shared by the mine stage and the trainer).

    Args:
        positive: 'random' (a cluster mate re-drawn every epoch), 'descriptor' (the most
            similar mate under the current descriptors) or 'fixed' (the `positives` of the
            source, e.g. the mate with the most inliers, or the query-positive pairs of a tuples
            file).
        negatives: 'hard' (the most similar pool images, one per cluster, cirtorch), 'random'
            (random pool images, one per cluster) or 'listed' (the source's listed negatives of
            each pair, re-ranked by the current descriptors).
        num_queries: queries per epoch, drawn without replacement; None (or more than there
            are) for all.
        pool_size: images in the random negative pool of an epoch.
        num_negatives: negatives per tuple.
        unclustered_negatives: the pool also holds images in no cluster (each its own
            cluster); off by default, an unverified image may show the query's landmark.
        seed: seed of every random choice (with the epoch).
    """

    positive: str = "random"
    negatives: str = "hard"
    num_queries: int | None = None
    pool_size: int = 2000
    num_negatives: int = 5
    unclustered_negatives: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.positive not in POSITIVE_RULES:
            raise ValueError(f"positive: expected one of {POSITIVE_RULES}, got {self.positive!r}")
        if self.negatives not in NEGATIVE_RULES:
            raise ValueError(f"negatives: expected one of {NEGATIVE_RULES}, got {self.negatives!r}")
        for name in ("pool_size", "num_negatives"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_queries is not None and self.num_queries < 1:
            raise ValueError(f"num_queries: must be >= 1 or None, got {self.num_queries}")


@dataclass
class TupleSource:
    """What mining found in a collection, as index arrays over its N images.

    Args:
        ids: (N,) image ids.
        labels: (N,) int64 cluster id of each image, -1 for none.
        pairs: (P, 2) int64 fixed (query, positive) rows (positive='fixed'); (0, 2) for none.
        listed: per pair, its int64 listed negatives (negatives='listed'); None for none.
        links: (E, 2) int64 image pairs whose clusters may not be each other's negatives (kNN
            edges, `knn_links`); (0, 2) for none.
    """

    ids: list[str]
    labels: np.ndarray
    pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    listed: list[np.ndarray] | None = None
    links: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.labels.shape != (n,):
            raise ValueError(f"labels: expected shape ({n},), got {self.labels.shape}")
        if self.pairs.ndim != 2 or self.pairs.shape[1] != 2:
            raise ValueError(f"pairs: expected (P, 2), got {self.pairs.shape}")

    @property
    def num_images(self) -> int:
        return len(self.ids)


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


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of a pair graph: (N,) labels (0 the largest), -1 for images in no pair.

    Args:
        n: number of images.
        pairs: (P, 2) int image indices.
    """
    from raytrieval.mining.cleaning import connected_clusters

    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    return connected_clusters(n, pairs[:, 0], pairs[:, 1], np.ones(pairs.shape[0], np.int64), 1, 2)


def has_mate(labels: np.ndarray) -> np.ndarray:
    """(N,) bool: the image is in a cluster of at least two images."""
    ok = labels >= 0
    counts = np.bincount(labels[ok], minlength=1) if ok.any() else np.zeros(1, np.int64)
    out = np.zeros(labels.shape, bool)
    out[ok] = counts[labels[ok]] >= 2
    return out


def knn_links(src: np.ndarray, dst: np.ndarray, rank: np.ndarray, exclude_knn: int) -> np.ndarray:
    """(E, 2) edges of the first `exclude_knn` neighbours of every image of a kNN graph.

    Args:
        src: (M,) int image index of each kNN row.
        dst: (M,) int neighbour index.
        rank: (M,) its rank (0 the nearest).
        exclude_knn: neighbours kept (0: no edge).
    """
    keep = np.asarray(rank) < exclude_knn
    return np.stack([np.asarray(src, np.int64)[keep], np.asarray(dst, np.int64)[keep]], axis=1).reshape(-1, 2)


def plan_epoch(src: TupleSource, rules: TupleRules, epoch: int) -> EpochPlan:
    """Draw the queries, positives and negative candidates of an epoch (seeded by epoch)."""
    rng = np.random.default_rng([rules.seed, epoch])
    n = src.num_images
    if rules.positive == "fixed":
        count = src.pairs.shape[0]
        rows = np.sort(rng.choice(count, size=min(rules.num_queries or count, count), replace=False))
        queries, positives = src.pairs[rows, 0].copy(), src.pairs[rows, 1].copy()
        needed = [queries, positives]
    else:
        eligible = np.flatnonzero(has_mate(src.labels))
        size = min(rules.num_queries or eligible.size, eligible.size)
        queries = np.sort(rng.choice(eligible, size=size, replace=False))
        positives = np.full(queries.size, -1, np.int64)
        if rules.positive == "random":
            for t, q in enumerate(queries):
                mates = np.flatnonzero(src.labels == src.labels[q])
                mates = mates[mates != q]
                positives[t] = mates[rng.integers(mates.size)]
            needed = [queries, positives]
        else:  # descriptor: every mate of every query must be embedded
            needed = [queries, np.flatnonzero(np.isin(src.labels, src.labels[queries]))]
        rows = None
    if rules.negatives == "listed":
        if src.listed is None or rows is None:
            raise ValueError("negatives: 'listed' needs fixed pairs with listed negatives (a tuples file)")
        candidates = [src.listed[r] for r in rows]
        needed.extend(candidates)
    else:
        clustered = src.labels >= 0
        pool_from = np.arange(n) if (rules.unclustered_negatives or not clustered.any()) else np.flatnonzero(clustered)
        pool = np.sort(rng.choice(pool_from, size=min(rules.pool_size, pool_from.size), replace=False))
        candidates = [pool] * queries.size
        needed.append(pool)
    embed = np.unique(np.concatenate([np.asarray(a, np.int64).ravel() for a in needed]))
    return EpochPlan(queries=queries, positives=positives, candidates=candidates, embed=embed)


def build_tuples(src: TupleSource, rules: TupleRules, plan: EpochPlan, desc: np.ndarray, epoch: int = 0) -> np.ndarray:
    """Choose descriptor positives (if asked) and the negatives of an epoch.

    Args:
        src: the tuple source.
        rules: the rules (positive, negatives, num_negatives, seed).
        plan: from `plan_epoch`.
        desc: (len(plan.embed), D) descriptors of `plan.embed` under the current model.
        epoch: the epoch (seeds random negatives).

    Returns:
        (T', 2 + num_negatives) int64 rows (query, positive, negatives...) with -1 padding;
        tuples for which no negative was found are dropped.
    """
    from raytrieval.mining.hardneg import link_labels, mine_hard_negatives, random_negatives, singleton_labels

    if desc.shape[0] != plan.embed.size:
        raise ValueError(f"desc: expected {plan.embed.size} rows, got {desc.shape[0]}")
    row_of = np.full(src.num_images, -1, np.int64)
    row_of[plan.embed] = np.arange(plan.embed.size)
    labels = singleton_labels(src.labels)
    links = link_labels(labels, src.links[:, 0], src.links[:, 1]) if src.links.size else None
    positives = plan.positives.copy()
    for t in np.flatnonzero(positives < 0):
        q = plan.queries[t]
        mates = np.flatnonzero(src.labels == src.labels[q])
        mates = mates[mates != q]
        sims = desc[row_of[mates]] @ desc[row_of[q]]
        positives[t] = mates[np.argmax(sims)]
    m = rules.num_negatives
    out = np.full((plan.queries.size, 2 + m), -1, np.int64)
    out[:, 0], out[:, 1] = plan.queries, positives
    rng = np.random.default_rng([rules.seed, epoch, 1])

    def pick(qs: np.ndarray, pool: np.ndarray, links: np.ndarray | None) -> np.ndarray:
        if rules.negatives == "random":
            got = random_negatives(labels[qs], labels[pool], m, seed=rng, links=links)
        else:
            got = mine_hard_negatives(desc[row_of[qs]], desc[row_of[pool]], labels[qs], labels[pool], m, links=links)
        return np.where(got >= 0, pool[np.maximum(got, 0)], -1)

    def fill(rows: np.ndarray, links: np.ndarray | None) -> None:
        shared = all(c is plan.candidates[0] for c in plan.candidates)
        if shared and plan.candidates and rows.size:
            out[rows, 2:] = pick(plan.queries[rows], plan.candidates[0], links)
        elif not shared:
            for t in rows:
                if plan.candidates[t].size:
                    out[t, 2:] = pick(plan.queries[[t]], plan.candidates[t], links)[0]

    fill(np.arange(plan.queries.size), links)
    if links is not None:
        # kNN exclusion is a preference: a query it leaves without any negative (a small
        # collection whose clusters are all kNN-linked) keeps cirtorch's rule alone
        fill(np.flatnonzero(~(out[:, 2:] >= 0).any(axis=1)), None)
    # a negative must never be the positive (possible when labels do not cover the pair)
    out[:, 2:][out[:, 2:] == out[:, 1:2]] = -1
    keep = (out[:, 2:] >= 0).any(axis=1)
    return out[keep]
