"""Clusters from 3-D reconstruction by COLMAP (Radenović et al. 2016), an optional extra.

With ``pycolmap`` installed (``pip install 'raytrieval[colmap]'``), the clean stage can replace
the connected components of the match graph by the 3-D models that COLMAP's incremental
Structure-from-Motion builds from it: an image belongs to the cluster of the model it is
registered in, so chains of 2-D matches that no camera geometry explains (repeated textures,
shared backgrounds, watermarks) no longer merge landmarks. The box of an image is the extent of
its keypoints that observe a 3-D point of its model, the same points in every image of the
model, so boxes are consistent across the cluster by construction.

The database COLMAP reads is written from this project's own features and matches: RootSIFT
keypoints of the decoded upright image (`raytrieval.mining.verify.PairVerifier.features`), putative
matches (ratio test, mutual) of the pairs the OpenCV verification accepted; COLMAP then
re-verifies each pair (fundamental / essential / homography, `pycolmap.verify_matches`) and
maps (`pycolmap.incremental_mapping`, several models, no image file read).

`sfm_models` works on arrays only, so it is testable on synthetic projections;
`colmap_clusters` is what the clean stage calls.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from raytrieval.mining.cleaning import canonical_labels

__all__ = ["ColmapConfig", "SfmModel", "colmap_clusters", "models_to_clusters", "require_pycolmap", "sfm_models"]


@dataclass
class ColmapConfig:
    """COLMAP settings of the clean stage's ``clusters: colmap`` mode.

    Args:
        match_ratio: Lowe ratio of the putative matches written to the database.
        min_num_matches: matches (and COLMAP-verified inliers) for a pair to count.
        init_min_num_inliers: inliers of the initial pair of a model (COLMAP: 100; relaxed by
            COLMAP itself when no pair has them).
        abs_pose_min_num_inliers: 2D-3D inliers to register a further image (COLMAP: 30).
        num_threads: COLMAP threads (-1: all cores).
        seed: random seed of COLMAP's RANSAC and mapper (deterministic runs).
    """

    match_ratio: float = 0.8
    min_num_matches: int = 15
    init_min_num_inliers: int = 50
    abs_pose_min_num_inliers: int = 15
    num_threads: int = -1
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.match_ratio <= 1.0:
            raise ValueError(f"colmap.match_ratio: must be in (0, 1], got {self.match_ratio}")
        for name in ("min_num_matches", "init_min_num_inliers", "abs_pose_min_num_inliers"):
            if getattr(self, name) < 5:
                raise ValueError(f"colmap.{name}: must be >= 5, got {getattr(self, name)}")
        if self.num_threads == 0 or self.num_threads < -1:
            raise ValueError(f"colmap.num_threads: must be -1 or >= 1, got {self.num_threads}")


@dataclass
class SfmModel:
    """One reconstructed 3-D model.

    Args:
        images: indices of the registered images.
        observed: image index -> (K, 2) keypoints of that image that observe a 3-D point.
        points3d: 3-D points of the model.
    """

    images: list[int]
    observed: dict[int, np.ndarray]
    points3d: int


def require_pycolmap():
    """Import pycolmap or explain how to get it."""
    try:
        import pycolmap
    except ImportError as exc:
        raise RuntimeError(
            "clusters: colmap needs pycolmap: pip install 'raytrieval[colmap]' (or pip install pycolmap)"
        ) from exc
    return pycolmap


def _write_database(pycolmap, db_path: Path, keypoints: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]],
                    matches: Mapping[tuple[int, int], np.ndarray]) -> list[int]:
    """A COLMAP database with one camera (SIMPLE_RADIAL, trivial rig) per image; returns image ids."""
    db = pycolmap.Database.open(str(db_path))
    image_ids = []
    try:
        for i, (kp, (h, w)) in enumerate(zip(keypoints, sizes)):
            cam = pycolmap.Camera.create_from_model_name(0, "SIMPLE_RADIAL", 1.2 * max(h, w), int(w), int(h))
            cam.camera_id = db.write_camera(cam)
            rig = pycolmap.Rig()
            rig.add_ref_sensor(cam.sensor_id)
            rig_id = db.write_rig(rig)
            image = pycolmap.Image(name=f"i{i}", camera_id=cam.camera_id)
            image.image_id = db.write_image(image)
            frame = pycolmap.Frame(rig_id=rig_id)
            frame.add_data_id(image.data_id)
            db.write_frame(frame)
            db.write_keypoints(image.image_id, np.ascontiguousarray(kp, dtype=np.float32).reshape(-1, 2))
            image_ids.append(image.image_id)
        for (a, b), m in matches.items():
            db.write_matches(image_ids[a], image_ids[b], np.ascontiguousarray(m, dtype=np.uint32).reshape(-1, 2))
    finally:
        db.close()
    return image_ids


def _reconstruct(pycolmap, work: Path, cfg: ColmapConfig, min_size: int) -> dict:
    """COLMAP's two-view verification of the database's pairs, then incremental mapping."""
    db_path = work / "database.db"
    verify = pycolmap.TwoViewGeometryOptions()
    verify.min_num_inliers = cfg.min_num_matches
    verify.ransac.random_seed = cfg.seed
    pycolmap.verify_matches(db_path, work / "pairs.txt", verify)

    opts = pycolmap.IncrementalPipelineOptions()
    opts.extract_colors = False
    opts.multiple_models = True
    opts.min_model_size = max(2, int(min_size))
    opts.min_num_matches = cfg.min_num_matches
    opts.num_threads = cfg.num_threads
    opts.random_seed = cfg.seed
    opts.mapper.init_min_num_inliers = cfg.init_min_num_inliers
    opts.mapper.abs_pose_min_num_inliers = cfg.abs_pose_min_num_inliers
    opts.mapper.num_threads = cfg.num_threads
    opts.mapper.random_seed = cfg.seed
    (work / "models").mkdir()
    return pycolmap.incremental_mapping(db_path, work / "images", work / "models", opts)


def sfm_models(
    keypoints: Sequence[np.ndarray],
    sizes: Sequence[tuple[int, int]],
    matches: Mapping[tuple[int, int], np.ndarray],
    workdir: str | os.PathLike,
    config: ColmapConfig | None = None,
    min_size: int = 2,
) -> list[SfmModel]:
    """Reconstruct 3-D models from keypoints and putative matches with COLMAP.

    Args:
        keypoints: per image, (K_i, 2) float (x, y) pixel positions.
        sizes: per image, (height, width) of the image the keypoints are in.
        matches: (a, b) image indices -> (M, 2) int rows (keypoint index in a, in b).
        workdir: folder for COLMAP's database and models (replaced).
        config: COLMAP settings.
        min_size: smallest model kept (registered images).

    Returns:
        The models, largest first.

    Raises:
        RuntimeError: pycolmap is not installed.
    """
    pycolmap = require_pycolmap()
    cfg = config or ColmapConfig()
    if len(keypoints) != len(sizes):
        raise ValueError(f"sizes: expected {len(keypoints)} entries, got {len(sizes)}")
    work = Path(workdir)
    shutil.rmtree(work, ignore_errors=True)
    (work / "images").mkdir(parents=True)  # COLMAP wants an image folder; it reads no image
    db_path = work / "database.db"
    names = [f"i{i}" for i in range(len(keypoints))]
    usable = {pair: m for pair, m in matches.items() if len(m) >= cfg.min_num_matches}
    if not usable:
        return []
    _write_database(pycolmap, db_path, keypoints, sizes, usable)
    (work / "pairs.txt").write_text("".join(f"{names[a]} {names[b]}\n" for a, b in usable))
    level = pycolmap.logging.minloglevel
    pycolmap.logging.minloglevel = 2  # COLMAP logs every step at INFO: keep its errors only
    try:
        recs = _reconstruct(pycolmap, work, cfg, min_size)
    finally:
        pycolmap.logging.minloglevel = level
    index = {name: i for i, name in enumerate(names)}
    models = []
    for rec in recs.values():
        observed = {}
        for image in rec.images.values():
            if not image.has_pose:
                continue
            pts = [p.xy for p in image.points2D if p.has_point3D()]
            observed[index[image.name]] = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        if len(observed) >= min_size:
            models.append(SfmModel(sorted(observed), observed, int(rec.num_points3D())))
    models.sort(key=lambda m: (-len(m.images), m.images[0]))
    return models


def models_to_clusters(
    n: int, models: Sequence[SfmModel], min_size: int = 2, quantile: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster labels and boxes from 3-D models.

    An image registered in several models (COLMAP lets models overlap a little) goes to the
    one with the most images. Its box is the extent of its keypoints that observe 3-D points
    (``quantile=q > 0``: the q / 1-q quantiles, ignoring a few stray points).

    Args:
        n: number of images.
        models: from `sfm_models`.
        min_size: smallest cluster kept.
        quantile: robustness in [0, 0.5).

    Returns:
        labels (N,) int64 (-1: no cluster; 0 the largest) and boxes (N, 4) float32 (x0, y0,
        x1, y1), NaN rows for images without a cluster.
    """
    if not 0.0 <= quantile < 0.5:
        raise ValueError(f"quantile: must be in [0, 0.5), got {quantile}")
    groups = np.full(n, -1, np.int64)
    boxes = np.full((n, 4), np.nan, np.float64)
    for g, model in sorted(enumerate(models), key=lambda gm: -len(gm[1].images)):
        for i in model.images:
            if groups[i] >= 0:
                continue
            groups[i] = g
            pts = model.observed[i]
            if len(pts):
                lo = np.quantile(pts, quantile, axis=0)
                hi = np.quantile(pts, 1.0 - quantile, axis=0)
                boxes[i] = [lo[0], lo[1], hi[0], hi[1]]
    labels = canonical_labels(groups, min_size)
    boxes[labels < 0] = np.nan
    return labels, boxes.astype(np.float32)


def colmap_clusters(
    ids: Sequence[str],
    paths: Mapping[str, str],
    a: np.ndarray,
    b: np.ndarray,
    verifier: Any,
    workdir: str | os.PathLike,
    config: ColmapConfig | None = None,
    min_size: int = 2,
    quantile: float = 0.0,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Clusters of a collection by COLMAP over its verified pairs.

    Args:
        ids: image ids (index order of a, b).
        paths: image id -> path.
        a: (P,) first image index of each verified pair.
        b: (P,) second image index.
        verifier: a `raytrieval.mining.verify.PairVerifier` (its features: the same RootSIFT, cached).
        workdir: COLMAP's folder (replaced).
        config: COLMAP settings.
        min_size: smallest cluster kept.
        quantile: box robustness, as in `models_to_clusters`.
        progress: progress bar over the images.

    Returns:
        labels (N,), boxes (N, 4) in stored-image pixels, and a summary: models, registered
        images, 3-D points, and 'failures' (image id -> reason, images that did not decode).
    """
    from raytrieval.retrieval.imageio import ImageDecodeError
    from raytrieval.retrieval.spatial import match_features

    cfg = config or ColmapConfig()
    n = len(ids)
    members = sorted(set(np.asarray(a, np.int64).tolist()) | set(np.asarray(b, np.int64).tolist()))
    local = {img: j for j, img in enumerate(members)}
    feats, scales, failures = {}, {}, {}
    for img in tqdm(members, desc="colmap features", unit="img", disable=not progress):
        try:
            feats[img], scales[img] = verifier.features(ids[img], paths[ids[img]])
        except ImageDecodeError as exc:
            failures[ids[img]] = exc.reason
    matches = {}
    for i, j in zip(np.asarray(a).tolist(), np.asarray(b).tolist()):
        if i in feats and j in feats:
            matches[(local[i], local[j])] = match_features(feats[i], feats[j], cfg.match_ratio, mutual=True)
    empty = np.zeros((0, 2), np.float32)
    keypoints = [feats[img].keypoints if img in feats else empty for img in members]
    sizes = [feats[img].image_size if img in feats else (1, 1) for img in members]
    models = sfm_models(keypoints, sizes, matches, workdir, cfg, min_size)
    for model in models:  # back to collection indices and stored-image pixels
        model.observed = {members[j]: pts * scales[members[j]] for j, pts in model.observed.items()}
        model.images = sorted(model.observed)
    labels, boxes = models_to_clusters(n, models, min_size, quantile)
    info = {
        "models": len(models),
        "registered_images": int(sum(len(m.images) for m in models)),
        "points3d": int(sum(m.points3d for m in models)),
        "failures": failures,
    }
    return labels, boxes, info
