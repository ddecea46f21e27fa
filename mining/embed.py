"""The one embedding entry point: in this process, or through a pool of Ray actors.

`embed_images` embeds in this process (`workers=0`) or on `workers` Ray actors; either way an
undecodable image gets a zero row and its reason, never failing the batch. Each actor loads
the model once (any `raytrieval.retrieval.source.ModelSource`) and embeds chunks of images.
Ray restarts an actor that dies and retries its chunk (`max_restarts`, `max_task_retries`); a
chunk whose actor is unreachable (its node lost) is sent again until the actor is back, and an
actor dead for good is replaced (`raytrieval.mining.actor_pool`). Actors return descriptors
and per-image failures, never image tensors.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import ray
from tqdm.auto import tqdm

from raytrieval.mining.actor_pool import one_queue, run_on_actors
from raytrieval.retrieval.extract import Box, extract_descriptors
from raytrieval.retrieval.imageio import ImageDecodeError
from raytrieval.retrieval.model import RetrievalNet
from raytrieval.retrieval.source import ModelSource, ModelSourceLike, load_model


def load_worker_model(source: ModelSource, threads: int) -> RetrievalNet:
    """The model of one embedding actor: `threads` torch threads, on the GPU when torch sees one."""
    import torch

    torch.set_num_threads(max(1, threads))
    model = load_model(source)
    if torch.cuda.is_available():
        model = model.cuda()
    return model


def extract_recording_failures(
    model: RetrievalNet,
    images: Sequence[str],
    boxes: Sequence[Box | None],
    scales: Sequence[float],
    max_size: int,
    progress: bool = False,
) -> tuple[np.ndarray, dict[int, str]]:
    """Descriptors (N, D) of a chunk; an undecodable image gets a zero row and its reason.

    Returns:
        (descriptors, {row in `images`: reason}).
    """
    kwargs = dict(scales=scales, max_size=max_size)
    try:
        return extract_descriptors(model, images, boxes, progress=progress, **kwargs), {}
    except ImageDecodeError:
        pass  # one bad image: redo the chunk image by image to name every failure
    out = np.zeros((len(images), model.dim), dtype=np.float32)
    failures: dict[int, str] = {}
    for row, (img, box) in enumerate(zip(images, boxes)):
        try:
            out[row] = extract_descriptors(model, [img], [box], progress=False, **kwargs)[0]
        except ImageDecodeError as exc:
            failures[row] = exc.reason
    return out, failures


def require_ray() -> None:
    """Raise a ValueError naming the fix when Ray is not initialised."""
    if not ray.is_initialized():
        raise ValueError("workers: Ray is not initialised; call raytrieval.cluster.runtime.init_ray first, "
                         "or use workers=0")


def pool_resources(workers: int, use_gpu: bool | None) -> tuple[bool, int]:
    """(one GPU per actor?, torch threads per actor) for `workers` actors on this Ray cluster.

    Each actor reserves one CPU (so it schedules beside other work) and uses its share of the
    cluster's CPUs as threads; `use_gpu=None` means "if the cluster has a GPU per actor".
    """
    if workers < 1:
        raise ValueError(f"workers: must be >= 1, got {workers}")
    resources = ray.cluster_resources()
    use_gpu = resources.get("GPU", 0) >= workers if use_gpu is None else use_gpu
    return use_gpu, max(1, int(resources.get("CPU", 1) // workers))


MAX_RESTARTS = 2  # Ray restarts of a dead embedding actor
MAX_TASK_RETRIES = 2  # resends of a chunk whose actor died


class EmbedWorker:
    """Holds one model and embeds chunks of images with it; wrapped as a Ray actor by `embed_images`.

    Args:
        source: the model.
        threads: torch intra-op threads (the CPUs given to this actor).
    """

    def __init__(self, source: ModelSource, threads: int):
        self.model = load_worker_model(source, threads)

    def embed(self, chunk: "EmbedChunk") -> tuple[list[int], np.ndarray, dict[int, str]]:
        """Embed a chunk; undecodable images get a zero row and a reason."""
        out, failed = extract_recording_failures(self.model, chunk.images, chunk.boxes, chunk.scales, chunk.max_size)
        return chunk.indices, out, {chunk.indices[row]: reason for row, reason in failed.items()}


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


def work_list(images: Sequence[str | Path], boxes: Sequence[Box | None] | None) -> tuple[list[str], list[Box | None]]:
    """The image paths and one box (None: whole image) per image, checked."""
    if not images:
        raise ValueError("images: nothing to embed")
    if boxes is not None and len(boxes) != len(images):
        raise ValueError(f"boxes: {len(boxes)} boxes for {len(images)} images")
    return [str(p) for p in images], list(boxes) if boxes is not None else [None] * len(images)


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
    worker_cls: type = EmbedWorker,
    model: RetrievalNet | None = None,
) -> EmbedResult:
    """Embed images in this process (`workers=0`) or with a pool of `workers` Ray actors.

    Args:
        source: the model (a `ModelSource` or one of its dict forms).
        images: image paths.
        boxes: optional crop box per image.
        scales: extraction scales.
        max_size: longer image side.
        workers: number of actors (Ray must be initialised); 0 embeds in this process.
        chunk_size: images per task.
        use_gpu: one GPU per actor; None means "if the cluster has GPUs".
        progress: show a progress bar.
        worker_cls: the actor class (an EmbedWorker subclass; tests inject failures).
        model: `source` already loaded, used with `workers=0` instead of loading it again.

    Returns:
        EmbedResult with (N, D) float32 descriptors in the order of `images`; an undecodable
        image has a zero row and its reason in `failures`.
    """
    images, boxes = work_list(images, boxes)
    src = ModelSource.from_dict(source)
    if workers == 0:
        out, failures = extract_recording_failures(model or load_model(src), images, boxes, scales, max_size, progress)
        return EmbedResult(out, failures)
    require_ray()
    use_gpu, threads = pool_resources(workers, use_gpu)
    remote_cls = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0, max_restarts=MAX_RESTARTS,
                            max_task_retries=MAX_TASK_RETRIES)(worker_cls)
    n = len(images)
    chunks = [
        EmbedChunk(list(range(s, min(n, s + chunk_size))), images[s : s + chunk_size],
                   boxes[s : s + chunk_size], tuple(scales), max_size)
        for s in range(0, n, chunk_size)
    ]
    results = run_on_actors(
        lambda: remote_cls.remote(src, threads), workers, lambda actor, chunk: actor.embed.remote(chunk),
        one_queue(chunks), MAX_TASK_RETRIES, name="embed",
    )
    out: np.ndarray | None = None
    failures: dict[int, str] = {}
    with closing(results), tqdm(total=n, desc=f"embed x{workers}", unit="img", disable=not progress) as bar:
        for indices, desc, failed in results:  # each chunk once (see run_on_actors)
            if out is None:
                out = np.zeros((n, desc.shape[1]), dtype=np.float32)
            out[indices] = desc
            failures.update(failed)
            bar.update(len(indices))
    assert out is not None
    return EmbedResult(np.ascontiguousarray(out), failures)
