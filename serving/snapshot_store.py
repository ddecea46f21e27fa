"""Index snapshots: the faiss file, the ids table and `meta.json` (the commit point) of an index directory.

A snapshot writes ``index-<seq>.faiss`` and ``ids-<seq>.parquet`` under new names, then atomically
replaces ``meta.json``, which names them; files of older snapshots are removed afterwards. A crash
at any moment leaves the previous snapshot or the new one named by ``meta.json``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raytrieval.retrieval.artifacts import atomic_open, atomic_write_json, atomic_write_table

__all__ = ["FORMAT_VERSION", "META_FILE", "Record", "Snapshot", "read_index_meta", "read_snapshot",
           "remove_stale_files", "write_snapshot"]

META_FILE = "meta.json"
FORMAT_VERSION = 1
IDS_SCHEMA = pa.schema([
    pa.field("label", pa.int64(), nullable=False),
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("uri", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("deleted", pa.bool_(), nullable=False),
])
_SNAPSHOT_FILE = re.compile(r"^(index-\d{12}\.faiss|ids-\d{12}\.parquet)$")


@dataclass
class Record:
    """What the index keeps about a live image besides its vector."""

    image_id: str
    uri: str | None
    width: int | None
    height: int | None


@dataclass
class Snapshot:
    """A loaded snapshot: meta.json, the faiss bytes, live records and tombstoned labels."""

    meta: dict[str, Any]
    faiss_bytes: bytes
    records: dict[int, Record]
    deleted: set[int]


def read_index_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The `meta.json` of an index directory (the one reader of it).

    Raises:
        FileNotFoundError: no meta.json (not an index directory).
        ValueError: not valid JSON, or an unknown format version.
    """
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"index: no {META_FILE} in {directory}; run `raytrieval index build` first")
    try:
        meta = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"index: {path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise ValueError(f"index: {path} has format_version {version}, expected {FORMAT_VERSION}")
    return meta


def read_snapshot(directory: Path) -> Snapshot:
    """Load the snapshot named by meta.json.

    Raises:
        FileNotFoundError: no meta.json or snapshot files.
    """
    meta = read_index_meta(directory)
    snap = meta.get("snapshot") or {}
    index_path, ids_path = directory / snap.get("index", ""), directory / snap.get("ids", "")
    if not snap or not index_path.is_file() or not ids_path.is_file():
        raise FileNotFoundError(f"index: snapshot files named in {directory / META_FILE} are missing")
    records: dict[int, Record] = {}
    deleted: set[int] = set()
    table = pq.read_table(ids_path)
    cols = [table.column(name).to_pylist() for name in IDS_SCHEMA.names]
    for label, image_id, uri, width, height, gone in zip(*cols):
        if gone:
            deleted.add(int(label))
        else:
            records[int(label)] = Record(image_id, uri, width, height)
    return Snapshot(meta, index_path.read_bytes(), records, deleted)


def write_snapshot(directory: Path, meta: dict[str, Any], faiss_bytes: Any, records: dict[int, Record],
                   deleted: set[int], seq: int, next_label: int, ntotal: int) -> dict[str, Any]:
    """Write the data files of snapshot `seq`, then commit meta.json; returns the new meta."""
    tag = f"{seq:012d}"
    index_name, ids_name = f"index-{tag}.faiss", f"ids-{tag}.parquet"
    with atomic_open(directory / index_name) as f:
        f.write(memoryview(faiss_bytes))
    rows = [(label, r, False) for label, r in records.items()]
    rows += [(label, None, True) for label in deleted]
    rows.sort(key=lambda t: t[0])
    table = pa.table({
        "label": pa.array([t[0] for t in rows], pa.int64()),
        "image_id": pa.array([t[1].image_id if t[1] else "" for t in rows], pa.string()),
        "uri": pa.array([t[1].uri if t[1] else None for t in rows], pa.string()),
        "width": pa.array([t[1].width if t[1] else None for t in rows], pa.int32()),
        "height": pa.array([t[1].height if t[1] else None for t in rows], pa.int32()),
        "deleted": pa.array([t[2] for t in rows], pa.bool_()),
    }, schema=IDS_SCHEMA)
    atomic_write_table(table, directory / ids_name)
    meta = {**meta, "snapshot": {"seq": seq, "next_label": next_label, "index": index_name, "ids": ids_name,
                                 "count": len(records), "ntotal": ntotal}}
    atomic_write_json(directory / META_FILE, meta)  # the commit point
    return meta


def remove_stale_files(directory: Path, meta: dict[str, Any]) -> None:
    """Delete data files of older snapshots and leftover temp files."""
    snap = meta.get("snapshot") or {}
    keep = {snap.get("index"), snap.get("ids")}
    for path in directory.iterdir():
        stale_snapshot = _SNAPSHOT_FILE.match(path.name) and path.name not in keep
        stale_temp = path.name.startswith(".tmp-") and path.is_file()
        if stale_snapshot or stale_temp:
            path.unlink(missing_ok=True)
