"""Whitening/re-ranking as wired into evaluation, and region re-ranking with localisation."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from raytrieval.cluster.cli import main
from raytrieval.evaluation.rerank import RerankConfig, rerank
from raytrieval.retrieval.knn import rank_all
from raytrieval.retrieval.qe import alpha_qe, average_qe, dba
from raytrieval.retrieval.region import region_descriptors, region_rerank
from raytrieval.retrieval.whiten import learn_pca_whitening


@pytest.fixture
def descriptors():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((80, 24)).astype(np.float32)
    q = x[:6] + 0.3 * rng.standard_normal((6, 24)).astype(np.float32)
    norm = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    return norm(q), norm(x)


def test_config_validation():
    with pytest.raises(ValueError, match="whiten"):
        RerankConfig(whiten="zca")
    with pytest.raises(ValueError, match="steps"):
        RerankConfig(steps=("magic",))
    with pytest.raises(ValueError, match="steps"):
        RerankConfig(steps=("aqe", "alpha_qe"))
    assert RerankConfig(whiten="pca", dim=32, steps=("diffusion", "dba")).label == "pca32+dba+diffusion"


def test_steps_compose_like_direct_calls(descriptors):
    q, x = descriptors
    res = rerank(RerankConfig(whiten="pca", dim=16, steps=("alpha_qe", "dba")), q, x)
    w = learn_pca_whitening(x, dim=16)
    qw, xw = w.apply(q), w.apply(x)
    xd = dba(xw, 3, 3.0)
    expected = rank_all(alpha_qe(qw, xd, rank_all(qw, xd), 2, 3.0), xd)
    np.testing.assert_array_equal(res.ranks, expected)
    assert set(res.ms_per_query) == {"whiten", "dba", "search", "qe"}


def test_image_steps_need_image_access(descriptors):
    q, x = descriptors
    with pytest.raises(ValueError, match="sv"):
        rerank(RerankConfig(steps=("sv",)), q, x)


def test_region_rerank_localises_the_object(tmp_path):
    from skimage import data

    from raytrieval.retrieval.model import build_model

    model = build_model()
    obj = Image.fromarray(data.chelsea()).resize((200, 150))
    rng = np.random.default_rng(0)
    canvas = Image.fromarray(rng.integers(90, 110, (400, 400, 3), dtype=np.uint8))
    canvas.paste(obj, (200, 250))  # the object's true box: (200, 250, 400, 400)
    other = Image.fromarray(data.astronaut()).resize((400, 400))
    from raytrieval.retrieval.extract import extract_descriptors

    query = extract_descriptors(model, [obj], progress=False)[0]
    sets = [region_descriptors(model, other), region_descriptors(model, canvas)]
    new, scores, boxes = region_rerank(query, sets, np.array([0, 1]), top_n=2)
    assert new.tolist() == [1, 0] and scores[0] > scores[1]
    x0, y0, x1, y1 = boxes[0]
    inter = max(0, min(x1, 400) - max(x0, 200)) * max(0, min(y1, 400) - max(y0, 250))
    union = (x1 - x0) * (y1 - y0) + 200 * 150 - inter
    assert inter / union > 0.3


def test_eval_cli_with_reranking(shared_data, tmp_path):
    assert main(["eval", "--dataset", "ukbench-56", "--data-root", str(shared_data), "--workers", "0",
                 "--max-size", "256", "--whiten", "pca", "--dim", "32", "--rerank", "alpha_qe,diffusion,sv",
                 "--sv-top", "8", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert set(record["timings"]["rerank_ms_per_query"]) >= {"whiten", "qe", "diffusion", "sv"}
    assert record["baseline_metrics"]["ns_score"] > 3.0
    assert 0 < record["metrics"]["ns_score"] <= 4.0

    # the same model's descriptors read back instead of embedded: the same figures, nothing embedded
    from raytrieval.cluster.eval_stage import EvalConfig, run_eval

    cfg = EvalConfig(dataset="ukbench-56", data_root=str(shared_data), workers=0, descriptors=str(tmp_path),
                     rerank=RerankConfig(steps=("alpha_qe",)), out=str(tmp_path / "again"))
    again = run_eval(cfg)
    assert again["baseline_metrics"] == record["baseline_metrics"]
    assert again["timings"]["descriptors_from"] == str(tmp_path) and "embed_s" not in again["timings"]
    np.save(tmp_path / "again" / "database.npy", np.load(tmp_path / "database.npy")[:-1])
    with pytest.raises(ValueError, match="descriptors: .* 55 images, ukbench-56 has 56 and 56"):
        run_eval(dataclasses.replace(cfg, descriptors=str(tmp_path / "again")))


def test_a_new_step_is_one_registry_line(monkeypatch, descriptors):
    """A step added as one `STEP_REGISTRY` line runs in its place, validated and timed."""
    from raytrieval.evaluation import rerank as module

    def reverse(state):  # the worst re-ranking: each query's ranking backwards
        state.ranks = state.ranks[:, ::-1]

    registry = {**module.STEP_REGISTRY, "reverse": module.Step(reverse)}
    monkeypatch.setattr(module, "STEP_REGISTRY", registry)
    q, x = descriptors
    res = rerank(RerankConfig(steps=("reverse", "aqe")), q, x)  # runs after QE: registry order
    np.testing.assert_array_equal(res.ranks, rank_all(average_qe(q, x, rank_all(q, x), 2), x)[:, ::-1])
    assert "reverse" in res.ms_per_query and RerankConfig(steps=("reverse",)).label == "reverse"


def test_eval_reads_known_database_descriptors_by_real_path(shared_data, tmp_path):
    """A pipeline's collection descriptors stand in for the benchmark images they cover; the rest
    and every (cropped) query are embedded."""
    import os

    from raytrieval.cluster.eval_stage import EvalConfig, run_eval
    from raytrieval.evaluation.datasets import prepare_benchmark
    from raytrieval.retrieval.model import ModelSpec

    cfg = EvalConfig(dataset="ukbench-56", data_root=str(shared_data), workers=0, out=str(tmp_path / "full"),
                     model=ModelSpec(max_size=96))
    full = run_eval(cfg)
    db, q = np.load(tmp_path / "full" / "database.npy"), np.load(tmp_path / "full" / "queries.npy")
    images = prepare_benchmark("ukbench-56", str(shared_data)).images
    # the odd images "known" as the negated descriptor: read, not embedded again
    known = {os.path.realpath(p): -db[i] for i, p in enumerate(images) if i % 2}
    part = run_eval(dataclasses.replace(cfg, out=str(tmp_path / "part")), known)
    got = np.load(tmp_path / "part" / "database.npy")
    assert part["timings"]["database_reused"] == 28 and full["timings"]["database_reused"] == 0
    np.testing.assert_allclose(got[1::2], -db[1::2])
    np.testing.assert_allclose(got[0::2], db[0::2], atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "part" / "queries.npy"), q, atol=1e-5)
    known[os.path.realpath(images[1])] = db[1, :7]
    with pytest.raises(ValueError, match="known: descriptor of .* has shape \\(7,\\)"):
        run_eval(dataclasses.replace(cfg, out=str(tmp_path / "bad")), known)
