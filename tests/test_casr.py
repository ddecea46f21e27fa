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
