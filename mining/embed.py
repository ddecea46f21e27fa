"""Distributed descriptor extraction through a pool of Ray actors.

Each actor loads the model once (any `raytrieval.retrieval.source.ModelSource`) and embeds
chunks of images; chunks are retried on another attempt if an actor dies (`max_task_retries`).
Actors return descriptors and per-image failures, never image tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import ray
from ray.util import ActorPool
from tqdm.auto import tqdm

from raytrieval.retrieval.extract import Box
from raytrieval.retrieval.source import ModelSource, ModelSourceLike, load_model


@ray.remote(max_restarts=2, max_task_retries=2)
class EmbedWorker:
    """Holds one model and embeds chunks of images with it.

    Args:
        source: the model.
        threads: torch intra-op threads (the CPUs given to this actor).
    """

    def __init__(self, source: ModelSource, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.model = load_model(source)
        if torch.cuda.is_available():
            self.model = self.model.cuda()
        self.dim = self.model.dim

    def embed(self, chunk: "EmbedChunk") -> tuple[list[int], np.ndarray, dict[int, str]]:
        """Embed a chunk; undecodable images get a zero row and a reason."""
        from raytrieval.retrieval.extract import extract_descriptors
        from raytrieval.retrieval.imageio import ImageDecodeError

        kwargs = dict(scales=chunk.scales, max_size=chunk.max_size, progress=False)
        try:
            return chunk.indices, extract_descriptors(self.model, chunk.images, chunk.boxes, **kwargs), {}
        except ImageDecodeError:
            pass
        out = np.zeros((len(chunk.indices), self.dim), dtype=np.float32)
        failures: dict[int, str] = {}
        for row, (i, img, box) in enumerate(zip(chunk.indices, chunk.images, chunk.boxes)):
            try:
                out[row] = extract_descriptors(self.model, [img], [box], **kwargs)[0]
            except ImageDecodeError as exc:
                failures[i] = exc.reason
        return chunk.indices, out, failures


@dataclass
class EmbedChunk:
    """A unit of work: image paths with their indices in the full list."""

    indices: list[int]
    images: list[str]
    boxes: list[Box | None]
    scales: tuple[float, ...] = (1.0,)
    max_size: int = 512


@dataclass
class EmbedResult:
    """Descriptors (N, D) and the images that could not be decoded (index -> reason)."""

    descriptors: np.ndarray
    failures: dict[int, str] = field(default_factory=dict)


def embed_images(
    source: ModelSourceLike,
    images: Sequence[str | Path],
    boxes: Sequence[Box | None] | None = None,
    scales: Sequence[float] = (1.0,),
    max_size: int = 512,
    workers: int = 2,
    chunk_size: int = 16,
    use_gpu: bool | None = None,
    progress: bool = True,
) -> EmbedResult:
    """Embed images with a pool of `workers` Ray actors (Ray must be initialised).

    Args:
        source: the model (a `ModelSource` or one of its dict forms).
        images: image paths.
        boxes: optional crop box per image.
        scales: extraction scales.
        max_size: longer image side.
        workers: number of actors.
        chunk_size: images per task.
        use_gpu: one GPU per actor; None means "if the cluster has GPUs".
        progress: show a progress bar.

    Returns:
        EmbedResult with (N, D) float32 descriptors in the order of `images`.
    """
    if workers < 1:
        raise ValueError(f"workers: must be >= 1, got {workers}")
    if not images:
        raise ValueError("images: nothing to embed")
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    use_gpu = gpus >= workers if use_gpu is None else use_gpu
    # each actor reserves one CPU (so it schedules beside other work) and uses its share as threads
    threads = max(1, int(resources.get("CPU", 1) // workers))
    src = ModelSource.from_dict(source)
    actors = [
        EmbedWorker.options(num_cpus=1, num_gpus=1 if use_gpu else 0).remote(src, threads) for _ in range(workers)
    ]
    n = len(images)
    boxes = list(boxes) if boxes is not None else [None] * n
    chunks = [
        EmbedChunk(list(range(s, min(n, s + chunk_size))), [str(p) for p in images[s : s + chunk_size]],
                   boxes[s : s + chunk_size], tuple(scales), max_size)
        for s in range(0, n, chunk_size)
    ]
    out: np.ndarray | None = None
    failures: dict[int, str] = {}
    bar = tqdm(total=n, desc=f"embed x{workers}", unit="img", disable=not progress)
    for indices, desc, failed in ActorPool(actors).map_unordered(lambda a, c: a.embed.remote(c), chunks):
        if out is None:
            out = np.zeros((n, desc.shape[1]), dtype=np.float32)
        out[indices] = desc
        failures.update(failed)
        bar.update(len(indices))
    bar.close()
    for actor in actors:
        ray.kill(actor)
    assert out is not None
    return EmbedResult(np.ascontiguousarray(out), failures)
