"""Hard negatives, cirtorch style: never from the query's cluster, at most one per cluster (brute force)."""

from __future__ import annotations

import numpy as np
import pytest

import scipy.sparse as sp

from raytrieval.mining.hardneg import link_labels, mine_hard_negatives, random_negatives, sample_pool, singleton_labels


def _l2n(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _brute(Q, P, ql, pl, m, linked=frozenset()):
    """The cirtorch loop: walk the pool by decreasing similarity, skip own, linked and used clusters."""
    out = np.full((len(Q), m), -1, np.int64)
    for i in range(len(Q)):
        sims = [(-float(np.dot(Q[i].astype(np.float64), P[j].astype(np.float64))), j) for j in range(len(P))]
        used, picked = set(), []
        for _, j in sorted(sims):
            if pl[j] == ql[i] or pl[j] in used or (ql[i], pl[j]) in linked:
                continue
            used.add(pl[j])
            picked.append(j)
            if len(picked) == m:
                break
        out[i, : len(picked)] = picked
    return out


def test_singleton_labels():
    assert singleton_labels(np.array([2, -1, 0, -1, 2])).tolist() == [2, 3, 0, 4, 2]
    assert singleton_labels(np.array([-1, -1])).tolist() == [0, 1]
    with pytest.raises(ValueError, match="labels"):
        singleton_labels(np.array([0.5]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hard_negatives_match_the_brute_force_loop(seed):
    rng = np.random.default_rng(seed)
    n_clusters, pool_n = 12, 150
    centers = rng.standard_normal((n_clusters, 16))
    pool_labels = rng.integers(0, n_clusters, pool_n)
    P = _l2n(centers[pool_labels] + 0.8 * rng.standard_normal((pool_n, 16)))
    q_idx = rng.choice(pool_n, 40, replace=False)  # queries are pool images (as in training)
    Q, ql = P[q_idx], pool_labels[q_idx]
    neg = mine_hard_negatives(Q, P, ql, pool_labels, num_negatives=5)
    assert neg.shape == (40, 5) and neg.dtype == np.int64
    np.testing.assert_array_equal(neg, _brute(Q, P, ql, pool_labels, 5))
    for i in range(40):
        assert not np.any(pool_labels[neg[i]] == ql[i])  # never the query's cluster (nor itself)
        assert len(set(pool_labels[neg[i]].tolist())) == 5  # one per cluster
        sims = P[neg[i]] @ Q[i]
        assert np.all(np.diff(sims) <= 1e-6)  # hardest first


def test_padding_when_the_pool_has_few_clusters():
    P = _l2n(np.eye(4, 3, dtype=np.float32) + 0.1)
    labels = np.array([0, 0, 1, 2])
    neg = mine_hard_negatives(P[:1], P, labels[:1], labels, num_negatives=3)
    assert sorted(neg[0, :2].tolist()) == [2, 3] and neg[0, 2] == -1
    with pytest.raises(ValueError, match="labels"):
        mine_hard_negatives(P, P, np.array([-1, 0, 1, 2]), labels)
    with pytest.raises(ValueError, match="num_negatives"):
        mine_hard_negatives(P, P, labels, labels, num_negatives=0)


def test_random_negatives_and_pool():
    labels = np.repeat(np.arange(10), 3)
    neg = random_negatives(labels, labels, num_negatives=4, seed=1)
    for i, row in enumerate(neg):
        assert -1 not in row and labels[i] not in labels[row] and len(set(labels[row].tolist())) == 4
    np.testing.assert_array_equal(neg, random_negatives(labels, labels, num_negatives=4, seed=1))
    pool = sample_pool(100, 30, seed=3)
    assert pool.shape == (30,) and len(set(pool.tolist())) == 30 and np.all(np.diff(pool) > 0)
    assert sample_pool(5, 30).tolist() == [0, 1, 2, 3, 4]


def test_large_pool_shortlist_is_exact():
    """Pools beyond the shortlist (16 x num_negatives) give the brute-force answer, ties included."""
    rng = np.random.default_rng(5)
    pool_labels = rng.integers(0, 300, 600)
    P = _l2n(rng.standard_normal((600, 8)))
    P[10] = P[11]  # an exact tie
    Q, ql = P[:30], pool_labels[:30]
    neg = mine_hard_negatives(Q, P, ql, pool_labels, num_negatives=3)
    np.testing.assert_array_equal(neg, _brute(Q, P, ql, pool_labels, 3))
    few = np.repeat(np.arange(3), 200)  # only 2 other clusters: the shortlist runs out of clusters
    neg = mine_hard_negatives(Q, P, few[:30], few, num_negatives=3)
    np.testing.assert_array_equal(neg, _brute(Q, P, few[:30], few, 3))


def test_linked_clusters_are_never_negatives():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 20, 200)
    P = _l2n(rng.standard_normal((200, 8)))
    a, b = rng.integers(0, 200, 40), rng.integers(0, 200, 40)  # some image pairs, e.g. kNN edges
    links = link_labels(labels, a, b)
    assert links.shape == (20, 20) and (links != links.T).nnz == 0
    linked = {(int(x), int(y)) for x, y in zip(labels[a], labels[b])}
    linked |= {(y, x) for x, y in linked}
    q = rng.choice(200, 25, replace=False)
    neg = mine_hard_negatives(P[q], P, labels[q], labels, num_negatives=4, links=links)
    np.testing.assert_array_equal(neg, _brute(P[q], P, labels[q], labels, 4, linked))
    for i, row in zip(q, neg):
        assert not any((int(labels[i]), int(labels[j])) in linked for j in row if j >= 0)
    rnd = random_negatives(labels[q], labels, num_negatives=4, seed=0, links=links)
    for i, row in zip(q, rnd):
        assert not any((int(labels[i]), int(labels[j])) in linked or labels[j] == labels[i] for j in row if j >= 0)
    with pytest.raises(ValueError, match="links"):
        mine_hard_negatives(P[q], P, labels[q], labels, links=sp.eye(5, dtype=bool))


def test_knn_exclusion_falls_back_per_query_when_it_leaves_no_negative():
    """Three clusters; 0 and 1 kNN-linked, 2 linked to nobody: only cluster 0/1 queries fall back."""
    from raytrieval.mining.tuples import TupleRules, TupleSource, build_tuples, plan_epoch

    labels = np.array([0, 0, 1, 1, 2, 2], np.int64)
    ids = [f"i{i}" for i in range(6)]
    links = np.array([[0, 2], [2, 0]], np.int64)  # cluster 0 <-> cluster 1
    desc = np.eye(6, dtype=np.float32)
    rules = TupleRules(negatives="hard", num_negatives=2, pool_size=6)
    linked = TupleSource(ids=ids, labels=labels, links=links)
    plan = plan_epoch(linked, rules, epoch=0)
    tuples = build_tuples(linked, rules, plan, desc[plan.embed])
    negs = {int(t[0]): {int(labels[n]) for n in t[2:] if n >= 0} for t in tuples}
    assert sorted(negs) == list(range(6))  # no query dropped
    assert negs[0] == {2} and negs[2] == {2}  # cluster 2 is unlinked: the link is honoured
    assert negs[4] == {0, 1}  # cluster 2 is linked to nobody
    # cluster 0 linked to 1 AND 2: the kNN rule would leave nothing, so cirtorch's rule applies
    everything = TupleSource(ids=ids, labels=labels, links=np.array([[0, 2], [0, 4], [2, 4]], np.int64))
    plan = plan_epoch(everything, rules, epoch=0)
    tuples = build_tuples(everything, rules, plan, desc[plan.embed])
    assert len(tuples) == 6 and all((t[2:] >= 0).any() for t in tuples)
    assert all(labels[n] != labels[t[0]] for t in tuples for n in t[2:] if n >= 0)
