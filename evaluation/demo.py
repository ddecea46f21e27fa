"""The embedded demo collection: a small retrieval benchmark built from photos inside wheels.

Nothing is downloaded: the photos are those shipped in scikit-image (``skimage.data``) and
scikit-learn (``load_sample_images``); the faint retina and moon photos are used with their
local contrast enhanced. Each *scene* is a region of one of them (a face, a pagoda, a gland, a
patch of deep field, ...). A database *view* of a scene is the region seen as a planar object
by another camera: perspective warp (yaw, pitch, roll), scale, position (possibly partly out
of frame), on an out-of-focus background, with clutter and occluders (boxes or blobs), under
its own lighting (gamma, gain, contrast) and camera (white balance cast, blur, noise, JPEG
quality). ``stereo_motorcycle`` is a real two-view pair: one view of the motorcycle scene
shows the other camera's image. *Distractors* are built the same way around an object of
their own: a tile of a photo region that no scene uses (:func:`distractor_tiles`), one
distractor per tile.

Nothing is shared between pictures but the scene itself: every background, clutter patch and
occluder is a texture (colour field, shapes, grain) drawn by the picture's own generator, and
``pasted`` in ``demo.json`` records for every picture what went into it (the key of each
texture, the photo region of its object), so that a test can check that no two scenes share
any of it. Shared backgrounds would let spatial verification link different scenes.

Ground truth follows revisitop and is decided from the generated parameters (all recorded in
``demo.json``): a view is ``junk`` when under 25% of the object is visible (out of frame or
occluded) or the visible part covers under 1.2% of the image; ``hard`` when under 60% is
visible, a quarter or more of its in-frame part is occluded, the plane is tilted (yaw or
pitch) 30 degrees or more, rolled 20 degrees or more, small (scale under 0.4 of the largest
size that fits) or strongly lit; otherwise ``easy``. Queries are separate, mildly transformed
views stored whole with a box ``bbx`` around the visible object.

Layout (Revisited Oxford/Paris, readable by ``raytrieval.evaluation.datasets.load_benchmark('demo',
out_root)``)::

    <out_root>/demo/jpg/<name>.jpg
    <out_root>/demo/gnd_demo.json   imlist, qimlist, gnd[i] = {bbx, easy, hard, junk}
    <out_root>/demo/demo.json       version, seed, config, scenes, per-image parameters

Generation is deterministic: every image draws from its own ``numpy`` Generator seeded by
``(seed, kind, scene, view)``, JPEG qualities come from that Generator, and nothing depends on
time, threads or file-system order; the same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

__all__ = [
    "DEMO_NAME",
    "DEMO_VERSION",
    "SCENES",
    "DISTRACTOR_REGIONS",
    "distractor_tiles",
    "load_sources",
    "plane_quad",
    "classify_view",
    "generate_demo",
    "main",
]

DEMO_NAME = "demo"
DEMO_VERSION = 2

Box = tuple[int, int, int, int]

# Scenes: (name, source photo, region (x0, y0, x1, y1) in source pixels). Regions taken from
# the same photo do not overlap each other nor any distractor region.
SCENES: tuple[tuple[str, str, Box], ...] = (
    ("astronaut_face", "astronaut", (110, 0, 340, 250)),
    ("astronaut_shuttle", "astronaut", (345, 0, 490, 255)),
    ("astronaut_helmet", "astronaut", (100, 260, 512, 512)),
    ("cat", "chelsea", (0, 0, 451, 300)),
    ("coffee", "coffee", (40, 0, 520, 400)),
    ("rocket", "rocket", (170, 0, 470, 427)),
    ("deep_field_nw", "hubble_deep_field", (0, 0, 420, 380)),
    ("deep_field_se", "hubble_deep_field", (560, 470, 1000, 872)),
    ("gland_top", "immunohistochemistry", (0, 0, 300, 300)),
    ("gland_round", "immunohistochemistry", (200, 300, 470, 512)),
    ("retina_disc", "retina", (50, 430, 500, 880)),
    ("retina_fovea", "retina", (520, 480, 920, 880)),
    ("retina_vessels", "retina", (350, 60, 900, 420)),
    ("pagoda", "china", (50, 0, 340, 380)),
    ("lake_shore", "china", (340, 80, 640, 427)),
    ("dahlia", "flower", (150, 60, 470, 380)),
    ("motorcycle", "stereo_left", (0, 0, 741, 500)),
    ("cameraman", "camera", (0, 40, 350, 512)),
    ("coins", "coins", (0, 0, 384, 303)),
    ("moon", "moon", (0, 0, 512, 512)),
    ("cells", "cell", (0, 0, 550, 330)),
    ("text", "text", (0, 0, 448, 172)),
    ("page", "page", (0, 0, 384, 191)),
)

# Regions that belong to no scene: backgrounds, clutter, occluders and distractor objects.
DISTRACTOR_REGIONS: tuple[tuple[str, str, Box], ...] = (
    ("flag", "astronaut", (0, 0, 90, 420)),
    ("tower_left", "rocket", (0, 0, 165, 427)),
    ("tower_right", "rocket", (475, 0, 640, 427)),
    ("deep_field_ne", "hubble_deep_field", (560, 0, 1000, 420)),
    ("deep_field_sw", "hubble_deep_field", (0, 480, 480, 872)),
    ("gland_ne", "immunohistochemistry", (300, 0, 512, 290)),
    ("gland_sw", "immunohistochemistry", (0, 310, 190, 512)),
    ("retina_bottom", "retina", (300, 950, 1100, 1320)),
    ("leaves_left", "flower", (0, 0, 150, 427)),
    ("leaves_right", "flower", (480, 0, 640, 380)),
    ("skyline", "camera", (350, 0, 512, 330)),
    ("cell", "cell", (0, 340, 550, 660)),
    ("grass", "grass", (0, 0, 512, 512)),
    ("gravel", "gravel", (0, 0, 512, 512)),
)
_TEXTURES = frozenset({"cell", "grass", "gravel"})  # grey: tinted when used
_FLAT = ("retina", "moon")  # photos shown with their local contrast enhanced
_TILE = 150  # distractor regions are cut into tiles of about this side, one per distractor

# Output image sizes (width, height): longer side 480-640 px like the real benchmarks.
_CANVAS_SIZES: tuple[tuple[int, int], ...] = (
    (640, 480), (480, 640), (600, 450), (512, 512), (640, 427), (427, 640), (560, 420),
    (448, 600),
)

# Ground-truth thresholds on the generated parameters (see the module docstring).
JUNK_VISIBLE = 0.25
JUNK_AREA = 0.012
HARD_VISIBLE = 0.6
HARD_OCCLUDED = 0.25
HARD_TILT = 30.0
HARD_ROLL = 20.0
HARD_SCALE = 0.4

_FOCAL = 1.6  # focal length of the virtual camera, in units of the object's longer side


# --------------------------------------------------------------------------------------------
# sources


def load_sources() -> dict[str, np.ndarray]:
    """Load the photos the collection is built from (no download).

    Returns:
        Source name -> (H, W, 3) float32 RGB image in [0, 1].

    Raises:
        RuntimeError: a photo cannot be read from the installed wheels.
    """
    try:
        import skimage.data as skd
        from sklearn.datasets import load_sample_images
    except ImportError as exc:  # pragma: no cover - both are project dependencies
        raise RuntimeError("the demo collection needs scikit-image and scikit-learn: "
                           "pip install scikit-image scikit-learn") from exc

    def rgb(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        return np.ascontiguousarray(a[:, :, :3], dtype=np.float32) / 255.0

    names = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
             "immunohistochemistry", "retina", "camera", "coins", "moon", "text", "page",
             "cell", "grass", "gravel")
    out: dict[str, np.ndarray] = {}
    try:
        for name in names:
            out[name] = rgb(getattr(skd, name)())
        left, right, _ = skd.stereo_motorcycle()
        out["stereo_left"], out["stereo_right"] = rgb(left), rgb(right)
        sample = load_sample_images()
        for fname, img in zip(sample.filenames, sample.images):
            out[Path(fname).stem] = rgb(img)  # china, flower
        for name in _FLAT:
            out[name] = _local_contrast(out[name])
    except Exception as exc:
        raise RuntimeError(f"cannot read a demo source photo from the installed wheels: {exc}"
                           ) from exc
    return out


def _local_contrast(img: np.ndarray) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of the lightness (a fixed edit of a
    photo whose structure is too faint for local features, like an enhanced fundus image)."""
    lab = cv2.cvtColor(np.rint(img * 255).astype(np.uint8), cv2.COLOR_RGB2LAB)
    lab[:, :, 0] = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(8, 8)).apply(lab[:, :, 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB).astype(np.float32) / 255.0


def distractor_tiles() -> list[tuple[str, str, Box]]:
    """The distractor objects: each of :data:`DISTRACTOR_REGIONS` cut into a grid of disjoint
    tiles of about ``_TILE`` pixels; a tile is the object of at most one distractor."""
    tiles = []
    for name, source, (x0, y0, x1, y1) in DISTRACTOR_REGIONS:
        nx, ny = max(1, round((x1 - x0) / _TILE)), max(1, round((y1 - y0) / _TILE))
        xs, ys = np.linspace(x0, x1, nx + 1).astype(int), np.linspace(y0, y1, ny + 1).astype(int)
        tiles += [(f"{name}_{i}{j}", source, (int(xs[i]), int(ys[j]), int(xs[i + 1]), int(ys[j + 1])))
                  for j in range(ny) for i in range(nx)]
    return tiles


def _region(sources: dict[str, np.ndarray], source: str, box: Box) -> np.ndarray:
    x0, y0, x1, y1 = box
    img = sources[source]
    if not (0 <= x0 < x1 <= img.shape[1] and 0 <= y0 < y1 <= img.shape[0]):
        raise ValueError(f"region {box} is outside source {source!r} of shape {img.shape}")
    return img[y0:y1, x0:x1]


# --------------------------------------------------------------------------------------------
# geometry


def plane_quad(width: float, height: float, yaw: float, pitch: float, roll: float,
               focal: float = _FOCAL) -> np.ndarray:
    """Corners of a planar rectangle seen by a pinhole camera after a 3-D rotation.

    The rectangle is centred at the origin, its longer side has length 1, it is rotated by
    ``pitch`` about x, ``yaw`` about y, ``roll`` about the optical axis (degrees), and viewed
    from distance ``focal`` with focal length ``focal`` (so an unrotated plane keeps its size).

    Args:
        width: rectangle width (any unit; only the aspect ratio matters).
        height: rectangle height.
        yaw: rotation about the vertical axis, degrees.
        pitch: rotation about the horizontal axis, degrees.
        roll: in-plane rotation, degrees.
        focal: camera distance and focal length.

    Returns:
        (4, 2) float64 image coordinates of the corners (top-left, top-right, bottom-right,
        bottom-left), not centred.
    """
    s = max(width, height)
    w, h = width / s, height / s
    pts = np.array([[-w / 2, -h / 2, 0.0], [w / 2, -h / 2, 0.0], [w / 2, h / 2, 0.0],
                    [-w / 2, h / 2, 0.0]])  # (4, 3)
    a, b, c = np.deg2rad([pitch, yaw, roll])
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    q = pts @ (rz @ ry @ rx).T  # (4, 3)
    return focal * q[:, :2] / (q[:, 2:3] + focal)


def _polygon_area(quad: np.ndarray) -> float:
    x, y = quad[:, 0], quad[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _warp(obj: np.ndarray, quad: np.ndarray, size: tuple[int, int]
          ) -> tuple[np.ndarray, np.ndarray]:
    """Warp `obj` (h, w, 3) onto `quad` in a canvas of `size` (W, H); returns image and mask."""
    h, w = obj.shape[:2]
    extent = np.ptp(quad, axis=0).max()
    shrink = extent / max(w, h)
    if shrink < 0.7:  # pre-shrink with area averaging so the warp does not alias
        nw, nh = max(2, round(w * shrink * 1.2)), max(2, round(h * shrink * 1.2))
        obj = cv2.resize(obj, (nw, nh), interpolation=cv2.INTER_AREA)
        h, w = nh, nw
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float32)
    m = cv2.getPerspectiveTransform(src, quad.astype(np.float32))
    flags = cv2.INTER_LINEAR
    img = cv2.warpPerspective(obj, m, size, flags=flags, borderMode=cv2.BORDER_CONSTANT)
    mask = cv2.warpPerspective(np.ones((h, w), np.float32), m, size, flags=flags,
                               borderMode=cv2.BORDER_CONSTANT)
    return img, np.clip(mask, 0.0, 1.0)


def _fit_quad(rng: np.random.Generator, quad: np.ndarray, size: tuple[int, int], scale: float,
              inside: float) -> np.ndarray:
    """Scale `quad` to `scale` of the largest size that fits `size` and place it so that about
    `inside` of its bounding box lies in the frame (1: fully inside, centre drawn at random)."""
    W, H = size
    quad = quad - quad.min(axis=0)
    bw, bh = quad.max(axis=0)
    k = scale * min(W / bw, H / bh)
    quad = quad * k
    bw, bh = bw * k, bh * k
    x0 = rng.uniform(0.0, W - bw)
    y0 = rng.uniform(0.0, H - bh)
    if inside < 1.0:
        if rng.random() < 0.5:  # cut on the left or the right
            x0 = W - inside * bw if rng.random() < 0.5 else inside * bw - bw
        else:
            y0 = H - inside * bh if rng.random() < 0.5 else inside * bh - bh
    return quad + np.array([x0, y0])


# --------------------------------------------------------------------------------------------
# photometry


def _tint(rng: np.random.Generator, img: np.ndarray, amount: float) -> np.ndarray:
    gains = 1.0 + rng.uniform(-amount, amount, size=3).astype(np.float32)
    return img * gains


def _relight(img: np.ndarray, gamma: float, gain: Sequence[float], contrast: float) -> np.ndarray:
    out = np.power(np.clip(img, 0.0, 1.0), gamma) * np.asarray(gain, np.float32)
    mean = out.mean(axis=(0, 1), keepdims=True)
    return np.clip(mean + contrast * (out - mean), 0.0, 1.0)


def _light_params(rng: np.random.Generator, strong: bool) -> dict[str, Any]:
    """Object lighting and camera parameters; `strong` draws a hard lighting change."""
    if strong:
        gamma = float(rng.choice([rng.uniform(0.45, 0.6), rng.uniform(1.7, 2.2)]))
        cast, contrast = 0.25, float(rng.uniform(0.6, 0.8))
        noise, blur = float(rng.uniform(0.015, 0.03)), float(rng.uniform(0.6, 1.3))
        quality = int(rng.integers(50, 70))
    else:
        gamma = float(rng.uniform(0.8, 1.25))
        cast, contrast = 0.08, float(rng.uniform(0.85, 1.15))
        noise, blur = float(rng.uniform(0.0, 0.015)), float(rng.uniform(0.0, 0.7))
        quality = int(rng.integers(75, 96))
    return {
        "gamma": gamma,
        "gain": [float(g) for g in 1.0 + rng.uniform(-cast, cast, size=3)],
        "contrast": contrast,
        "white_balance": [float(g) for g in 1.0 + rng.uniform(-cast / 2, cast / 2, size=3)],
        "noise": noise,
        "blur": blur,
        "jpeg_quality": quality,
        "strong_light": bool(strong),
    }


def _camera(rng: np.random.Generator, img: np.ndarray, light: dict[str, Any]) -> np.ndarray:
    """White balance, blur and sensor noise of the whole picture; returns uint8."""
    img = img * np.asarray(light["white_balance"], np.float32)
    if light["blur"] > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), light["blur"])
    if light["noise"] > 0:
        noise = rng.standard_normal((img.shape[0], img.shape[1], 1), dtype=np.float32)
        img = img + light["noise"] * noise  # luminance noise
    return np.clip(np.rint(np.clip(img, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# composition


def _texture(rng: np.random.Generator, size: tuple[int, int], focus: float = 1.0) -> np.ndarray:
    """A picture no other image shares, drawn from `rng`: a smooth colour field,
    8-24 shapes (boxes, discs, strokes) and faint grain, colours muted, blurred by `focus`
    times 0.5-2 px (a background is out of focus); (H, W, 3)."""
    W, H = size
    gw, gh = int(rng.integers(2, 7)), int(rng.integers(2, 7))
    base = cv2.resize(rng.uniform(0.05, 0.95, (gh, gw, 3)).astype(np.float32), (W, H),
                      interpolation=cv2.INTER_CUBIC)
    img = np.ascontiguousarray(base)
    for _ in range(int(rng.integers(8, 25))):
        colour = tuple(float(c) for c in rng.uniform(0.0, 1.0, 3))
        x, y = int(rng.integers(0, W)), int(rng.integers(0, H))
        r = int(rng.uniform(0.03, 0.25) * max(W, H))
        kind = int(rng.integers(3))
        if kind == 0:  # a box at any angle
            box = cv2.boxPoints(((x, y), (2 * r, r * rng.uniform(0.3, 1.0)), rng.uniform(0, 180)))
            cv2.fillPoly(img, [np.rint(box).astype(np.int32)], colour)
        elif kind == 1:
            cv2.ellipse(img, (x, y), (r, max(2, int(r * rng.uniform(0.3, 1.0)))),
                        float(rng.uniform(0, 180)), 0, 360, colour, -1)
        else:
            pts = (np.array([[x, y]]) + rng.integers(-r, r + 1, (int(rng.integers(3, 7)), 2)))
            cv2.polylines(img, [pts.astype(np.int32)], False, colour, int(rng.integers(1, 6)))
    # grain over everything at a random cell size (never a regular pattern: no stripes or
    # tiles, which would match between pictures)
    cell = float(rng.uniform(3.0, 12.0))
    grain = rng.standard_normal((max(2, int(H / cell)), max(2, int(W / cell)), 1)
                                ).astype(np.float32)
    img = img + float(rng.uniform(0.01, 0.04)) * cv2.resize(
        grain, (W, H), interpolation=cv2.INTER_CUBIC)[:, :, None]
    img = cv2.GaussianBlur(img, (0, 0), focus * float(rng.uniform(0.5, 2.0)))
    grey = img.mean(axis=2, keepdims=True)  # muted colours, like a photo's context
    return np.clip(grey + float(rng.uniform(0.25, 0.6)) * (img - grey), 0.0, 1.0
                   ).astype(np.float32)


def _blob(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A soft random star-shaped mask covering most of a (h, w) box (an occluder's outline)."""
    t = np.linspace(0.0, 2 * np.pi, 48, endpoint=False)
    radius = 1.0 + sum(rng.uniform(-0.25, 0.25) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
                       for k in range(1, 5))
    pts = np.stack([w / 2 * (1 + 0.95 * radius / radius.max() * np.cos(t)),
                    h / 2 * (1 + 0.95 * radius / radius.max() * np.sin(t))], axis=1)
    mask = np.zeros((h, w), np.float32)
    cv2.fillPoly(mask, [np.rint(pts).astype(np.int32)], 1.0)
    return cv2.GaussianBlur(mask, (0, 0), 1.0)


def _paste_patch(rng: np.random.Generator, canvas: np.ndarray, scale: float,
                 centre: tuple[float, float] | None = None) -> np.ndarray:
    """Paste a new texture of its own (box or blob shaped) under a perspective warp, `scale`
    of the canvas's longer side; returns its mask."""
    H, W = canvas.shape[:2]
    side = max(16, int(scale * max(W, H)))
    w, h = side, max(16, int(side * rng.uniform(0.5, 1.5)))
    patch = _texture(rng, (w, h))
    quad = plane_quad(w, h, rng.uniform(-25, 25), rng.uniform(-25, 25), rng.uniform(-15, 15))
    quad = quad - quad.min(axis=0)
    quad *= side / np.ptp(quad, axis=0).max()
    cx, cy = centre if centre is not None else (rng.uniform(0, W), rng.uniform(0, H))
    quad += np.array([cx, cy]) - quad.mean(axis=0)
    img, mask = _warp(patch, quad, (W, H))
    if rng.random() < 0.5:
        blob = _blob(rng, w, h)
        mask = mask * _warp(np.repeat(blob[:, :, None], 3, 2), quad, (W, H))[0][:, :, 0]
    m = mask[:, :, None]
    canvas[:] = canvas * (1.0 - m) + img * m
    return mask


def _render(rng: np.random.Generator, obj: np.ndarray | None, plan: dict[str, Any]
            ) -> tuple[np.ndarray, dict[str, Any]]:
    """Compose one picture from a plan; returns the uint8 image and its recorded parameters.

    Background, clutter and occluders are textures drawn by `rng`, which belongs to this
    picture alone: ``pasted`` records each of them with the key of its generator, so no two
    pictures share any of them (``object`` is the only photo region in a picture).
    """
    size = _CANVAS_SIZES[int(rng.integers(len(_CANVAS_SIZES)))]
    if "canvas_scale" in plan:  # a smaller picture (the scaled-up collections of `synthetic`)
        size = (round(size[0] * plan["canvas_scale"]), round(size[1] * plan["canvas_scale"]))
    W, H = size
    key = plan["key"]
    canvas = _texture(rng, size, focus=2.0)
    pasted: list[dict[str, Any]] = [{"role": "background", "source": "texture", "key": key}]
    for c in range(plan["clutter"]):
        _paste_patch(rng, canvas, float(rng.uniform(0.2, 0.45)))
        pasted.append({"role": "clutter", "source": "texture", "key": f"{key}/clutter{c}"})
    rec: dict[str, Any] = {"width": W, "height": H}
    light = _light_params(rng, plan["strong_light"])
    if obj is None:
        canvas = canvas * np.asarray(light["gain"], np.float32)
        rec.update(light=light, pasted=pasted)
        return _camera(rng, canvas, light), rec

    h, w = obj.shape[:2]
    quad = plane_quad(w, h, plan["yaw"], plan["pitch"], plan["roll"])
    quad = _fit_quad(rng, quad, size, plan["scale"], plan["inside"])
    lit = _relight(obj, light["gamma"], light["gain"], light["contrast"])
    img, mask = _warp(lit, quad, size)
    m = mask[:, :, None]
    canvas = canvas * (1.0 - m) + img * m
    pasted.append({"role": "object", **plan["object"]})
    full_area = _polygon_area(quad)
    in_frame = float(mask.sum())

    occ = np.zeros((H, W), np.float32)
    target = plan["occlusion"]
    ys, xs = np.nonzero(mask > 0.5)
    while target > 0 and len(pasted) < 12 and xs.size:
        covered = float((mask * occ).sum()) / max(in_frame, 1.0)
        if covered >= target:
            break
        i = int(rng.integers(xs.size))
        need = max(target - covered, 0.04) * in_frame * 1.6
        scale = min(math.sqrt(need) / max(W, H), 0.9)
        occ = np.maximum(occ, _paste_patch(rng, canvas, scale, (float(xs[i]), float(ys[i]))))
        n_occ = sum(p["role"] == "occluder" for p in pasted)
        pasted.append({"role": "occluder", "source": "texture", "key": f"{key}/occluder{n_occ}"})

    visible = float((mask * (1.0 - occ)).sum())
    ys, xs = np.nonzero(mask * (1.0 - occ) > 0.5)
    bbx = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if xs.size else None
    rec.update(
        yaw=plan["yaw"], pitch=plan["pitch"], roll=plan["roll"], scale=plan["scale"],
        quad=np.round(quad, 1).tolist(),
        in_frame=min(in_frame / full_area, 1.0),  # the mask's soft edge can add a little
        occluded=1.0 - visible / max(in_frame, 1.0),
        visible=min(visible / full_area, in_frame / full_area, 1.0),
        area=visible / (W * H),
        bbx=bbx, light=light, pasted=pasted,
    )
    return _camera(rng, canvas, light), rec


def classify_view(rec: dict[str, Any]) -> str:
    """Ground-truth label of a view from its recorded parameters.

    Args:
        rec: the parameters of one view (``visible``, ``occluded``, ``area``, ``yaw``,
            ``pitch``, ``roll``, ``scale``, ``light['strong_light']``).

    Returns:
        ``'junk'``, ``'hard'`` or ``'easy'`` (thresholds in the module docstring).
    """
    if rec["visible"] < JUNK_VISIBLE or rec["area"] < JUNK_AREA:
        return "junk"
    if (rec["visible"] < HARD_VISIBLE or rec["occluded"] >= HARD_OCCLUDED
            or max(abs(rec["yaw"]), abs(rec["pitch"])) >= HARD_TILT
            or abs(rec["roll"]) >= HARD_ROLL or rec["scale"] < HARD_SCALE
            or rec["light"]["strong_light"]):
        return "hard"
    return "easy"


def _plan(rng: np.random.Generator, level: str) -> dict[str, Any]:
    """Draw the transform plan of a view of the given intended level."""
    plan: dict[str, Any] = {
        "yaw": float(rng.uniform(-18, 18)), "pitch": float(rng.uniform(-15, 15)),
        "roll": float(rng.uniform(-6, 6)), "scale": float(rng.uniform(0.55, 0.9)),
        "inside": 1.0, "occlusion": 0.0, "strong_light": False,
        "clutter": int(rng.random() < 0.4),
    }
    if level == "easy":
        if rng.random() < 0.4:
            plan["occlusion"] = float(rng.uniform(0.04, 0.12))
    elif level == "query":
        plan.update(yaw=float(rng.uniform(-12, 12)), pitch=float(rng.uniform(-10, 10)),
                    roll=float(rng.uniform(-4, 4)), scale=float(rng.uniform(0.5, 0.75)))
    elif level == "hard":
        # one (sometimes two) strong changes out of five, the rest mild
        for change in rng.choice(5, size=1 + int(rng.random() < 0.3), replace=False):
            if change == 0:
                sign = rng.choice([-1.0, 1.0], size=2)
                plan.update(yaw=float(sign[0] * rng.uniform(35, 60)),
                            pitch=float(sign[1] * rng.uniform(0, 45)),
                            roll=float(rng.uniform(-25, 25)))
            elif change == 1:
                plan["scale"] = float(rng.uniform(0.26, 0.38))
            elif change == 2:
                plan["inside"] = float(rng.uniform(0.4, 0.62))
            elif change == 3:
                plan["occlusion"] = float(rng.uniform(0.3, 0.5))
            else:
                plan["strong_light"] = True
    elif level == "junk":
        mode = int(rng.integers(3))
        if mode == 0:
            plan["scale"] = float(rng.uniform(0.06, 0.1))
        elif mode == 1:
            plan["inside"] = float(rng.uniform(0.06, 0.18))
        else:
            plan["occlusion"] = float(rng.uniform(0.85, 0.95))
    else:
        raise ValueError(f"level must be easy, hard, junk or query, got {level!r}")
    return plan


def _levels(rng: np.random.Generator, n: int) -> list[str]:
    n_junk = max(1, round(0.1 * n))
    n_easy = round(0.4 * n)
    levels = ["easy"] * n_easy + ["hard"] * (n - n_easy - n_junk) + ["junk"] * n_junk
    return [levels[i] for i in rng.permutation(n)]


# --------------------------------------------------------------------------------------------
# the collection


def _config(n_scenes: int, views_per_scene: int, queries_per_scene: int,
            n_distractors: int) -> dict[str, int]:
    if not 1 <= n_scenes <= len(SCENES):
        raise ValueError(f"n_scenes must be in [1, {len(SCENES)}], got {n_scenes}")
    if views_per_scene < 2:
        raise ValueError(f"views_per_scene must be at least 2, got {views_per_scene}")
    if queries_per_scene < 1:
        raise ValueError(f"queries_per_scene must be at least 1, got {queries_per_scene}")
    if n_distractors < 0:
        raise ValueError(f"n_distractors must be non-negative, got {n_distractors}")
    return {"n_scenes": n_scenes, "views_per_scene": views_per_scene,
            "queries_per_scene": queries_per_scene, "n_distractors": n_distractors}


def _rounded(obj: Any) -> Any:
    """Round floats for a stable, readable JSON record."""
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v) for v in obj]
    return obj


def _save_jpeg(path: Path, img: np.ndarray, quality: int) -> None:
    Image.fromarray(img).save(path, format="JPEG", quality=int(quality), optimize=False,
                              progressive=False, subsampling=2)


def _write_collection(folder: Path, seed: int, config: dict[str, int]) -> None:
    """Generate every image and both JSON files into `folder` (which exists and is empty)."""
    sources = load_sources()
    jpg = folder / "jpg"
    jpg.mkdir()
    db: list[tuple[np.ndarray, dict[str, Any]]] = []
    queries: list[tuple[np.ndarray, dict[str, Any]]] = []
    scenes_meta = []
    for s, (name, source, box) in enumerate(SCENES[:config["n_scenes"]]):
        obj = np.ascontiguousarray(_region(sources, source, box))
        levels = _levels(np.random.default_rng([seed, 0, s]), config["views_per_scene"])
        second_view = levels.index("easy") if "easy" in levels else 0
        for v, level in enumerate(levels):
            rng = np.random.default_rng([seed, 1, s, v])
            view_obj, view_source = obj, source
            rec: dict[str, Any] = {"kind": "view", "scene": name, "level": level}
            if source == "stereo_left" and v == second_view:  # the real second camera
                view_source = "stereo_right"
                view_obj = np.ascontiguousarray(_region(sources, view_source, box))
                rec["source"] = view_source
            plan = {**_plan(rng, level), "key": f"view/{s}/{v}",
                    "object": {"source": view_source, "region": list(box)}}
            img, params = _render(rng, view_obj, plan)
            rec = _rounded({**rec, **params})  # label what demo.json records
            rec["category"] = classify_view(rec)
            db.append((img, rec))
        for q in range(config["queries_per_scene"]):
            rng = np.random.default_rng([seed, 2, s, q])
            plan = {**_plan(rng, "query"), "key": f"query/{s}/{q}",
                    "object": {"source": source, "region": list(box)}}
            img, params = _render(rng, obj, plan)
            queries.append((img, {"kind": "query", "scene": name, **params}))
        scenes_meta.append({"name": name, "source": source, "region": list(box)})
    tiles = distractor_tiles()
    tile_order = np.random.default_rng([seed, 5]).permutation(len(tiles))
    for d in range(config["n_distractors"]):
        rng = np.random.default_rng([seed, 3, d])
        plan = {**_plan(rng, "easy"), "key": f"distractor/{d}",
                "strong_light": bool(rng.random() < 0.25)}
        tile_obj = None
        if d < len(tiles):  # an object of its own; beyond the tiles, texture only
            tile, tile_source, tile_box = tiles[int(tile_order[d])]
            tile_obj = np.ascontiguousarray(_region(sources, tile_source, tile_box))
            if tile_source in _TEXTURES:
                tile_obj = _tint(rng, tile_obj, 0.35)
            plan["object"] = {"source": tile_source, "region": list(tile_box), "tile": tile}
        else:
            plan["clutter"] += 2
        img, params = _render(rng, tile_obj, plan)
        db.append((img, {"kind": "distractor", **params}))

    # Shuffle the database so that index order and names say nothing about scenes.
    order = np.random.default_rng([seed, 4]).permutation(len(db))
    imlist = [f"img_{i:04d}" for i in range(len(db))]
    records: dict[str, Any] = {}
    by_scene: dict[str, dict[str, list[int]]] = {m["name"]: {"easy": [], "hard": [], "junk": []}
                                                for m in scenes_meta}
    for new, old in enumerate(order):
        img, rec = db[int(old)]
        _save_jpeg(jpg / f"{imlist[new]}.jpg", img, rec["light"]["jpeg_quality"])
        records[imlist[new]] = rec
        if rec["kind"] == "view":
            by_scene[rec["scene"]][rec["category"]].append(new)
    qimlist = [f"query_{j:03d}" for j in range(len(queries))]
    gnd = []
    for qname, (img, rec) in zip(qimlist, queries):
        _save_jpeg(jpg / f"{qname}.jpg", img, rec["light"]["jpeg_quality"])
        records[qname] = rec
        gnd.append({"bbx": rec["bbx"], **by_scene[rec["scene"]]})
    for m in scenes_meta:
        m["views"] = [n for n in imlist if records[n]["kind"] == "view"
                      and records[n]["scene"] == m["name"]]
        m["queries"] = [n for n in qimlist if records[n]["scene"] == m["name"]]
        m.update({k: len(v) for k, v in by_scene[m["name"]].items()})

    gnd_doc = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    (folder / f"gnd_{DEMO_NAME}.json").write_text(json.dumps(gnd_doc) + "\n", encoding="utf-8")
    meta = {
        "version": DEMO_VERSION, "seed": seed, "config": config,
        "thresholds": {"junk_visible": JUNK_VISIBLE, "junk_area": JUNK_AREA,
                       "hard_visible": HARD_VISIBLE, "hard_occluded": HARD_OCCLUDED,
                       "hard_tilt": HARD_TILT,
                       "hard_roll": HARD_ROLL, "hard_scale": HARD_SCALE},
        "scenes": scenes_meta,
        "distractors": [n for n in imlist if records[n]["kind"] == "distractor"],
        "images": _rounded(records),
    }
    (folder / "demo.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n",
                                      encoding="utf-8")


def _is_current(folder: Path, seed: int, config: dict[str, int]) -> bool:
    try:
        meta = json.loads((folder / "demo.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not (isinstance(meta, dict) and meta.get("version") == DEMO_VERSION
            and meta.get("seed") == seed and meta.get("config") == config):
        return False
    n = (config["n_scenes"] * (config["views_per_scene"] + config["queries_per_scene"])
         + config["n_distractors"])
    jpg = folder / "jpg"
    return (folder / f"gnd_{DEMO_NAME}.json").is_file() and jpg.is_dir() and sum(
        1 for _ in jpg.glob("*.jpg")) == n


def install_folder(final: Path, write: Callable[[Path], None], is_current: Callable[[Path], bool]) -> None:
    """Write a generated folder beside `final` and rename it into place, replacing `final`.

    No reader ever sees a partly written folder; when another process installs a current one
    between the two renames, theirs is kept (`is_current` decides).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-tmp-", dir=final.parent))
    old = final.parent / f".{final.name}-old-{secrets.token_hex(6)}"
    try:
        os.chmod(tmp, 0o755)
        write(tmp)
        try:
            os.rename(final, old)
        except FileNotFoundError:
            pass
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_current(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def generate_demo(
    out_root: str | os.PathLike,
    seed: int = 0,
    n_scenes: int = len(SCENES),
    views_per_scene: int = 10,
    queries_per_scene: int = 1,
    n_distractors: int = 60,
    force: bool = False,
) -> Path:
    """Write the demo benchmark to ``<out_root>/demo`` unless a current copy is there.

    The collection is generated into a temporary folder under ``out_root`` and renamed into
    place, so no reader ever sees a partly written collection. A folder
    whose ``demo.json`` has this version, seed and configuration (and all its images) is kept
    as it is.

    Args:
        out_root: folder that holds benchmark folders (the ``data_root`` of
            ``raytrieval.evaluation.datasets.load_benchmark``).
        seed: seed of every random draw; the same seed gives byte-identical files.
        n_scenes: number of scenes, the first ``n_scenes`` of :data:`SCENES` (at most 23).
            A scene's images depend on the seed and ``views_per_scene`` only, not on how many
            scenes or distractors are generated.
        views_per_scene: database views per scene (40% meant easy, 10% junk, the rest hard;
            the final label comes from the drawn parameters).
        queries_per_scene: query images per scene.
        n_distractors: database images that show no scene.
        force: regenerate even when a current copy exists.

    Returns:
        The benchmark folder ``<out_root>/demo``.

    Raises:
        ValueError: a count out of range (the message names it).
    """
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    config = _config(int(n_scenes), int(views_per_scene), int(queries_per_scene),
                     int(n_distractors))
    final = Path(out_root) / DEMO_NAME
    if force or not _is_current(final, seed, config):
        install_folder(final, lambda tmp: _write_collection(tmp, seed, config),
                       lambda folder: _is_current(folder, seed, config))
    return final


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m raytrieval.evaluation.demo --out runs/data``."""
    parser = argparse.ArgumentParser(
        prog="python -m raytrieval.evaluation.demo",
        description="Generate the embedded demo retrieval benchmark (photos from wheels).")
    parser.add_argument("--out", default="runs/data",
                        help="folder that receives demo/ (default: runs/data)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--scenes", type=int, default=len(SCENES),
                        help=f"number of scenes (default: all {len(SCENES)})")
    parser.add_argument("--views", type=int, default=10, help="database views per scene")
    parser.add_argument("--queries", type=int, default=1, help="queries per scene")
    parser.add_argument("--distractors", type=int, default=60, help="distractor images")
    parser.add_argument("--force", action="store_true", help="regenerate even if current")
    parser.add_argument("--smoke-test", action="store_true",
                        help="a tiny collection (4 scenes, 8 views, 8 distractors)")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.scenes, args.views, args.distractors = 4, 8, 8
    start = time.perf_counter()
    folder = generate_demo(args.out, seed=args.seed, n_scenes=args.scenes,
                           views_per_scene=args.views, queries_per_scene=args.queries,
                           n_distractors=args.distractors, force=args.force)
    meta = json.loads((folder / "demo.json").read_text(encoding="utf-8"))
    counts = {c: sum(s[c] for s in meta["scenes"]) for c in ("easy", "hard", "junk")}
    n_db = len(meta["images"]) - sum(len(s["queries"]) for s in meta["scenes"])
    print(f"demo collection at {folder} ({time.perf_counter() - start:.1f} s): "
          f"{len(meta['scenes'])} scenes, {n_db} database images "
          f"({len(meta['distractors'])} distractors; views easy {counts['easy']}, "
          f"hard {counts['hard']}, junk {counts['junk']}), "
          f"{sum(len(s['queries']) for s in meta['scenes'])} queries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
