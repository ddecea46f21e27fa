"""Region-based re-ranking with localisation (Salvador et al. 2016, class-agnostic spatial re-ranking).

Regions are the R-MAC grid over the last conv map; each region is pooled by the model's own
head (so GeM stays GeM, whitening included), and a database image is scored by its region that
best matches the query. That region's box, mapped back to image pixels, localises the query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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
    """

    descriptors: np.ndarray
    boxes: np.ndarray


@torch.no_grad()
def region_descriptors(model: RetrievalNet, src: ImageSource, max_size: int = 512, levels: int = 3) -> RegionSet:
    """R-MAC grid regions of one image (whole image first), pooled by the model's head."""
    img = src if isinstance(src, Image.Image) else load_image(src)
    width, height = img.size
    x = prepare_image(img, None, max_size)[None]
    device = next(model.parameters()).device
    fmap = model.forward_features(model.normalize(x.to(device)))  # (1, C, h, w)
    h, w = fmap.shape[-2:]
    regions = rmac_regions(h, w, levels)
    vecs = torch.cat([l2n(model.head(fmap[:, :, y : y + rh, xx : xx + rw])) for y, xx, rh, rw in regions])
    sx, sy = width / w, height / h
    boxes = np.array([(xx * sx, y * sy, (xx + rw) * sx, (y + rh) * sy) for y, xx, rh, rw in regions], np.float32)
    return RegionSet(np.ascontiguousarray(vecs.float().cpu().numpy()), boxes)


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
