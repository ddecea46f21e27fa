"""Batched, multi-scale extraction of global descriptors from images of any size."""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from raytrieval.retrieval.imageio import crop_box, load_image, resize_max
from raytrieval.retrieval.model import RetrievalNet
from raytrieval.retrieval.pooling import l2n, resize_scale

Box = tuple[float, float, float, float]
ImageSource = str | Path | bytes | Image.Image


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 tensor in [0, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def fit_image(img: Image.Image, box: Box | None, max_size: int) -> Image.Image:
    """Crop a decoded image to `box` (pixels of the stored image) and shrink it to `max_size`."""
    if box is not None:
        img = crop_box(img, box)
    return resize_max(img, max_size)


def prepare_image(src: ImageSource, box: Box | None, max_size: int) -> torch.Tensor:
    """Decode, crop to `box` (pixels of the stored image), shrink to `max_size`: (3, H, W)."""
    img = src if isinstance(src, Image.Image) else load_image(src)
    return to_tensor(fit_image(img, box, max_size))


@torch.no_grad()
def scale_features(model: RetrievalNet, x: torch.Tensor, scales: Sequence[float]) -> list[torch.Tensor]:
    """Conv feature maps of a batch (B, 3, H, W) in [0, 1] at each scale."""
    x = model.normalize(x)
    return [model.forward_features(resize_scale(x, s)) for s in scales]


def power_mean(vectors: Sequence[torch.Tensor], p: float) -> torch.Tensor:
    """GeM-like average of per-scale descriptors, (mean_s v_s^p)^(1/p), then L2: (B, D)."""
    if len(vectors) == 1:
        return vectors[0]
    return l2n((sum(v.pow(p) for v in vectors) / len(vectors)).pow(1.0 / p))


@torch.no_grad()
def embed_batch(model: RetrievalNet, x: torch.Tensor, scales: Sequence[float] = (1.0,)) -> torch.Tensor:
    """Descriptors of a same-size batch (B, 3, H, W) in [0, 1], power-averaged over scales.

    The power is `model.multiscale_power` (GeM's p, else 1).

    Returns:
        (B, D) L2-normalised descriptors on the input's device.
    """
    return power_mean([l2n(model.head(f)) for f in scale_features(model, x, scales)], model.multiscale_power)


def default_batch_size(device: torch.device) -> int:
    """Images per forward pass: 1 on CPU, 16 on an accelerator.

    On CPU a batch of large images is no faster per image than one image at a time (slower
    with one thread per worker, as the Ray actors run) and holds the whole batch's activations
    (`benchmarks/cpu_batch.md`, EfficientNet-Lite0 at 512 px). GPUs need batches to fill.
    """
    return 1 if device.type == "cpu" else 16


def _windows(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def extract_descriptors(
    model: RetrievalNet,
    images: Sequence[ImageSource],
    boxes: Sequence[Box | None] | None = None,
    scales: Sequence[float] = (1.0,),
    max_size: int = 512,
    batch_size: int | None = None,
    progress: bool = True,
    io_threads: int = 2,
) -> np.ndarray:
    """Embed images into L2-normalised global descriptors.

    Images are decoded ahead in threads; within a window of consecutive images, those of the
    same prepared size are batched together, so memory stays bounded for any collection.

    Args:
        model: the network, on the device to run on.
        images: paths, bytes or PIL images.
        boxes: an optional (x0, y0, x1, y1) crop per image (revisitop query boxes), or None.
        scales: image scales; more than one gives multi-scale descriptors.
        max_size: longer side of the image before scaling (never upscaled).
        batch_size: images per forward pass (same size only); None: `default_batch_size`.
        progress: show a progress bar.
        io_threads: decoding threads.

    Returns:
        (N, D) float32 C-contiguous descriptors.

    Raises:
        raytrieval.retrieval.imageio.ImageDecodeError: for an image that cannot be decoded.
    """
    n = len(images)
    if boxes is not None and len(boxes) != n:
        raise ValueError(f"boxes: {len(boxes)} boxes for {n} images")
    boxes = boxes if boxes is not None else [None] * n
    device = next(model.parameters()).device
    batch_size = batch_size or default_batch_size(device)
    out = np.zeros((n, model.dim), dtype=np.float32)
    model.eval()
    bar = tqdm(total=n, desc="extract", unit="img", disable=not progress)
    with ThreadPoolExecutor(max_workers=io_threads) as pool:
        for window in _windows(n, max(8, 4 * batch_size)):  # decoded ahead of the forward passes
            tensors = pool.map(lambda i: prepare_image(images[i], boxes[i], max_size), window)
            by_shape: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = defaultdict(list)
            for i, t in zip(window, tensors):
                by_shape[tuple(t.shape)].append((i, t))
            for group in by_shape.values():
                for start in range(0, len(group), batch_size):
                    chunk = group[start : start + batch_size]
                    x = torch.stack([t for _, t in chunk]).to(device)
                    out[[i for i, _ in chunk]] = embed_batch(model, x, scales).float().cpu().numpy()
                    bar.update(len(chunk))
    bar.close()
    return np.ascontiguousarray(out)
