"""The clusters artifact (`clusters.parquet`): schema, validated reads and atomic writes.

Written by the clean stage (`raytrieval.mining.cleaning.clusters_table`), read by mining,
training and recognition (serving), so it lives in the core.

Columns: image_id (string), cluster_id (int64, 0 is the largest cluster), box
(list<float32> x0, y0, x1, y1 or null). Only clustered images are listed.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raytrieval.retrieval.artifacts import atomic_write_table, conform_table

__all__ = ["BOX_TYPE", "CLUSTERS_SCHEMA", "box_map", "cluster_map", "read_clusters", "write_clusters"]

BOX_TYPE = pa.list_(pa.float32())

CLUSTERS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("cluster_id", pa.int64(), nullable=False),
        pa.field("box", BOX_TYPE),
    ]
)


def _validate_clusters(table: pa.Table, where: str) -> pa.Table:
    table = conform_table(table, CLUSTERS_SCHEMA, where, "clusters")
    ids = table.column("image_id")
    if pc.count_distinct(ids).as_py() != len(ids):
        raise ValueError(f"{where}: an image_id is listed in more than one row")
    return table


def write_clusters(table: pa.Table, path: str | os.PathLike) -> os.PathLike:
    """Atomically write `clusters.parquet` (validated)."""
    return atomic_write_table(_validate_clusters(table, os.fspath(path)), path)


def read_clusters(path: str | os.PathLike) -> pa.Table:
    """Read and validate `clusters.parquet`.

    Args:
        path: the Parquet file.

    Returns:
        A table with CLUSTERS_SCHEMA.
    """
    return _validate_clusters(pq.read_table(path), os.fspath(path))


def cluster_map(path: str | os.PathLike) -> dict[str, int]:
    """image_id -> cluster_id of a `clusters.parquet` (validated)."""
    table = read_clusters(path)
    return dict(zip(table.column("image_id").to_pylist(), table.column("cluster_id").to_pylist()))


def box_map(path: str | os.PathLike) -> dict[str, tuple[float, float, float, float]]:
    """image_id -> (x0, y0, x1, y1) of the clustered images that have a box."""
    table = read_clusters(path)
    return {i: tuple(b) for i, b in zip(table.column("image_id").to_pylist(), table.column("box").to_pylist())
            if b is not None}
