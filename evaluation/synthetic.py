"""Synthetic collections of any size: the demo's pictures, scaled up (the growth runs of
benchmarks/scale.py).

The demo (:mod:`raytrieval.evaluation.demo`) has 23 scenes cut from the photos inside the
wheels; a collection of 10^4 to 10^5 images needs thousands. Here each scene's object is a
texture of its own (the demo's colour field, shapes and grain, drawn sharp by the scene's own
generator), seen in ``views_per_scene`` database views made by the demo's plans (easy, hard
and junk levels) and renderer: perspective, scale, crop, clutter, occluders, lighting and
camera. The other images are distractors with no object (the demo's texture-only
distractors). Pictures are ``canvas_scale`` times the demo's size.

Layout::

    <out>/jpg/img_000000.jpg ...
    <out>/synthetic.json   version, seed, config, scene of every image (-1: a distractor)

Every picture draws from its own ``numpy`` Generator seeded by ``(seed, kind, scene, view)``
and the names come from a seeded permutation, so the same arguments give byte-identical files
whatever the number of processes that write them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from raytrieval.evaluation import demo

__all__ = ["SYNTHETIC_VERSION", "generate_collection", "read_labels", "main"]

SYNTHETIC_VERSION = 1
RECORD = "synthetic.json"
Config = dict[str, Any]  # the validated arguments, as recorded in synthetic.json


def _config(n_images: int, views_per_scene: int, distractor_fraction: float, canvas_scale: float
            ) -> dict[str, Any]:
    if n_images < 2:
        raise ValueError(f"n_images must be at least 2, got {n_images}")
    if views_per_scene < 2:
        raise ValueError(f"views_per_scene must be at least 2, got {views_per_scene}")
    if not 0.0 <= distractor_fraction < 1.0:
        raise ValueError(f"distractor_fraction must be in [0, 1), got {distractor_fraction}")
    if not 0.1 <= canvas_scale <= 1.0:
        raise ValueError(f"canvas_scale must be in [0.1, 1], got {canvas_scale}")
    n_scenes = max(1, round(n_images * (1.0 - distractor_fraction)) // views_per_scene)
    if n_scenes * views_per_scene > n_images:
        raise ValueError(f"n_images={n_images} cannot hold one scene of {views_per_scene} views")
    return {"n_images": n_images, "views_per_scene": views_per_scene, "n_scenes": n_scenes,
            "n_distractors": n_images - n_scenes * views_per_scene,
            "distractor_fraction": distractor_fraction, "canvas_scale": canvas_scale}



_GLYPHS = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789#%&@"


def _scene_object(seed: int, scene: int) -> np.ndarray:
    """The object of one scene, 240-420 x 200-380 px: a sharp texture of its own under a
    dozen short words of random glyphs (like a poster or a facade's signs), whose corners
    give the local features that verification matches."""
    rng = np.random.default_rng([seed, 10, scene])
    W, H = int(rng.integers(240, 421)), int(rng.integers(200, 381))
    img = np.ascontiguousarray(np.rint(demo._texture(rng, (W, H), focus=0.5) * 255).astype(np.uint8))
    for _ in range(int(rng.integers(10, 16))):
        word = "".join(rng.choice(list(_GLYPHS), size=int(rng.integers(2, 6))))
        colour = tuple(int(c) for c in rng.choice([rng.integers(0, 64, 3), rng.integers(192, 256, 3)]))
        origin = (int(rng.integers(0, W - 40)), int(rng.integers(30, H)))
        cv2.putText(img, word, origin, int(rng.choice([0, 2, 3, 4])), float(rng.uniform(0.8, 1.8)), colour,
                    int(rng.integers(2, 5)), cv2.LINE_AA)
    return img.astype(np.float32) / 255.0


def _write_scene(folder: Path, seed: int, config: Config, scene: int, names: list[str]) -> None:
    """Render the views of one scene into the files `names` (one per view)."""
    obj = _scene_object(seed, scene)
    levels = demo._levels(np.random.default_rng([seed, 0, scene]), config["views_per_scene"])
    for v, (level, name) in enumerate(zip(levels, names)):
        rng = np.random.default_rng([seed, 1, scene, v])
        plan = {**demo._plan(rng, level), "key": f"view/{scene}/{v}", "canvas_scale": config["canvas_scale"],
                "object": {"source": "texture", "scene": scene}}
        img, params = demo._render(rng, obj, plan)
        demo._save_jpeg(folder / "jpg" / name, img, params["light"]["jpeg_quality"])


def _write_distractors(folder: Path, seed: int, config: Config, first: int, names: list[str]) -> None:
    """Render distractors `first`, `first + 1`, ... into the files `names`."""
    for d, name in enumerate(names, start=first):
        rng = np.random.default_rng([seed, 3, d])
        plan = {**demo._plan(rng, "easy"), "key": f"distractor/{d}", "canvas_scale": config["canvas_scale"],
                "strong_light": bool(rng.random() < 0.25)}
        plan["clutter"] += 2
        img, params = demo._render(rng, None, plan)
        demo._save_jpeg(folder / "jpg" / name, img, params["light"]["jpeg_quality"])


def _labels_and_names(seed: int, config: Config) -> tuple[np.ndarray, list[str]]:
    """Scene of every image (-1: distractor) in name order, and the file name of every
    picture in generation order (scene 0's views, scene 1's, ..., then the distractors)."""
    n, v = config["n_images"], config["views_per_scene"]
    generated = np.concatenate([np.repeat(np.arange(config["n_scenes"]), v),
                                np.full(config["n_distractors"], -1)])
    order = np.random.default_rng([seed, 4]).permutation(n)  # name i shows picture order[i]
    labels = generated[order]
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    return labels, [f"img_{int(i):06d}.jpg" for i in position]


def _write_collection(folder: Path, seed: int, config: Config, workers: int) -> None:
    (folder / "jpg").mkdir()
    labels, names = _labels_and_names(seed, config)
    v, n_views = config["views_per_scene"], config["n_scenes"] * config["views_per_scene"]
    step = 64
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_write_scene, folder, seed, config, s, names[s * v:(s + 1) * v])
                   for s in range(config["n_scenes"])]
        futures += [pool.submit(_write_distractors, folder, seed, config, d, names[n_views + d:n_views + d + step])
                    for d in range(0, config["n_distractors"], step)]
        for f in futures:
            f.result()
    record = {"version": SYNTHETIC_VERSION, "seed": seed, "config": config, "labels": labels.tolist()}
    (folder / RECORD).write_text(json.dumps(record) + "\n", encoding="utf-8")


def _is_current(folder: Path, seed: int, config: Config) -> bool:
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(record, dict) and record.get("version") == SYNTHETIC_VERSION
            and record.get("seed") == seed and record.get("config") == config
            and sum(1 for _ in (folder / "jpg").glob("*.jpg")) == config["n_images"])


def generate_collection(
    out: str | os.PathLike,
    n_images: int,
    seed: int = 0,
    views_per_scene: int = 8,
    distractor_fraction: float = 0.3,
    canvas_scale: float = 0.4,
    workers: int = 1,
    force: bool = False,
) -> Path:
    """Write a synthetic collection of `n_images` images to `out` unless a current copy is there.

    Args:
        out: the collection folder (written beside and renamed into place).
        n_images: images in the collection.
        seed: seed of every random draw.
        views_per_scene: database views per scene (40% meant easy, 10% junk, the rest hard).
        distractor_fraction: about this fraction of the images shows no scene.
        canvas_scale: picture size as a fraction of the demo's (longer side 480-640 px).
        workers: processes that render pictures.
        force: regenerate even when a current copy exists.

    Returns:
        The collection folder; its images are in ``<out>/jpg``.

    Raises:
        ValueError: an argument out of range (the message names it).
    """
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    config = _config(int(n_images), int(views_per_scene), float(distractor_fraction), float(canvas_scale))
    final = Path(out)
    if force or not _is_current(final, seed, config):
        demo.install_folder(final, lambda tmp: _write_collection(tmp, seed, config, workers),
                            lambda folder: _is_current(folder, seed, config))
    return final


def read_labels(folder: str | os.PathLike) -> dict[str, int]:
    """Image id (file name without extension) -> scene (-1: a distractor) of a collection."""
    labels = json.loads((Path(folder) / RECORD).read_text(encoding="utf-8"))["labels"]
    return {f"img_{i:06d}": int(s) for i, s in enumerate(labels)}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m raytrieval.evaluation.synthetic --out runs/scale/1000 --images 1000``."""
    parser = argparse.ArgumentParser(prog="python -m raytrieval.evaluation.synthetic",
                                     description="Generate a synthetic collection of any size.")
    parser.add_argument("--out", required=True, help="the collection folder")
    parser.add_argument("--images", type=int, required=True, help="images in the collection")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--views", type=int, default=8, help="database views per scene (default: 8)")
    parser.add_argument("--distractor-fraction", type=float, default=0.3, help="share of distractors (default: 0.3)")
    parser.add_argument("--canvas-scale", type=float, default=0.4, help="picture size vs the demo's (default: 0.4)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="rendering processes")
    parser.add_argument("--force", action="store_true", help="regenerate even if current")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    folder = generate_collection(args.out, args.images, args.seed, args.views, args.distractor_fraction,
                                 args.canvas_scale, args.workers, args.force)
    config = json.loads((folder / RECORD).read_text(encoding="utf-8"))["config"]
    print(f"synthetic collection at {folder} ({time.perf_counter() - start:.1f} s): {config['n_images']} images, "
          f"{config['n_scenes']} scenes of {config['views_per_scene']} views, {config['n_distractors']} distractors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
