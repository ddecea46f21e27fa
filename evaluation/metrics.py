"""Retrieval metrics: revisitop mAP / mP@k, the classic Oxford protocol, UKBench N-S score,
and the recognition metrics GAP and accuracy at a coverage.

Pure numpy functions over rankings. A ranking is an (Nq, Ndb) int array of database indices
sorted by decreasing similarity (row ``i`` is the answer to query ``i``). This is the
transpose of revisitop's (Ndb, Nq) layout.

The Revisited Oxford/Paris numbers reproduce ``revisitop/python/evaluate.py``
(``compute_ap`` / ``compute_map``) exactly, including its two quirks:

- junk images are removed by shifting each positive's position down by the number of junk
  images ranked strictly before it;
- precision@k divides by ``min(max(pos), k)`` (1-based positions after the shift), so a query
  whose last retrieved positive is at position 3 gets P@10 = hits / 3, not hits / 10.

Two cases where revisitop crashes are defined here: a query whose positives are all absent
from the ranking (possible with truncated rankings) has AP = 0 and P@k = 0, and a set in which
no query has positives has mAP = mP@k = NaN.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "compute_ap",
    "compute_map",
    "revisitop_protocols",
    "evaluate_revisitop",
    "evaluate_classic",
    "ns_score",
    "ranks_from_similarity",
    "precision_recall_curve",
    "global_average_precision",
    "accuracy_at_coverage",
]

_EMPTY = np.empty(0, dtype=np.int64)


def _as_index_array(value: object, field: str) -> np.ndarray:
    """Return ``value`` as a 1-D int64 array, raising ValueError naming ``field`` otherwise."""
    arr = np.asarray(value if value is not None else _EMPTY)
    if arr.size == 0:
        return _EMPTY
    if arr.ndim == 1 and np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
        return arr.astype(np.int64)
    if arr.ndim != 1 or arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"gnd field {field!r} must be a 1-D array of integer indices, got "
                         f"dtype {arr.dtype} and shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


def _check_ranks(ranks: np.ndarray, nq: int | None = None) -> np.ndarray:
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be a 2-D (Nq, Ndb) array, got shape {ranks.shape}")
    if ranks.size and not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must hold integer database indices, got dtype {ranks.dtype}")
    if nq is not None and ranks.shape[0] != nq:
        raise ValueError(f"ranks has {ranks.shape[0]} rows but the ground truth has {nq} queries "
                         "(ranks must be (Nq, Ndb), one row per query)")
    return ranks


def compute_ap(ranks: np.ndarray, nres: int) -> float:
    """Average precision by the trapezoid rule, as revisitop's ``compute_ap``.

    For the j-th retrieved positive (0-based) at junk-free position r (0-based), the area
    between recall j/nres and (j+1)/nres is a trapezoid with heights j/r (1 when r == 0) and
    (j+1)/(r+1). Positives missing from ``ranks`` contribute nothing.

    Args:
        ranks: sorted 0-based positions of the retrieved positives in the ranking after junk
            removal, shape (P,).
        nres: total number of positives for the query (may exceed P).

    Returns:
        The average precision in [0, 1].
    """
    pos = np.asarray(ranks, dtype=np.float64).reshape(-1)  # (P,)
    if nres <= 0:
        raise ValueError(f"nres must be positive, got {nres}")
    if pos.size == 0:
        return 0.0
    j = np.arange(pos.size, dtype=np.float64)
    safe = np.where(pos == 0, 1.0, pos)
    precision_0 = np.where(pos == 0, 1.0, j / safe)
    precision_1 = (j + 1.0) / (pos + 1.0)
    return float(np.sum((precision_0 + precision_1) * (1.0 / nres) / 2.0))


def _junk_free_positions(row: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based positions of the positives in ``row`` after removing junk (revisitop's shift)."""
    pos = np.flatnonzero(np.isin(row, ok))  # (P,) sorted positions in the raw ranking
    if junk.size and pos.size:
        junk_pos = np.flatnonzero(np.isin(row, junk))  # (J,) sorted
        # Shift each positive down by the number of junk images ranked strictly before it.
        pos = pos - np.searchsorted(junk_pos, pos, side="left")
    return pos


def compute_map(
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, np.ndarray]],
    kappas: Sequence[int] = (1, 5, 10),
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """mAP and mean precision@k over queries, as revisitop's ``compute_map``.

    Args:
        ranks: (Nq, Ndb) int array; row i holds database indices for query i sorted by
            decreasing similarity. Ndb may be smaller than the database (truncated ranking).
        gnd: Nq dicts with ``'ok'`` (positive indices) and optionally ``'junk'`` (indices
            ignored in the ranking).
        kappas: cut-offs k for precision@k.

    Returns:
        ``(map, aps, mpk, prs)``: mAP (float), per-query AP (Nq,), mean precision at each
        kappa (K,), per-query precision at each kappa (Nq, K). Queries without positives get
        NaN in ``aps`` / ``prs`` and are left out of ``map`` / ``mpk``. All values in [0, 1].
    """
    ranks = _check_ranks(ranks, len(gnd))
    kappas = [int(k) for k in kappas]
    if any(k <= 0 for k in kappas):
        raise ValueError(f"kappas must be positive integers, got {kappas}")
    nq = len(gnd)
    aps = np.full(nq, np.nan, dtype=np.float64)  # (Nq,)
    prs = np.full((nq, len(kappas)), np.nan, dtype=np.float64)  # (Nq, K)
    for i in range(nq):
        ok = _as_index_array(gnd[i]["ok"], "ok")
        if ok.size == 0:
            continue  # no positives: excluded from the means (NaN)
        junk = _as_index_array(gnd[i].get("junk"), "junk")
        pos = _junk_free_positions(ranks[i], ok, junk)
        aps[i] = compute_ap(pos, len(ok))
        if pos.size == 0:
            prs[i, :] = 0.0  # nothing retrieved (revisitop would fail on max([]))
            continue
        pos1 = pos + 1  # 1-based
        last = int(pos1.max())
        for j, k in enumerate(kappas):
            kq = min(last, k)
            prs[i, j] = np.count_nonzero(pos1 <= kq) / kq
    valid = ~np.isnan(aps)
    if not valid.any():
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    mean_ap = float(aps[valid].mean())
    mpk = prs[valid].mean(axis=0)  # (K,)
    return mean_ap, aps, mpk, prs


def revisitop_protocols(gnd_raw: Sequence[Mapping[str, object]]) -> dict[str, list[dict]]:
    """Build the Easy / Medium / Hard ground truth from revisitop ``easy/hard/junk`` lists.

    Easy: ok = easy, junk = junk + hard. Medium: ok = easy + hard, junk = junk.
    Hard: ok = hard, junk = junk + easy.

    Args:
        gnd_raw: one dict per query with ``'easy'``, ``'hard'``, ``'junk'`` index sequences.

    Returns:
        ``{'easy': [...], 'medium': [...], 'hard': [...]}``, each a list of dicts with int64
        arrays ``'ok'`` and ``'junk'``.
    """
    out: dict[str, list[dict]] = {"easy": [], "medium": [], "hard": []}
    for i, g in enumerate(gnd_raw):
        try:
            easy = _as_index_array(g["easy"], "easy")
            hard = _as_index_array(g["hard"], "hard")
            junk = _as_index_array(g["junk"], "junk")
        except KeyError as exc:
            raise ValueError(f"gnd[{i}] lacks the key {exc.args[0]!r} "
                             "(needs 'easy', 'hard', 'junk')") from None
        out["easy"].append({"ok": easy, "junk": np.concatenate([junk, hard])})
        out["medium"].append({"ok": np.concatenate([easy, hard]), "junk": junk})
        out["hard"].append({"ok": hard, "junk": np.concatenate([junk, easy])})
    return out


def _summary(ranks: np.ndarray, gnd: Sequence[Mapping], kappas: Sequence[int]) -> dict:
    mean_ap, aps, mpk, _ = compute_map(ranks, gnd, kappas)
    out: dict = {"map": mean_ap}
    for k, p in zip(kappas, mpk):
        out[f"mp@{int(k)}"] = float(p)
    out["aps"] = [float(a) for a in aps]
    return out


def evaluate_revisitop(
    ranks: np.ndarray,
    gnd_raw: Sequence[Mapping[str, object]],
    kappas: Sequence[int] = (1, 5, 10),
) -> dict[str, dict]:
    """Revisited Oxford/Paris evaluation under the Easy, Medium and Hard protocols.

    Args:
        ranks: (Nq, Ndb) int array of database indices sorted by decreasing similarity.
        gnd_raw: one dict per query with ``'easy'``, ``'hard'``, ``'junk'``.
        kappas: cut-offs for mean precision@k.

    Returns:
        ``{'easy': {'map', 'mp@1', 'mp@5', 'mp@10', 'aps'}, 'medium': ..., 'hard': ...}`` with
        fractions in [0, 1]; ``aps`` is a per-query list with NaN for queries without
        positives under that protocol.
    """
    protocols = revisitop_protocols(gnd_raw)
    ranks = _check_ranks(ranks, len(gnd_raw))
    return {name: _summary(ranks, g, kappas) for name, g in protocols.items()}


def evaluate_classic(
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, object]],
    kappas: Sequence[int] = (1, 5, 10),
) -> dict:
    """Classic Oxford5k / Paris6k protocol (``compute_ap.cpp``).

    Positives are good + ok images (pass them together as ``'ok'``), junk images are skipped,
    and AP is the same trapezoid rule as revisitop's (``compute_ap.cpp`` starts from
    precision 1 at recall 0 and averages consecutive precisions, which is identical).

    Args:
        ranks: (Nq, Ndb) int array of database indices sorted by decreasing similarity.
        gnd: one dict per query with ``'ok'`` and ``'junk'``.
        kappas: cut-offs for mean precision@k.

    Returns:
        ``{'map', 'mp@k'..., 'aps'}`` as in :func:`evaluate_revisitop` for one protocol.
    """
    return _summary(_check_ranks(ranks, len(gnd)), gnd, kappas)


def ns_score(
    ranks: np.ndarray,
    groups: np.ndarray,
    top: int = 4,
    query_groups: np.ndarray | None = None,
) -> float:
    """UKBench N-S score: mean number of same-group images among the top ``top`` results.

    Every image is a query and the query itself counts (4.0 is perfect for groups of 4).

    Args:
        ranks: (Nq, Ndb) int array of database indices sorted by decreasing similarity.
        groups: (Ndb,) group id of each database image.
        top: how many results to look at.
        query_groups: (Nq,) group id of each query; defaults to ``groups`` (queries are the
            database images, in order).

    Returns:
        The mean count over queries (0 to ``top``).
    """
    ranks = _check_ranks(ranks)
    groups = np.asarray(groups).reshape(-1)
    if query_groups is None:
        if ranks.shape[0] != groups.shape[0]:
            raise ValueError(f"ranks has {ranks.shape[0]} queries but groups has "
                             f"{groups.shape[0]} entries; pass query_groups")
        query_groups = groups
    query_groups = np.asarray(query_groups).reshape(-1)
    if query_groups.shape[0] != ranks.shape[0]:
        raise ValueError(f"query_groups has {query_groups.shape[0]} entries for "
                         f"{ranks.shape[0]} queries")
    if top <= 0:
        raise ValueError(f"top must be positive, got {top}")
    if ranks.shape[0] == 0:
        return float("nan")
    hits = groups[ranks[:, :top]] == query_groups[:, None]  # (Nq, top)
    return float(hits.sum(axis=1).mean())


def ranks_from_similarity(sim: np.ndarray) -> np.ndarray:
    """Rank database items by decreasing similarity (stable for ties).

    Args:
        sim: (Nq, Ndb) similarities.

    Returns:
        (Nq, Ndb) int64 database indices, most similar first.
    """
    sim = np.asarray(sim)
    if sim.ndim != 2:
        raise ValueError(f"sim must be a 2-D (Nq, Ndb) array, got shape {sim.shape}")
    return np.argsort(-sim, axis=1, kind="stable").astype(np.int64, copy=False)


def precision_recall_curve(
    ranks_row: np.ndarray, ok: np.ndarray, junk: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Precision-recall curve of one query, junk images removed.

    The curve starts at (recall 0, precision 1) and has one point per non-junk ranked image,
    so ``np.trapezoid(precision, recall)`` equals this query's AP from :func:`compute_map`
    (when ``ok`` and ``junk`` are disjoint, as in revisitop ground truth).

    Args:
        ranks_row: (Ndb,) database indices sorted by decreasing similarity.
        ok: positive database indices.
        junk: database indices to skip.

    Returns:
        ``(recall, precision)``, two float64 arrays of shape (1 + number of non-junk images,).
    """
    row = np.asarray(ranks_row).reshape(-1)
    ok = _as_index_array(ok, "ok")
    junk = _as_index_array(junk, "junk")
    if ok.size == 0:
        raise ValueError("ok is empty: a precision-recall curve needs at least one positive")
    row = row[~np.isin(row, junk)] if junk.size else row
    hits = np.cumsum(np.isin(row, ok), dtype=np.float64)  # (M,)
    recall = np.concatenate([[0.0], hits / len(ok)])
    precision = np.concatenate([[1.0], hits / np.arange(1, row.size + 1, dtype=np.float64)])
    return recall, precision


def _predictions(pred: np.ndarray, conf: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred = np.asarray(pred).reshape(-1)
    conf = np.asarray(conf, dtype=np.float64).reshape(-1)
    truth = np.asarray(truth).reshape(-1)
    if not (pred.shape == conf.shape == truth.shape):
        raise ValueError(f"pred, conf, truth: expected one (Q,) shape, got {pred.shape}, {conf.shape}, {truth.shape}")
    if not np.all(np.isfinite(conf)):
        raise ValueError("conf: must be finite")
    return pred.astype(np.int64), conf, truth.astype(np.int64)


def global_average_precision(pred: np.ndarray, conf: np.ndarray, truth: np.ndarray) -> float:
    """GAP (micro AP) of the Google Landmark Recognition challenge: one prediction per query.

    All predictions are sorted by decreasing confidence; GAP = (1/M) sum_i P(i) rel(i), with
    P(i) the precision of the first i predictions, rel(i) = 1 when prediction i is correct, and M
    the number of queries that have a true landmark. A query without a prediction (pred -1)
    is left out of the sorted list; a prediction for a query without a landmark (truth -1) is
    always wrong. Ties keep the query order.

    Args:
        pred: (Q,) predicted class per query, -1 for none.
        conf: (Q,) confidence of each prediction.
        truth: (Q,) true class per query, -1 for none.

    Returns:
        GAP in [0, 1]; NaN when no query has a true landmark.
    """
    pred, conf, truth = _predictions(pred, conf, truth)
    m = int((truth >= 0).sum())
    if m == 0:
        return float("nan")
    made = np.flatnonzero(pred >= 0)
    made = made[np.argsort(-conf[made], kind="stable")]
    rel = ((pred[made] == truth[made]) & (truth[made] >= 0)).astype(np.float64)
    precision = np.cumsum(rel) / np.arange(1, made.size + 1)
    return float((precision * rel).sum() / m)


def accuracy_at_coverage(pred: np.ndarray, conf: np.ndarray, truth: np.ndarray, coverage: float = 0.9) -> float:
    """Accuracy over the ceil(coverage * Q) most confident queries (a query without a prediction
    counts as wrong and, with its confidence, ranks where it falls).

    Args:
        pred: (Q,) predicted class per query, -1 for none.
        conf: (Q,) confidence.
        truth: (Q,) true class, -1 for none.
        coverage: share of the queries answered, in (0, 1].

    Returns:
        The share of correct answers among them; NaN for no queries.
    """
    pred, conf, truth = _predictions(pred, conf, truth)
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage: must be in (0, 1], got {coverage}")
    if pred.size == 0:
        return float("nan")
    top = np.argsort(-conf, kind="stable")[: int(np.ceil(coverage * pred.size - 1e-9))]
    return float(np.mean((pred[top] == truth[top]) & (pred[top] >= 0)))
