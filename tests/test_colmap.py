"""COLMAP clusters: 3-D models from synthetic projections, labels and boxes, the clean stage on real photos."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from raytrieval.cluster.cli import main
from raytrieval.mining.cleaning import canonical_labels, connected_clusters, read_clusters
from raytrieval.mining.colmap import ColmapConfig, SfmModel, models_to_clusters, require_pycolmap, sfm_models
from raytrieval.mining.stages import CleanConfig
from raytrieval.retrieval.manifest import build_manifest, write_manifest

W, H, F = 640, 480, 500.0


def _look_at(centre: np.ndarray) -> np.ndarray:
    z = -centre / np.linalg.norm(centre)
    x = np.cross([0.0, 1.0, 0.0], z)
    x /= np.linalg.norm(x)
    return np.stack([x, np.cross(z, x), z])  # rows: camera axes in world coordinates


def _scene(rng: np.random.Generator, views: int, points: int = 400):
    """A cloud of 3-D points seen by cameras on an arc: keypoints (true projections + clutter)."""
    X = rng.uniform(-1.0, 1.0, (points, 3))
    keypoints, visible, extents = [], [], []
    for v in range(views):
        angle = np.deg2rad(-20.0 + 40.0 * v / (views - 1))
        centre = np.array([6 * np.sin(angle), 0.3 * rng.standard_normal(), -6 * np.cos(angle)])
        cam = (X - centre) @ _look_at(centre).T
        uv = F * cam[:, :2] / cam[:, 2:] + [W / 2, H / 2]
        vis = np.flatnonzero((uv[:, 0] > 0) & (uv[:, 0] < W) & (uv[:, 1] > 0) & (uv[:, 1] < H))
        clutter = rng.uniform(0, [W, H], (100, 2))  # keypoints that match nothing
        keypoints.append(np.concatenate([uv[vis] + 0.3 * rng.standard_normal((vis.size, 2)), clutter]))
        visible.append(vis)
        extents.append(np.r_[uv[vis].min(0), uv[vis].max(0)])
    return keypoints, visible, extents


@pytest.fixture(scope="module")
def two_scenes():
    """Scene A (images 0-5) and scene B (6-10); true matches within a scene, a wrong pair 0-6."""
    rng = np.random.default_rng(0)
    ka, va, ea = _scene(rng, 6)
    kb, vb, eb = _scene(rng, 5)
    keypoints, visible, extents = ka + kb, va + vb, ea + eb
    scene = [0] * 6 + [1] * 5
    matches = {}
    for a in range(11):
        for b in range(a + 1, 11):
            if scene[a] == scene[b]:
                _, ia, ib = np.intersect1d(visible[a], visible[b], return_indices=True)
                matches[(a, b)] = np.stack([ia, ib], axis=1)
    # 80 random correspondences: enough for the 2-D match graph, explained by no camera geometry
    matches[(0, 6)] = np.stack([rng.permutation(len(visible[0]))[:80], rng.permutation(len(visible[6]))[:80]], 1)
    return keypoints, matches, np.array(extents)


def test_config_validation():
    with pytest.raises(ValueError, match="match_ratio"):
        ColmapConfig(match_ratio=0.0)
    with pytest.raises(ValueError, match="min_num_matches"):
        ColmapConfig(min_num_matches=2)
    with pytest.raises(ValueError, match="num_threads"):
        ColmapConfig(num_threads=0)
    with pytest.raises(ValueError, match="clusters"):
        CleanConfig(run_dir="x", clusters="kmeans")
    assert CleanConfig(run_dir="x", clusters="colmap", colmap={"seed": 3}).colmap.seed == 3


def test_missing_pycolmap_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycolmap", None)
    with pytest.raises(RuntimeError, match=r"pip install 'raytrieval\[colmap\]'"):
        require_pycolmap()


def test_canonical_labels_exact():
    groups = np.array([7, 7, -1, 3, 3, 3, 9, 5, 5])
    # {3,4,5} largest -> 0; {0,1} and {7,8} tie on size: smallest member first; {6} dropped
    assert canonical_labels(groups, 2).tolist() == [1, 1, -1, 0, 0, 0, -1, 2, 2]
    assert canonical_labels(groups, 3).tolist() == [-1, -1, -1, 0, 0, 0, -1, -1, -1]
    assert canonical_labels(np.full(4, -1), 1).tolist() == [-1] * 4
    # the same rule as the connected components of a pair graph
    a, b, inl = np.array([0, 3, 4, 7]), np.array([1, 4, 5, 8]), np.full(4, 20)
    comp = connected_clusters(9, a, b, inl, 15, 2)
    assert comp.tolist() == [1, 1, -1, 0, 0, 0, -1, 2, 2]


def test_models_to_clusters_overlap_and_boxes():
    pts = {i: np.array([[10.0 * i, 0.0], [10.0 * i + 4, 6.0], [10.0 * i + 2, 3.0]]) for i in range(6)}
    big = SfmModel([0, 1, 2], {i: pts[i] for i in (0, 1, 2)}, 10)
    small = SfmModel([2, 3], {i: pts[i] for i in (2, 3)}, 5)  # image 2 is in both: goes to the bigger
    lone = SfmModel([5], {5: pts[5]}, 1)
    labels, boxes = models_to_clusters(6, [small, big, lone], min_size=2)
    assert labels.tolist() == [0, 0, 0, -1, -1, -1]  # {3} alone after the overlap is resolved
    np.testing.assert_allclose(boxes[1], [10, 0, 14, 6])
    assert np.isnan(boxes[3:]).all()
    _, robust = models_to_clusters(6, [big], min_size=2, quantile=0.25)
    np.testing.assert_allclose(robust[0], [1.0, 1.5, 3.0, 4.5])  # x in {0, 4, 2}, y in {0, 6, 3}


def test_sfm_models_separate_scenes_that_2d_matches_chain(two_scenes, tmp_path):
    keypoints, matches, extents = two_scenes
    models = sfm_models(keypoints, [(H, W)] * 11, matches, tmp_path / "colmap", min_size=2)
    assert [m.images for m in models] == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert all(m.points3d > 300 for m in models)
    labels, boxes = models_to_clusters(11, models)
    assert labels.tolist() == [0] * 6 + [1] * 5
    # the box is the extent of the keypoints of triangulated points: within the true extent
    # (0.3 px noise) and covering almost all of it
    assert np.all(boxes[:, :2] >= extents[:, :2] - 2) and np.all(boxes[:, 2:] <= extents[:, 2:] + 2)
    area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    assert np.all(area >= 0.9 * np.prod(extents[:, 2:] - extents[:, :2], axis=1))
    # the 2-D match graph alone merges the two scenes through the wrong pair
    pairs = np.array(list(matches))
    inliers = np.array([len(m) for m in matches.values()])
    assert connected_clusters(11, pairs[:, 0], pairs[:, 1], inliers, 15, 2).tolist() == [0] * 11


def test_sfm_models_without_usable_matches(tmp_path):
    kp = [np.random.default_rng(i).uniform(0, 100, (50, 2)) for i in range(3)]
    few = {(0, 1): np.array([[0, 0], [1, 1]]), (1, 2): np.zeros((0, 2), np.int64)}
    assert sfm_models(kp, [(100, 100)] * 3, few, tmp_path / "c") == []


def test_clean_stage_with_colmap_clusters_on_real_photos(shared_data, tmp_path):
    """Two UKBench objects, four photos each: COLMAP reconstructs one model per object."""
    images = sorted((shared_data / "ukbench-56" / "jpg").glob("*.jpg"))[:8]
    run = tmp_path / "run"
    run.mkdir()
    write_manifest(build_manifest({p.stem: str(p) for p in images}, progress=False), run / "images.parquet")
    assert main(["clean", "--run-dir", str(run), "--workers", "0", "--k", "5", "--clusters", "colmap"]) == 0
    record = json.loads((run / "clean.json").read_text())
    table = read_clusters(run / "clusters.parquet").to_pydict()
    groups = {}
    for image_id, cluster in zip(table["image_id"], table["cluster_id"]):
        groups.setdefault(cluster, set()).add(int(image_id[-5:]) // 4)  # UKBench: 4 photos an object
    assert len(groups) == 2 and all(len(g) == 1 for g in groups.values())  # pure clusters
    assert len(table["image_id"]) >= 6
    assert record["colmap"]["models"] == 2 and record["colmap"]["points3d"] > 100
    for box in table["box"]:
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480
    assert (run / "colmap" / "database.db").is_file()
    assert record["config"]["clusters"] == "colmap"
