"""Embedding through Ray Data equals the in-process extractor, keeps input order, records bad
files without failing their batch, and survives an actor that dies mid-run."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from raytrieval.mining import embed
from raytrieval.mining.embed import EmbedBatch, embed_images
from raytrieval.retrieval.extract import extract_descriptors
from raytrieval.retrieval.model import ModelSpec, RetrievalNet

SIZE = 96  # small images keep the tests fast; the path is the same at any size
SPEC = ModelSpec(max_size=SIZE)


@pytest.fixture(scope="module")
def photos(shared_data):
    return sorted((shared_data / "ukbench-56" / "jpg").glob("*.jpg"))[:6]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("pool")
    paths = []
    for i in range(7):
        path = d / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (60 + 4 * i, 80, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def model():
    return RetrievalNet(SPEC).eval()


def test_matches_in_process(ray_session, photos, model):
    plain = extract_descriptors(model, photos, max_size=SIZE, progress=False)
    result = embed_images(SPEC.to_dict(), photos, max_size=SIZE, workers=2, chunk_size=2, progress=False)
    assert result.failures == {}
    assert result.descriptors.shape == plain.shape and result.descriptors.dtype == np.float32
    assert result.descriptors.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(result.descriptors, plain, atol=1e-5)


def test_actor_killed_mid_run_counts_every_image_once(ray_session, folder, tmp_path, monkeypatch):
    """An actor dies (no cleanup) on its way through batch [4, 5]: Ray Data restarts it, the batch
    is embedded again, and the progress bar still counts each image once."""
    marker = tmp_path / "crashed-once"

    class CrashOnce(EmbedBatch):
        def __call__(self, batch):
            if 4 in batch["index"] and not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)
            return super().__call__(batch)

    counted: list[int] = []

    class CountingBar:
        def __init__(self, total, **kwargs):
            assert total == len(folder)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def update(self, k):
            counted.append(k)

    monkeypatch.setattr(embed, "tqdm", CountingBar)
    spec = ModelSpec(max_size=64)
    plain = extract_descriptors(RetrievalNet(spec).eval(), folder, max_size=64, progress=False)
    result = embed_images(spec.to_dict(), folder, max_size=64, workers=2, chunk_size=2, batch_cls=CrashOnce)
    assert marker.exists()  # the actor really died once
    assert sorted(counted) == [1, 2, 2, 2] and result.failures == {}  # each batch once, none lost
    np.testing.assert_allclose(result.descriptors, plain, atol=1e-5)


def test_bad_files_recorded_without_failing_the_batch(ray_session, photos, model, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"this is not an image, only text")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    images = [photos[0], corrupt, photos[1], empty, photos[2]]
    # one batch holds all five images: the two bad ones must not cost the three good ones
    result = embed_images(SPEC.to_dict(), images, max_size=SIZE, workers=1, chunk_size=len(images), progress=False)
    assert result.failures == {1: "not an image", 3: "empty file"}
    assert np.all(result.descriptors[[1, 3]] == 0)
    good = extract_descriptors(model, [photos[0], photos[1], photos[2]], max_size=SIZE, progress=False)
    np.testing.assert_allclose(result.descriptors[[0, 2, 4]], good, atol=1e-5)


def test_order_preserved_with_boxes(ray_session, photos, model):
    # a permuted list with repeats, each image cropped differently, over several batches and actors
    order = [4, 1, 5, 0, 1, 3, 2]
    images = [photos[i] for i in order]
    boxes = [(10.0 * k, 5.0 * k, 640.0 - 20 * k, 480.0 - 10 * k) if k % 3 else None for k in range(len(order))]
    result = embed_images(SPEC.to_dict(), images, boxes, max_size=SIZE, workers=2, chunk_size=3, progress=False)
    expected = np.stack([extract_descriptors(model, [img], [box], max_size=SIZE, progress=False)[0]
                         for img, box in zip(images, boxes)])  # one image at a time: the naive reference
    assert result.failures == {}
    np.testing.assert_allclose(result.descriptors, expected, atol=1e-5)
    # the boxes took effect: photo 1 sits at rows 1 and 4 with different crops
    assert not np.allclose(result.descriptors[1], result.descriptors[4], atol=1e-3)


def test_ray_data_settings_restored(ray_session, photos):
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = (ctx.enable_progress_bars, ctx.print_on_execution_start)
    embed_images(SPEC.to_dict(), photos[:1], max_size=SIZE, workers=1, progress=False)
    assert (ctx.enable_progress_bars, ctx.print_on_execution_start) == before


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"images": []}, "images"), ({"workers": -1}, "workers"), ({"chunk_size": 0}, "chunk_size"),
     ({"boxes": [None]}, "boxes")],
)
def test_rejects_bad_arguments(ray_session, photos, kwargs, match):
    args = {"images": photos[:2], **kwargs}
    with pytest.raises(ValueError, match=match):
        embed_images(SPEC.to_dict(), **args)
