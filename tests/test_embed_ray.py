"""The Ray actor pool embeds exactly what the in-process extractor does, and survives bad files."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from raytrieval.mining import embed
from raytrieval.mining.embed import EmbedWorker, embed_images
from raytrieval.retrieval.extract import extract_descriptors
from raytrieval.retrieval.model import ModelSpec, RetrievalNet


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


def test_pool_matches_plain_loop(ray_session, folder):
    spec = ModelSpec(max_size=64)
    plain = extract_descriptors(RetrievalNet(spec).eval(), folder, max_size=64, progress=False)
    result = embed_images(spec.to_dict(), folder, max_size=64, workers=2, chunk_size=2, progress=False)
    assert result.failures == {}
    np.testing.assert_allclose(result.descriptors, plain, atol=1e-5)


def test_actor_killed_mid_run_counts_every_image_once(ray_session, folder, tmp_path, monkeypatch):
    """An actor dies (no cleanup) on its way through chunk [4, 5]: Ray restarts it, the chunk is
    embedded again, and the progress bar still counts each image once."""
    marker = tmp_path / "crashed-once"

    class CrashOnce(EmbedWorker):
        def embed(self, chunk):
            if 4 in chunk.indices and not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)
            return super().embed(chunk)

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
    result = embed_images(spec.to_dict(), folder, max_size=64, workers=2, chunk_size=2, worker_cls=CrashOnce)
    assert marker.exists()  # the actor really died once
    assert sum(counted) == len(folder) and result.failures == {}
    np.testing.assert_allclose(result.descriptors, plain, atol=1e-5)


def test_pool_records_bad_images(ray_session, folder, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    images = [folder[0], bad, folder[1]]
    result = embed_images(ModelSpec(max_size=64).to_dict(), images, max_size=64, workers=1, progress=False)
    assert set(result.failures) == {1}
    assert np.all(result.descriptors[1] == 0)
    np.testing.assert_allclose(np.linalg.norm(result.descriptors[[0, 2]], axis=1), 1.0, rtol=1e-5)


def test_pool_rejects_empty_input(ray_session):
    with pytest.raises(ValueError, match="images"):
        embed_images(ModelSpec().to_dict(), [], workers=1)
