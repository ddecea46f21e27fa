"""The region proposals artifact, `regions.parquet` (learned proposals per image, Gordo et al. 2016).

| column | type | content |
|---|---|---|
| image_id | string | manifest image id |
| width, height | int32 | size of the stored upright image the boxes refer to |
| x0, y0, x1, y1 | float32 | the box in pixels of that image |
| objectness | float32 | the proposal network's score (higher: more object-like) |

Rows of one image are ordered by decreasing objectness. Reading and writing validate every
row: a box outside its image, of zero (or negative) area, or with a NaN coordinate raises a
`ValueError` that names the row.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raytrieval.retrieval.artifacts import atomic_write_table, conform_table

REGIONS_FILE = "regions.parquet"  # in a run directory (`raytrieval regions`) and in an index directory
REGIONS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("x0", pa.float32(), nullable=False),
        pa.field("y0", pa.float32(), nullable=False),
        pa.field("x1", pa.float32(), nullable=False),
        pa.field("y1", pa.float32(), nullable=False),
        pa.field("objectness", pa.float32(), nullable=False),
    ]
)

# Boxes may overhang their image by this many pixels (float rounding of mapped coordinates).
TOLERANCE = 1e-3


def regions_table(
    ids: Sequence[str], sizes: Sequence[tuple[int, int]], boxes: Sequence[np.ndarray], scores: Sequence[np.ndarray]
) -> pa.Table:
    """The regions artifact of some images.

    Args:
        ids: (N,) image ids.
        sizes: (N,) (width, height) of each image.
        boxes: N arrays (R_i, 4) of (x0, y0, x1, y1) boxes in pixels.
        scores: N arrays (R_i,) of objectness.

    Returns:
        A validated table with REGIONS_SCHEMA, each image's rows by decreasing objectness.
    """
    if not len(ids) == len(sizes) == len(boxes) == len(scores):
        raise ValueError(f"regions: {len(ids)} ids, {len(sizes)} sizes, {len(boxes)} box sets, {len(scores)} score sets")
    cols: dict[str, list] = {name: [] for name in REGIONS_SCHEMA.names}
    for image_id, (w, h), b, s in zip(ids, sizes, boxes, scores):
        b = np.asarray(b, np.float32).reshape(-1, 4)
        s = np.asarray(s, np.float32).reshape(-1)
        if len(b) != len(s):
            raise ValueError(f"regions: image {image_id!r} has {len(b)} boxes and {len(s)} scores")
        order = np.argsort(-s, kind="stable")
        cols["image_id"] += [image_id] * len(b)
        cols["width"] += [int(w)] * len(b)
        cols["height"] += [int(h)] * len(b)
        for j, name in enumerate(("x0", "y0", "x1", "y1")):
            cols[name] += b[order, j].tolist()
        cols["objectness"] += s[order].tolist()
    table = pa.Table.from_arrays([pa.array(cols[f.name], f.type) for f in REGIONS_SCHEMA], schema=REGIONS_SCHEMA)
    return validate_regions(table)


def validate_regions(table: pa.Table, where: str = "regions") -> pa.Table:
    """Check a regions table: columns and types, then every box against its image.

    Raises:
        ValueError: a missing column, a type that does not cast, or a bad row (named).
    """
    table = conform_table(table, REGIONS_SCHEMA, where, "regions")
    box = np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in ("x0", "y0", "x1", "y1")], 1)
    w = table.column("width").to_numpy(zero_copy_only=False)
    h = table.column("height").to_numpy(zero_copy_only=False)
    score = table.column("objectness").to_numpy(zero_copy_only=False)
    checks = [
        (~np.isfinite(np.column_stack([box, score])).all(1), "a NaN or infinite coordinate or objectness"),
        ((w <= 0) | (h <= 0), "a non-positive image size"),
        ((box[:, 2] <= box[:, 0]) | (box[:, 3] <= box[:, 1]), "zero or negative area"),
        ((box[:, 0] < -TOLERANCE) | (box[:, 1] < -TOLERANCE)
         | (box[:, 2] > w + TOLERANCE) | (box[:, 3] > h + TOLERANCE), "a box outside the image"),
    ]
    for bad, reason in checks:
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            image_id = table.column("image_id")[row].as_py()
            raise ValueError(
                f"{where}: row {row} (image_id {image_id!r}, box {box[row].tolist()}, image "
                f"{int(w[row])}x{int(h[row])}): {reason}"
            )
    return table


def write_regions(table: pa.Table, path: str | os.PathLike) -> os.PathLike:
    """Atomically write `regions.parquet` (validated)."""
    return atomic_write_table(validate_regions(table, os.fspath(path)), path)


def read_regions(path: str | os.PathLike) -> pa.Table:
    """Read and validate `regions.parquet`."""
    return validate_regions(pq.read_table(path), os.fspath(path))


def regions_by_image(table: pa.Table) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """image_id -> ((R, 4) float32 boxes, (R,) float32 objectness), in the table's row order."""
    ids = np.asarray(table.column("image_id").to_pylist(), dtype=object)
    box = np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in ("x0", "y0", "x1", "y1")], 1)
    score = table.column("objectness").to_numpy(zero_copy_only=False)
    uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for u in np.argsort(first):  # images in order of first appearance
        rows = order[bounds[u] : bounds[u + 1]]
        out[str(uniq[u])] = (np.ascontiguousarray(box[rows], np.float32), np.ascontiguousarray(score[rows], np.float32))
    return out
