"""SIFT features of images at a bounded side, with an LRU cache: the one implementation used by
pair verification (mining), spatial re-ranking of benchmarks (evaluation) and of searches
(serving).

An image is decoded, optionally cropped to a box, shrunk to `max_side` and described once; the
cache keeps both coordinate frames of its keypoints: those of the shrunk image SIFT ran on
(mining verifies there) and those of the stored image (serving and evaluation localise there).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np

from raytrieval.retrieval.imageio import ImageSource, crop_box, load_image, resize_max
from raytrieval.retrieval.spatial import LocalFeatures, extract_local_features


@dataclass(frozen=True)
class ImageFeatures:
    """Local features of one (cropped) image.

    Args:
        shrunk: features with keypoints in pixels of the shrunk image SIFT ran on.
        stored: the same features with keypoints in pixels of the stored image (the crop's
            offset added) and `image_size` the stored image's (height, width).
        scale: stored (cropped) pixels per shrunk pixel.
    """

    shrunk: LocalFeatures
    stored: LocalFeatures
    scale: float


def image_features(src: ImageSource, box: Sequence[float] | None = None, max_side: int = 512,
                   max_features: int = 1000, root: bool = True) -> ImageFeatures:
    """Decode, crop to `box`, shrink to `max_side` and extract (Root)SIFT features.

    Raises:
        raytrieval.retrieval.imageio.ImageDecodeError: the image cannot be decoded.
        ValueError: the box is empty inside the image.
    """
    img = load_image(src)
    crop = crop_box(img, box) if box is not None else img
    small = resize_max(crop, max_side)
    scale = crop.size[0] / small.size[0]
    shrunk = extract_local_features(np.asarray(small), max_features, root=root)
    offset = np.array([round(box[0]), round(box[1])] if box is not None else (0, 0), np.float32)
    width, height = img.size
    stored = LocalFeatures(shrunk.keypoints * np.float32(scale) + offset, shrunk.descriptors, (height, width))
    return ImageFeatures(shrunk, stored, scale)


class FeatureCache:
    """LRU cache of `image_features` by a caller's key (thread-safe).

    Args:
        max_side: longer side images are shrunk to before SIFT.
        max_features: keypoints per image, strongest first.
        root: RootSIFT descriptors (else plain SIFT).
        capacity: images kept; None keeps every image.
    """

    def __init__(self, max_side: int = 512, max_features: int = 1000, root: bool = True,
                 capacity: int | None = 256) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity: must be >= 1 or None, got {capacity}")
        self.max_side = max_side
        self.max_features = max_features
        self.root = root
        self.capacity = capacity
        self.extracted = 0  # cache misses, for tests and benchmarks
        self._items: OrderedDict[Hashable, ImageFeatures] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable, src: ImageSource, box: Sequence[float] | None = None) -> ImageFeatures:
        """The features of image `src` (cropped to `box`), cached under `key`.

        Raises:
            raytrieval.retrieval.imageio.ImageDecodeError: the image cannot be decoded (nothing
                is cached, so a later call tries again).
        """
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        item = image_features(src, box, self.max_side, self.max_features, self.root)
        with self._lock:
            self.extracted += 1
            self._items[key] = item
            while self.capacity is not None and len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return item
