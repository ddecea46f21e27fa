"""Tests for the cluster mosaics of the cleaning stage (raytrieval.evaluation.mosaic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from raytrieval.evaluation.mosaic import BOX_COLOUR, cluster_mosaics, mosaic_html

CELL = 100


def _tables(tmp_path: Path, rows: list[tuple[str, int, list[float] | None]]) -> tuple[pa.Table, pa.Table]:
    """Grey 300 x 200 images, one per row, and the clusters / manifest tables over them."""
    uris = []
    for image_id, _, _ in rows:
        path = tmp_path / f"{image_id}.jpg"
        Image.new("RGB", (300, 200), (128, 128, 128)).save(path)
        uris.append(str(path))
    clusters = pa.table({"image_id": [r[0] for r in rows], "cluster_id": pa.array([r[1] for r in rows], pa.int64()),
                         "box": pa.array([r[2] for r in rows], pa.list_(pa.float32(), 4))})
    manifest = pa.table({"image_id": [r[0] for r in rows], "uri": uris})
    return clusters, manifest


def _red(tile: np.ndarray) -> np.ndarray:
    """Mask of the box colour's pixels."""
    return np.all(np.abs(tile.astype(int) - np.array(BOX_COLOUR)) < 40, axis=2)


def test_mosaics_largest_first_with_boxes_where_they_belong(tmp_path: Path) -> None:
    rows = [("a0", 5, [30.0, 20.0, 150.0, 120.0]), ("a1", 5, None),
            ("b0", 2, [0.0, 0.0, 300.0, 200.0]), ("b1", 2, [150.0, 100.0, 300.0, 200.0]),
            ("b2", 2, [60.0, 40.0, 120.0, 80.0])]
    clusters, manifest = _tables(tmp_path, rows)
    mosaics = cluster_mosaics(clusters, manifest, tmp_path / "out", columns=2, cell=CELL)
    assert [(m.cluster_id, m.size, m.shown) for m in mosaics] == [(2, 3, 3), (5, 2, 2)]
    assert [m.path.name for m in mosaics] == ["cluster_2.png", "cluster_5.png"]

    sheet = np.asarray(Image.open(mosaics[1].path).convert("RGB"))
    # 2 columns, 1 row of (CELL + 4) x (CELL + caption + 4) slots
    assert sheet.shape[1] == 2 * (CELL + 4) + 4
    first, second = sheet[4:4 + CELL, 4:4 + CELL], sheet[4:4 + CELL, 8 + CELL:8 + 2 * CELL]
    # by hand: the 300 x 200 image is scaled by 1/3 and centred vertically (offset 17 px)
    scale, oy = CELL / 300, (CELL - round(200 * CELL / 300)) // 2
    ys, xs = np.nonzero(_red(first))
    assert abs(xs.min() - 30 * scale) <= 2 and abs(xs.max() - 150 * scale) <= 2
    assert abs(ys.min() - (oy + 20 * scale)) <= 2 and abs(ys.max() - (oy + 120 * scale)) <= 2
    assert not _red(second).any()  # no box: nothing drawn

    page = mosaic_html(mosaics, tmp_path)
    assert "out/cluster_2.png" in page and "cluster 5: 2 images" in page
    assert mosaic_html([], tmp_path) == ""


def test_limits_on_clusters_and_images(tmp_path: Path) -> None:
    rows = [(f"i{k}", k % 3, None) for k in range(9)]
    clusters, manifest = _tables(tmp_path, rows)
    mosaics = cluster_mosaics(clusters, manifest, tmp_path / "out", max_clusters=2, max_images=2, cell=40)
    assert [(m.cluster_id, m.size, m.shown) for m in mosaics] == [(0, 3, 2), (1, 3, 2)]  # ties: lower id
    assert "first 2 shown" in mosaic_html(mosaics, tmp_path)


def test_bad_input_names_the_problem(tmp_path: Path) -> None:
    clusters, manifest = _tables(tmp_path, [("x", 0, None)])
    with pytest.raises(ValueError, match="'ghost'"):
        cluster_mosaics(pa.table({"image_id": ["ghost"], "cluster_id": pa.array([0], pa.int64()),
                                  "box": pa.array([None], pa.list_(pa.float32(), 4))}), manifest, tmp_path)
    with pytest.raises(ValueError, match="uri"):
        cluster_mosaics(clusters, manifest.drop(["uri"]), tmp_path)
    with pytest.raises(ValueError, match="cell"):
        cluster_mosaics(clusters, manifest, tmp_path, cell=0)
