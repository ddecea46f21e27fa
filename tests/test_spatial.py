"""Spatial verification on skimage photos: a known homography, unrelated pairs, re-ranking."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data as skdata

from raytrieval.retrieval.spatial import (
    LocalFeatures,
    extract_local_features,
    localize,
    match_features,
    spatial_rerank,
    verify_pair,
)

# rotation 0.2 rad, scale 0.8, shift, mild perspective: the warped photo fits in 700 x 700
H_TRUE = np.array(
    [
        [0.8 * np.cos(0.2), -0.8 * np.sin(0.2), 120.0],
        [0.8 * np.sin(0.2), 0.8 * np.cos(0.2), 40.0],
        [1e-4, 2e-4, 1.0],
    ]
)


@pytest.fixture(scope="module")
def feats() -> dict[str, LocalFeatures]:
    astronaut = skdata.astronaut()
    warped = cv2.warpPerspective(astronaut, H_TRUE, (700, 700))
    return {
        "astronaut": extract_local_features(astronaut),
        "warped": extract_local_features(warped),
        "coffee": extract_local_features(skdata.coffee()),
        "chelsea": extract_local_features(skdata.chelsea()),
        "rocket": extract_local_features(skdata.rocket()),
    }


def _corners(H: np.ndarray, w: float = 512, h: float = 512) -> np.ndarray:
    pts = np.array([[0, 0, 1], [w, 0, 1], [w, h, 1], [0, h, 1]], dtype=np.float64) @ H.T
    return pts[:, :2] / pts[:, 2:]


def test_rootsift_features(feats):
    f = feats["astronaut"]
    assert 500 < len(f) <= 2000 and f.image_size == (512, 512)
    assert f.keypoints.dtype == np.float32 and f.keypoints.shape == (len(f), 2)
    assert f.descriptors.dtype == np.float32 and f.descriptors.shape == (len(f), 128)
    assert f.descriptors.min() >= 0
    np.testing.assert_allclose(np.linalg.norm(f.descriptors, axis=1), 1.0, atol=1e-3)  # sqrt of L1-normalised
    raw = extract_local_features(skdata.astronaut(), max_features=300, root=False)
    assert len(raw) == 300 and raw.descriptors.max() > 1.0
    gray = extract_local_features(skdata.camera(), max_features=100)
    assert len(gray) == 100
    blank = extract_local_features(np.zeros((64, 64), np.uint8))
    assert len(blank) == 0 and blank.descriptors.shape == (0, 128)
    with pytest.raises(ValueError, match="img"):
        extract_local_features(skdata.astronaut().astype(np.float32))
    with pytest.raises(ValueError, match="img"):
        extract_local_features(np.zeros((8, 8, 2), np.uint8))


def test_match_features(feats):
    a, b = feats["astronaut"], feats["warped"]
    m = match_features(a, b)
    assert m.dtype == np.int64 and m.ndim == 2 and m.shape[1] == 2 and len(m) > 200
    assert len(np.unique(m[:, 0])) == len(m)
    mutual = match_features(a, b, mutual=True)
    assert set(map(tuple, mutual)) <= set(map(tuple, m))
    assert len(match_features(a, b, ratio=1.0)) == len(a)
    assert len(match_features(a, b, ratio=0.5)) < len(m)
    empty = LocalFeatures(np.zeros((0, 2)), np.zeros((0, 128)))
    assert match_features(empty, b).shape == (0, 2)
    assert match_features(a, empty).shape == (0, 2)
    with pytest.raises(ValueError, match="ratio"):
        match_features(a, b, ratio=0.0)


@pytest.mark.parametrize("method", ["usac_magsac", "ransac"])
def test_recovers_known_homography(feats, method):
    v = verify_pair(feats["astronaut"], feats["warped"], method=method)
    assert v.inliers > 300 and v.inliers >= 0.8 * len(v.matches)
    assert v.inlier_mask.shape == (len(v.matches),) and v.inlier_mask.sum() == v.inliers
    H = v.model / v.model[2, 2]
    # the recovered homography maps the photo's corners within 2 px of the true ones
    assert np.abs(_corners(H) - _corners(H_TRUE)).max() < 2.0
    # the object's box in the warped image, from the query corners
    box = localize((0, 0, 512, 512), v.model)
    truth = localize((0, 0, 512, 512), H_TRUE)
    assert np.abs(box - truth).max() < 2.0
    # inlier keypoints lie inside the object in both images
    assert v.box_a[0] >= 0 and v.box_a[2] <= 512 and v.box_a[1] >= 0 and v.box_a[3] <= 512
    assert np.all(v.box_b[:2] >= truth[:2] - 2) and np.all(v.box_b[2:] <= truth[2:] + 2)


def test_unrelated_images_have_few_inliers(feats):
    for other in ("coffee", "chelsea", "rocket"):
        v = verify_pair(feats["astronaut"], feats[other])
        assert v.inliers < 15, (other, v.inliers)


def test_fundamental_matrix_on_a_real_stereo_pair():
    left, right, _ = skdata.stereo_motorcycle()
    a, b = extract_local_features(left, 1000), extract_local_features(right, 1000)
    v = verify_pair(a, b, model="fundamental")
    assert v.model.shape == (3, 3) and v.inliers > 150
    # inliers satisfy the epipolar constraint x_b^T F x_a ~ 0 (distance to the epipolar line)
    pa = np.c_[a.keypoints[v.matches[v.inlier_mask, 0]], np.ones(v.inliers)]
    pb = np.c_[b.keypoints[v.matches[v.inlier_mask, 1]], np.ones(v.inliers)]
    lines = pa @ v.model.T
    dist = np.abs(np.sum(lines * pb, axis=1)) / np.linalg.norm(lines[:, :2], axis=1)
    assert np.median(dist) < 1.0
    unrelated = verify_pair(a, extract_local_features(skdata.coffee(), 1000), model="fundamental")
    assert unrelated.inliers < v.inliers / 5


def test_too_few_matches_is_not_an_error(feats):
    a = feats["astronaut"]
    tiny = LocalFeatures(a.keypoints[:3], a.descriptors[:3])
    for model in ("homography", "fundamental"):
        v = verify_pair(a, tiny, model=model)
        assert v.inliers == 0 and v.model is None and v.box_a is None and v.box_b is None
        assert v.inlier_mask.shape == (len(v.matches),)
    empty = LocalFeatures(np.zeros((0, 2)), np.zeros((0, 128)))
    assert verify_pair(empty, a).inliers == 0
    assert verify_pair(a, empty).inliers == 0
    with pytest.raises(ValueError, match="method"):
        verify_pair(a, a, method="lmeds")
    with pytest.raises(ValueError, match="model"):
        verify_pair(a, a, model="affine")


def test_localize():
    box = localize((10, 20, 30, 60), np.eye(3))
    np.testing.assert_allclose(box, [10, 20, 30, 60])
    shift = np.array([[2.0, 0, 5], [0, 2.0, -7], [0, 0, 1]])
    np.testing.assert_allclose(localize((0, 0, 10, 10), shift), [5, -7, 25, 13])
    np.testing.assert_allclose(localize((0, 0, 10, 10), -shift), [5, -7, 25, 13])  # H ~ -H
    np.testing.assert_allclose(localize((0, 0, 10, 10), shift, clip_to=(10, 20)), [5, 0, 20, 10])
    horizon = np.array([[1.0, 0, 0], [0, 1.0, 0], [-0.2, 0, 1.0]])  # x = 5 goes to infinity
    assert localize((0, 0, 10, 10), horizon) is None
    with pytest.raises(ValueError, match="box_query"):
        localize((10, 0, 0, 10), np.eye(3))
    with pytest.raises(ValueError, match="H"):
        localize((0, 0, 1, 1), np.eye(2))


def test_spatial_rerank(feats):
    q = feats["astronaut"]
    db = [feats["coffee"], feats["chelsea"], feats["warped"], feats["rocket"], feats["astronaut"]]
    ranks_row = np.array([0, 1, 2, 3, 4])
    new, inliers, boxes = spatial_rerank(q, db, ranks_row, top_n=4, min_inliers=15)
    # the warped copy is verified and moves to the front; the rest keep their order
    np.testing.assert_array_equal(new, [2, 0, 1, 3, 4])
    assert inliers.shape == (4,) and inliers.dtype == np.int64 and inliers[2] > 300
    assert boxes.shape == (4, 4) and np.isfinite(boxes[2]).all() and np.isnan(boxes[[0, 1, 3]]).all()
    # with both copies in the shortlist, the identical image (more inliers) comes first
    new, inliers, _ = spatial_rerank(q, db, np.array([3, 2, 0, 4, 1]), top_n=10)
    assert inliers.shape == (5,)
    np.testing.assert_array_equal(new, [4, 2, 3, 0, 1])
    # a mapping holding only the shortlist is enough
    new, _, _ = spatial_rerank(q, {2: db[2], 0: db[0]}, np.array([0, 2, 1, 3, 4]), top_n=2)
    np.testing.assert_array_equal(new, [2, 0, 1, 3, 4])
    with pytest.raises(ValueError, match="db_feats_list"):
        spatial_rerank(q, {0: db[0]}, np.array([0, 2]), top_n=2)
    same, inl, _ = spatial_rerank(q, db, ranks_row, top_n=0)
    np.testing.assert_array_equal(same, ranks_row)
    assert inl.shape == (0,)


def test_matches_collapsing_onto_one_point_count_once():
    # a degenerate model (seen on the demo: det(H) ~ 1e-32) maps 20 keypoints of a onto one
    # spot of b; one-to-one in position, its inliers count once there
    from raytrieval.retrieval.spatial import _one_to_one

    rng = np.random.default_rng(0)
    pa = rng.uniform(0, 500, (30, 2)).astype(np.float32)
    pb = np.vstack([np.full((20, 2), 250.0), rng.uniform(0, 500, (10, 2))]).astype(np.float32)
    pb[1] += 0.1  # the same spot to within half a pixel
    mask = np.ones(30, bool)
    mask[25] = False
    keep = _one_to_one(mask, pa, pb)
    # by hand: the first match at the spot, then the 10 distinct ones except the masked one
    assert np.flatnonzero(keep).tolist() == [0] + [i for i in range(20, 30) if i != 25]
    assert not _one_to_one(np.zeros(30, bool), pa, pb).any()
