"""Region descriptors and region-based re-ranking with localisation (Salvador et al. 2016).

Two kinds of regions over the last conv map of the backbone:

- `region_descriptors`: the fixed R-MAC grid, each region pooled by the model's own head (so
  GeM stays GeM, whitening included); the `region` re-ranking step.
- `proposal_descriptors`: any boxes (learned proposals from `regions.parquet`, or the
  label-free default `grid_proposals`: the R-MAC grid plus multi-scale sliding boxes), pooled
  by RoIAlign (torchvision.ops.roi_align), then max-pooled (Salvador's region-wise RPA-max) or
  sum-pooled (RPA-sum) over the RoIAlign grid, L2-normalised; the `casr` re-ranking step.
  A max-pooled descriptor is monotone under box inclusion (a larger box only adds maxima), so
  the best-matching max-pooled proposal tends to shrink onto the most distinctive part of the
  object; sum pooling scores the whole extent (a pasted object's best proposal has IoU 0.76
  with RPA-sum, 0.50 with RPA-max), which is why CA-SR pools with 'sum' by default.

A database image is scored by its region that best matches the query. It is localised by
`similarity_box`: the query's cosine similarity to every conv cell, thresholded by Otsu's rule,
and the box of the connected cells around the peak (0.75 on the pasted object with either
pooling; on the demo, 81 % of the top-10 true positives get IoU >= 0.5, against 45 % for the
best proposal's box: benchmarks/regions.md). Without the cells (whitened descriptors) the best
proposal's box is returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from raytrieval.retrieval.extract import ImageSource, prepare_image
from raytrieval.retrieval.imageio import load_image
from raytrieval.retrieval.model import RetrievalNet
from raytrieval.retrieval.pooling import l2n, rmac_regions


@dataclass
class RegionSet:
    """Region descriptors of one image.

    Args:
        descriptors: (R, D) float32, L2-normalised.
        boxes: (R, 4) float32 (x0, y0, x1, y1) in pixels of the stored image.
        cells: (h, w, C) float16, the conv map's cells, each L2-normalised (what `similarity_box`
            localises on); None when the descriptors live in another space (e.g. whitened).
        image_size: (width, height) of the stored image, with `cells`.
    """

    descriptors: np.ndarray
    boxes: np.ndarray
    cells: np.ndarray | None = None
    image_size: tuple[int, int] | None = None


@torch.no_grad()
def feature_map(model: RetrievalNet, src: ImageSource, max_size: int = 512) -> tuple[torch.Tensor, tuple[int, int]]:
    """(last conv map (1, C, h, w) of the image shrunk to `max_size`, (width, height) of the stored image)."""
    img = src if isinstance(src, Image.Image) else load_image(src)
    x = prepare_image(img, None, max_size)[None]
    device = next(model.parameters()).device
    return model.forward_features(model.normalize(x.to(device))), img.size


@torch.no_grad()
def region_descriptors(model: RetrievalNet, src: ImageSource, max_size: int = 512, levels: int = 3) -> RegionSet:
    """R-MAC grid regions of one image (whole image first), pooled by the model's head."""
    fmap, (width, height) = feature_map(model, src, max_size)  # (1, C, h, w)
    h, w = fmap.shape[-2:]
    regions = rmac_regions(h, w, levels)
    vecs = torch.cat([l2n(model.head(fmap[:, :, y : y + rh, xx : xx + rw])) for y, xx, rh, rw in regions])
    sx, sy = width / w, height / h
    boxes = np.array([(xx * sx, y * sy, (xx + rw) * sx, (y + rh) * sy) for y, xx, rh, rw in regions], np.float32)
    return RegionSet(np.ascontiguousarray(vecs.float().cpu().numpy()), boxes)


REGION_POOLS = ("max", "sum")


def roi_pool(fmap: torch.Tensor, boxes: torch.Tensor, output_size: int | tuple[int, int] = 7,
             sampling_ratio: int = 1, pool: str = "max") -> torch.Tensor:
    """Region vectors: each box RoIAligned to an output grid, then max- or sum-pooled over it.

    Coordinates are continuous feature-map coordinates (`aligned=True`: cell j spans [j, j + 1)),
    so a box on cell borders with one bin per cell and one sample per bin (`sampling_ratio=1`)
    reads every cell exactly and gives the max (or mean) of that crop of the map.

    Args:
        fmap: (1, C, h, w) feature map.
        boxes: (R, 4) (x0, y0, x1, y1) in feature-map cells.
        output_size: RoIAlign grid per box.
        sampling_ratio: bilinear samples per bin side.
        pool: 'max' (RPA-max) or 'sum' (RPA-sum: the mean over the grid; equal after L2).

    Returns:
        (R, C) unnormalised region vectors.
    """
    from torchvision.ops import roi_align

    if pool not in REGION_POOLS:
        raise ValueError(f"pool: must be one of {REGION_POOLS}, got {pool!r}")
    if fmap.ndim != 4 or fmap.shape[0] != 1:
        raise ValueError(f"fmap: expected (1, C, h, w), got {tuple(fmap.shape)}")
    boxes = boxes.to(device=fmap.device, dtype=fmap.dtype).reshape(-1, 4)
    pooled = roi_align(fmap, [boxes], output_size, spatial_scale=1.0, sampling_ratio=sampling_ratio, aligned=True)
    return pooled.amax(dim=(-2, -1)) if pool == "max" else pooled.mean(dim=(-2, -1))  # (R, C)


def grid_proposals(h: int, w: int, fractions: Sequence[float] = (0.3, 0.45, 0.6, 0.8, 1.0),
                   levels: int = 3) -> np.ndarray:
    """Label-free default proposals over an h x w map: the R-MAC grid plus sliding boxes.

    Sliding boxes have every width and height among `fractions` of the map side (aspect, relative
    to the map's, within [1/2, 2]) at steps of a third of their size, the last one flush with
    the far border. All boxes lie on cell borders.

    Returns:
        (R, 4) float32 (x0, y0, x1, y1) in cells, unique, the whole map first.
    """
    boxes = [(x, y, x + rw, y + rh) for y, x, rh, rw in rmac_regions(h, w, levels)]
    sides_w = sorted({max(1, round(f * w)) for f in fractions})
    sides_h = sorted({max(1, round(f * h)) for f in fractions})

    def starts(side: int, total: int) -> list[int]:
        return sorted(set(range(0, total - side + 1, max(1, side // 3))) | {total - side})

    for bw in sides_w:
        for bh in sides_h:
            if not 0.5 <= (bw / w) / (bh / h) <= 2.0:
                continue
            boxes += [(x, y, x + bw, y + bh) for y in starts(bh, h) for x in starts(bw, w)]
    return np.array(list(dict.fromkeys(boxes)), np.float32).reshape(-1, 4)


@torch.no_grad()
def proposal_descriptors(
    model: RetrievalNet, src: ImageSource, boxes: np.ndarray | None = None, max_size: int = 512,
    output_size: int | tuple[int, int] = 7, sampling_ratio: int = 1, pool: str = "max",
) -> RegionSet:
    """RPA-max / RPA-sum descriptors of an image's proposals (RoIAlign on the backbone's last conv map).

    Args:
        model: the retrieval network (its backbone gives the map; the head is not used).
        src: the image.
        boxes: (R, 4) proposals in pixels of the stored image; None: `grid_proposals`.
        max_size: longer side the image is shrunk to before the backbone.
        output_size, sampling_ratio, pool: see `roi_pool`.

    Returns:
        The RegionSet: (R, C) L2-normalised descriptors, (R, 4) boxes in pixels.
    """
    fmap, (width, height) = feature_map(model, src, max_size)
    h, w = fmap.shape[-2:]
    to_cells = np.array([w / width, h / height, w / width, h / height], np.float32)
    if boxes is None:
        cells = grid_proposals(h, w)
        boxes = cells / to_cells
    else:
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        cells = boxes * to_cells
    vecs = l2n(roi_pool(fmap, torch.from_numpy(cells), output_size, sampling_ratio, pool))
    unit = l2n(fmap[0].permute(1, 2, 0)).to(torch.float16).cpu().numpy()  # (h, w, C)
    return RegionSet(np.ascontiguousarray(vecs.float().cpu().numpy()), np.ascontiguousarray(boxes, np.float32),
                     unit, (width, height))


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of a set of values: the split that maximises the between-class variance
    (exact, over every split of the sorted values); the value itself goes to the lower class."""
    v = np.sort(np.asarray(values, np.float64).ravel())
    if v.size < 2 or v[0] == v[-1]:
        return float(v[-1]) if v.size else 0.0
    n = v.size
    k = np.arange(1, n)  # size of the lower class
    low = np.cumsum(v)[:-1]
    mean_low, mean_high = low / k, (v.sum() - low) / (n - k)
    between = k * (n - k) * (mean_low - mean_high) ** 2
    between[v[:-1] == v[1:]] = -1.0  # no split between equal values
    return float(v[int(np.argmax(between))])


def similarity_box(regions: RegionSet, query: np.ndarray) -> np.ndarray:
    """Localise `query` (D,) in an image from its similarity map: the cosine similarity of every
    conv cell to the query, thresholded by Otsu's rule (no constant to tune), and the bounding box
    of the connected cells above it that hold the peak, in pixels of the stored image.

    Unlike a single best proposal, whose extent is limited to the proposal shapes (and which
    RPA-max shrinks onto the most distinctive part), the map follows the object's own extent.

    Raises:
        ValueError: the region set has no cells.
    """
    from scipy.ndimage import label

    if regions.cells is None or regions.image_size is None:
        raise ValueError("similarity_box: the region set has no conv cells")
    sims = regions.cells.astype(np.float32) @ np.asarray(query, np.float32)  # (h, w)
    h, w = sims.shape
    parts, _ = label(sims > otsu_threshold(sims))
    peak = np.unravel_index(int(np.argmax(sims)), sims.shape)
    ys, xs = np.nonzero(parts == parts[peak]) if parts[peak] else ([peak[0]], [peak[1]])
    width, height = regions.image_size
    sx, sy = width / w, height / h
    return np.array([min(xs) * sx, min(ys) * sy, (max(xs) + 1) * sx, (max(ys) + 1) * sy], np.float32)


def learned_rmac(proposals: RegionSet) -> np.ndarray:
    """R-MAC over learned regions (Gordo et al. 2016): the L2-normalised sum of the regions'
    max-pooled (RPA-max, `proposal_descriptors(..., pool="max")`) L2-normalised descriptors.
    Gordo's per-region PCA-whitening is left out (no labels to learn it from here).

    Returns:
        (D,) float32, L2-normalised.

    Raises:
        ValueError: no regions.
    """
    if len(proposals.descriptors) == 0:
        raise ValueError("learned_rmac: no regions")
    v = proposals.descriptors.sum(0)
    return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)


def region_rerank(
    query: np.ndarray, regions: Sequence[RegionSet], ranks_row: np.ndarray, top_n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-rank the top-N of one query by its best-matching region in each image.

    Args:
        query: (D,) query descriptor.
        regions: region sets of the images `ranks_row[:top_n]`, in that order.
        ranks_row: (Ndb,) the initial ranking.
        top_n: how many leading images to re-rank (the rest keep their order).

    Returns:
        (new ranks_row (Ndb,), best region score per re-ranked image (top_n,) in the new
        order, its box (top_n, 4) in the new order).
    """
    top_n = min(top_n, len(ranks_row))
    if len(regions) != top_n:
        raise ValueError(f"regions: {len(regions)} region sets for top_n={top_n}")
    scores = np.empty(top_n, np.float32)
    boxes = np.empty((top_n, 4), np.float32)
    for i, rs in enumerate(regions):
        sims = rs.descriptors @ query  # (R,)
        best = int(np.argmax(sims))
        scores[i], boxes[i] = sims[best], rs.boxes[best]
    order = np.argsort(-scores, kind="stable")
    new = np.concatenate([ranks_row[:top_n][order], ranks_row[top_n:]])
    return new, scores[order], boxes[order]


def best_regions(query: np.ndarray, regions: Sequence[RegionSet]) -> tuple[np.ndarray, np.ndarray]:
    """(best similarity (n,) float32, index of that region (n,) int64) of each region set to `query` (D,)."""
    scores = np.empty(len(regions), np.float32)
    best = np.empty(len(regions), np.int64)
    for i, rs in enumerate(regions):
        if len(rs.descriptors) == 0:
            raise ValueError(f"regions: region set {i} has no regions")
        sims = rs.descriptors @ query  # (R,)
        best[i] = int(np.argmax(sims))
        scores[i] = sims[best[i]]
    return scores, best


def casr_rerank(
    query: np.ndarray, regions: Sequence[RegionSet], ranks_row: np.ndarray, top_n: int,
    qe: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class-agnostic spatial re-ranking (CA-SR, Salvador et al. 2016) of one query's top N.

    Each of the top-N images is scored by its proposal most similar to the query. Its
    localisation is `similarity_box` of the (final) query where the region set has its conv
    cells, else that best proposal. With `qe`, query expansion follows the re-ranking: the query
    is expanded with the best proposals of the re-ranked list and the top N scored again.

    Args:
        query: (D,) query descriptor (pooled like the region descriptors).
        regions: region sets of the images `ranks_row[:top_n]`, in that order.
        ranks_row: (Ndb,) the filtering ranking.
        top_n: how many leading images to re-rank (the rest keep their order).
        qe: (query (D,), best region descriptors (n, D) by decreasing score) -> expanded query;
            None for no expansion.

    Returns:
        (new ranks_row (Ndb,), score per re-ranked image (top_n,) and its box (top_n, 4), both in
        the new order).
    """
    top_n = min(top_n, len(ranks_row))
    if len(regions) != top_n:
        raise ValueError(f"regions: {len(regions)} region sets for top_n={top_n}")
    scores, best = best_regions(query, regions)
    if qe is not None:
        order = np.argsort(-scores, kind="stable")
        found = np.stack([regions[i].descriptors[best[i]] for i in order])  # (top_n, D)
        query = qe(query, found)
        scores, best = best_regions(query, regions)
    order = np.argsort(-scores, kind="stable")
    boxes = np.stack([similarity_box(regions[i], query) if regions[i].cells is not None else regions[i].boxes[best[i]]
                      for i in order]).astype(np.float32).reshape(-1, 4)
    new = np.concatenate([ranks_row[:top_n][order], ranks_row[top_n:]])
    return new, scores[order], boxes
