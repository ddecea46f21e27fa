"""Collection manifests: which images exist, their upright size, hash, and whether they decode.

`images.parquet` (see DESIGN.md) has one row per listed file:

| column   | type   | content |
|----------|--------|---------|
| image_id | string | stable id: path relative to the root without extension, or given |
| uri      | string | absolute path |
| width    | int32  | upright width (after EXIF orientation); null unless status is 'ok' |
| height   | int32  | upright height; null unless status is 'ok' |
| sha1     | string | SHA-1 of the file bytes; null when the file could not be read |
| status   | string | 'ok', or the reason the file was rejected ('truncated', ...) |

Ingest never fails on a bad file: `check_image` is a pure per-file function that records the
reason, so the same function can be mapped by a Ray actor pool over a large collection.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Union

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from raytrieval.retrieval.artifacts import atomic_write_table
from raytrieval.retrieval.imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, probe_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "MANIFEST_SCHEMA",
    "STATUS_OK",
    "assign_image_ids",
    "build_manifest",
    "check_image",
    "list_images",
    "manifest_from_rows",
    "ok_images",
    "read_manifest",
    "validate_manifest",
    "write_manifest",
]

STATUS_OK = "ok"

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif",
)

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("sha1", pa.string()),
        pa.field("status", pa.string(), nullable=False),
    ]
)

_NOT_NULL = tuple(field.name for field in MANIFEST_SCHEMA if not field.nullable)

PathLike = Union[str, os.PathLike]
Sources = Union[PathLike, Sequence[PathLike], Mapping[str, PathLike]]


def _normalise_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    if isinstance(extensions, str):
        extensions = (extensions,)
    out = tuple(sorted({"." + ext.lower().lstrip(".") for ext in extensions}))
    if not out or "." in out:
        raise ValueError(f"extensions must be non-empty names like 'jpg', got {extensions!r}")
    return out


def list_images(folder: PathLike, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """List image files under `folder`, recursively, sorted by relative POSIX path.

    Files are selected by name ending (case-insensitive), not by content: a text file named
    `x.jpg` is listed and rejected later by decoding. Symlinked files are listed; symlinked
    directories are not followed (no cycles).

    Args:
        folder: the collection root.
        extensions: accepted endings, with or without the dot (default: jpg, jpeg, png, bmp,
            tif, tiff, webp, gif).

    Returns:
        Paths `folder / relative_path`, sorted by relative path.

    Raises:
        ValueError: if `folder` is not a directory or `extensions` is empty.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder: {folder} is not a directory")
    endings = _normalise_extensions(extensions)
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for filename in filenames:
            if filename.lower().endswith(endings):
                full = Path(dirpath) / filename
                if full.is_file():
                    found.append((full.relative_to(folder).as_posix(), full))
    found.sort(key=lambda item: item[0])
    return [full for _, full in found]


def _strip_extension(relative: Path) -> str:
    """'a/b/img.JPG' -> 'a/b/img'; a bare '.jpg' keeps its name (Path sees no suffix)."""
    return relative.with_suffix("").as_posix() if relative.suffix else relative.as_posix()


def assign_image_ids(paths: Sequence[PathLike], root: PathLike | None = None) -> list[str]:
    """Stable image ids: the path relative to `root` without extension, or the file stem.

    Args:
        paths: the image files (need not exist).
        root: ids are relative to this folder; every path must lie inside it. Without a
            root the id is the file name without extension.

    Returns:
        One id per path, in order.

    Raises:
        ValueError: if a path lies outside `root`, or two paths get the same id.
    """
    ids: list[str] = []
    root_abs = Path(os.path.abspath(root)) if root is not None else None
    for path in paths:
        path = Path(path)
        if root_abs is None:
            ids.append(_strip_extension(Path(path.name)))
            continue
        try:
            relative = Path(os.path.abspath(path)).relative_to(root_abs)
        except ValueError:
            raise ValueError(f"sources: {path} is not inside root {root_abs}") from None
        ids.append(_strip_extension(relative))
    _check_unique(ids, [os.fspath(p) for p in paths])
    return ids


def _check_unique(ids: Sequence[str], paths: Sequence[str]) -> None:
    first: dict[str, str] = {}
    clashes: list[str] = []
    for image_id, path in zip(ids, paths):
        if not image_id:
            raise ValueError(f"image_id: empty id for {path}")
        if image_id in first:
            clashes.append(f"{image_id!r}: {first[image_id]} and {path}")
        else:
            first[image_id] = path
    if clashes:
        shown = "; ".join(clashes[:5]) + (f"; ... ({len(clashes)} in all)" if len(clashes) > 5 else "")
        raise ValueError(
            f"image_id: duplicate ids ({shown}); pass a root so ids keep their folders, "
            "rename files that differ only by extension, or give ids explicitly"
        )


def check_image(path: PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """Hash and decode-check one file; never raises for a bad or missing file.

    The file is read once: the same bytes are hashed and decoded.

    Args:
        path: the image file.
        max_pixels: the decompression-bomb cap passed to `probe_image`.

    Returns:
        A manifest row without `image_id`: {'uri', 'width', 'height', 'sha1', 'status'};
        width/height are None unless status is 'ok', sha1 is None if the file is unreadable.
    """
    uri = os.path.abspath(path)
    row: dict[str, Any] = {"uri": uri, "width": None, "height": None, "sha1": None}
    try:
        with open(uri, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return {**row, "status": "missing file"}
    except IsADirectoryError:
        return {**row, "status": "not a file"}
    except OSError:
        return {**row, "status": "unreadable file"}
    row["sha1"] = hashlib.sha1(data).hexdigest()
    try:
        width, height = probe_image(data, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        return {**row, "status": exc.reason}
    return {**row, "width": width, "height": height, "status": STATUS_OK}


def manifest_from_rows(image_ids: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Assemble `check_image` rows and their ids into a manifest table.

    Args:
        image_ids: one unique id per row.
        rows: dicts with keys uri, width, height, sha1, status.

    Returns:
        A table with `MANIFEST_SCHEMA`.
    """
    if len(image_ids) != len(rows):
        raise ValueError(f"image_ids: {len(image_ids)} ids for {len(rows)} rows")
    _check_unique(image_ids, [row["uri"] for row in rows])
    columns = {"image_id": list(image_ids)}
    for name in MANIFEST_SCHEMA.names[1:]:
        columns[name] = [row[name] for row in rows]
    return pa.table(columns, schema=MANIFEST_SCHEMA)


def _resolve_sources(sources: Sources, root: PathLike | None) -> tuple[list[str], list[Path]]:
    if isinstance(sources, Mapping):
        ids = [str(image_id) for image_id in sources]
        paths = [Path(p) for p in sources.values()]
        _check_unique(ids, [os.fspath(p) for p in paths])
        return ids, paths
    if isinstance(sources, (str, os.PathLike)):
        folder = Path(sources)
        paths = list_images(folder)
        return assign_image_ids(paths, root if root is not None else folder), paths
    if isinstance(sources, (bytes, bytearray)):
        raise ValueError("sources: expected a folder, a list of files or {image_id: file}")
    paths = [Path(p) for p in sources]
    return assign_image_ids(paths, root), paths


def build_manifest(
    sources: Sources,
    root: PathLike | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    threads: int | None = None,
) -> pa.Table:
    """List, hash and decode-check a collection; bad files are recorded, never raised.

    Files are checked by a pool of threads (reading, hashing and decoding release the GIL), in
    listing order whatever the number of threads.

    Args:
        sources: a folder (searched recursively with `list_images`), a list of files (which
            may include missing ones: status 'missing file'), or a mapping {image_id: file}
            that gives the ids explicitly.
        root: ids are paths relative to `root` without extension. Defaults to the folder for
            a folder source; for a list without root the id is the file name without
            extension. Ignored for a mapping.
        max_pixels: the decompression-bomb cap (width * height) for each image.
        progress: show a tqdm progress bar.
        threads: threads checking files; None: one per CPU core (`os.cpu_count`).

    Returns:
        A table with `MANIFEST_SCHEMA`, one row per file, in listing order.

    Raises:
        ValueError: for a source folder that does not exist, a file outside `root`, or
            duplicate image ids (e.g. `a.jpg` and `a.png`).
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads: must be >= 1 or None, got {threads}")
    ids, paths = _resolve_sources(sources, root)
    check = functools.partial(check_image, max_pixels=max_pixels)
    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        rows = list(tqdm(pool.map(check, paths), total=len(paths), desc="ingest", unit="img", disable=not progress))
    return manifest_from_rows(ids, rows)


def validate_manifest(table: pa.Table, where: str = "manifest") -> pa.Table:
    """Check a table against `MANIFEST_SCHEMA` and return it with exactly that schema.

    Columns are reordered to the schema order; extra columns are dropped.

    Args:
        table: the table to check.
        where: a name for error messages (e.g. the file path).

    Raises:
        ValueError: naming the missing column, wrong type, null required value or duplicate id.
    """
    columns = []
    for field in MANIFEST_SCHEMA:
        if field.name not in table.column_names:
            raise ValueError(f"{where}: missing column {field.name!r}")
        column = table.column(field.name)
        if column.type != field.type:
            if column.type == pa.large_string() and field.type == pa.string():
                column = column.cast(pa.string())
            else:
                raise ValueError(
                    f"{where}: column {field.name!r} has type {column.type}, expected {field.type}"
                )
        if not field.nullable and column.null_count:
            raise ValueError(f"{where}: column {field.name!r} has {column.null_count} nulls")
        columns.append(column)
    out = pa.Table.from_arrays(columns, schema=MANIFEST_SCHEMA)
    ids = out.column("image_id")
    if pc.count_distinct(ids).as_py() != len(ids):
        _check_unique(ids.to_pylist(), out.column("uri").to_pylist())
    return out


def write_manifest(table: pa.Table, path: PathLike) -> Path:
    """Validate and atomically write a manifest as Parquet.

    Args:
        table: a manifest table.
        path: the destination, conventionally `<run dir>/images.parquet`.

    Returns:
        `path` as a Path.
    """
    return atomic_write_table(validate_manifest(table, where=os.fspath(path)), path)


def read_manifest(path: PathLike) -> pa.Table:
    """Read a manifest written by `write_manifest` and check its schema.

    Args:
        path: the Parquet file.

    Returns:
        A table with `MANIFEST_SCHEMA`.

    Raises:
        ValueError: if the file does not hold a valid manifest.
    """
    return validate_manifest(pq.read_table(path), where=os.fspath(path))


def ok_images(table: pa.Table) -> pa.Table:
    """The rows whose status is 'ok'.

    Args:
        table: a manifest table.

    Returns:
        The filtered table (same schema, same order).
    """
    return table.filter(pc.equal(table.column("status"), STATUS_OK))
