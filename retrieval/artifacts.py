"""Atomic artifact writes, file hashes and stage fingerprints.

Every artifact is written to a hidden temporary file in its destination directory, flushed and
fsynced, then `os.replace`d onto the final name, so readers see either the old complete file or
the new complete file, never a partial one. A failed write removes its temporary file and leaves
the previous artifact untouched.

Only local paths for now; every writer goes through `atomic_open`, the one place a
`pyarrow.fs` backend would have to be added.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "atomic_dir",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_npy",
    "atomic_write_table",
    "fingerprint",
    "sha1_file",
]

FINGERPRINT_CHARS = 16  # 64 bits of SHA-1: plenty to tell configs apart, short in file names


def _temp_sibling(path: Path) -> Path:
    """A unique hidden name next to `path` that keeps its suffix (for writers that sniff it)."""
    return path.with_name(f".tmp-{secrets.token_hex(6)}-{path.name}")


def _fsync_dir(directory: Path) -> None:
    """Persist a rename on POSIX; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a binary file for writing that appears at `path` only if the block succeeds.

    Parent directories are created. The temporary file gets the default permissions (umask),
    not mkstemp's 0600, so other users of a shared storage path can read the artifact.

    Args:
        path: the final file path.

    Yields:
        A binary file object; write to it inside the `with` block.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory artifact (checkpoint, index) under a temporary name, then swap it in.

    An existing directory at `path` is replaced only after the block succeeds (renamed aside,
    the new one renamed in, the old one deleted); on failure the temporary directory is
    removed and the old one is left as it was.

    Args:
        path: the final directory path.

    Yields:
        The temporary directory to fill.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        for dirpath, _, filenames in os.walk(tmp):
            for filename in filenames:
                with open(os.path.join(dirpath, filename), "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if path.exists():
            old = _temp_sibling(path)
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_with(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    with atomic_open(path) as f:
        write(f)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write `data` to `path`.

    Args:
        path: the final file path.
        data: the bytes.

    Returns:
        `path` as a Path.
    """
    return _write_with(path, lambda f: f.write(data))


def _json_default(obj: Any) -> Any:
    """JSON for the values configs and metrics carry besides plain JSON types."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write `obj` as UTF-8 JSON with sorted keys, indent 2 and a final newline.

    Paths, numpy scalars/arrays, sets and dataclass instances are converted to JSON types.

    Args:
        path: the final file path.
        obj: a JSON-serialisable object.

    Returns:
        `path` as a Path.
    """
    text = json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, default=_json_default)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def atomic_write_table(table: pa.Table, path: str | os.PathLike, **parquet_kwargs: Any) -> Path:
    """Atomically write an Arrow table as Parquet.

    Args:
        table: the table.
        path: the final file path (conventionally `*.parquet`).
        **parquet_kwargs: passed to `pyarrow.parquet.write_table` (e.g. compression).

    Returns:
        `path` as a Path.
    """
    return _write_with(path, lambda f: pq.write_table(table, f, **parquet_kwargs))


def conform_table(table: pa.Table, schema: pa.Schema, where: str, what: str) -> pa.Table:
    """`table` with exactly `schema`'s columns, in its order and types.

    Args:
        table: a table read from, or about to be written to, an artifact.
        schema: the artifact's schema.
        where: what to call the table in errors (a path).
        what: the artifact's name in errors ('matches', 'tuples', ...).

    Raises:
        ValueError: a missing column, or a column whose type does not cast.
    """
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise ValueError(f"{where}: missing columns {missing}")
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"{where}: columns do not match the {what} schema ({exc})") from None


def atomic_write_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Atomically write an array in `.npy` format (no pickles; read with `np.load`).

    Args:
        path: the final file path; written as given (no `.npy` is appended).
        array: the array, e.g. (N, D) float32 descriptors.

    Returns:
        `path` as a Path.
    """
    array = np.asarray(array)
    return _write_with(path, lambda f: np.save(f, array, allow_pickle=False))


def sha1_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-1 hex digest of a file's contents, read in chunks.

    Args:
        path: the file.
        chunk: read size in bytes.

    Returns:
        40 lowercase hex characters.
    """
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(*parts: Any) -> str:
    """A stable short digest of configs and input hashes, to skip stages that are current.

    The parts are serialised as canonical JSON (sorted keys, no whitespace), so dict key order
    does not matter while any change of value, type-visible structure or part order does.
    Paths count by their string; pass `sha1_file(path)` to make a file's content count.

    Args:
        *parts: JSON-serialisable values (dicts, lists, strings, numbers, dataclasses, ...).

    Returns:
        16 lowercase hex characters.
    """
    text = json.dumps(
        list(parts), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
        allow_nan=True, default=_json_default,
    )
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:FINGERPRINT_CHARS]
