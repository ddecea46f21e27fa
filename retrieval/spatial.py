"""Local features and geometric (spatial) verification with OpenCV.

- `extract_local_features`: SIFT keypoints and (Root)SIFT descriptors of one image.
- `match_features`: nearest-neighbour matching with Lowe's ratio test (optionally mutual).
- `verify_pair`: robust homography (or fundamental matrix) fit, MAGSAC++ when OpenCV has it
  (``cv2.USAC_MAGSAC``), RANSAC otherwise; inlier count, model, and inlier boxes.
- `localize`: box of the query object in a database image through a homography.
- `spatial_rerank`: re-order the top of a ranking by inlier count.

Keypoints are (x, y) pixel coordinates; boxes are (x0, y0, x1, y1) float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import cv2
import faiss
import numpy as np

_METHODS = ("usac_magsac", "ransac")
_MODELS = ("homography", "fundamental")
_MIN_MATCHES = {"homography": 4, "fundamental": 8}
_DEFAULT_REPROJ = {"homography": 4.0, "fundamental": 1.5}


@dataclass
class LocalFeatures:
    """Local features of one image.

    Args:
        keypoints: (K, 2) float32 (x, y) pixel positions.
        descriptors: (K, 128) float32 (Root)SIFT descriptors.
        image_size: (height, width) of the image they come from, if known.
    """

    keypoints: np.ndarray
    descriptors: np.ndarray
    image_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        kp = np.ascontiguousarray(np.asarray(self.keypoints, dtype=np.float32).reshape(-1, 2))
        desc = np.asarray(self.descriptors, dtype=np.float32)
        if desc.ndim != 2 or desc.shape[0] != kp.shape[0]:
            raise ValueError(
                f"descriptors: expected shape ({kp.shape[0]}, D) matching the keypoints, got {desc.shape}"
            )
        self.keypoints = kp
        self.descriptors = np.ascontiguousarray(desc)
        if self.image_size is not None:
            self.image_size = (int(self.image_size[0]), int(self.image_size[1]))

    def __len__(self) -> int:
        return int(self.keypoints.shape[0])


@dataclass
class Verification:
    """Result of geometric verification of an image pair (a, b).

    Args:
        inliers: number of inlier matches (0 when no model could be fitted).
        model: (3, 3) float64 homography a -> b (or fundamental matrix), or None.
        inlier_mask: (M,) bool over `matches`.
        box_a: (4,) float32 (x0, y0, x1, y1) bounding box of the inlier keypoints in a, or None.
        box_b: the same in b, or None.
        matches: (M, 2) int64 tentative matches (index in a, index in b).
    """

    inliers: int
    model: np.ndarray | None
    inlier_mask: np.ndarray
    box_a: np.ndarray | None
    box_b: np.ndarray | None
    matches: np.ndarray


def _to_gray(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"img: expected uint8 pixels, got dtype {img.dtype}")
    if img.ndim == 2:
        gray = img
    elif img.ndim == 3 and img.shape[2] == 1:
        gray = img[:, :, 0]
    elif img.ndim == 3 and img.shape[2] in (3, 4):
        gray = cv2.cvtColor(np.ascontiguousarray(img[:, :, :3]), cv2.COLOR_RGB2GRAY)
    else:
        raise ValueError(f"img: expected (H, W) or (H, W, 1|3|4) RGB(A), got shape {img.shape}")
    if gray.shape[0] == 0 or gray.shape[1] == 0:
        raise ValueError(f"img: empty image of shape {img.shape}")
    return np.ascontiguousarray(gray)


def extract_local_features(img: np.ndarray, max_features: int = 2000, root: bool = True) -> LocalFeatures:
    """SIFT keypoints and descriptors (RootSIFT by default) of one image.

    Args:
        img: (H, W) grey or (H, W, 3) RGB uint8 image.
        max_features: keep at most this many keypoints, strongest first.
        root: RootSIFT (Arandjelović & Zisserman 2012): L1-normalise then square root, so that
            L2 distances between descriptors compare like the Hellinger kernel.

    Returns:
        `LocalFeatures` with keypoints (K, 2) and descriptors (K, 128), K <= max_features.
    """
    if isinstance(max_features, bool) or not isinstance(max_features, (int, np.integer)) or max_features < 1:
        raise ValueError(f"max_features: must be an int >= 1, got {max_features!r}")
    gray = _to_gray(img)
    sift = cv2.SIFT_create(nfeatures=int(max_features))
    kps, desc = sift.detectAndCompute(gray, None)
    size = (int(gray.shape[0]), int(gray.shape[1]))
    if desc is None or len(kps) == 0:
        return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), size)
    xy = np.array([kp.pt for kp in kps], dtype=np.float32)  # (K, 2)
    if len(kps) > max_features:  # SIFT may return a few more (one keypoint per orientation)
        order = np.argsort([-kp.response for kp in kps], kind="stable")[:max_features]
        xy, desc = xy[order], desc[order]
    desc = desc.astype(np.float32)
    if root:
        desc = np.sqrt(desc / (np.abs(desc).sum(axis=1, keepdims=True) + 1e-7))
    return LocalFeatures(xy, desc, size)


def match_features(a: LocalFeatures, b: LocalFeatures, ratio: float = 0.8, mutual: bool = False) -> np.ndarray:
    """Tentative correspondences by nearest neighbour with Lowe's ratio test.

    A descriptor of a matches its nearest neighbour in b when
    ``d(nn1) < ratio * d(nn2)`` (L2 distances).

    Args:
        a: features of the first image.
        b: features of the second image (needs at least 2 for the ratio test).
        ratio: ratio test threshold in (0, 1]; 1 disables the test.
        mutual: also require a's descriptor to be the nearest neighbour of its match in b.

    Returns:
        (M, 2) int64 pairs (index in a, index in b).
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio: must be in (0, 1], got {ratio}")
    if len(a) and len(b) and a.descriptors.shape[1] != b.descriptors.shape[1]:
        raise ValueError(
            f"b: descriptor dimension {b.descriptors.shape[1]} differs from a's {a.descriptors.shape[1]}"
        )
    if len(a) == 0 or len(b) < 2:
        return np.zeros((0, 2), np.int64)
    dist2, nn = faiss.knn(a.descriptors, b.descriptors, 2, metric=faiss.METRIC_L2)  # squared L2
    keep = dist2[:, 0] < (ratio**2) * dist2[:, 1] if ratio < 1.0 else np.ones(len(a), bool)
    idx_a = np.flatnonzero(keep)
    idx_b = nn[idx_a, 0].astype(np.int64)
    if mutual and idx_a.size:
        _, back = faiss.knn(b.descriptors, a.descriptors, 1, metric=faiss.METRIC_L2)  # (Kb, 1)
        ok = back[idx_b, 0] == idx_a
        idx_a, idx_b = idx_a[ok], idx_b[ok]
    return np.stack([idx_a.astype(np.int64), idx_b], axis=1)


def _box(points: np.ndarray) -> np.ndarray:
    """(P, 2) points -> (4,) float32 (x0, y0, x1, y1)."""
    return np.array([*points.min(axis=0), *points.max(axis=0)], dtype=np.float32)


def _one_to_one(mask: np.ndarray, pa: np.ndarray, pb: np.ndarray) -> np.ndarray:
    """`mask` keeping, in order, only matches whose positions (to 0.5 px) in a and in b are
    both new: several keypoints at one spot (or matched to one spot) count once."""
    keep = np.zeros_like(mask)
    seen_a: set[tuple[float, float]] = set()
    seen_b: set[tuple[float, float]] = set()
    for i in np.flatnonzero(mask):
        ka, kb = tuple(np.round(pa[i] * 2.0)), tuple(np.round(pb[i] * 2.0))
        if ka not in seen_a and kb not in seen_b:
            seen_a.add(ka)
            seen_b.add(kb)
            keep[i] = True
    return keep


def _robust_flag(method: str) -> int:
    if method == "usac_magsac" and hasattr(cv2, "USAC_MAGSAC"):
        return int(cv2.USAC_MAGSAC)
    return int(cv2.RANSAC)


def verify_pair(
    a: LocalFeatures,
    b: LocalFeatures,
    ratio: float = 0.8,
    method: str = "usac_magsac",
    reproj: float | None = None,
    model: str = "homography",
    mutual: bool = False,
    confidence: float = 0.999,
    max_iters: int = 2000,
) -> Verification:
    """Match two images and fit a geometric model robustly.

    Never raises on hard pairs: too few matches, a degenerate configuration or a failed fit
    give ``inliers=0`` and ``model=None``.

    Args:
        a: features of the first (query) image.
        b: features of the second (database) image.
        ratio: Lowe ratio for `match_features`.
        method: ``'usac_magsac'`` (MAGSAC++, falls back to RANSAC on an OpenCV without USAC)
            or ``'ransac'``.
        reproj: inlier threshold in pixels; None for 4.0 (homography) or 1.5 (fundamental).
        model: ``'homography'`` (planar / rotation; the model maps a to b) or ``'fundamental'``
            (general two-view geometry).
        mutual: mutual nearest neighbours only.
        confidence: RANSAC confidence.
        max_iters: RANSAC iterations.

    Returns:
        A `Verification`.
    """
    if method not in _METHODS:
        raise ValueError(f"method: expected one of {_METHODS}, got {method!r}")
    if model not in _MODELS:
        raise ValueError(f"model: expected one of {_MODELS}, got {model!r}")
    thr = _DEFAULT_REPROJ[model] if reproj is None else float(reproj)
    if not thr > 0:
        raise ValueError(f"reproj: must be > 0, got {reproj}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: must be in (0, 1), got {confidence}")
    matches = match_features(a, b, ratio=ratio, mutual=mutual)
    empty = Verification(0, None, np.zeros(len(matches), bool), None, None, matches)
    if len(matches) < _MIN_MATCHES[model]:
        return empty
    pa = np.ascontiguousarray(a.keypoints[matches[:, 0]], dtype=np.float32)  # (M, 2)
    pb = np.ascontiguousarray(b.keypoints[matches[:, 1]], dtype=np.float32)
    flag = _robust_flag(method)
    try:
        if model == "homography":
            M, mask = cv2.findHomography(
                pa, pb, method=flag, ransacReprojThreshold=thr, maxIters=int(max_iters), confidence=confidence
            )
        else:
            M, mask = cv2.findFundamentalMat(pa, pb, flag, thr, confidence, int(max_iters))
    except cv2.error:
        return empty
    if M is None or mask is None or M.shape != (3, 3) or not np.all(np.isfinite(M)):
        return empty
    # inliers are one-to-one in position: a model that maps many matches onto one point (many
    # keypoints matching one repeated blob) is degenerate, its matches there count once
    inlier_mask = _one_to_one(mask.ravel().astype(bool), pa, pb)
    n_in = int(inlier_mask.sum())
    if n_in == 0:
        return empty
    return Verification(
        inliers=n_in,
        model=np.asarray(M, dtype=np.float64),
        inlier_mask=inlier_mask,
        box_a=_box(pa[inlier_mask]),
        box_b=_box(pb[inlier_mask]),
        matches=matches,
    )


def localize(
    box_query: np.ndarray | Sequence[float],
    H: np.ndarray,
    clip_to: tuple[int, int] | None = None,
) -> np.ndarray | None:
    """Bounding box of a query box mapped through a homography.

    Args:
        box_query: (4,) (x0, y0, x1, y1) in the query image; ``(0, 0, width, height)`` for the
            whole query image.
        H: (3, 3) homography from the query to the database image.
        clip_to: optional (height, width) of the database image to clip the box to.

    Returns:
        (4,) float32 (x0, y0, x1, y1) in the database image, or None when the box is mapped
        across the line at infinity (no finite image).
    """
    box = np.asarray(box_query, dtype=np.float64).ravel()
    if box.shape != (4,) or not np.all(np.isfinite(box)) or box[2] < box[0] or box[3] < box[1]:
        raise ValueError(f"box_query: expected (x0, y0, x1, y1) with x0 <= x1, y0 <= y1, got {box_query!r}")
    H = np.asarray(H, dtype=np.float64)
    if H.shape != (3, 3) or not np.all(np.isfinite(H)):
        raise ValueError(f"H: expected a finite (3, 3) matrix, got shape {H.shape}")
    x0, y0, x1, y1 = box
    corners = np.array([[x0, y0, 1.0], [x1, y0, 1.0], [x1, y1, 1.0], [x0, y1, 1.0]])  # (4, 3)
    mapped = corners @ H.T  # (4, 3)
    w = mapped[:, 2]
    if np.all(w < 0):  # H and -H are the same homography
        mapped, w = -mapped, -w
    scale = np.abs(mapped[:, :2]).max() if mapped.size else 1.0
    if np.any(w <= 1e-12 * max(scale, 1.0)):
        return None
    xy = mapped[:, :2] / w[:, None]
    out = np.array([*xy.min(axis=0), *xy.max(axis=0)])
    if clip_to is not None:
        height, width = clip_to
        out = np.clip(out, 0.0, [width, height, width, height])
    return out.astype(np.float32)


def spatial_rerank(
    query_feats: LocalFeatures,
    db_feats_list: Sequence[LocalFeatures] | Mapping[int, LocalFeatures],
    ranks_row: np.ndarray,
    top_n: int = 100,
    min_inliers: int = 15,
    ratio: float = 0.8,
    method: str = "usac_magsac",
    reproj: float | None = None,
    model: str = "homography",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-rank the top of one query's ranking by spatial verification.

    The first ``top_n`` database images are verified against the query. Images with at least
    ``min_inliers`` inliers move to the front, by decreasing inlier count (ties keep their
    original order); all other images follow in their original order.

    Args:
        query_feats: local features of the query image.
        db_feats_list: database features indexed by database index (a list over the whole
            database, or a mapping holding at least the ``top_n`` shortlisted indices).
        ranks_row: (Ndb,) int database indices by decreasing similarity.
        top_n: number of top-ranked images to verify.
        min_inliers: inliers needed to count as verified.
        ratio: Lowe ratio for matching.
        method: robust estimator, as in `verify_pair`.
        reproj: inlier threshold in pixels, as in `verify_pair`.
        model: ``'homography'`` or ``'fundamental'``.

    Returns:
        (new_ranks_row (Ndb,) int64, inliers (n,) int64, boxes (n, 4) float32) with
        ``n = min(top_n, Ndb)``; inliers and boxes (inlier box in the database image, NaN when
        nothing was verified) are aligned with ``ranks_row[:n]``, i.e. the original order.
    """
    ranks_row = np.asarray(ranks_row)
    if ranks_row.ndim != 1 or not np.issubdtype(ranks_row.dtype, np.integer):
        raise ValueError(f"ranks_row: expected a (Ndb,) int array, got shape {ranks_row.shape} {ranks_row.dtype}")
    if isinstance(top_n, bool) or not isinstance(top_n, (int, np.integer)) or top_n < 0:
        raise ValueError(f"top_n: must be an int >= 0, got {top_n!r}")
    if min_inliers < 1:
        raise ValueError(f"min_inliers: must be >= 1, got {min_inliers}")
    ranks_row = ranks_row.astype(np.int64, copy=False)
    n = min(int(top_n), ranks_row.shape[0])
    inliers = np.zeros(n, np.int64)
    boxes = np.full((n, 4), np.nan, np.float32)
    for pos in range(n):
        idx = int(ranks_row[pos])
        try:
            feats = db_feats_list[idx]
        except (IndexError, KeyError):
            raise ValueError(f"db_feats_list: no features for database index {idx}") from None
        ver = verify_pair(query_feats, feats, ratio=ratio, method=method, reproj=reproj, model=model)
        inliers[pos] = ver.inliers
        if ver.inliers >= min_inliers and ver.box_b is not None:
            boxes[pos] = ver.box_b
    verified = np.flatnonzero(inliers >= min_inliers)
    verified = verified[np.argsort(-inliers[verified], kind="stable")]
    rest = np.ones(ranks_row.shape[0], bool)
    rest[verified] = False
    new_row = np.concatenate([ranks_row[verified], ranks_row[rest]])
    return new_row, inliers, boxes
