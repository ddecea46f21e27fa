"""`kind: auto`: choose an index from N, D, a memory budget and a recall target, the autofaiss way.

Estimate first: list the kinds whose bytes per vector (`estimate_bytes`) fit the budget, cheapest
search first (exact search for small collections, then HNSW, IVF-Flat, IVF-RaBitQ at the most bits
a dimension that fit, OPQ + IVFADC at the largest code that fits, the same with an 8-bit
re-ranking store, IVFADC, the inverted multi-index, PQ, LSH).
Then verify: build the first candidate, measure its real bytes per vector, and tune its search
parameter (lists probed, HNSW beam, re-ranking shortlist) on a sample of the database used as
queries, against exact search with each query's own vector left out. The first candidate that
reaches the recall target within the budget wins; if none does, the one with the best recall.
No labels are used: the target is agreement with exact search.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from raytrieval.retrieval.faiss_index import (
    FaissIndex,
    IndexSpec,
    build_index,
    estimate_bytes,
    factory_string,
    min_train,
    nlist_for,
)
from raytrieval.retrieval.knn import search as exact_search

__all__ = ["AutoChoice", "candidates", "recall_at_k", "select_index", "size_rule"]


def size_rule(n: int, flat_max: int, hnsw_max: int) -> str:
    """The kind tried first by collection size alone: exact, then HNSW, then IVFADC."""
    if n <= flat_max:
        return "flat"
    return "hnsw" if n <= hnsw_max else "ivfpq"


@dataclass
class AutoChoice:
    """The chosen index, its tuned search settings and the record of why (written to meta.json)."""

    index: FaissIndex
    search: dict[str, int]
    report: dict[str, Any]


def candidates(n: int, dim: int, budget: float, flat_max: int, hnsw_max: int,
               factory_kwargs: dict[str, Any] | None = None) -> list[IndexSpec]:
    """Index specs in order of preference whose estimated bytes per vector fit `budget`."""
    kw = dict(factory_kwargs or {})
    kw.pop("pq_m", None)
    order: list[IndexSpec] = []
    limit = 0.97 * budget  # room for what the formula leaves out (rotations, centroids)

    def spec(kind: str, refine: str | None = None, **extra: Any) -> IndexSpec:
        factory, metric = factory_string(kind, n, dim, **{**kw, **extra})
        return IndexSpec(kind, factory, metric, refine)

    if n <= flat_max:
        order.append(spec("flat"))
    if n <= hnsw_max:
        order.append(spec("hnsw"))
    order.append(spec("ivfflat"))
    rabitq = [b for b in range(8, 0, -1) if estimate_bytes(spec("rabitq", rabitq_bits=b), dim) <= limit]
    if rabitq:  # the most bits a dimension that fit; its recall is verified like every candidate's
        order.append(spec("rabitq", rabitq_bits=rabitq[0]))
    divisors = [m for m in range(min(128, dim // 2), 0, -1) if dim % m == 0 and m >= 4]
    fit = [m for m in divisors if estimate_bytes(spec("opq", pq_m=m), dim) <= limit]
    if fit:
        order.append(spec("opq", pq_m=fit[0]))
    small = [m for m in divisors if m <= max(4, dim // 8) and estimate_bytes(spec("opq", "sq8", pq_m=m), dim) <= limit]
    if small:
        order.append(spec("opq", "sq8", pq_m=small[0]))
    if fit:
        order.append(spec("ivfpq", pq_m=fit[0]))
        order.append(spec("imi", pq_m=fit[0]))
        order.append(spec("pq", pq_m=fit[0]))
    bits = int(8 * max(1, int(limit - 8)))
    order.append(spec("lsh", lsh_bits=max(8, min(bits - bits % 8, 16 * dim))))
    first = size_rule(n, flat_max, hnsw_max)
    order.sort(key=lambda s: s.kind != first or s.refine is not None)  # stable: the size rule's kind first
    return [s for s in order if estimate_bytes(s, dim) <= limit and n >= min_train(s)]


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each row of `exact` (Nq, k) found in the same row of `found` (Nq, k')."""
    k = exact.shape[1]
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(found, exact)]))


def _drop_self(labels: np.ndarray, selves: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((labels.shape[0], k), np.int64)
    for i, (row, me) in enumerate(zip(labels, selves)):
        kept = row[row != me]
        out[i] = kept[:k] if kept.size >= k else np.pad(kept, (0, k - kept.size), constant_values=-1)
    return out


def _sweep(spec: IndexSpec, index: FaissIndex) -> tuple[str | None, list[int]]:
    """The search parameter to tune for a spec and the values tried, cheapest first."""
    if spec.kind == "hnsw":
        return "ef_search", [16, 32, 64, 128, 256, 512]
    if spec.kind in ("ivfflat", "ivfpq", "opq", "rabitq"):
        nlist = int(spec.factory.split("IVF")[1].split(",")[0])
        return "nprobe", [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if v <= nlist] or [nlist]
    if spec.kind == "imi":
        return "nprobe", [64, 256, 1024, 4096, 16384]
    if spec.refine is not None:
        return "k_factor", [2, 4, 8, 16, 32]
    return None, [0]


def select_index(vectors: np.ndarray, labels: np.ndarray, *, max_bytes_per_vector: float | None = None,
                 memory: float | None = None, recall_target: float = 0.95, k: int = 10, sample: int = 200,
                 flat_max: int = 100_000, hnsw_max: int = 1_000_000, k_factor: int = 4,
                 factory_kwargs: dict[str, Any] | None = None, train_size: int = 100_000,
                 seed: int = 0) -> AutoChoice:
    """Choose, build and tune an index for (N, D) vectors; see the module docstring.

    Args:
        vectors: (N, D) float32 unit descriptors.
        labels: (N,) int64 labels.
        max_bytes_per_vector: the memory budget per vector, or
        memory: a total budget in bytes (divided by N); None for both: no budget.
        recall_target: wanted recall@k against exact search.
        k: the k of the recall.
        sample: database vectors used as queries to verify.
        flat_max: exact search is a candidate up to this many vectors.
        hnsw_max: HNSW is a candidate up to this many vectors.
        k_factor: re-ranking shortlist factor while the lists probed are tuned.
        factory_kwargs: `factory_string` keyword arguments (pq_nbits, hnsw_m, nlist, ...).
        train_size: at most this many vectors train a candidate.

    Returns:
        An `AutoChoice`; its report says what was tried and why the winner won.
    """
    n, dim = vectors.shape
    if not 0 < recall_target <= 1:
        raise ValueError(f"recall_target: must be in (0, 1], got {recall_target}")
    budget = math.inf
    if max_bytes_per_vector is not None:
        budget = float(max_bytes_per_vector)
    if memory is not None:
        budget = min(budget, float(memory) / max(1, n))
    specs = candidates(n, dim, budget, flat_max, hnsw_max, factory_kwargs)
    if not specs:
        raise ValueError(f"max_bytes_per_vector: no index kind fits {budget:.1f} bytes per vector at dimension {dim}")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, min(sample, n), replace=False))
    queries = vectors[rows]
    kk = min(k, n - 1) if n > 1 else 1
    _, exact = exact_search(vectors, queries, min(kk + 1, n))
    exact = _drop_self(labels[exact], labels[rows], kk)
    tried: list[dict[str, Any]] = []
    best: tuple[float, FaissIndex, dict[str, int], dict[str, Any]] | None = None
    for spec in specs:
        start = time.perf_counter()
        index = build_index(vectors, labels, spec, train_size=train_size, seed=seed)
        index.configure(k_factor=k_factor)
        entry: dict[str, Any] = {"factory": spec.full_factory, "kind": spec.kind,
                                 "estimated_bytes_per_vector": round(estimate_bytes(spec, dim), 1),
                                 "build_s": round(time.perf_counter() - start, 2)}
        measured = index.bytes_per_vector()
        entry["bytes_per_vector"] = round(measured, 1)
        if measured > budget:
            entry["rejected"] = f"{measured:.1f} bytes per vector exceed the budget of {budget:.1f}"
            tried.append(entry)
            continue
        param, values = _sweep(spec, index)
        recalls: dict[int, float] = {}
        setting: dict[str, int] = {}
        for value in values:
            setting = {param: value} if param else {}
            index.configure(**setting)
            _, found = index.search(queries, min(kk + 1, n))
            recalls[value] = recall_at_k(_drop_self(found, labels[rows], kk), exact)
            if recalls[value] >= recall_target:
                break
        recall = recalls[values[0] if not param else setting[param]]
        entry.update({"param": param, "recall_by_value": {str(v): round(r, 4) for v, r in recalls.items()},
                      "recall": round(recall, 4)})
        tried.append(entry)
        if best is None or recall > best[0]:
            best = (recall, index, setting, entry)
        if recall >= recall_target:
            break
    if best is None:
        raise ValueError(f"max_bytes_per_vector: every candidate exceeded {budget:.1f} bytes per vector once built")
    recall, index, setting, entry = best
    met = recall >= recall_target
    reason = (f"{entry['factory']}: the first candidate (cheapest search first) within {budget:.1f} bytes per "
              f"vector that reached recall@{kk} {recall:.3f} >= {recall_target} on {len(rows)} sampled queries"
              f" against exact search" if met else
              f"{entry['factory']}: no candidate within {budget:.1f} bytes per vector reached recall@{kk} "
              f"{recall_target}; this one came closest ({recall:.3f})")
    if setting:
        reason += f", with {', '.join(f'{p}={v}' for p, v in setting.items())}"
    report = {"n": n, "dim": dim, "budget_bytes_per_vector": None if math.isinf(budget) else round(budget, 1),
              "recall_target": recall_target, "k": kk, "sample": len(rows), "chosen": entry["factory"],
              "kind": index.spec.kind, "search": setting, "recall": round(recall, 4), "met_target": met,
              "bytes_per_vector": entry["bytes_per_vector"], "reason": reason, "tried": tried}
    return AutoChoice(index, setting, report)
