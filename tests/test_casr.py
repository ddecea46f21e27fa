"""CA-SR (class-agnostic spatial re-ranking) finds a pasted object and re-ranks like a brute-force loop."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raytrieval.evaluation.rerank import ImageAccess, RerankConfig, rerank
from raytrieval.retrieval.region import RegionSet, casr_rerank, proposal_descriptors

sys.path.insert(0, str(Path(__file__).parent))


def iou(a, b) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def scene():
    from skimage import data

    from raytrieval.retrieval.model import build_model

    model = build_model()
    obj = Image.fromarray(data.chelsea()).resize((200, 150))
    rng = np.random.default_rng(0)
    canvas = Image.fromarray(rng.integers(90, 110, (400, 400, 3), dtype=np.uint8))
    canvas.paste(obj, (200, 250))  # the object's true box: (200, 250, 400, 400)
    other = Image.fromarray(data.astronaut()).resize((400, 400))
    pool = RerankConfig().casr_pool  # the step's default pooling
    query = proposal_descriptors(model, obj, np.array([[0, 0, 200, 150]], np.float32), pool=pool).descriptors[0]
    return query, [proposal_descriptors(model, other, pool=pool), proposal_descriptors(model, canvas, pool=pool)]


def test_casr_finds_the_pasted_object(scene):
    query, sets = scene  # grid proposals (no learned regions)
    new, scores, boxes = casr_rerank(query, sets, np.array([0, 1]), top_n=2)
    assert new.tolist() == [1, 0] and scores[0] > scores[1]
    assert iou(boxes[0], (200, 250, 400, 400)) > 0.7, boxes[0]
    # with query expansion after re-ranking, the object is still found
    expand = lambda q, found: (q + found[0]) / np.linalg.norm(q + found[0])  # noqa: E731
    new, _, boxes = casr_rerank(query, sets, np.array([0, 1]), top_n=2, qe=expand)
    assert new[0] == 1 and iou(boxes[0], (200, 250, 400, 400)) > 0.7


def test_casr_step_matches_a_brute_force_loop():
    rng = np.random.default_rng(1)
    unit = lambda a: (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    Q, X = unit(rng.normal(size=(3, 8))), unit(rng.normal(size=(12, 8)))
    props = [RegionSet(unit(rng.normal(size=(5, 8))), rng.uniform(0, 50, (5, 4)).astype(np.float32)) for _ in X]
    qreg = unit(rng.normal(size=(3, 8)))
    access = ImageAccess(query_region=lambda q: qreg[q], db_proposals=lambda i: props[i])
    res = rerank(RerankConfig(steps=("casr",), casr_top=6), Q, X, access)
    for q in range(3):
        filtering = np.argsort(-(X @ Q[q]), kind="stable")
        best = {int(i): max(range(5), key=lambda r: props[i].descriptors[r] @ qreg[q]) for i in filtering[:6]}
        score = {i: props[i].descriptors[r] @ qreg[q] for i, r in best.items()}
        expected = sorted(filtering[:6], key=lambda i: -score[int(i)]) + filtering[6:].tolist()
        assert res.ranks[q].tolist() == [int(i) for i in expected]
        assert res.boxes[q] == {i: tuple(float(v) for v in props[i].boxes[r]) for i, r in best.items()}
    # casr + aqe: the query expanded with the best proposals of the re-ranked top qe_k
    res2 = rerank(RerankConfig(steps=("casr", "aqe"), casr_top=6, qe_k=2), Q, X, access)
    for q in range(3):
        top2 = res.ranks[q, :2]
        e = qreg[q] + sum(props[int(i)].descriptors[best_r] for i, best_r in
                          ((i, max(range(5), key=lambda r: props[int(i)].descriptors[r] @ qreg[q])) for i in top2))
        e = e / np.linalg.norm(e)
        filtering = np.argsort(-(X @ Q[q]), kind="stable")
        score = {int(i): (props[int(i)].descriptors @ e).max() for i in filtering[:6]}
        assert res2.ranks[q, :6].tolist() == sorted((int(i) for i in filtering[:6]), key=lambda i: -score[i])
    assert set(res2.ms_per_query) == {"search", "casr"}  # query expansion is timed inside CA-SR


def test_casr_needs_its_inputs():
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="casr"):
        rerank(RerankConfig(steps=("casr",)), x[:1], x)
    with pytest.raises(ValueError, match="casr_pool"):
        RerankConfig(casr_pool="gem")


def test_eval_cli_with_casr(tmp_path):
    from trainset import make_collection

    from raytrieval.cluster.cli import main

    paths = make_collection(tmp_path / "c", scenes=3, views=2)
    out = tmp_path / "eval"
    assert main(["eval", "--dataset", "tiny", "--data-root", str(paths["bench_root"]), "--workers", "0",
                 "--max-size", "64", "--rerank", "casr,aqe", "--casr-top", "4", "--casr-pool", "max", "--out", str(out)]) == 0
    import json

    record = json.loads((out / "metrics.json").read_text())
    assert "casr" in record["timings"]["rerank_ms_per_query"]


def test_otsu_threshold_matches_a_brute_force_search():
    from raytrieval.retrieval.region import otsu_threshold

    rng = np.random.default_rng(3)
    v = np.r_[rng.normal(0.1, 0.05, 60), rng.normal(0.6, 0.05, 20)]

    def between(t):
        a, b = v[v <= t], v[v > t]
        return a.size * b.size * (a.mean() - b.mean()) ** 2 if a.size and b.size else -1

    assert otsu_threshold(v) == max(v, key=between)
    assert 0.25 < otsu_threshold(v) < 0.45  # it separates the two modes
    assert otsu_threshold(np.full(5, 0.3)) == 0.3  # a flat map has no split


def test_similarity_box_follows_the_planted_object_and_keeps_the_peak_component():
    from raytrieval.retrieval.region import similarity_box

    rng = np.random.default_rng(0)
    cells = rng.normal(size=(10, 20, 8)).astype(np.float32)
    query = np.zeros(8, np.float32)
    query[0] = 1.0
    cells[..., 0] = 0.0  # the background is orthogonal to the query
    cells[2:6, 4:12, 0] += 20.0  # the object: rows 2-5, columns 4-11
    cells[8, 18, 0] += 15.0  # a weaker, separate blob: not part of the peak's component
    cells[2, 5, 0] += 5.0  # the peak lies inside the object
    cells /= np.linalg.norm(cells, axis=-1, keepdims=True)
    rs = RegionSet(np.zeros((1, 8), np.float32), np.zeros((1, 4), np.float32), cells.astype(np.float16), (400, 200))
    # 20 px per cell in both directions (400 x 200 image over a 20 x 10 map)
    assert similarity_box(rs, query).tolist() == [80.0, 40.0, 240.0, 120.0]
    with pytest.raises(ValueError, match="no conv cells"):
        similarity_box(RegionSet(rs.descriptors, rs.boxes), query)


def test_casr_without_cells_returns_the_best_proposal(scene):
    query, sets = scene
    bare = [RegionSet(s.descriptors, s.boxes) for s in sets]
    _, _, boxes = casr_rerank(query, bare, np.array([0, 1]), top_n=2)
    best = int(np.argmax(sets[1].descriptors @ query))
    assert boxes[0].tolist() == sets[1].boxes[best].tolist()


def test_learned_rmac_is_the_normalised_sum_of_regional_max_pooling():
    import torch

    from raytrieval.retrieval.model import build_model
    from raytrieval.retrieval.region import feature_map, learned_rmac

    model = build_model()
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (160, 240, 3), dtype=np.uint8))
    boxes = np.array([[0, 0, 240, 160], [30, 20, 150, 140], [120, 0, 240, 80]], np.float32)
    got = learned_rmac(proposal_descriptors(model, img, boxes, pool="max"))
    # reference: crop the conv map to each box's cells (boxes on cell borders) and max-pool directly
    fmap, (w, h) = feature_map(model, img)
    fh, fw = fmap.shape[-2:]
    ref = np.zeros(fmap.shape[1])
    for x0, y0, x1, y1 in boxes:
        c = fmap[0, :, round(y0 * fh / h) : round(y1 * fh / h), round(x0 * fw / w) : round(x1 * fw / w)]
        m = c.amax(dim=(1, 2)).numpy()
        ref += m / np.linalg.norm(m)
    ref /= np.linalg.norm(ref)
    assert float(got @ ref) > 0.99, float(got @ ref)
    with pytest.raises(ValueError, match="no regions"):
        learned_rmac(RegionSet(np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32)))
