"""A tiny synthetic collection for training tests: scenes seen in several shifted views.

`make_collection(root)` writes, all under `root`:
- `jpg/s{scene}_v{view}.png`: views of random smooth textures (64 px),
- `images.parquet`: the manifest, `clusters.parquet`: one cluster per scene,
- `tuples.parquet`: (view 0, view 1) of every scene with the other scenes' view 0 as negatives,
- `split.parquet`: the last scene's cluster held out for validation (scenes 0.. train),
- `bench/tiny/`: a revisitop-layout benchmark over fresh views (query: view 0 of each scene).

`write_knn(manifest, out, k)` writes a brute-force kNN artifact of a manifest (`knn.parquet`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour texture (size, size, 3) uint8."""
    small = rng.random((6, 6, 3))
    img = Image.fromarray((small * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img).astype(np.float32)
    arr += rng.normal(0, 12, arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _views(base: np.ndarray, rng: np.random.Generator, n: int, size: int) -> list[Image.Image]:
    out = []
    for _ in range(n):
        y, x = rng.integers(0, base.shape[0] - size, 2)
        crop = base[y : y + size, x : x + size].astype(np.float32) * rng.uniform(0.8, 1.2)
        out.append(Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)))
    return out


def make_collection(root: Path, scenes: int = 4, views: int = 4, size: int = 64, seed: int = 0) -> dict[str, Path]:
    """Write the collection, its artifacts and a benchmark; returns their paths."""
    from raytrieval.mining.cleaning import clusters_table, write_clusters
    from raytrieval.mining.tuples import tuples_table, write_tuples
    from raytrieval.retrieval.manifest import build_manifest, write_manifest

    rng = np.random.default_rng(seed)
    root = Path(root)
    jpg = root / "jpg"
    jpg.mkdir(parents=True, exist_ok=True)
    bench = root / "bench" / "tiny"
    (bench / "jpg").mkdir(parents=True, exist_ok=True)
    bases = [_texture(rng, size + 24) for _ in range(scenes)]
    for s, base in enumerate(bases):
        for v, img in enumerate(_views(base, rng, views, size)):
            img.save(jpg / f"s{s}_v{v}.png")
    manifest = build_manifest(jpg, progress=False)
    write_manifest(manifest, root / "images.parquet")
    ids = manifest.column("image_id").to_pylist()
    labels = np.array([int(i.split("_")[0][1:]) for i in ids], np.int64)
    write_clusters(clusters_table(ids, labels), root / "clusters.parquet")
    from raytrieval.mining.split import SplitConfig, split_stage

    split_stage(SplitConfig(run_dir=str(root), fraction=1 / scenes, seed=0))
    write_tuples(
        tuples_table([f"s{s}_v0" for s in range(scenes)], [f"s{s}_v1" for s in range(scenes)],
                     [[f"s{o}_v0" for o in range(scenes) if o != s] for s in range(scenes)], "test"),
        root / "tuples.parquet",
    )
    # benchmark: fresh views; query = view 0 of each scene, database = the other views
    imlist, qimlist, gnd = [], [], []
    for s, base in enumerate(bases):
        for v, img in enumerate(_views(base, rng, 3, size)):
            name = f"b{s}_v{v}"
            img.save(bench / "jpg" / f"{name}.jpg", quality=95)
            (qimlist if v == 0 else imlist).append(name)
    for s in range(scenes):
        easy = [i for i, name in enumerate(imlist) if name.startswith(f"b{s}_")]
        gnd.append({"bbx": [0, 0, size, size], "easy": easy, "hard": [], "junk": []})
    (bench / "gnd_tiny.json").write_text(json.dumps({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}))
    return {
        "root": root, "manifest": root / "images.parquet", "clusters": root / "clusters.parquet",
        "tuples": root / "tuples.parquet", "bench_root": root / "bench", "split": root / "split.parquet",
    }


def write_knn(manifest: Path, out: Path, k: int) -> Path:
    """`out`: the kNN artifact (src, dst, rank, similarity) of a manifest's 'ok' images.

    Brute force: each image's `k` most cosine-similar others over centred 8x8 colour
    thumbnails, a naive stand-in for the clean stage's descriptor kNN. With 4 views per scene,
    an image's first 4 neighbours always hold another scene's view (a cross-cluster link).
    """
    from raytrieval.mining.stages import knn_table
    from raytrieval.retrieval.artifacts import atomic_write_table
    from raytrieval.retrieval.manifest import ok_images, read_manifest

    table = ok_images(read_manifest(manifest))
    ids, uris = table.column("image_id").to_pylist(), table.column("uri").to_pylist()
    thumbs = np.stack([np.asarray(Image.open(u).convert("RGB").resize((8, 8)), np.float32).ravel() for u in uris])
    thumbs -= thumbs.mean(axis=1, keepdims=True)
    thumbs /= np.linalg.norm(thumbs, axis=1, keepdims=True)  # (N, 192)
    sims = thumbs @ thumbs.T
    np.fill_diagonal(sims, -np.inf)  # an image is not its own neighbour
    nbrs = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # (N, k), nearest first
    return atomic_write_table(knn_table(ids, np.take_along_axis(sims, nbrs, axis=1), nbrs), out)


def tiny_config(paths: dict[str, Path], out: Path, **overrides):
    """A TrainConfig for the tiny collection: ImageNet lite0, 64 px, 2 workers, no MLflow model."""
    from raytrieval.trainers.config import TrainConfig

    kwargs = dict(
        manifest=str(paths["manifest"]), pairs="clusters", clusters=str(paths["clusters"]),
        num_queries=8, pool_size=16, num_negatives=2, image_size=64, max_size=64,
        weights="imagenet", lr=1e-4, batch_size=2, epochs=2, val_dataset="tiny",
        val_data_root=str(paths["bench_root"]), workers=2, out=str(out), name="tiny",
        registered_model="raytrieval-test",
    )
    kwargs.update(overrides)
    return TrainConfig(**kwargs)


def tiny_pipeline_config(root: Path, **overrides) -> Path:
    """A 3-scene demo collection under `root` and a pipeline config sized for a 2-core CI machine."""
    import yaml

    from raytrieval.evaluation.demo import generate_demo

    generate_demo(root / "data", n_scenes=3, views_per_scene=4, n_distractors=4)
    cfg = {
        "run_dir": str(root / "run"), "benchmark": "demo", "data_root": str(root / "data"), "workers": 1,
        "model": {"max_size": 224},
        "clean": {"k": 4, "min_inliers": 12},
        "mine": {"method": "sfm"},
        "train": {"epochs": 2, "num_queries": 6, "pool_size": 12, "num_negatives": 2, "image_size": 128,
                  "batch_size": 3, "cpus_per_worker": 1},
        **overrides,
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
