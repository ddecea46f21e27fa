"""Losses against loops over explicit pairs and triplets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raytrieval.trainers.losses import contrastive_loss, pair_distance, triplet_loss, tuple_loss


def _unit(rng: np.random.Generator, n: int, d: int) -> torch.Tensor:
    x = rng.normal(size=(n, d))
    return torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))


def _dist(a, b) -> float:
    return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))


def test_contrastive_matches_loop_over_pairs():
    rng = np.random.default_rng(0)
    a, b = _unit(rng, 12, 8), _unit(rng, 12, 8)
    label = torch.from_numpy(rng.integers(0, 2, 12)).double()
    margin = 0.8
    d = pair_distance(a, b, eps=0.0)
    expected = []
    for i in range(12):
        di = _dist(a[i], b[i])
        expected.append(0.5 * di**2 if label[i] == 1 else 0.5 * max(margin - di, 0.0) ** 2)
    got = contrastive_loss(d, label, margin, reduction="none")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert float(contrastive_loss(d, label, margin)) == pytest.approx(sum(expected), rel=1e-12)
    assert float(contrastive_loss(d, label, margin, "mean")) == pytest.approx(sum(expected) / 12, rel=1e-12)


def test_triplet_matches_loop_over_triplets():
    rng = np.random.default_rng(1)
    anc, pos, neg = _unit(rng, 10, 6), _unit(rng, 10, 6), _unit(rng, 10, 6)
    margin = 0.3
    dp, dn = pair_distance(anc, pos, eps=0.0), pair_distance(anc, neg, eps=0.0)
    sq = [max(_dist(anc[i], pos[i]) ** 2 - _dist(anc[i], neg[i]) ** 2 + margin, 0.0) for i in range(10)]
    plain = [max(_dist(anc[i], pos[i]) - _dist(anc[i], neg[i]) + margin, 0.0) for i in range(10)]
    np.testing.assert_allclose(triplet_loss(dp, dn, margin, "none").numpy(), sq, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(triplet_loss(dp, dn, margin, "none", squared=False).numpy(), plain, rtol=1e-12, atol=1e-15)
    assert float(triplet_loss(dp, dn, margin)) == pytest.approx(sum(sq), rel=1e-12)


@pytest.mark.parametrize("loss", ["contrastive", "triplet"])
def test_tuple_loss_is_the_sum_over_the_tuples_pairs(loss):
    rng = np.random.default_rng(2)
    desc = _unit(rng, 2 + 4, 16).float()  # query, positive, 4 negatives
    margin = 0.7 if loss == "contrastive" else 0.1
    value, dp, dn = tuple_loss(loss, desc, margin)
    q, p, negs = desc[0], desc[1], desc[2:]
    d_qp = _dist(q, p)
    if loss == "contrastive":
        expected = 0.5 * d_qp**2 + sum(0.5 * max(margin - _dist(q, n), 0.0) ** 2 for n in negs)
    else:
        expected = sum(max(d_qp**2 - _dist(q, n) ** 2 + margin, 0.0) for n in negs)
    assert float(value) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert float(dp[0]) == pytest.approx(d_qp, rel=1e-4)
    np.testing.assert_allclose(dn.numpy(), [_dist(q, n) for n in negs], rtol=1e-4)


def test_gradient_is_finite_for_identical_descriptors():
    x = torch.nn.functional.normalize(torch.ones(3, 4), dim=1).requires_grad_()
    value, _, _ = tuple_loss("contrastive", x, 0.7)
    value.backward()
    assert torch.isfinite(x.grad).all()


def test_bad_arguments_name_the_field():
    d = torch.ones(3)
    with pytest.raises(ValueError, match="reduction"):
        contrastive_loss(d, torch.ones(3), 0.7, reduction="max")
    with pytest.raises(ValueError, match="margin"):
        triplet_loss(d, d, margin=0.0)
    with pytest.raises(ValueError, match="loss"):
        tuple_loss("arcface", torch.ones(3, 4), 0.5)
    with pytest.raises(ValueError, match="descriptors"):
        tuple_loss("triplet", torch.ones(2, 4), 0.5)
    with pytest.raises(ValueError, match="label"):
        contrastive_loss(d, torch.ones(2), 0.7)
