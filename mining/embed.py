"""The one embedding entry point: in this process, or streamed through Ray Data.

`embed_images` embeds in this process (`workers=0`) or as a Ray Data pipeline, the same on one
machine and on a cluster: `from_items` (index, path, box) -> `map_batches` with `EmbedBatch`, a
callable class that holds the model (any `raytrieval.retrieval.source.ModelSource`), on a fixed
pool of `workers` actors, one GPU each when the cluster has them, decoding inside the actors ->
descriptors written by image index as batches stream back. Either way an undecodable image gets
a zero row and its reason, never failing its batch. Ray Data restarts an actor that dies (its
node lost included) and retries its batch: its actor pool's defaults, `max_restarts=-1` and
`max_task_retries=-1` (Ray 2.60 deprecates passing them to `map_batches`). Actors return
descriptors and per-image failures, never image tensors. Throughput against a plain loop:
benchmarks/embed_data.md.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import ray
from tqdm.auto import tqdm

from raytrieval.retrieval.extract import Box, extract_descriptors
from raytrieval.retrieval.imageio import ImageDecodeError
from raytrieval.retrieval.model import RetrievalNet
from raytrieval.retrieval.source import ModelSource, ModelSourceLike, load_model

_NO_BOX = (math.nan,) * 4  # the box column is (N, 4) float; NaN rows mean "whole image"


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
    """Descriptors (N, D) of a batch; an undecodable image gets a zero row and its reason.

    Returns:
        (descriptors, {row in `images`: reason}).
    """
    kwargs = dict(scales=scales, max_size=max_size)
    try:
        return extract_descriptors(model, images, boxes, progress=progress, **kwargs), {}
    except ImageDecodeError:
        pass  # one bad image: redo the batch image by image to name every failure
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
    batch_cls: type = EmbedBatch,
    model: RetrievalNet | None = None,
) -> EmbedResult:
    """Embed images in this process (`workers=0`) or through Ray Data on `workers` actors.

    Args:
        source: the model (a `ModelSource` or one of its dict forms).
        images: image paths.
        boxes: optional crop box per image.
        scales: extraction scales.
        max_size: longer image side.
        workers: actors in the pool (Ray must be initialised; each reserves one CPU, and one GPU
            with `use_gpu`); 0 embeds in this process.
        chunk_size: images per `map_batches` call.
        use_gpu: one GPU per actor; None means "if the cluster has a GPU per actor".
        progress: show a progress bar, advanced as batches come back.
        batch_cls: the Ray Data callable class (an EmbedBatch subclass; tests inject failures).
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
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    require_ray()
    use_gpu, threads = pool_resources(workers, use_gpu)
    n = len(images)
    items = [{"index": i, "path": p, "box": [float(v) for v in (b if b is not None else _NO_BOX)]}
             for i, (p, b) in enumerate(zip(images, boxes))]
    blocks = max(min(n, workers), math.ceil(n / chunk_size))  # at least one block per actor
    out: np.ndarray | None = None
    failures: dict[int, str] = {}
    seen = np.zeros(n, dtype=np.int64)  # batches that returned each image
    with quiet_ray_data(), tqdm(total=n, desc=f"embed x{workers}", unit="img", disable=not progress) as bar:
        ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            batch_cls,
            fn_constructor_args=(src, threads, tuple(scales), max_size),
            batch_size=chunk_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=1,
            num_gpus=1 if use_gpu else 0,
            udf_modifying_row_count=False,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            index, desc = batch["index"], batch["descriptor"]
            if out is None:
                out = np.zeros((n, desc.shape[1]), dtype=np.float32)
            out[index] = desc
            seen[index] += 1
            failures.update((int(i), str(r)) for i, r in zip(index, batch["failure"]) if r)
            bar.update(len(index))
    if out is None or not np.all(seen == 1):
        raise RuntimeError(f"embed: {int(np.sum(seen == 0))} images lost, {int(np.sum(seen > 1))} returned twice")
    return EmbedResult(np.ascontiguousarray(out), failures)
