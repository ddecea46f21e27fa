"""Served CA-SR: `/search?casr=true` re-ranks by region proposals and returns the pasted object's box."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from raytrieval.retrieval.model import build_model
from raytrieval.serving.engine import SearchOptions, embed_arrays, model_record, prepare_query, search_images
from raytrieval.serving.index import ImageIndex, IndexConfig
from raytrieval.serving.ingress import ApiSettings, LocalBackend, create_app
from raytrieval.serving.regions import RegionReranker, RegionsUnavailable

TRUE_BOX = (200, 250, 400, 400)  # where the object is pasted in 'scene'


def iou(a, b) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(model, index directory, the query object): a scene with the object pasted small in a
    corner, and two unrelated photos, indexed by whole-image GeM."""
    from skimage import data

    model = build_model()
    obj = Image.fromarray(data.chelsea()).resize((200, 150))
    canvas = Image.fromarray(np.random.default_rng(0).integers(90, 110, (400, 400, 3), dtype=np.uint8))
    canvas.paste(obj, TRUE_BOX[:2])
    photos = {"scene": canvas, "astronaut": Image.fromarray(data.astronaut()).resize((400, 400)),
              "coffee": Image.fromarray(data.coffee()).resize((400, 300))}
    folder = tmp_path_factory.mktemp("casr")
    files = []
    for name, img in photos.items():
        files.append(str(folder / f"{name}.png"))
        img.save(files[-1])
    max_size = model.spec.max_size
    vectors = embed_arrays(model, [prepare_query(_png(img), None, max_size).pixels for img in photos.values()],
                           max_size=max_size)
    ImageIndex.create(folder / "index", vectors, list(photos), files, [img.size for img in photos.values()],
                      config=IndexConfig(kind="flat"), model=model_record(model, {"spec": model.spec.to_dict()}))
    return model, folder / "index", obj


def test_search_with_casr_returns_the_objects_box(served):
    model, index_dir, obj = served
    client = TestClient(create_app(LocalBackend(model, ImageIndex.open(index_dir)), ApiSettings()),
                        base_url="http://127.0.0.1:8000", raise_server_exceptions=False)
    r = client.post("/search", files={"image": ("q.png", _png(obj), "image/png")},
                    data={"k": "3", "casr": "true", "casr_top": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["rerank"] == ["casr"]
    top = body["results"][0]
    assert top["image_id"] == "scene" and top["inliers"] is None
    assert iou(top["box"], TRUE_BOX) > 0.6, top["box"]
    assert all(h["box"] is not None for h in body["results"])  # every re-ranked image is localised
    plain = client.post("/search", files={"image": ("q.png", _png(obj), "image/png")}, data={"k": "3"}).json()
    assert all(h["box"] is None for h in plain["results"]) and plain["rerank"] == []


def test_casr_scores_the_best_region_and_caches_region_sets(served):
    model, index_dir, obj = served
    index = ImageIndex.open(index_dir)
    regions = RegionReranker(index)  # loads the model from the index's record, as the Serve Searcher does
    pixels = prepare_query(_png(obj), None, model.spec.max_size).pixels
    q = embed_arrays(model, [pixels], max_size=model.spec.max_size)[0]
    hits = search_images(index, q, SearchOptions(k=3, casr=True, casr_top=3), pixels, regions=regions)
    assert regions.pooled == 3
    query = regions.query_descriptor(pixels)
    best = {}
    for label in range(3):
        rec = index.record(label)
        best[rec["image_id"]] = float((regions.region_set(label, rec).descriptors @ query).max())
    assert [h["image_id"] for h in hits] == sorted(best, key=lambda k: -best[k])
    assert [h["score"] for h in hits] == pytest.approx([best[h["image_id"]] for h in hits], abs=1e-5)
    assert regions.pooled == 3  # every region set came from the cache
    search_images(index, q, SearchOptions(k=3, casr=True, casr_top=3), pixels, regions=regions)
    assert regions.pooled == 3


def test_images_without_a_file_follow_the_reranked_ones(served, tmp_path):
    import shutil

    model, index_dir, obj = served
    shutil.copytree(index_dir, tmp_path / "index")
    index = ImageIndex.open(tmp_path / "index")
    pixels = prepare_query(_png(obj), None, model.spec.max_size).pixels
    q = embed_arrays(model, [pixels], max_size=model.spec.max_size)[0]
    index.add(["vector-only"], q[None, :])  # the query's own vector, no file: first by similarity
    hits = search_images(index, q, SearchOptions(k=4, casr=True, casr_top=4), pixels,
                         regions=RegionReranker(index, model))
    ids = [h["image_id"] for h in hits]
    assert ids[0] == "scene" and ids[-1] == "vector-only" and hits[-1]["box"] is None


def test_an_index_without_a_model_record_cannot_casr(served, tmp_path):
    model, _, obj = served
    vec = np.eye(1, model.dim, dtype=np.float32)
    index = ImageIndex.create(tmp_path / "bare", vec, ["a"], [None], [(8, 8)], config=IndexConfig(kind="flat"))
    with pytest.raises(RegionsUnavailable, match="records no model"):
        RegionReranker(index).model()


def test_learned_proposals_installed_in_the_index_are_used(served, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from raytrieval.retrieval.regions import regions_table
    from raytrieval.serving.regions import install_regions

    model, index_dir, obj = served
    shutil.copytree(index_dir, tmp_path / "index")
    index = ImageIndex.open(tmp_path / "index")
    sizes = {index.record(i)["image_id"]: (index.record(i)["width"], index.record(i)["height"]) for i in range(3)}
    ids = list(sizes)
    whole = {i: np.array([[0, 0, *sizes[i]]], np.float32) for i in ids}
    boxes = [np.array([TRUE_BOX], np.float32) if i == "scene" else whole[i] for i in ids]
    table = regions_table(ids, [sizes[i] for i in ids], boxes, [np.ones(1)] * 3)
    pq.write_table(table, tmp_path / "regions.parquet")
    install_regions(tmp_path / "regions.parquet", tmp_path / "index")
    regions = RegionReranker(index, model)
    label = index.label_of("scene")
    np.testing.assert_array_equal(regions.region_set(label, index.record(label)).boxes, [TRUE_BOX])
    pixels = prepare_query(_png(obj), None, model.spec.max_size).pixels
    q = embed_arrays(model, [pixels], max_size=model.spec.max_size)[0]
    hits = search_images(index, q, SearchOptions(k=3, casr=True, casr_top=3), pixels, regions=regions)
    assert hits[0]["image_id"] == "scene"
    # a bad box is refused with its row named, and nothing is installed
    bad = table.set_column(table.schema.get_field_index("x1"), "x1", pa.array([float("nan"), 1.0, 1.0], pa.float32()))
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="row 0"):
        install_regions(tmp_path / "bad.parquet", tmp_path / "other")
    assert not (tmp_path / "other").exists()
