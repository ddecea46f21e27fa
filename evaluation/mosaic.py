"""The cleaning stage as pictures: one mosaic per cluster, each image with its verified box.

A cluster's mosaic shows its images as thumbnails in a grid, each with the box the cleaning
stage gave it (the extent of the inlier keypoints of its verified pairs inside the cluster,
`clusters.parquet` column ``box``, in original pixels) drawn in red. Inputs are the
`clusters.parquet` table (image_id, cluster_id, box) and the `images.parquet` manifest
(image_id, uri) as pyarrow tables; the caller reads them.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pyarrow as pa
from PIL import Image, ImageDraw, ImageOps

__all__ = ["Mosaic", "cluster_mosaics", "mosaic_html"]

BOX_COLOUR = (230, 30, 30)
_BACKGROUND = (24, 24, 24)
_CAPTION = 14  # pixels of caption under each thumbnail


@dataclass(frozen=True)
class Mosaic:
    """One cluster's picture.

    Args:
        cluster_id: the cluster.
        size: its number of images.
        shown: how many of them the picture shows.
        path: the PNG file.
    """

    cluster_id: int
    size: int
    shown: int
    path: Path


def _members(clusters: pa.Table, manifest: pa.Table) -> dict[int, list[tuple[str, str, Sequence[float] | None]]]:
    """cluster id -> [(image id, path, box or None)], in table order."""
    for table, name, cols in ((clusters, "clusters", ("image_id", "cluster_id", "box")),
                              (manifest, "manifest", ("image_id", "uri"))):
        missing = [c for c in cols if c not in table.column_names]
        if missing:
            raise ValueError(f"{name}: missing columns {missing}")
    uri = dict(zip(manifest.column("image_id").to_pylist(), manifest.column("uri").to_pylist()))
    out: dict[int, list[tuple[str, str, Sequence[float] | None]]] = {}
    for image_id, cluster_id, box in zip(clusters.column("image_id").to_pylist(),
                                         clusters.column("cluster_id").to_pylist(),
                                         clusters.column("box").to_pylist()):
        if image_id not in uri:
            raise ValueError(f"clusters: image_id {image_id!r} is not in the manifest")
        out.setdefault(int(cluster_id), []).append((image_id, uri[image_id], box))
    return out


def _tile(path: str, box: Sequence[float] | None, cell: int, caption: str) -> Image.Image:
    """A cell x (cell + caption) tile: the image fitted in, its box drawn, a caption under it."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        scale = min(cell / im.width, cell / im.height)
        thumb = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
    tile = Image.new("RGB", (cell, cell + _CAPTION), _BACKGROUND)
    ox, oy = (cell - thumb.width) // 2, (cell - thumb.height) // 2
    tile.paste(thumb, (ox, oy))
    draw = ImageDraw.Draw(tile)
    if box is not None:
        x0, y0, x1, y1 = (float(v) * scale for v in box)
        draw.rectangle([ox + x0, oy + y0, ox + x1, oy + y1], outline=BOX_COLOUR, width=2)
    draw.text((3, cell + 1), caption[:26], fill=(220, 220, 220))
    return tile


def cluster_mosaics(clusters: pa.Table, manifest: pa.Table, out_dir: str | Path, max_clusters: int = 12,
                    max_images: int = 12, columns: int = 6, cell: int = 150) -> list[Mosaic]:
    """Write `cluster_<id>.png` for the largest clusters into `out_dir`.

    Args:
        clusters: the clusters table (image_id, cluster_id, box).
        manifest: the images manifest (image_id, uri).
        out_dir: folder for the PNG files (created).
        max_clusters: clusters drawn, largest first (ties: lower id first).
        max_images: images drawn per cluster (the first ones in table order).
        columns: thumbnails per row.
        cell: side of a thumbnail, pixels.

    Returns:
        The mosaics, largest cluster first.

    Raises:
        ValueError: a column is missing, an image is not in the manifest, or a size is < 1.
    """
    for name, value in (("max_clusters", max_clusters), ("max_images", max_images), ("columns", columns),
                        ("cell", cell)):
        if value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")
    members = _members(clusters, manifest)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mosaics = []
    for cluster_id in sorted(members, key=lambda c: (-len(members[c]), c))[:max_clusters]:
        shown = members[cluster_id][:max_images]
        cols = min(columns, len(shown))
        rows = -(-len(shown) // cols)
        sheet = Image.new("RGB", (cols * (cell + 4) + 4, rows * (cell + _CAPTION + 4) + 4), (60, 60, 60))
        for k, (image_id, path, box) in enumerate(shown):
            r, c = divmod(k, cols)
            sheet.paste(_tile(path, box, cell, image_id), (4 + c * (cell + 4), 4 + r * (cell + _CAPTION + 4)))
        path = out_dir / f"cluster_{cluster_id}.png"
        sheet.save(path)
        mosaics.append(Mosaic(cluster_id, len(members[cluster_id]), len(shown), path))
    return mosaics


def mosaic_html(mosaics: Sequence[Mosaic], relative_to: str | Path) -> str:
    """An HTML section showing the mosaics (image paths relative to the page's folder)."""
    if not mosaics:
        return ""
    figures = "".join(
        f"<figure><img src='{html.escape(str(m.path.relative_to(relative_to)))}' style='max-width:100%'>"
        f"<figcaption>cluster {m.cluster_id}: {m.size} images"
        f"{f' (first {m.shown} shown)' if m.shown < m.size else ''}</figcaption></figure>"
        for m in mosaics)
    return ("<h2>Cleaning: the largest clusters</h2><p>Each image with the box of its verified inlier "
            f"keypoints (red).</p><div class='grid'>{figures}</div>")
