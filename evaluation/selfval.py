"""Self-mAP: label-free validation from the geometry the clean stage verified.

A user's collection has no ground truth, but spatial verification left clusters of images that
certainly show the same thing. The validation clusters of the split stage become a benchmark:

- pseudo-queries: the images of the validation clusters, each left out of the database (it is
  junk of its own query, which removes it from the ranking as revisitop removes junk); whole
  images, or cropped to their verified boxes (the region its inliers with the cluster mates
  span) as revisitop crops its queries to the object: `SelfValSet.boxes`, embedded by the
  caller and passed as `Q`;
- positives: its verified cluster mates;
- junk (revisitop style): images in no cluster that are geometrically linked to the query's
  cluster (kNN graph of the descriptors, or a candidate pair of the match graph), so an
  unverifiable true match is not counted as an error;
- every other image, including the images of other clusters, is a negative.

Self-mAP is the mAP of `raytrieval.evaluation.metrics.compute_map` over these queries. Every
decision after mining is taken on it; a benchmark's ground truth only scores. Which models
(best epoch, Tune champion, the serving gate) on the whole-image pseudo-queries, which
re-ranking on the cropped ones: each is the form that chose well on rparis6k-mini, ukbench-56
and the demo (benchmarks/selfval.md). On the demo the cropped figure fell while fine-tuning
raised the true mAP by 6.5 points, and the whole-image one ranked re-ranking settings worse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from raytrieval.retrieval.extract import Box

from raytrieval.evaluation.metrics import compute_map
from raytrieval.evaluation.rerank import RerankConfig, rerank

__all__ = ["SelfValSet", "self_aps", "self_map", "selfval_set"]


@dataclass
class SelfValSet:
    """Pseudo-queries and their ground truth over a collection of N images.

    Args:
        queries: (Nq,) int64 database indices of the pseudo-queries.
        gnd: per query {'ok': positives, 'junk': ignored (the query itself included)}, int64.
        boxes: per query its verified box (x0, y0, x1, y1) in pixels, or None (whole image).
    """

    queries: np.ndarray
    gnd: list[dict[str, np.ndarray]]
    boxes: list[Box | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.boxes:
            self.boxes = [None] * len(self.queries)
        if len(self.boxes) != len(self.queries) or len(self.gnd) != len(self.queries):
            raise ValueError(f"SelfValSet: {len(self.queries)} queries, {len(self.gnd)} gnd, {len(self.boxes)} boxes")

    @property
    def num_queries(self) -> int:
        return int(self.queries.size)


def selfval_set(
    labels: np.ndarray, val: np.ndarray, links: np.ndarray | None = None, boxes: Sequence[Box | None] | None = None,
) -> SelfValSet:
    """The self-validation set of a collection.

    Args:
        labels: (N,) int cluster id of each image, -1 for images in no cluster.
        val: (N,) bool, the image belongs to a validation cluster.
        links: (E, 2) int image pairs that are geometrically linked (kNN edges, candidate
            pairs); an unclustered image linked to a member of the query's cluster is junk.
        boxes: (N,) the verified box of each image (None: whole image), kept for the queries.

    Returns:
        The `SelfValSet` (no query when no validation cluster has two images).
    """
    labels = np.asarray(labels, np.int64)
    val = np.asarray(val, bool)
    if labels.ndim != 1 or val.shape != labels.shape:
        raise ValueError(f"labels, val: expected two (N,) arrays, got {labels.shape} and {val.shape}")
    if np.any(val & (labels < 0)):
        raise ValueError("val: an image in no cluster cannot be a validation image")
    n = labels.size
    boxes = [None] * n if boxes is None else list(boxes)
    if len(boxes) != n:
        raise ValueError(f"boxes: expected {n} entries, got {len(boxes)}")
    links = np.zeros((0, 2), np.int64) if links is None else np.asarray(links, np.int64).reshape(-1, 2)
    if links.size and (links.min() < 0 or links.max() >= n):
        raise ValueError(f"links: image indices must be in 0..{n - 1}")
    lonely = labels < 0
    queries, gnd = [], []
    for c in np.unique(labels[val]):
        members = np.flatnonzero(labels == c)
        if members.size < 2:
            continue
        inside = np.isin(links, members)
        touched = np.unique(np.r_[links[inside[:, 0], 1], links[inside[:, 1], 0]])
        linked = touched[lonely[touched]]
        for q in members:
            queries.append(q)
            gnd.append({"ok": members[members != q], "junk": np.r_[q, linked].astype(np.int64)})
    return SelfValSet(np.asarray(queries, np.int64), gnd, [boxes[q] for q in queries])


def self_aps(X: np.ndarray, sv: SelfValSet, cfg: RerankConfig | None = None, Q: np.ndarray | None = None) -> np.ndarray:
    """Average precision of every pseudo-query, with optional re-ranking.

    Args:
        X: (N, D) L2-normalised descriptors of the whole collection (the database).
        sv: the pseudo-queries (indices into X).
        cfg: re-ranking applied to every search (None: plain search).
        Q: (Nq, D) descriptors of the pseudo-queries cropped to `sv.boxes` (what re-ranking
            decisions use); None takes their whole-image database descriptors (what model
            decisions use).

    Returns:
        (Nq,) AP in [0, 1]; empty without queries.
    """
    if sv.num_queries == 0:
        return np.zeros(0)
    Q = X[sv.queries] if Q is None else Q
    ranks = rerank(cfg or RerankConfig(), Q, X, exclude=sv.queries).ranks
    return compute_map(ranks, sv.gnd)[1]


def self_map(X: np.ndarray, sv: SelfValSet, cfg: RerankConfig | None = None, Q: np.ndarray | None = None) -> float:
    """Self-mAP of a collection's descriptors (the mean of `self_aps`); NaN without queries."""
    aps = self_aps(X, sv, cfg, Q)
    return float(aps.mean()) if aps.size else float("nan")


# ---------------------------------------------------------------------------------------------
# decisions taken on self-mAP


def gate(finetuned: float, off_the_shelf: float, margin: float) -> tuple[bool, str]:
    """The do-no-harm gate: serve the fine-tuned model only if its self-mAP (whole-image
    pseudo-queries) beats the off-the-shelf model's by `margin`.

    Args:
        finetuned: self-mAP of the fine-tuned model (NaN: none, or no validation queries).
        off_the_shelf: self-mAP of the off-the-shelf model.
        margin: the gain it needs (self-mAP in [0, 1], e.g. 0.01 for one point).

    Returns:
        (serve the fine-tuned model, why, in one sentence).
    """
    if np.isnan(finetuned) or np.isnan(off_the_shelf):
        return False, "no self-validation figure for both models: the off-the-shelf model is served"
    gain = finetuned - off_the_shelf
    if gain > margin:
        return True, (f"fine-tuned self-mAP {100 * finetuned:.1f} beats off-the-shelf {100 * off_the_shelf:.1f} "
                      f"by {100 * gain:.1f} > {100 * margin:.1f} points: the fine-tuned model is served")
    return False, (f"fine-tuned self-mAP {100 * finetuned:.1f} vs off-the-shelf {100 * off_the_shelf:.1f} "
                   f"(gain {100 * gain:+.1f}, needs > {100 * margin:.1f}): the off-the-shelf model is served")


QE_KS = (1, 2, 3, 5)
QE_ALPHAS = (0.0, 3.0)  # 0: average QE
DIFFUSION_KS = (5, 10, 20)
DIFFUSION_KQS = (3, 5)


def rerank_grid(num_images: int, cluster_sizes: np.ndarray) -> list[RerankConfig]:
    """The small, cheap grid of re-ranking settings a collection chooses from, 'none' first.

    Query expansion (alpha-QE; alpha 0 is average QE) over `QE_KS` x `QE_ALPHAS`, and diffusion
    over `DIFFUSION_KS` x `DIFFUSION_KQS`. The cleaning statistics narrow it: no QE with more
    neighbours than the largest verified cluster has mates (they would all be non-matches), no
    diffusion graph with as many neighbours as images. DBA is left out: it rewrites the
    database vectors, which the served (mutable) index cannot follow.

    Args:
        num_images: images in the collection.
        cluster_sizes: (C,) sizes of the verified clusters.
    """
    mates = int(np.max(cluster_sizes)) - 1 if np.size(cluster_sizes) else 1
    grid = [RerankConfig()]
    grid += [RerankConfig(steps=("alpha_qe",), qe_k=k, qe_alpha=a) for k in QE_KS if k <= max(mates, 1) for a in QE_ALPHAS]
    grid += [RerankConfig(steps=("diffusion",), diffusion_k=k, diffusion_kq=kq)
             for k in DIFFUSION_KS if k < num_images for kq in DIFFUSION_KQS if kq <= k]
    return grid


def describe(cfg: RerankConfig) -> str:
    """A short name of a grid setting: 'none', 'alpha_qe k=2 alpha=3', 'diffusion k=10 kq=3'."""
    if "alpha_qe" in cfg.steps:
        return f"alpha_qe k={cfg.qe_k} alpha={cfg.qe_alpha:g}"
    if "diffusion" in cfg.steps:
        return f"diffusion k={cfg.diffusion_k} kq={cfg.diffusion_kq}"
    return cfg.label if cfg.label != "baseline" else "none"


def select_rerank(
    X: np.ndarray, sv: SelfValSet, grid: list[RerankConfig], Q: np.ndarray | None = None,
) -> tuple[int, list[float]]:
    """The simplest grid setting whose self-mAP is within one standard error of the best's.

    The one-standard-error rule: a few dozen pseudo-queries cannot tell settings a point apart,
    so among those whose mean per-query AP deficit to the highest-scoring setting is at most
    the standard error of that paired deficit, the earliest in `grid` wins ('none' first, then
    query expansion, then diffusion: the least rewriting of the ranking). It keeps plain search
    when re-ranking's gain is noise and never gives up a gain the pseudo-queries can show.

    Args:
        X: (N, D) descriptors of the collection (the served model).
        sv: the pseudo-queries.
        grid: settings, simplest first, e.g. `rerank_grid`.
        Q: (Nq, D) the pseudo-queries cropped to their boxes (see `self_aps`).

    Returns:
        (index of the chosen setting, self-mAP per setting); (0, NaNs) without queries.
    """
    if sv.num_queries == 0:
        return 0, [float("nan")] * len(grid)
    aps = np.stack([self_aps(X, sv, cfg, Q) for cfg in grid])
    scores = aps.mean(axis=1)
    deficit = aps[int(np.argmax(scores))] - aps  # (settings, queries), paired by query
    se = deficit.std(axis=1, ddof=1) / np.sqrt(sv.num_queries) if sv.num_queries > 1 else np.zeros(len(grid))
    return int(np.flatnonzero(deficit.mean(axis=1) <= se + 1e-12)[0]), [float(s) for s in scores]
