"""Views of three photos (scikit-image's astronaut, coffee, chelsea) for spatial verification tests."""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from skimage import data as skdata

SCENES = {"astronaut": skdata.astronaut, "coffee": skdata.coffee, "chelsea": skdata.chelsea}


def view_of(img: np.ndarray, v: int) -> np.ndarray:
    """View v of a photo: v=0 the photo itself, else a rotated, scaled, shifted, tilted copy."""
    if v == 0:
        return img
    h, w = img.shape[:2]
    angle, scale = 0.12 * v, 1.0 - 0.1 * v
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    H = np.array([[c, -s, 30.0 * v], [s, c, 10.0 * v], [1e-4 * v, 5e-5 * v, 1.0]])
    return cv2.warpPerspective(img, H, (w, h), borderValue=(127, 127, 127))


def write_views(folder: Path) -> tuple[dict[str, str], dict[str, str]]:
    """3 scenes x 3 views, about 300 px, as files: id -> path, and id -> scene."""
    paths, scene_of = {}, {}
    for scene, load in SCENES.items():
        base = np.asarray(Image.fromarray(load()).resize((320, 240) if scene != "astronaut" else (300, 300)))
        for v in range(3):
            image_id = f"{scene}_{v}"
            paths[image_id] = str(folder / f"{image_id}.png")
            Image.fromarray(view_of(base, v)).save(paths[image_id])
            scene_of[image_id] = scene
    return paths, scene_of


def all_pairs(ids) -> list[tuple[str, str]]:
    """Every unordered pair of ids, (smaller, larger), sorted."""
    return [(a, b) for a, b in itertools.combinations(sorted(ids), 2)]
