"""Label-free decisions: the serving gate and the re-ranking choice (pure), then the pipeline on
a bare folder (ukbench-56 images copied without their ground truth)."""

from __future__ import annotations

import numpy as np
import pytest

from raytrieval.evaluation.selfval import describe, gate, rerank_grid, select_rerank, self_map, selfval_set


def _chains(seed: int, clusters: int = 8, length: int = 15, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Clusters that are curved chains crossing each other: descriptor neighbours along a chain
    are its own, neighbours far along it are other chains'. Diffusion over a small graph follows
    the chains; a large graph (k=20 > a chain's reach) jumps between them."""
    rng = np.random.default_rng(seed)
    points, labels = [], []
    for c in range(clusters):
        x, d = 0.3 * rng.normal(size=dim), rng.normal(size=dim)
        for _ in range(length):
            d += 0.3 * rng.normal(size=dim)
            d /= np.linalg.norm(d)
            x = x + 0.6 * d
            points.append(x + 0.15 * rng.normal(size=dim))
            labels.append(c)
    X = np.array(points) + 3.0 / np.sqrt(dim)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32), np.array(labels)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_rerank_selection_picks_the_diffusion_graph_the_ground_truth_prefers(seed):
    X, labels = _chains(seed)
    grid = rerank_grid(len(X), np.bincount(labels))
    # the truth: mAP of every setting with every image a query and its chain its positives
    truth = [self_map(X, selfval_set(labels, np.ones(len(X), bool)), cfg) for cfg in grid]
    best = grid[int(np.argmax(truth))]
    assert "diffusion" in best.steps and best.diffusion_k < 20  # the published k=20 is wrong here
    # the label-free choice sees only half of the clusters (the validation clusters)
    chosen, scores = select_rerank(X, selfval_set(labels, np.isin(labels, [0, 1, 2, 3])), grid)
    assert describe(grid[chosen]) == describe(best)
    assert scores[chosen] > scores[0]  # better than no re-ranking


def test_grid_is_narrowed_by_the_collection():
    grid = [describe(c) for c in rerank_grid(8, np.array([2, 3]))]
    assert grid[0] == "none" and "alpha_qe k=2 alpha=3" in grid and "alpha_qe k=3 alpha=0" not in grid
    assert "diffusion k=5 kq=3" in grid and not any(g.startswith("diffusion k=10") for g in grid)


def test_gate_serves_the_fine_tuned_model_only_with_a_margin():
    ok, why = gate(0.62, 0.60, 0.01)
    assert ok and "fine-tuned model is served" in why
    ok, why = gate(0.605, 0.60, 0.01)
    assert not ok and "off-the-shelf model is served" in why
    assert not gate(0.40, 0.60, 0.01)[0]
    assert not gate(float("nan"), 0.60, 0.01)[0]
