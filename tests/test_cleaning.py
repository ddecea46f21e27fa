"""Cleaning: candidate pairs, connected components, cluster boxes and positives, checked exactly."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data as skdata

from raytrieval.mining.cleaning import (
    candidate_pairs,
    cluster_boxes,
    clusters_table,
    connected_clusters,
    match_arrays,
    read_clusters,
    read_matches,
    select_positives,
    validate_matches,
    write_clusters,
)
from raytrieval.retrieval.artifacts import atomic_write_table
from raytrieval.retrieval.spatial import extract_local_features, verify_pair

NAN4 = [np.nan] * 4

# 9 images; verified pairs (a, b, inliers): {0,1,2} (chain 0-1-2), {4,5} and {6,7,8} with a weak
# edge 5-6 below the threshold; 3 alone.
A = np.array([0, 1, 4, 5, 6, 7, 0, 3])
B = np.array([1, 2, 5, 6, 7, 8, 2, 8])
INL = np.array([40, 20, 100, 10, 30, 30, 16, 5])
BOX_A = np.array(
    [[10, 10, 50, 50], [0, 0, 20, 20], [1, 1, 2, 2], [0, 0, 9, 9], [5, 5, 6, 6], [7, 7, 8, 8], [20, 0, 60, 40], NAN4]
)
BOX_B = np.array(
    [[30, 30, 70, 70], [5, 5, 25, 25], [3, 3, 4, 4], [0, 0, 9, 9], [6, 6, 7, 7], [8, 8, 9, 9], [1, 2, 3, 4], NAN4]
)


def test_candidate_pairs_are_undirected_and_unique():
    knn = np.array([[1, 2], [0, 3], [0, 1], [1, 0]])
    sims = np.array([[0.9, 0.5], [0.9, 0.4], [0.5, 0.3], [0.4, 0.2]])
    pairs = candidate_pairs(knn)
    brute = sorted({(min(i, j), max(i, j)) for i in range(4) for j in knn[i]})
    assert pairs.tolist() == [list(p) for p in brute] and pairs.dtype == np.int64
    strong = candidate_pairs(knn, sims, min_similarity=0.45)
    assert strong.tolist() == [[0, 1], [0, 2]]
    with pytest.raises(ValueError, match="sims"):
        candidate_pairs(knn, min_similarity=0.5)


def test_connected_components_exact():
    labels = connected_clusters(9, A, B, INL, min_inliers=15, min_size=2)
    # clusters by decreasing size, ties by smallest member: {0,1,2} and {6,7,8} (size 3) then {4,5}
    assert labels.tolist() == [0, 0, 0, -1, 2, 2, 1, 1, 1]
    assert connected_clusters(9, A, B, INL, min_inliers=15, min_size=3).tolist() == [0, 0, 0, -1, -1, -1, 1, 1, 1]
    # lowering the threshold merges {4,5} and {6,7,8} through the weak edge
    assert connected_clusters(9, A, B, INL, min_inliers=10, min_size=2).tolist() == [1, 1, 1, -1, 0, 0, 0, 0, 0]
    singletons = connected_clusters(9, A, B, INL, min_inliers=15, min_size=1)
    assert singletons[3] >= 0 and len(set(singletons.tolist())) == 4
    assert connected_clusters(0, [], [], []).shape == (0,)


def test_cluster_boxes_union_and_robust():
    labels = connected_clusters(9, A, B, INL, min_inliers=15, min_size=2)
    boxes = cluster_boxes(labels, A, B, INL, BOX_A, BOX_B, min_inliers=15)
    expected = np.full((9, 4), np.nan)
    expected[0] = [10, 0, 60, 50]  # union of its boxes in pairs 0-1 and 0-2
    expected[1] = [0, 0, 70, 70]  # pair 0-1 (as b) and pair 1-2 (as a)
    expected[2] = [1, 2, 25, 25]  # pairs 1-2 and 0-2, both as b
    expected[4] = [1, 1, 2, 2]
    expected[5] = [3, 3, 4, 4]  # the weak 5-6 pair does not count
    expected[6] = [5, 5, 6, 6]
    expected[7] = [6, 6, 8, 8]
    expected[8] = [8, 8, 9, 9]
    np.testing.assert_array_equal(boxes, expected.astype(np.float32))
    # robust extent: with quantile 0.25 over the 2 boxes of image 0, linear interpolation
    robust = cluster_boxes(labels, A, B, INL, BOX_A, BOX_B, min_inliers=15, quantile=0.25)
    np.testing.assert_allclose(robust[0], [12.5, 2.5, 57.5, 47.5])
    np.testing.assert_array_equal(robust[4], expected[4])  # one box: unchanged


def test_boxes_from_a_real_verification_hold_the_object():
    """A known homography: the cluster box of the warped view is the inlier extent, inside the object."""
    img = skdata.astronaut()[::2, ::2]  # 256 x 256
    H = np.array([[0.9, -0.1, 60.0], [0.1, 0.9, 30.0], [0.0, 0.0, 1.0]])
    warped = cv2.warpPerspective(img, H, (400, 400))
    ver = verify_pair(extract_local_features(img, 800), extract_local_features(warped, 800))
    assert ver.inliers > 100
    Hn = ver.model / ver.model[2, 2]
    corners = np.array([[0, 0, 1], [256, 0, 1], [256, 256, 1], [0, 256, 1]], float)
    mapped = corners @ Hn.T
    truth = corners @ H.T
    np.testing.assert_allclose(mapped[:, :2] / mapped[:, 2:], truth[:, :2], atol=2.0)
    labels = connected_clusters(2, [0], [1], [ver.inliers])
    boxes = cluster_boxes(labels, [0], [1], [ver.inliers], ver.box_a[None], ver.box_b[None])
    np.testing.assert_array_equal(boxes, np.stack([ver.box_a, ver.box_b]))
    lo, hi = truth[:, :2].min(axis=0), truth[:, :2].max(axis=0)
    assert np.all(boxes[1, :2] >= lo - 2) and np.all(boxes[1, 2:] <= hi + 2)


def _brute_positive(labels, method, X=None, tau=15):
    best = {}
    for i in range(len(labels)):
        if labels[i] < 0:
            continue
        cands = []
        for j in range(len(labels)):
            if j == i or labels[j] != labels[i]:
                continue
            if method == "descriptor":
                cands.append((-float(X[i] @ X[j]), j))
            else:
                w = max([INL[p] for p in range(len(A)) if {A[p], B[p]} == {i, j}] or [0])
                if w >= tau:
                    cands.append((-w, j))
        best[i] = min(cands)[1] if cands else -1
    return best


def test_positive_selection_against_a_loop():
    labels = connected_clusters(9, A, B, INL, min_inliers=15, min_size=2)
    pos = select_positives(labels, A, B, INL, "inliers", tau=15)
    brute = _brute_positive(labels, "inliers")
    assert all(pos[i] == brute[i] for i in brute) and pos[3] == -1
    assert pos[:3].tolist() == [1, 0, 1]  # 0: 40 with 1; 1: 40 with 0 beats 20 with 2; 2: 20 with 1 beats 16 with 0
    X = np.random.default_rng(0).standard_normal((9, 8)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    pos = select_positives(labels, A, B, INL, "descriptor", descriptors=X)
    brute = _brute_positive(labels, "descriptor", X)
    assert all(pos[i] == brute[i] for i in brute)
    for seed in range(5):
        rnd = select_positives(labels, A, B, INL, "random", tau=25, seed=seed)
        # >= 25 inliers: 0-1 (40), 4-5 (100), 6-7 (30), 7-8 (30); 2 has no such mate
        assert rnd[0] == 1 and rnd[1] == 0 and rnd[2] == -1 and rnd[4] == 5 and rnd[6] == 7 and rnd[8] == 7
        assert rnd[7] in (6, 8)
    assert {int(select_positives(labels, A, B, INL, "random", tau=25, seed=s)[7]) for s in range(20)} == {6, 8}
    with pytest.raises(ValueError, match="descriptors"):
        select_positives(labels, A, B, INL, "descriptor")
    with pytest.raises(ValueError, match="method"):
        select_positives(labels, A, B, INL, "nope")


def test_artifacts_roundtrip(tmp_path):
    ids = [f"img{i}" for i in range(9)]
    labels = connected_clusters(9, A, B, INL, min_inliers=15, min_size=2)
    boxes = cluster_boxes(labels, A, B, INL, BOX_A, BOX_B, min_inliers=15)
    boxes[8] = np.nan
    write_clusters(clusters_table(ids, labels, boxes), tmp_path / "clusters.parquet")
    table = read_clusters(tmp_path / "clusters.parquet")
    assert table.column("image_id").to_pylist() == ["img0", "img1", "img2", "img6", "img7", "img8", "img4", "img5"]
    assert table.column("cluster_id").to_pylist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert table.column("box").to_pylist()[0] == [10, 0, 60, 50] and table.column("box").to_pylist()[5] is None
    import pyarrow as pa

    matches = pa.table({
        "a": [ids[i] for i in A], "b": [ids[i] for i in B], "inliers": pa.array(INL, pa.int32()),
        "model": ["homography"] * 7 + [None],
        "box_a": [None if np.isnan(r).any() else r.tolist() for r in BOX_A],
        "box_b": [None if np.isnan(r).any() else r.tolist() for r in BOX_B],
    })
    atomic_write_table(validate_matches(matches), tmp_path / "matches.parquet")
    arrays = match_arrays(read_matches(tmp_path / "matches.parquet"), ids)
    order = np.lexsort((B, A))
    np.testing.assert_array_equal(arrays.a, A[order])
    np.testing.assert_array_equal(arrays.inliers, INL[order])
    np.testing.assert_array_equal(arrays.box_b, BOX_B[order].astype(np.float32))
    with pytest.raises(ValueError, match="model"):
        validate_matches(matches.set_column(3, "model", pa.array(["affine"] * 8)))
