"""Descriptor extraction streamed through Ray Data (`map_batches` over an actor pool).

The same work as `raytrieval.mining.embed.embed_images`, expressed as a Ray Data pipeline:
`from_items` (index, path, box) -> `map_batches` with a callable class that holds the model
(a fixed pool of `workers` actors, one GPU each when asked) and decodes inside the actor ->
descriptors collected in input order. Undecodable images are recorded with their reason by the
shared `extract_recording_failures`, never failing the batch. Throughput against the actor pool
and a plain loop: benchmarks/embed_data.md.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import ray

from raytrieval.mining.embed import (EmbedResult, extract_recording_failures, load_worker_model, pool_resources,
                                     work_list)
from raytrieval.retrieval.extract import Box
from raytrieval.retrieval.source import ModelSource, ModelSourceLike

_NO_BOX = (math.nan,) * 4  # the box column is (N, 4) float; NaN rows mean "whole image"


class EmbedBatch:
    """Ray Data callable class: one model per actor, a numpy batch of (index, path, box) in,
    (index, descriptor, failure) out; `failure` is "" for an embedded image, else the reason.

    Args:
        source: the model.
        threads: torch intra-op threads (the CPUs given to this actor).
        scales: extraction scales.
        max_size: longer image side.
    """

    def __init__(self, source: ModelSource, threads: int, scales: tuple[float, ...], max_size: int):
        self.model = load_worker_model(source, threads)
        self.scales = scales
        self.max_size = max_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        boxes = [None if np.isnan(b).any() else tuple(float(v) for v in b) for b in batch["box"]]
        desc, failed = extract_recording_failures(self.model, [str(p) for p in batch["path"]], boxes,
                                                  self.scales, self.max_size)
        reasons = np.array([failed.get(row, "") for row in range(len(desc))], dtype=object)
        return {"index": batch["index"], "descriptor": desc, "failure": reasons}


@contextlib.contextmanager
def quiet_ray_data() -> Iterator[None]:
    """Ray Data without progress bars or per-execution log lines, for a block; then as before."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    names = ("enable_progress_bars", "enable_operator_progress_bars", "print_on_execution_start", "verbose_stats_logs")
    saved = {name: getattr(ctx, name) for name in names}
    logger = logging.getLogger("ray.data")
    level = logger.level
    for name in names:
        setattr(ctx, name, False)
    logger.setLevel(logging.ERROR)  # also its notice that progress bars are off
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(ctx, name, value)
        logger.setLevel(level)


def embed_dataset(
    source: ModelSourceLike,
    images: Sequence[str | Path],
    boxes: Sequence[Box | None] | None = None,
    scales: Sequence[float] = (1.0,),
    max_size: int = 512,
    workers: int = 2,
    use_gpu: bool | None = None,
    batch_size: int = 16,
) -> EmbedResult:
    """Embed images through Ray Data with a pool of `workers` actors (Ray must be initialised).

    Args:
        source: the model (a `ModelSource` or one of its dict forms).
        images: image paths.
        boxes: optional crop box per image.
        scales: extraction scales.
        max_size: longer image side.
        workers: actors in the pool (each reserves one CPU, and one GPU with `use_gpu`).
        use_gpu: one GPU per actor; None means "if the cluster has a GPU per actor".
        batch_size: images per `map_batches` call.

    Returns:
        EmbedResult with (N, D) float32 descriptors in the order of `images`; undecodable images
        have a zero row and their reason in `failures`.
    """
    images, boxes = work_list(images, boxes)
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    n = len(images)
    use_gpu, threads = pool_resources(workers, use_gpu)
    src = ModelSource.from_dict(source)
    items = [{"index": i, "path": p, "box": [float(v) for v in (b if b is not None else _NO_BOX)]}
             for i, (p, b) in enumerate(zip(images, boxes))]
    blocks = max(min(n, workers), math.ceil(n / batch_size))  # at least one block per actor
    out: np.ndarray | None = None
    failures: dict[int, str] = {}
    with quiet_ray_data():
        ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            EmbedBatch,
            fn_constructor_args=(src, threads, tuple(scales), max_size),
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=1,
            num_gpus=1 if use_gpu else 0,
            udf_modifying_row_count=False,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            desc = batch["descriptor"]
            if out is None:
                out = np.zeros((n, desc.shape[1]), dtype=np.float32)
            out[batch["index"]] = desc
            failures.update((int(i), str(r)) for i, r in zip(batch["index"], batch["failure"]) if r)
    assert out is not None
    return EmbedResult(np.ascontiguousarray(out), failures)
