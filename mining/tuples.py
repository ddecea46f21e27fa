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
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raytrieval.retrieval.artifacts import atomic_write_table

__all__ = ["TUPLES_SCHEMA", "read_tuples", "tuples_from_indices", "tuples_table", "validate_tuples", "write_tuples"]

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
    negatives = np.asarray(negatives, np.int64).reshape(queries.shape[0], -1)
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
    missing = [f.name for f in TUPLES_SCHEMA if f.name not in table.column_names]
    if missing:
        raise ValueError(f"{where}: missing columns {missing}")
    try:
        table = table.select(TUPLES_SCHEMA.names).cast(TUPLES_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"{where}: columns do not match the tuples schema ({exc})") from None
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
