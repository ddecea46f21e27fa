"""regions.parquet validation and RoIAlign region descriptors against crop-and-pool references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from raytrieval.retrieval.region import grid_proposals, proposal_descriptors, roi_pool
from raytrieval.retrieval.regions import read_regions, regions_by_image, regions_table, write_regions


def test_regions_roundtrip(tmp_path):
    boxes = [np.array([[0, 0, 10, 10], [2, 3, 40, 30]], np.float32), np.array([[5, 5, 6, 7]], np.float32)]
    table = regions_table(["a", "b"], [(40, 30), (8, 8)], boxes, [np.array([0.1, 0.9]), np.array([0.5])])
    path = write_regions(table, tmp_path / "regions.parquet")
    got = regions_by_image(read_regions(path))
    assert list(got) == ["a", "b"]
    np.testing.assert_array_equal(got["a"][0], boxes[0][::-1])  # by decreasing objectness
    np.testing.assert_allclose(got["a"][1], [0.9, 0.1], rtol=1e-6)
    np.testing.assert_array_equal(got["b"][0], boxes[1])


@pytest.mark.parametrize("box, reason", [
    ([0, 0, 41, 10], "outside the image"),
    ([-3, 0, 10, 10], "outside the image"),
    ([5, 5, 5, 9], "zero or negative area"),
    ([5, np.nan, 9, 9], "NaN"),
])
def test_bad_boxes_are_rejected_with_the_row(tmp_path, box, reason):
    good = np.array([[0, 0, 10, 10], [1, 1, 4, 4]], np.float32)
    with pytest.raises(ValueError, match=rf"row 2 \(image_id 'b'.*{reason}"):
        regions_table(["a", "b"], [(40, 30), (40, 30)], [good, np.array([box], np.float32)],
                      [np.array([0.2, 0.1]), np.array([0.3])])
    # the same check guards reading a file written by someone else
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = regions_table(["a"], [(40, 30)], [good], [np.array([0.2, 0.1])])
    row = pa.table({
        "image_id": ["b"], "width": pa.array([40], pa.int32()), "height": pa.array([30], pa.int32()),
        **{c: pa.array([v], pa.float32()) for c, v in zip(("x0", "y0", "x1", "y1"), box)},
        "objectness": pa.array([0.3], pa.float32())})
    bad = pa.concat_tables([table, row.cast(table.schema)])
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=rf"bad.parquet: row 2 \(image_id 'b'.*{reason}"):
        read_regions(tmp_path / "bad.parquet")


def test_roi_pool_matches_crop_and_max():
    fmap = torch.rand(1, 5, 9, 12)
    for x0, y0, x1, y1 in [(0, 0, 12, 9), (3, 2, 7, 5), (11, 8, 12, 9), (0, 4, 5, 9)]:
        got = roi_pool(fmap, torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32),
                           output_size=(y1 - y0, x1 - x0), sampling_ratio=1)[0]
        ref = fmap[0, :, y0:y1, x0:x1].amax(dim=(1, 2))  # the crop of the map, max-pooled
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        got = roi_pool(fmap, torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32),
                       output_size=(y1 - y0, x1 - x0), sampling_ratio=1, pool="sum")[0]
        torch.testing.assert_close(got, fmap[0, :, y0:y1, x0:x1].mean(dim=(1, 2)), rtol=0, atol=1e-6)


def test_proposal_descriptors_pool_the_right_cells():
    from raytrieval.retrieval.model import build_model
    from raytrieval.retrieval.pooling import l2n
    from raytrieval.retrieval.region import feature_map

    model = build_model(max_size=256)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (192, 256, 3), dtype=np.uint8))
    fmap, _ = feature_map(model, img, 256)  # (1, 1280, 6, 8): 32 px per cell
    assert fmap.shape[-2:] == (6, 8)
    cells = [(0, 0), (5, 3), (2, 1)]  # (x, y) of 3 x 2-cell boxes
    boxes = np.array([[32 * x, 32 * y, 32 * (x + 3), 32 * (y + 2)] for x, y in cells], np.float32)
    rs = proposal_descriptors(model, img, boxes, max_size=256, output_size=(2, 3), sampling_ratio=1)
    ref = torch.stack([l2n(fmap[0, :, y : y + 2, x : x + 3].amax(dim=(1, 2))) for x, y in cells])
    np.testing.assert_allclose(rs.descriptors, ref.numpy(), atol=1e-5)
    np.testing.assert_array_equal(rs.boxes, boxes)
    np.testing.assert_allclose(np.linalg.norm(rs.descriptors, axis=1), 1, atol=1e-5)


def test_grid_proposals_cover_the_map():
    boxes = grid_proposals(6, 8)
    assert boxes[0].tolist() == [0, 0, 8, 6]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 8).all() and (boxes[:, 3] <= 6).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and len(np.unique(boxes, axis=0)) == len(boxes)
    assert {(2, 2)} <= {(int(b[2] - b[0]), int(b[3] - b[1])) for b in boxes}  # small boxes too
