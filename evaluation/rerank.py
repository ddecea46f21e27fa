"""Whitening and re-ranking applied to benchmark descriptors, step by step, with timings.

The steps run in a fixed, sensible order whatever order they are given in:
whitening -> DBA (database side) -> query expansion -> diffusion -> spatial verification ->
region re-ranking -> class-agnostic spatial re-ranking (`casr`, Salvador et al. 2016) or its
class-specific variant (`cssr`: a box classifier over the pseudo-landmarks, `retrieval/cssr.py`;
unknown-class queries fall back to CA-SR). With `casr` or `cssr`, query expansion (`aqe` / `alpha_qe`) follows it, as in Salvador et al.: the query is
expanded with the best proposals of its re-ranked top images. Image-level inputs (local features, region descriptors) come from
callables so that this module stays free of model and IO choices.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from raytrieval.retrieval.diffusion import diffusion_rerank
from raytrieval.retrieval.knn import rank_all
from raytrieval.retrieval.qe import alpha_qe, average_qe, dba
from raytrieval.retrieval.cssr import DEFAULT_MIN_CONFIDENCE, cssr_rerank, load_box_classifier
from raytrieval.retrieval.region import REGION_POOLS, RegionSet, casr_rerank, region_rerank
from raytrieval.retrieval.spatial import LocalFeatures, spatial_rerank, verify_pair
from raytrieval.retrieval.whiten import Whitening, learn_lw_whitening, learn_pca_whitening

@dataclass
class RerankConfig:
    """Whitening and re-ranking options.

    Args:
        whiten: None, "pca" (learned on the database descriptors, no labels) or "lw" (learned
            from spatially verified database pairs, no labels).
        dim: output dimension of the whitening (None: full).
        shrinkage: power on the eigenvalues for PCA whitening (1 full, 0 plain PCA rotation).
        steps: re-ranking steps, in order, any of dba, aqe | alpha_qe, diffusion, sv, region, casr | cssr.
        qe_k: database vectors used by AQE / alpha-QE.
        qe_alpha: alpha-QE power.
        dba_k: vectors averaged per database item by DBA (itself included).
        dba_alpha: DBA similarity power.
        diffusion_k: kNN graph size of diffusion.
        diffusion_kq: query neighbours that start the diffusion.
        diffusion_gamma: similarity power of the diffusion graph.
        diffusion_alpha: diffusion's random-walk parameter.
        diffusion_truncate: each query's subgraph size (None: the whole graph; for large databases).
        sv_top: images spatially verified per query.
        sv_min_inliers: inliers to count as verified.
        region_top: images re-ranked by their best region.
        casr_top: images re-ranked by their best proposal (CA-SR).
        casr_pool: pooling of the query box and proposal descriptors, 'sum' (RPA-sum, the
            default: it localises whole objects) or 'max' (Salvador's RPA-max); used by the
            caller that builds `ImageAccess` (see `raytrieval.retrieval.region`).
        box_classifier: the `cssr` step's box classifier file (`raytrieval box-classifier`),
            trained on descriptors pooled with `casr_pool`; cssr re-ranks the top `casr_top`.
        cssr_min_confidence: least probability of the query's class for `cssr` to use it (below,
            or a background query: CA-SR).
        lw_knn: neighbours verified per database image to find Lw pairs.
        lw_min_inliers: inliers that make a verified pair.
    """

    whiten: str | None = None
    dim: int | None = None
    shrinkage: float = 1.0
    steps: tuple[str, ...] = ()
    qe_k: int = 2
    qe_alpha: float = 3.0
    dba_k: int = 3
    dba_alpha: float = 3.0
    diffusion_k: int = 20
    diffusion_kq: int = 5
    diffusion_gamma: float = 3.0
    diffusion_alpha: float = 0.99
    diffusion_truncate: int | None = None
    sv_top: int = 50
    sv_min_inliers: int = 15
    region_top: int = 50
    casr_top: int = 100
    casr_pool: str = "sum"
    box_classifier: str | None = None
    cssr_min_confidence: float = DEFAULT_MIN_CONFIDENCE
    lw_knn: int = 5
    lw_min_inliers: int = 20

    def __post_init__(self) -> None:
        if self.whiten not in (None, "pca", "lw"):
            raise ValueError(f"whiten: must be None, 'pca' or 'lw', got {self.whiten!r}")
        if self.dim is not None and self.dim < 1:
            raise ValueError(f"dim: must be >= 1, got {self.dim}")
        self.steps = tuple(self.steps)
        unknown = set(self.steps) - set(STEP_REGISTRY)
        if unknown:
            raise ValueError(f"steps: unknown {sorted(unknown)}; choose from {tuple(STEP_REGISTRY)}")
        if self.casr_pool not in REGION_POOLS:
            raise ValueError(f"casr_pool: must be one of {REGION_POOLS}, got {self.casr_pool!r}")
        if "aqe" in self.steps and "alpha_qe" in self.steps:
            raise ValueError("steps: choose one of 'aqe' and 'alpha_qe'")
        if "casr" in self.steps and "cssr" in self.steps:
            raise ValueError("steps: choose one of 'casr' and 'cssr'")
        if "cssr" in self.steps and not self.box_classifier:
            raise ValueError("box_classifier: the 'cssr' step needs a box classifier file (raytrieval box-classifier)")
        if not 0.0 <= self.cssr_min_confidence <= 1.0:
            raise ValueError(f"cssr_min_confidence: must lie in [0, 1], got {self.cssr_min_confidence}")

    @property
    def label(self) -> str:
        parts = [f"{self.whiten}{self.dim or ''}"] if self.whiten else []
        return "+".join(parts + [s for s in STEP_REGISTRY if s in self.steps]) or "baseline"


@dataclass
class ImageAccess:
    """Lazy access to what image-level steps need (cached by the caller as it likes).

    Args:
        query_features: query index -> local features of the (cropped) query.
        db_features: database index -> local features.
        db_regions: database index -> region descriptors (with boxes in image pixels).
        query_region: query index -> (D,) descriptor of the query box pooled like the proposals.
        db_proposals: database index -> proposal descriptors (RPA-max, boxes in image pixels).
    """

    query_features: Callable[[int], LocalFeatures] | None = None
    db_features: Callable[[int], LocalFeatures] | None = None
    db_regions: Callable[[int], RegionSet] | None = None
    query_region: Callable[[int], np.ndarray] | None = None
    db_proposals: Callable[[int], RegionSet] | None = None


@dataclass
class RerankResult:
    """Final ranking, per-query time of each step (ms) and localisation boxes.

    boxes[q] maps a database index to its (x0, y0, x1, y1) box of the query object.
    """

    ranks: np.ndarray
    ms_per_query: dict[str, float] = field(default_factory=dict)
    boxes: list[dict[int, tuple[float, float, float, float]]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # e.g. cssr_fallback: queries CS-SR left to CA-SR


def verified_pairs(
    X: np.ndarray, features: Callable[[int], LocalFeatures], k: int, min_inliers: int
) -> np.ndarray:
    """Matching pairs without labels: each image's k nearest neighbours kept when verified.

    Returns:
        (M, 2) int64 pairs (i, j), i < j.
    """
    ranks = rank_all(X, X)[:, 1 : k + 1]
    pairs = {(min(i, int(j)), max(i, int(j))) for i in range(len(X)) for j in ranks[i]}
    kept = [p for p in sorted(pairs) if verify_pair(features(p[0]), features(p[1])).inliers >= min_inliers]
    return np.array(kept, dtype=np.int64).reshape(-1, 2)


def learn_whitening(cfg: RerankConfig, X: np.ndarray, access: ImageAccess) -> Whitening:
    """Learn the configured whitening on the database descriptors (no labels)."""
    if cfg.whiten == "pca":
        return learn_pca_whitening(X, dim=cfg.dim, shrinkage=cfg.shrinkage)
    if access.db_features is None:
        raise ValueError("whiten: 'lw' needs local features of the database images")
    pairs = verified_pairs(X, access.db_features, cfg.lw_knn, cfg.lw_min_inliers)
    if len(pairs) == 0:
        raise ValueError("whiten: no verified pairs to learn Lw from")
    return learn_lw_whitening(X, pairs, dim=cfg.dim)


@dataclass
class _State:
    """What the steps read and change: descriptors, rankings, boxes found."""

    cfg: RerankConfig
    Q: np.ndarray
    X: np.ndarray
    access: ImageAccess
    whitening: Whitening | None
    exclude: np.ndarray | None
    ranks: np.ndarray | None = None
    boxes: list[dict[int, tuple[float, float, float, float]]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def _dba(s: _State) -> None:
    s.X = dba(s.X, s.cfg.dba_k, s.cfg.dba_alpha)


def _qe(s: _State) -> None:
    if "aqe" in s.cfg.steps:
        s.Q = average_qe(s.Q, s.X, s.ranks, s.cfg.qe_k)
    else:
        s.Q = alpha_qe(s.Q, s.X, s.ranks, s.cfg.qe_k, s.cfg.qe_alpha)
    s.ranks = _last(rank_all(s.Q, s.X), s.exclude)


def _diffusion(s: _State) -> None:
    c = s.cfg
    s.ranks = _last(diffusion_rerank(s.Q, s.X, k=c.diffusion_k, kq=c.diffusion_kq, gamma=c.diffusion_gamma,
                                     alpha=c.diffusion_alpha, truncate=c.diffusion_truncate), s.exclude)


@dataclass(frozen=True)
class Step:
    """A re-ranking step: what it does to the state, what it needs, its timer's name.

    `before_search` steps change the database descriptors before the first search (DBA);
    a step `done_by` another is left to that one when both are asked for (query expansion
    follows CA-SR inside `_casr`, CS-SR inside `_cssr`).
    """

    run: Callable[[_State], None]
    needs: tuple[str, ...] = ()
    timer: str | None = None
    before_search: bool = False
    done_by: tuple[str, ...] = ()




def rerank(
    cfg: RerankConfig, Q: np.ndarray, X: np.ndarray, access: ImageAccess | None = None,
    exclude: np.ndarray | None = None,
) -> RerankResult:
    """Apply whitening and re-ranking to (Nq, D) queries and an (Ndb, D) database.

    Args:
        cfg: the steps and their parameters.
        Q: (Nq, D) query descriptors.
        X: (Ndb, D) database descriptors.
        access: image-level inputs of the 'sv', 'region' and 'casr' steps.
        exclude: (Nq,) database index left out of each query's search (leave-one-out when the
            queries are database images, as in label-free validation): it is moved to the end
            of every ranking, so query expansion never expands with it; None for none.

    Returns:
        RerankResult with (Nq, Ndb) ranks.
    """
    access = access or ImageAccess()
    nq = len(Q)
    ms: dict[str, float] = {}
    steps = [(name, step) for name, step in STEP_REGISTRY.items()
             if name in cfg.steps and not set(step.done_by) & set(cfg.steps)]
    for name, step in steps:
        missing = [n for n in step.needs if getattr(access, n) is None]
        if missing:
            raise ValueError(f"steps: {name!r} needs {', '.join(missing)} (an ImageAccess with them)")

    def timed(name: str, fn: Callable[[], object]) -> object:
        t = time.perf_counter()
        out = fn()
        ms[name] = ms.get(name, 0.0) + 1000 * (time.perf_counter() - t) / max(nq, 1)
        return out

    whitening = None
    if cfg.whiten:
        whitening = timed("whiten", lambda: learn_whitening(cfg, X, access))
        Q, X = whitening.apply(Q), whitening.apply(X)
    if exclude is not None:
        exclude = np.asarray(exclude, np.int64).reshape(-1)
        if exclude.shape != (nq,):
            raise ValueError(f"exclude: expected ({nq},) database indices, got shape {exclude.shape}")
    state = _State(cfg, Q, X, access, whitening, exclude, boxes=[{} for _ in range(nq)])
    for name, step in steps:
        if step.before_search:
            timed(step.timer or name, lambda: step.run(state))
    state.ranks = _last(timed("search", lambda: rank_all(state.Q, state.X)), exclude)
    for name, step in steps:
        if not step.before_search:
            timed(step.timer or name, lambda: step.run(state))
    return RerankResult(np.ascontiguousarray(state.ranks), ms, state.boxes, state.counts)


def _last(ranks: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
    """Each row's excluded index moved to the end, the order of the others kept."""
    if exclude is None:
        return ranks
    order = np.argsort(ranks == exclude[:, None], axis=1, kind="stable")
    return np.take_along_axis(ranks, order, axis=1)


def _spatial(s: _State) -> None:
    """Spatial verification of each query's top `sv_top`; boxes of the verified ones."""
    cfg, ranks, access, boxes = s.cfg, s.ranks, s.access, s.boxes
    out = ranks.copy()
    for q in range(len(ranks)):
        top = ranks[q, : cfg.sv_top]
        db = {int(i): access.db_features(int(i)) for i in top}
        out[q], inliers, found = spatial_rerank(access.query_features(q), db, ranks[q], cfg.sv_top, cfg.sv_min_inliers)
        for idx, n, box in zip(top, inliers, found):
            if n >= cfg.sv_min_inliers:
                boxes[q][int(idx)] = tuple(float(v) for v in box)
    s.ranks = out


def _regions(s: _State) -> None:
    """Region re-ranking; region descriptors get the same whitening as the global ones."""
    cfg, Q, ranks, access, boxes, whitening = s.cfg, s.Q, s.ranks, s.access, s.boxes, s.whitening
    out = ranks.copy()
    for q in range(len(ranks)):
        top = ranks[q, : cfg.region_top]
        sets = [access.db_regions(int(i)) for i in top]
        if whitening is not None:
            sets = [RegionSet(whitening.apply(rs.descriptors), rs.boxes) for rs in sets]
        out[q], _, found = region_rerank(Q[q], sets, ranks[q], cfg.region_top)
        for idx, box in zip(out[q, : len(found)], found):
            boxes[q].setdefault(int(idx), tuple(float(v) for v in box))
    s.ranks = out


def _region_qe(cfg: RerankConfig) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
    """The query expansion that follows CA-SR / CS-SR (aqe or alpha_qe over the best proposals), or None."""
    if "aqe" not in cfg.steps and "alpha_qe" not in cfg.steps:
        return None
    alpha = cfg.qe_alpha if "alpha_qe" in cfg.steps else 0.0  # 0: average QE

    def expand(query: np.ndarray, found: np.ndarray) -> np.ndarray:
        k = min(cfg.qe_k, len(found))
        return alpha_qe(query[None], found, np.arange(len(found))[None], k, alpha)[0]

    return expand


def _casr(s: _State) -> None:
    """CA-SR over the top `casr_top`, then its query expansion; boxes from `casr_rerank` (the similarity
    map of each image, or its best proposal once whitened)."""
    cfg, ranks, access, boxes, whitening = s.cfg, s.ranks, s.access, s.boxes, s.whitening
    qe = _region_qe(cfg)
    out = ranks.copy()
    for q in range(len(ranks)):
        query = access.query_region(q)[None]
        sets = [access.db_proposals(int(i)) for i in ranks[q, : cfg.casr_top]]
        if whitening is not None:
            query = whitening.apply(query)
            sets = [RegionSet(whitening.apply(rs.descriptors), rs.boxes) for rs in sets]
        out[q], _, found = casr_rerank(query[0], sets, ranks[q], cfg.casr_top, qe)
        for idx, box in zip(out[q, : len(found)], found):
            boxes[q][int(idx)] = tuple(float(v) for v in box)
    s.ranks = out


def _cssr(s: _State) -> None:
    """CS-SR over the top `casr_top` (CA-SR for unknown-class queries), then its query expansion.

    The classifier reads the unwhitened query and proposal descriptors; the similarities of the
    CA-SR fallback and of query expansion use the whitened ones, as `_casr` does.
    """
    cfg, ranks, access, boxes, whitening = s.cfg, s.ranks, s.access, s.boxes, s.whitening
    classifier = load_box_classifier(cfg.box_classifier)
    if classifier.pool != cfg.casr_pool:
        raise ValueError(f"box_classifier: {cfg.box_classifier} was trained on {classifier.pool!r}-pooled regions, "
                         f"the proposals are {cfg.casr_pool!r}-pooled (set casr_pool to {classifier.pool!r})")
    qe = _region_qe(cfg)
    out = ranks.copy()
    fell_back = 0
    for q in range(len(ranks)):
        sets = [access.db_proposals(int(i)) for i in ranks[q, : cfg.casr_top]]
        res = cssr_rerank(access.query_region(q), sets, ranks[q], cfg.casr_top, classifier, cfg.cssr_min_confidence,
                          qe, whitening.apply if whitening is not None else None)
        out[q], fell_back = res.ranks, fell_back + res.fell_back
        for idx, box in zip(out[q, : len(res.boxes)], res.boxes):
            boxes[q][int(idx)] = tuple(float(v) for v in box)
    s.counts["cssr_fallback"] = fell_back
    s.ranks = out


# the registry, in the order the steps run: a new step is one function and one line here
STEP_REGISTRY: dict[str, Step] = {
    "dba": Step(_dba, before_search=True),
    "aqe": Step(_qe, timer="qe", done_by=("casr", "cssr")),
    "alpha_qe": Step(_qe, timer="qe", done_by=("casr", "cssr")),
    "diffusion": Step(_diffusion),
    "sv": Step(_spatial, needs=("query_features", "db_features")),
    "region": Step(_regions, needs=("db_regions",)),
    "casr": Step(_casr, needs=("query_region", "db_proposals")),
    "cssr": Step(_cssr, needs=("query_region", "db_proposals")),
}
STEPS = tuple(STEP_REGISTRY)
