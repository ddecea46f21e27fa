"""Metrics against naive references: explicit loops over rankings, AP by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raytrieval.evaluation.metrics import (
    compute_ap,
    compute_map,
    evaluate_classic,
    evaluate_revisitop,
    ns_score,
    precision_recall_curve,
    ranks_from_similarity,
    revisitop_protocols,
)

KAPPAS = (1, 5, 10)


def naive_query(row, ok, junk, kappas=KAPPAS):
    """AP and revisitop P@k of one query by walking the ranking.

    Junk images are skipped; at each positive the trapezoid between the precision just before
    it (1 at the very first position) and the precision at it is added with width 1/len(ok).
    P@k follows revisitop: k is clipped to the (1-based, junk-free) position of the last
    retrieved positive.
    """
    ok, junk = set(int(x) for x in ok), set(int(x) for x in junk)
    if not ok:
        return math.nan, [math.nan] * len(kappas)
    ap, seen, hits, positions = 0.0, 0, 0, []
    for item in row:
        item = int(item)
        if item in junk:
            continue
        seen += 1
        if item in ok:
            before = 1.0 if seen == 1 else hits / (seen - 1)
            hits += 1
            ap += (before + hits / seen) / 2.0 / len(ok)
            positions.append(seen)
    if not positions:
        return ap, [0.0] * len(kappas)
    prs = []
    for k in kappas:
        kq = min(max(positions), k)
        prs.append(sum(1 for p in positions if p <= kq) / kq)
    return ap, prs


def naive_cpp_ap(row, ok, junk):
    """compute_ap.cpp from the Oxford buildings page, transcribed as a loop."""
    ok, junk = set(int(x) for x in ok), set(int(x) for x in junk)
    old_recall, old_precision, ap, hits, j = 0.0, 1.0, 0.0, 0, 0
    for item in row:
        if int(item) in junk:
            continue
        if int(item) in ok:
            hits += 1
        recall = hits / len(ok)
        precision = hits / (j + 1.0)
        ap += (recall - old_recall) * ((old_precision + precision) / 2.0)
        old_recall, old_precision = recall, precision
        j += 1
    return ap


def random_case(seed: int, nq: int = 40, ndb: int = 60, keep: int = 45):
    """Random rankings truncated to ``keep`` columns (some positives never ranked), junk, and
    some queries without positives."""
    rng = np.random.default_rng(seed)
    ranks = np.stack([rng.permutation(ndb) for _ in range(nq)])[:, :keep].astype(np.int64)
    gnd = []
    for i in range(nq):
        n_ok = 0 if i % 7 == 3 else int(rng.integers(1, 12))
        n_junk = int(rng.integers(0, 6))
        chosen = rng.choice(ndb, size=n_ok + n_junk, replace=False)
        gnd.append({"ok": chosen[:n_ok].astype(np.int64), "junk": chosen[n_ok:].astype(np.int64)})
    # Put a few positives near the top so precision values are not all tiny.
    for i in range(0, nq, 3):
        if len(gnd[i]["ok"]):
            row = list(ranks[i])
            x = int(gnd[i]["ok"][0])
            if x in row:
                row.remove(x)
            ranks[i] = np.array([x] + row[: keep - 1])
    return ranks, gnd


def test_hand_computed_example():
    # Query 0: ranking [3, 7, 1, 9, 0, 2] (truncated), ok = {7, 9, 5}, junk = {1}; 5 is never
    # ranked. Without the junk the list is [3, 7, 9, 0, 2]: positives at 0-based 1 and 2.
    #   1st positive (j=0, r=1): precisions 0/1 and 1/2 -> (0 + 1/2)/2 * 1/3 = 1/12
    #   2nd positive (j=1, r=2): precisions 1/2 and 2/3 -> (1/2 + 2/3)/2 * 1/3 = 7/36
    #   AP = 1/12 + 7/36 = 10/36 = 5/18.
    #   1-based positions [2, 3], last = 3: P@1 = 0/1, P@5 = 2/min(3,5) = 2/3, P@10 = 2/3.
    # Query 1: no positives -> NaN, excluded.
    # Query 2: ok = {3} at rank 0: AP = (1 + 1)/2 = 1; P@k = 1/min(1, k) = 1.
    # mAP = (5/18 + 1)/2 = 23/36; mP@1 = 1/2; mP@5 = mP@10 = (2/3 + 1)/2 = 5/6.
    ranks = np.array([[3, 7, 1, 9, 0, 2]] * 3)
    gnd = [
        {"ok": np.array([7, 9, 5]), "junk": np.array([1])},
        {"ok": np.array([], dtype=np.int64), "junk": np.array([1])},
        {"ok": np.array([3]), "junk": np.array([], dtype=np.int64)},
    ]
    mean_ap, aps, mpk, prs = compute_map(ranks, gnd, KAPPAS)
    assert aps[0] == pytest.approx(5 / 18)
    assert math.isnan(aps[1]) and np.isnan(prs[1]).all()
    assert aps[2] == pytest.approx(1.0)
    np.testing.assert_allclose(prs[0], [0.0, 2 / 3, 2 / 3])
    np.testing.assert_allclose(prs[2], [1.0, 1.0, 1.0])
    assert mean_ap == pytest.approx(23 / 36)
    np.testing.assert_allclose(mpk, [0.5, 5 / 6, 5 / 6])
    # compute_ap directly on the junk-free positions.
    assert compute_ap(np.array([1, 2]), 3) == pytest.approx(5 / 18)


@pytest.mark.parametrize("seed", range(5))
def test_compute_map_matches_naive(seed):
    ranks, gnd = random_case(seed)
    mean_ap, aps, mpk, prs = compute_map(ranks, gnd, KAPPAS)
    ref = [naive_query(ranks[i], g["ok"], g["junk"]) for i, g in enumerate(gnd)]
    ref_aps = np.array([r[0] for r in ref])
    ref_prs = np.array([r[1] for r in ref])
    np.testing.assert_allclose(aps, ref_aps, rtol=1e-12, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(prs, ref_prs, rtol=1e-12, atol=1e-12, equal_nan=True)
    valid = ~np.isnan(ref_aps)
    assert 0 < valid.sum() < len(gnd)  # the case does contain queries without positives
    assert mean_ap == pytest.approx(ref_aps[valid].mean(), abs=1e-12)
    np.testing.assert_allclose(mpk, ref_prs[valid].mean(axis=0), atol=1e-12)
    # Some positives were not ranked at all (truncation): AP < 1 even for perfect prefixes.
    assert any(len(set(g["ok"]) - set(ranks[i])) for i, g in enumerate(gnd))


def test_compute_map_perfect_and_all_empty():
    ranks = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    gnd = [{"ok": np.array([0, 1]), "junk": np.array([])},
           {"ok": np.array([3]), "junk": np.array([2])}]
    mean_ap, aps, mpk, _ = compute_map(ranks, gnd)
    assert mean_ap == 1.0 and np.all(aps == 1.0) and np.all(mpk == 1.0)
    empty = [{"ok": np.array([], dtype=np.int64), "junk": np.array([0])}] * 2
    mean_ap, aps, mpk, prs = compute_map(ranks, empty)
    assert math.isnan(mean_ap) and np.isnan(aps).all() and np.isnan(mpk).all()


def test_junk_shift_only_counts_junk_before():
    # Junk after the last positive changes nothing; junk before it moves it up.
    ranks = np.array([[5, 0, 6, 1, 7]])
    base = compute_map(ranks, [{"ok": np.array([0, 1]), "junk": np.array([])}])[0]
    after = compute_map(ranks, [{"ok": np.array([0, 1]), "junk": np.array([7])}])[0]
    before = compute_map(ranks, [{"ok": np.array([0, 1]), "junk": np.array([5, 6])}])[0]
    assert after == pytest.approx(base)
    assert before == pytest.approx(1.0)


def test_compute_map_validates_shape():
    gnd = [{"ok": np.array([0]), "junk": np.array([])}] * 3
    with pytest.raises(ValueError, match="rows"):
        compute_map(np.zeros((4, 3), dtype=np.int64), gnd)
    with pytest.raises(ValueError, match="2-D"):
        compute_map(np.zeros(3, dtype=np.int64), gnd)
    with pytest.raises(ValueError, match="nres"):
        compute_ap(np.array([0]), 0)


def test_revisitop_protocols():
    raw = [{"easy": [1, 2], "hard": [3], "junk": [4]},
           {"easy": [], "hard": [0], "junk": []}]
    p = revisitop_protocols(raw)
    assert set(p) == {"easy", "medium", "hard"}
    assert p["easy"][0]["ok"].tolist() == [1, 2]
    assert sorted(p["easy"][0]["junk"].tolist()) == [3, 4]
    assert sorted(p["medium"][0]["ok"].tolist()) == [1, 2, 3]
    assert p["medium"][0]["junk"].tolist() == [4]
    assert p["hard"][0]["ok"].tolist() == [3]
    assert sorted(p["hard"][0]["junk"].tolist()) == [1, 2, 4]
    assert p["easy"][1]["ok"].size == 0 and p["hard"][1]["ok"].tolist() == [0]
    for proto in p.values():
        for g in proto:
            assert g["ok"].dtype == np.int64 and g["junk"].dtype == np.int64
    with pytest.raises(ValueError, match="hard"):
        revisitop_protocols([{"easy": [1], "junk": []}])


@pytest.mark.parametrize("seed", range(3))
def test_evaluate_revisitop_matches_naive(seed):
    rng = np.random.default_rng(100 + seed)
    nq, ndb = 12, 40
    ranks = np.stack([rng.permutation(ndb) for _ in range(nq)]).astype(np.int64)
    raw = []
    for i in range(nq):
        c = rng.choice(ndb, size=12, replace=False)
        ne = 0 if i == 2 else int(rng.integers(1, 5))
        nh = 0 if i == 5 else int(rng.integers(1, 5))
        raw.append({"easy": c[:ne], "hard": c[ne:ne + nh], "junk": c[ne + nh:ne + nh + 2]})
    res = evaluate_revisitop(ranks, raw)
    definitions = {
        "easy": lambda g: (g["easy"], list(g["junk"]) + list(g["hard"])),
        "medium": lambda g: (list(g["easy"]) + list(g["hard"]), g["junk"]),
        "hard": lambda g: (g["hard"], list(g["junk"]) + list(g["easy"])),
    }
    for name, define in definitions.items():
        ref = [naive_query(ranks[i], *define(g)) for i, g in enumerate(raw)]
        ref_aps = np.array([r[0] for r in ref])
        ref_prs = np.array([r[1] for r in ref])
        valid = ~np.isnan(ref_aps)
        out = res[name]
        assert set(out) == {"map", "mp@1", "mp@5", "mp@10", "aps"}
        assert isinstance(out["map"], float) and isinstance(out["aps"], list)
        np.testing.assert_allclose(out["aps"], ref_aps, atol=1e-12, equal_nan=True)
        assert out["map"] == pytest.approx(ref_aps[valid].mean(), abs=1e-12)
        for j, k in enumerate(KAPPAS):
            assert out[f"mp@{k}"] == pytest.approx(ref_prs[valid, j].mean(), abs=1e-12)
            assert 0.0 <= out[f"mp@{k}"] <= 1.0
    assert math.isnan(res["easy"]["aps"][2]) and math.isnan(res["hard"]["aps"][5])


def test_evaluate_classic_matches_cpp_loop():
    ranks, gnd = random_case(7, nq=20, ndb=30, keep=30)
    gnd = [g for g in gnd if len(g["ok"])]
    ranks = ranks[: len(gnd)]
    res = evaluate_classic(ranks, gnd)
    ref = np.array([naive_cpp_ap(ranks[i], g["ok"], g["junk"]) for i, g in enumerate(gnd)])
    np.testing.assert_allclose(res["aps"], ref, atol=1e-12)
    assert res["map"] == pytest.approx(ref.mean(), abs=1e-12)
    assert {"mp@1", "mp@5", "mp@10"} <= set(res)


def test_ns_score_by_hand():
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    ranks = np.array([
        [0, 1, 2, 3, 4, 5, 6, 7],  # 4 of group 0 in the top 4
        [1, 4, 0, 5, 2, 3, 6, 7],  # 1, 0 -> 2
        [2, 4, 5, 6, 7, 0, 1, 3],  # 2 -> 1
        [4, 5, 6, 7, 0, 1, 2, 3],  # none -> 0
        [4, 5, 6, 7, 0, 1, 2, 3],  # 4
        [5, 0, 4, 1, 6, 7, 2, 3],  # 5, 4 -> 2
        [6, 7, 5, 0, 1, 2, 3, 4],  # 3
        [7, 0, 1, 2, 3, 4, 5, 6],  # 1
    ])
    # (4 + 2 + 1 + 0 + 4 + 2 + 3 + 1) / 8 = 17 / 8
    assert ns_score(ranks, groups) == pytest.approx(17 / 8)
    assert ns_score(ranks, groups, top=1) == pytest.approx(7 / 8)
    # Rows 0 and 1 asked as queries of groups 0 and 1: {0,1,2,3} -> 4, {4,5} -> 2; mean 3.
    assert ns_score(ranks[:2], groups, query_groups=np.array([0, 1])) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="query_groups"):
        ns_score(ranks[:2], groups)


def test_ranks_from_similarity_stable_ties():
    sim = np.array([[0.1, 0.5, 0.5, 0.9, 0.1], [1.0, 1.0, 1.0, 1.0, 1.0]], dtype=np.float32)
    ranks = ranks_from_similarity(sim)
    assert ranks.dtype == np.int64 and ranks.shape == sim.shape
    for row_sim, row_rank in zip(sim, ranks):
        ref = sorted(range(len(row_sim)), key=lambda j: (-row_sim[j], j))
        assert row_rank.tolist() == ref


def test_precision_recall_curve_integrates_to_ap():
    trapezoid = getattr(np, "trapezoid", None) or np.trapz
    ranks, gnd = random_case(3)
    for i, g in enumerate(gnd):
        if not len(g["ok"]):
            continue
        recall, precision = precision_recall_curve(ranks[i], g["ok"], g["junk"])
        assert recall[0] == 0.0 and precision[0] == 1.0
        assert np.all(np.diff(recall) >= 0) and recall[-1] <= 1.0
        assert len(recall) == 1 + sum(1 for x in ranks[i] if x not in set(g["junk"]))
        ap = naive_query(ranks[i], g["ok"], g["junk"])[0]
        assert trapezoid(precision, recall) == pytest.approx(ap, abs=1e-12)
    with pytest.raises(ValueError, match="ok"):
        precision_recall_curve(ranks[0], [], [])
