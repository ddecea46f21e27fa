"""Self-mAP against AP computed by hand and against a naive leave-one-out loop."""

from __future__ import annotations

import numpy as np
import pytest

from raytrieval.evaluation.rerank import RerankConfig, rerank
from raytrieval.evaluation.metrics import compute_map
from raytrieval.evaluation.selfval import self_aps, self_map, selfval_set


def _ap_by_hand(ranking: list[int], ok: set[int], junk: set[int]) -> float:
    """revisitop's trapezoid AP, written as a plain loop over the junk-free ranking."""
    kept = [i for i in ranking if i not in junk]
    ap, hits = 0.0, 0
    for r, i in enumerate(kept):
        if i in ok:
            p0 = 1.0 if r == 0 else hits / r
            hits += 1
            p1 = hits / (r + 1)
            ap += (p0 + p1) / 2 / len(ok)
    return ap


def test_ground_truth_and_ap_of_a_tiny_collection():
    labels = np.array([0, 0, 0, -1, 1, 1, -1])
    val = np.array([1, 1, 1, 0, 0, 0, 0], bool)
    links = np.array([[0, 3], [4, 6], [2, 4]])  # 3 is linked to cluster 0; 4 is clustered (not junk)
    sv = selfval_set(labels, val, links)
    assert sv.queries.tolist() == [0, 1, 2]
    assert sv.gnd[0]["ok"].tolist() == [1, 2] and sorted(sv.gnd[0]["junk"].tolist()) == [0, 3]
    assert sorted(sv.gnd[2]["junk"].tolist()) == [2, 3]
    ranks = np.array([[0, 4, 1, 3, 2, 5, 6], [1, 0, 2, 3, 4, 5, 6], [5, 3, 2, 6, 1, 0, 4]])
    # query 0 junk-free: 4 1 2 5 6 -> hits at 1, 2: (0 + 1/2)/4 + (1/2 + 2/3)/4 = 0.41667
    # query 1: 0 2 3 4 ... (junk 1, 3) -> 0 2 4 5 6: hits at 0, 1: AP 1
    # query 2: 5 6 1 0 4 -> hits at 2, 3: (0 + 1/3)/4 + (1/3 + 1/2)/4 = 0.29167
    expected = [(0.5 + 0.5 + 2 / 3) / 4, 1.0, (1 / 3 + 1 / 3 + 1 / 2) / 4]
    for q in range(3):
        assert _ap_by_hand(ranks[q].tolist(), set(sv.gnd[q]["ok"].tolist()), set(sv.gnd[q]["junk"].tolist())) == pytest.approx(expected[q])
    assert compute_map(ranks, sv.gnd)[1] == pytest.approx(expected)


def test_self_map_equals_a_leave_one_out_loop():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16))
    labels = np.repeat(np.arange(4), 5)
    labels[[3, 9]] = -1  # unclustered images
    X = centres[np.repeat(np.arange(4), 5)] + 0.9 * rng.normal(size=(20, 16))
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    val = np.isin(labels, [1, 2])
    links = np.array([[3, 5], [9, 11]])
    sv = selfval_set(labels, val, links)
    aps = []
    for q in np.flatnonzero(val):
        others = [i for i in range(20) if i != q]
        order = [others[j] for j in np.argsort(-(X[others] @ X[q]), kind="stable")]
        ok = {i for i in np.flatnonzero(labels == labels[q]) if i != q}
        junk = {i for a, b in links for i in (a, b) if labels[i] < 0 and labels[a + b - i] == labels[q]}
        aps.append(_ap_by_hand(order, ok, junk))
    assert self_aps(X, sv) == pytest.approx(aps)
    assert self_map(X, sv) == pytest.approx(np.mean(aps))
    assert 0.0 < self_map(X, sv) < 1.0


def test_leave_one_out_keeps_query_expansion_off_the_query():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(12, 8)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    cfg = RerankConfig(steps=("aqe",), qe_k=1)
    q = np.array([0, 5])
    ranks = rerank(cfg, X[q], X, exclude=q).ranks
    assert ranks[:, -1].tolist() == [0, 5]
    # AQE with one neighbour: the nearest other image, never the query itself
    first = [int(np.argsort(-(np.delete(X, i, 0) @ X[i]))[0]) for i in q]
    first = [f + (f >= i) for f, i in zip(first, q)]
    Qe = X[q] + X[first]
    Qe /= np.linalg.norm(Qe, axis=1, keepdims=True)
    expect = np.argsort(-(Qe @ X.T), axis=1, kind="stable")
    expect = np.array([[j for j in row if j != i] + [i] for row, i in zip(expect, q)])
    assert np.array_equal(ranks, expect)


def test_no_validation_cluster_gives_nan_and_bad_input_is_named():
    sv = selfval_set(np.array([-1, -1, 0, 0]), np.zeros(4, bool))
    assert sv.num_queries == 0 and np.isnan(self_map(np.eye(4, dtype=np.float32), sv))
    with pytest.raises(ValueError, match="val"):
        selfval_set(np.array([-1, 0]), np.array([True, False]))
    with pytest.raises(ValueError, match="links"):
        selfval_set(np.array([0, 0]), np.array([True, True]), np.array([[0, 5]]))


def test_pseudo_queries_keep_their_verified_boxes_from_the_artifacts(tmp_path):
    """selfval_for reads each pseudo-query's box from clusters.parquet; unclustered and
    box-less images give None; the boxes follow `queries`."""
    import pyarrow as pa

    from raytrieval.mining.cleaning import clusters_table
    from raytrieval.mining.split import SPLIT_SCHEMA
    from raytrieval.retrieval.artifacts import atomic_write_table
    from raytrieval.trainers.data import selfval_for

    ids = [f"img{i}" for i in range(6)]
    labels = np.array([0, 0, 1, 1, 1, -1])
    boxes = np.array([[1, 2, 30, 40], [0, 0, 10, 10], [5, 5, 50, 60], [np.nan] * 4, [2, 3, 4, 5], [0, 0, 9, 9]], np.float32)
    atomic_write_table(clusters_table(ids, labels, boxes), tmp_path / "clusters.parquet")
    split = pa.Table.from_arrays([pa.array(ids[:5]), pa.array(labels[:5], pa.int64()),
                                  pa.array(["train", "train", "val", "val", "val"])], schema=SPLIT_SCHEMA)
    atomic_write_table(split, tmp_path / "split.parquet")
    order = ["img4", "img5", "img0", "img3", "img2", "img1"]  # another order than the artifacts'
    sv = selfval_for(order, str(tmp_path / "clusters.parquet"), str(tmp_path / "split.parquet"), None)
    assert [order[q] for q in sv.queries] == ["img4", "img3", "img2"]
    assert sv.boxes == [(2.0, 3.0, 4.0, 5.0), None, (5.0, 5.0, 50.0, 60.0)]
    with pytest.raises(ValueError, match="boxes"):
        selfval_set(labels, labels == 1, boxes=[None] * 5)


def test_cropped_pseudo_queries_are_scored_against_the_whole_images():
    """With Q (the pseudo-queries cropped), self-mAP is the leave-one-out loop over Q's rows."""
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(3), 4)
    X = rng.normal(size=(12, 8)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    sv = selfval_set(labels, labels == 1)
    Q = rng.normal(size=(sv.num_queries, 8)).astype(np.float32)
    aps = []
    for q, row in zip(sv.queries, Q):
        others = [i for i in range(12) if i != q]
        order = [others[j] for j in np.argsort(-(X[others] @ row), kind="stable")]
        aps.append(_ap_by_hand(order, {i for i in range(4, 8) if i != q}, set()))
    assert self_map(X, sv, Q=Q) == pytest.approx(np.mean(aps))
    assert self_map(X, sv, Q=Q) != pytest.approx(self_map(X, sv))
