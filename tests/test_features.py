"""`retrieval.features`: the one SIFT-at-a-max-side cache of mining, evaluation and serving."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from raytrieval.retrieval.features import FeatureCache, image_features
from raytrieval.retrieval.imageio import ImageDecodeError
from raytrieval.retrieval.spatial import extract_local_features


def _png(seed: int, size=(240, 160)) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    arr = np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BICUBIC))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_features_match_a_by_hand_reference():
    data = _png(0)
    box = (30.4, 20.0, 200.0, 150.6)
    got = image_features(data, box, max_side=100, max_features=300)
    img = Image.open(io.BytesIO(data)).convert("RGB")
    crop = img.crop((30, 20, 200, 151))  # rounded like the revisitop protocol
    w, h = crop.size
    small = crop.resize((100, round(h * 100 / w)), Image.Resampling.BILINEAR)
    want = extract_local_features(np.asarray(small), 300)
    assert np.array_equal(got.shrunk.keypoints, want.keypoints)
    assert np.array_equal(got.shrunk.descriptors, want.descriptors)
    assert got.scale == pytest.approx(170 / 100)
    assert np.allclose(got.stored.keypoints, want.keypoints * 1.7 + np.array([30, 20]), atol=1e-4)
    assert got.stored.image_size == (160, 240) and got.stored.descriptors is got.shrunk.descriptors


def test_lru_order_counts_and_failures(tmp_path):
    images = [_png(i) for i in range(3)]
    cache = FeatureCache(max_side=64, max_features=50, capacity=2)
    first = cache.get("a", images[0])
    assert cache.get("a", images[1]) is first  # a hit never re-reads
    cache.get("b", images[1])
    cache.get("a", images[0])  # 'a' is now the most recent
    cache.get("c", images[2])  # evicts 'b'
    assert len(cache) == 2 and cache.extracted == 3
    cache.get("a", images[0])
    assert cache.extracted == 3
    cache.get("b", images[1])
    assert cache.extracted == 4
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    for _ in range(2):
        with pytest.raises(ImageDecodeError):
            cache.get("bad", str(bad))
    assert "bad" not in cache._items and cache.extracted == 4
    with pytest.raises(ValueError, match="capacity"):
        FeatureCache(capacity=0)
