"""`raytrieval index build`: embed the ok images of a manifest or folder into a faiss index directory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raytrieval.retrieval.manifest import build_manifest, read_manifest
from raytrieval.retrieval.source import ModelSource, ModelSourceLike


def build_index(
    images: str | Path,
    source: ModelSourceLike,
    out: str | Path,
    workers: int = 0,
    config: dict[str, Any] | None = None,
    address: str | None = None,
    log=print,
    vectors: tuple[Sequence[str], np.ndarray] | None = None,
    regions: str | Path | None = None,
):
    """Embed a collection and write a serving index.

    Args:
        images: an image folder or an images.parquet manifest (only status 'ok' rows are used).
        source: the model: a `ModelSource` or one of its dict forms ({"checkpoint": dir}, {"spec": ...}).
        out: the index directory.
        workers: Ray embedding actors (0: in-process).
        config: `raytrieval.serving.index.IndexConfig` fields (kind, nprobe, ...).
        address: Ray cluster address for workers > 0.
        vectors: (image ids, (N, D) descriptors) already embedded with `source` (the clean
            stage's, when the served model is the one it embedded with): used instead of
            embedding; an ok image without one is skipped as not embedded.
        regions: a `regions.parquet` of learned proposals (`raytrieval regions`), installed in
            the index for the served CA-SR (`raytrieval.serving.regions`); None: grid proposals.

    Returns:
        The `raytrieval.serving.index.ImageIndex`.
    """
    from raytrieval.serving.engine import model_record
    from raytrieval.serving.index import ImageIndex, IndexConfig

    src = Path(images)
    if not src.exists():
        raise FileNotFoundError(f"images: {src} does not exist")
    table = read_manifest(src) if src.is_file() else build_manifest(src, progress=False)
    rows = [r for r in table.to_pylist() if r["status"] == "ok"]
    if not rows:
        raise ValueError(f"images: no decodable images in {src}")
    source = ModelSource.from_dict(source)
    model = source.load()
    scales, max_size = model.spec.scales, model.spec.max_size
    uris = [r["uri"] for r in rows]
    if vectors is not None:
        row_of = {image_id: k for k, image_id in enumerate(vectors[0])}
        failures = {i: "not embedded (failed when embedded before)" for i, r in enumerate(rows) if r["image_id"] not in row_of}
        stored, vectors = vectors[1], np.zeros((len(rows), vectors[1].shape[1]), np.float32)
        for i, r in enumerate(rows):
            if i not in failures:
                vectors[i] = stored[row_of[r["image_id"]]]
    else:
        if workers > 0:
            from raytrieval.cluster.runtime import init_ray

            init_ray(address)
        from raytrieval.mining.embed import embed_images

        result = embed_images(source, uris, scales=scales, max_size=max_size, workers=workers, model=model)
        vectors, failures = result.descriptors, result.failures
    keep = [i for i in range(len(rows)) if i not in failures]
    index = ImageIndex.create(
        out, vectors[keep], [rows[i]["image_id"] for i in keep], [uris[i] for i in keep],
        [(rows[i]["width"], rows[i]["height"]) for i in keep], config=IndexConfig(**(config or {})),
        model=model_record(model, source),
    )
    log(f"{len(index)} images, {index.kind} index, {index.dim}-d -> {out}")
    if regions is not None:
        from raytrieval.serving.regions import install_regions

        log(f"  learned proposals for region re-ranking -> {install_regions(regions, out)}")
    for i, reason in sorted(failures.items()):
        log(f"  skipped {uris[i]}: {reason}")
    return index
