"""Label-free landmark recognition: a kNN vote over pseudo-landmarks, calibrated on the collection.

Pure functions over arrays; no Ray, no index (the index-backed wrappers are in
`raytrieval.serving.recognition`).

- `vote`: a query's retrieved database neighbours vote for their cluster (a verified
  pseudo-landmark of the clean stage, `clusters.parquet`) with weight ``max(sim, 0) ** power``;
  unclustered neighbours (label -1) vote for nothing. The prediction is the cluster with the
  most vote mass. Its confidence is either ``'mass'``, the winning mass over k (the mass of k
  neighbours at similarity 1), which falls with the similarities themselves, or ``'share'``, the
  winning mass over all k neighbours' mass.
- `drop_self`: leave-one-out neighbour lists of database images searched against their own
  index.
- `calibrate`: the threshold below which the answer is "unknown", chosen without labels. Every
  database image is a pseudo-query (leave-one-out): a clustered image is correct when the vote
  gives its own cluster, an unclustered image (a pseudo-negative) is never correct. The
  threshold is the lowest confidence at which the pseudo-precision of the answered
  pseudo-queries reaches `target`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["CONFIDENCES", "Calibration", "RecognitionConfig", "apply_threshold", "calibrate", "drop_self", "vote"]

CONFIDENCES = ("mass", "share")


@dataclass
class RecognitionConfig:
    """How queries vote and how the threshold is calibrated.

    Args:
        k: database neighbours that vote.
        power: exponent on the (non-negative part of the) similarity of each vote.
        confidence: ``'mass'`` (winning mass / k) or ``'share'`` (winning mass / all k votes' mass).
        target: pseudo-precision the calibrated threshold must reach.
        curve_points: at most this many points of the precision/coverage curve are recorded.
    """

    k: int = 10
    power: float = 1.0
    confidence: str = "mass"
    target: float = 0.9
    curve_points: int = 101

    def __post_init__(self) -> None:
        for name in ("k", "curve_points"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
        if not (np.isfinite(self.power) and self.power > 0):
            raise ValueError(f"power: must be > 0, got {self.power}")
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"confidence: expected one of {CONFIDENCES}, got {self.confidence!r}")
        if not 0.0 < self.target <= 1.0:
            raise ValueError(f"target: must be in (0, 1], got {self.target}")


def _pair(sims: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sims = np.asarray(sims, dtype=np.float64)
    labels = np.asarray(labels)
    if sims.ndim != 2 or sims.shape != labels.shape:
        raise ValueError(f"sims and labels: expected two (Q, k) arrays of one shape, "
                         f"got {sims.shape} and {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels: expected integer cluster ids, got {labels.dtype}")
    return sims, labels.astype(np.int64, copy=False)


def vote(sims: np.ndarray, labels: np.ndarray, power: float = 1.0,
         confidence: str = "mass") -> tuple[np.ndarray, np.ndarray]:
    """Similarity-weighted kNN vote of the neighbours' cluster ids.

    Args:
        sims: (Q, k) similarities of each query's neighbours (NaN / -inf padding votes nothing).
        labels: (Q, k) cluster id of each neighbour, -1 for unclustered (or padding).
        power: weight = max(sim, 0) ** power.
        confidence: ``'mass'`` or ``'share'`` (see the module docstring).

    Returns:
        (pred (Q,) int64 winning cluster, -1 when no neighbour votes; conf (Q,) float64 in
        [0, 1], 0 where pred is -1). Ties go to the smaller cluster id.
    """
    if confidence not in CONFIDENCES:
        raise ValueError(f"confidence: expected one of {CONFIDENCES}, got {confidence!r}")
    sims, labels = _pair(sims, labels)
    q, k = sims.shape
    w = np.where(np.isfinite(sims), np.clip(np.nan_to_num(sims, nan=0.0, neginf=0.0), 0.0, 1.0), 0.0) ** power
    votes = (labels >= 0) & (w > 0)
    pred = np.full(q, -1, np.int64)
    conf = np.zeros(q, np.float64)
    rows, cols = np.nonzero(votes)
    if rows.size == 0:
        return pred, conf
    clusters = labels[rows, cols]
    # sum the mass per (query, cluster): sort by query then cluster, reduce runs
    order = np.lexsort((clusters, rows))
    r, c, m = rows[order], clusters[order], w[rows, cols][order]
    start = np.flatnonzero(np.r_[True, (r[1:] != r[:-1]) | (c[1:] != c[:-1])])
    mass = np.add.reduceat(m, start)
    r, c = r[start], c[start]
    best = np.lexsort((c, -mass, r))  # per query: most mass first, then smaller id
    first = best[np.r_[True, r[best][1:] != r[best][:-1]]]
    pred[r[first]] = c[first]
    denom = np.full(q, float(k)) if confidence == "mass" else w.sum(axis=1)
    conf[r[first]] = mass[first] / denom[r[first]]
    return pred, np.clip(conf, 0.0, 1.0)


def drop_self(nbrs: np.ndarray, sims: np.ndarray, k: int, self_ids: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out neighbour lists: each row without its own image, cut to k.

    Args:
        nbrs: (N, k') neighbours of database image i (row i) searched in its own index, k' > k.
        sims: (N, k') their similarities.
        k: neighbours kept.
        self_ids: (N,) the id of row i's own image in `nbrs` (default: i).

    Returns:
        (nbrs (N, k), sims (N, k)); a row that does not hold its own image loses its last column.
    """
    nbrs = np.asarray(nbrs)
    sims = np.asarray(sims)
    if nbrs.ndim != 2 or nbrs.shape != sims.shape or nbrs.shape[1] <= k:
        raise ValueError(f"nbrs and sims: expected (N, k') arrays with k' > k={k}, got {nbrs.shape} and {sims.shape}")
    n = nbrs.shape[0]
    own = np.arange(n) if self_ids is None else np.asarray(self_ids).reshape(n)
    is_self = nbrs == own[:, None]
    first = np.where(is_self.any(axis=1), np.argmax(is_self, axis=1), nbrs.shape[1] - 1)
    keep = np.ones(nbrs.shape, bool)
    keep[np.arange(n), first] = False
    out_n = nbrs[keep].reshape(n, -1)[:, :k]
    out_s = sims[keep].reshape(n, -1)[:, :k]
    return np.ascontiguousarray(out_n), np.ascontiguousarray(out_s)


@dataclass
class Calibration:
    """The calibrated "unknown" threshold and how it was found (`recognition.json`).

    Args:
        threshold: answer when confidence >= threshold; None when no threshold reaches the
            target (every query is then "unknown").
        target: the pseudo-precision asked for.
        precision: pseudo-precision at the threshold.
        coverage: share of the clustered pseudo-queries answered at the threshold.
        negatives_answered: share of the unclustered pseudo-queries answered at the threshold.
        curve: up to `curve_points` rows {threshold, precision, coverage} (lowest threshold first).
        counts: pseudo-queries, clustered ones, unclustered ones.
        config: the `RecognitionConfig` fields.
    """

    threshold: float | None
    target: float
    precision: float | None
    coverage: float
    negatives_answered: float
    curve: list[dict[str, float]]
    counts: dict[str, int]
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "target": self.target, "precision": self.precision,
                "coverage": self.coverage, "negatives_answered": self.negatives_answered, "curve": self.curve,
                "counts": self.counts, "config": self.config}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Calibration":
        missing = {"threshold", "target", "config"} - set(d)
        if missing:
            raise ValueError(f"recognition calibration: missing fields {sorted(missing)}")
        return cls(threshold=None if d["threshold"] is None else float(d["threshold"]), target=float(d["target"]),
                   precision=d.get("precision"), coverage=float(d.get("coverage", 0.0)),
                   negatives_answered=float(d.get("negatives_answered", 0.0)), curve=list(d.get("curve", [])),
                   counts=dict(d.get("counts", {})), config=dict(d["config"]))


def calibrate(pred: np.ndarray, conf: np.ndarray, truth: np.ndarray, cfg: RecognitionConfig) -> Calibration:
    """The lowest threshold whose pseudo-precision reaches `cfg.target`.

    Args:
        pred: (N,) leave-one-out prediction of each pseudo-query (-1: none).
        conf: (N,) its confidence.
        truth: (N,) the pseudo-query's own cluster, -1 for an unclustered image (pseudo-negative).
        cfg: the target and the curve size.

    Returns:
        The Calibration. Candidate thresholds are the positive confidences; at threshold t the
        answered pseudo-queries are those with pred >= 0 and conf >= t, the correct ones those
        whose pred equals their own cluster.
    """
    pred = np.asarray(pred, dtype=np.int64).reshape(-1)
    conf = np.asarray(conf, dtype=np.float64).reshape(-1)
    truth = np.asarray(truth, dtype=np.int64).reshape(-1)
    if not (pred.shape == conf.shape == truth.shape):
        raise ValueError(f"pred, conf, truth: expected one (N,) shape, got {pred.shape}, {conf.shape}, {truth.shape}")
    positives = int((truth >= 0).sum())
    negatives = int(truth.size - positives)
    counts = {"pseudo_queries": int(truth.size), "clustered": positives, "unclustered": negatives}
    answerable = (pred >= 0) & (conf > 0)
    c = conf[answerable]
    correct = (pred[answerable] == truth[answerable]) & (truth[answerable] >= 0)
    negative = truth[answerable] < 0
    order = np.argsort(-c, kind="stable")
    c, correct, negative = c[order], correct[order], negative[order]
    last = np.flatnonzero(np.r_[c[1:] != c[:-1], True]) if c.size else np.zeros(0, np.int64)  # end of each tie run
    answered = last + 1
    precision = np.cumsum(correct)[last] / answered
    coverage = np.cumsum(~negative)[last] / max(positives, 1)
    neg_rate = np.cumsum(negative)[last] / max(negatives, 1)
    thresholds = c[last]  # descending
    ok = np.flatnonzero(precision >= cfg.target)
    points = min(cfg.curve_points, thresholds.size)
    curve_idx = np.unique(np.linspace(0, thresholds.size - 1, points).round().astype(int)) if points else np.zeros(0, int)
    curve = [{"threshold": float(thresholds[i]), "precision": float(precision[i]), "coverage": float(coverage[i])}
             for i in curve_idx[::-1]]
    config = {"k": cfg.k, "power": cfg.power, "confidence": cfg.confidence, "target": cfg.target}
    if ok.size == 0:
        return Calibration(None, cfg.target, None, 0.0, 0.0, curve, counts, config)
    i = ok[-1]  # the lowest threshold (thresholds descend)
    return Calibration(float(thresholds[i]), cfg.target, float(precision[i]), float(coverage[i]), float(neg_rate[i]),
                       curve, counts, config)


def apply_threshold(pred: np.ndarray, conf: np.ndarray, threshold: float | None) -> np.ndarray:
    """Predictions with "unknown" (-1) where the confidence is below the threshold (all with None)."""
    pred = np.asarray(pred, dtype=np.int64)
    if threshold is None:
        return np.full(pred.shape, -1, np.int64)
    return np.where(np.asarray(conf) >= threshold, pred, -1)
