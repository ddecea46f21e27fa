"""The faiss index family over L2-normalised descriptors, with labels, deletes and exact re-ranking.

Kinds (faiss factory strings built by `factory_string`; all rank by cosine similarity):

- ``flat``: exact search (``Flat``).
- ``lsh``: binary codes searched by Hamming distance (``LSH<bits>r``: random rotation, sign bits).
- ``pq``: product quantisation, exhaustive asymmetric search (``PQ<m>x<bits>``).
- ``ivfflat``: inverted file of raw vectors (``IVF<nlist>,Flat``).
- ``ivfpq``: IVFADC, an inverted file of PQ-coded residuals (``IVF<nlist>,PQ<m>x<bits>``).
- ``imi``: the inverted multi-index with PQ codes (``IMI2x<bits>,PQ<m>x<bits>``).
- ``opq``: optimised PQ rotation before IVFADC (``OPQ<m>,IVF<nlist>,PQ<m>x<bits>``).
- ``hnsw``: graph search (``HNSW<M>``); it cannot remove vectors in place.
- ``factory``: any faiss factory string.

Any kind may re-rank a shortlist of ``k * k_factor`` candidates exactly from a store of the
vectors (``refine``: ``flat`` float32, ``fp16`` or ``sq8``), as faiss's ``IndexRefine``; the
factory suffixes ``,RFlat`` / ``,Refine(SQfp16)`` / ``,Refine(SQ8)`` ask for the same. Inverted
multi-index and LSH need the L2 metric: on unit vectors ``1 - d/2`` is the cosine, and ``cos(pi h /
bits)`` estimates it from a Hamming distance ``h``. The store and the base index share the labels;
base and store are serialized together as one faiss ``IndexRefine`` file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import faiss
import numpy as np

from raytrieval.retrieval.arrays import as_descriptors
from raytrieval.retrieval.knn import gpu_available, gpu_resources

__all__ = [
    "FaissIndex",
    "IndexSpec",
    "KINDS",
    "KIND_REGISTRY",
    "REFINES",
    "build_index",
    "estimate_bytes",
    "factory_string",
    "read_index",
]

REFINES = {"flat": "Flat", "fp16": "SQfp16", "sq8": "SQ8"}
_REFINE_SUFFIX = {",RFlat": "flat", ",Refine(Flat)": "flat", ",Refine(SQfp16)": "fp16", ",Refine(SQ8)": "sq8"}


@dataclass(frozen=True)
class IndexSpec:
    """What to build: a kind, its base faiss factory string, the metric and the re-ranking store.

    Args:
        kind: one of `KINDS`.
        factory: the base factory string (no IDMap, no refine suffix).
        metric: ``'ip'``, ``'l2'`` (converted to cosine as ``1 - d/2``) or ``'hamming'``.
        refine: None or a key of `REFINES`.
    """

    kind: str
    factory: str
    metric: str = "ip"
    refine: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KIND_REGISTRY and self.kind != "factory":
            raise ValueError(f"kind: expected one of {(*KIND_REGISTRY, 'factory')}, got {self.kind!r}")
        if self.metric not in ("ip", "l2", "hamming"):
            raise ValueError(f"metric: expected 'ip', 'l2' or 'hamming', got {self.metric!r}")
        if self.refine is not None and self.refine not in REFINES:
            raise ValueError(f"refine: expected None or one of {tuple(REFINES)}, got {self.refine!r}")

    @property
    def full_factory(self) -> str:
        """The faiss factory string including the re-ranking suffix."""
        if self.refine is None:
            return self.factory
        return self.factory + (",RFlat" if self.refine == "flat" else f",Refine({REFINES[self.refine]})")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "factory": self.factory, "metric": self.metric, "refine": self.refine}


def nlist_for(n: int) -> int:
    """IVF lists for n vectors: 4 sqrt(N), at most N / 39 (faiss wants 39 training points a list)."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // 39)))


def pq_m_for(dim: int, pq_m: int | None = None) -> int:
    """PQ sub-quantizers: `pq_m` (must divide D) or the largest divisor of D up to min(128, D / 2)."""
    if pq_m is not None:
        if dim % pq_m:
            raise ValueError(f"pq_m: {pq_m} does not divide the dimension {dim}")
        return pq_m
    cap = max(1, min(128, dim // 2))
    return max(m for m in range(1, cap + 1) if dim % m == 0)


def imi_bits_for(n: int) -> int:
    """Bits per half of an inverted multi-index: about N / 4 cells, 2..12 bits, 39 points a centroid."""
    bits = round(math.log2(max(n, 16) / 4) / 2)
    while bits > 2 and 2 ** bits * 39 > n:
        bits -= 1
    return int(min(12, max(2, bits)))


@dataclass(frozen=True)
class FactoryOptions:
    """What a kind's factory string may depend on besides N and D (None: the rule for N or D)."""

    nlist: int | None = None
    pq_m: int | None = None
    pq_nbits: int = 8
    hnsw_m: int = 32
    lsh_bits: int | None = None
    imi_bits: int | None = None
    rabitq_bits: int = 4

    def ivf(self, n: int) -> str:
        return f"IVF{self.nlist or nlist_for(n)}"

    def pq(self, dim: int) -> str:
        return f"PQ{pq_m_for(dim, self.pq_m)}x{self.pq_nbits}"


@dataclass(frozen=True)
class Kind:
    """An index kind: its base factory string for (N, D, options), its metric, whether GPU faiss runs it."""

    factory: Callable[[int, int, FactoryOptions], str]
    metric: str = "ip"
    gpu: bool = False


# the registry: a new kind is one line here (its bytes per vector follow from the factory string)
KIND_REGISTRY: dict[str, Kind] = {
    "flat": Kind(lambda n, d, o: "Flat", gpu=True),
    "lsh": Kind(lambda n, d, o: f"LSH{o.lsh_bits or 4 * d}r", metric="hamming"),
    "pq": Kind(lambda n, d, o: o.pq(d)),
    "ivfflat": Kind(lambda n, d, o: f"{o.ivf(n)},Flat", gpu=True),
    "ivfpq": Kind(lambda n, d, o: f"{o.ivf(n)},{o.pq(d)}", gpu=True),
    "imi": Kind(lambda n, d, o: f"IMI2x{o.imi_bits or imi_bits_for(n)},{o.pq(d)}", metric="l2"),
    "opq": Kind(lambda n, d, o: f"OPQ{pq_m_for(d, o.pq_m)},{o.ivf(n)},{o.pq(d)}", gpu=True),
    "hnsw": Kind(lambda n, d, o: f"HNSW{o.hnsw_m}"),
    # RaBitQ (Gao & Long 2024; multi-bit: extended RaBitQ) codes of the IVF residuals: unbiased
    # inner-product estimates; at 4 bits the best recall@10 near 100 B of the 1M rows (benchmarks/index_rabitq.md)
    "rabitq": Kind(lambda n, d, o: f"{o.ivf(n)},RaBitQ{o.rabitq_bits if o.rabitq_bits > 1 else ''}"),
}
KINDS = (*KIND_REGISTRY, "factory")  # 'factory': any faiss factory string


def factory_string(kind: str, n: int, dim: int, **options: Any) -> tuple[str, str]:
    """(base factory string, metric) of a kind for n vectors of dimension dim.

    Args:
        kind: a name of `KIND_REGISTRY`.
        n, dim: the number of vectors and their dimension.
        options: `FactoryOptions` fields (nlist, pq_m, pq_nbits, hnsw_m, lsh_bits, imi_bits).
    """
    if kind not in KIND_REGISTRY:
        raise ValueError(f"kind: no factory string for {kind!r}")
    entry = KIND_REGISTRY[kind]
    return entry.factory(n, dim, FactoryOptions(**options)), entry.metric


def parse_factory(factory: str) -> tuple[str, str | None]:
    """Split a user factory string into (base, refine store) by its refine suffix."""
    for suffix, refine in _REFINE_SUFFIX.items():
        if factory.endswith(suffix):
            return factory[: -len(suffix)], refine
    return factory, None


def estimate_bytes(spec: IndexSpec, dim: int) -> float:
    """Bytes per vector of a built index (codes + labels + direct map + re-ranking store), by formula."""
    base = spec.factory
    ids = 8.0
    pq = re.search(r"PQ(\d+)(?:x(\d+))?", base)
    rabitq = re.search(r"RaBitQ(\d*)", base)
    if rabitq:  # dim x bits, and the correction factors: 2 floats (1 bit), 5 (more bits)
        bits = int(rabitq.group(1) or 1)
        code = dim * bits / 8 + (8 if bits == 1 else 20)
    elif base.startswith("LSH"):
        code = int(re.match(r"LSH(\d*)", base).group(1) or dim) / 8
    elif base.startswith("HNSW"):
        m = int(re.match(r"HNSW(\d+)", base).group(1))
        code = 4 * dim + 2 * m * 4 * 1.05  # level-0 links (2M) plus the upper levels
    elif pq:
        code = int(pq.group(1)) * int(pq.group(2) or 8) / 8
    else:
        code = 4 * dim  # Flat, IVF...,Flat, or what the formula does not know
    inverted = re.match(r"(OPQ\d+,)?(IVF|IMI)", base) is not None
    direct_map = 16.0 if inverted and spec.refine is None and spec.kind != "factory" else 0.0
    store = {None: 0, "flat": 4 * dim + 8, "fp16": 2 * dim + 8, "sq8": dim + 8}[spec.refine]
    return code + ids + direct_map + store


def _raw_metric(spec: IndexSpec) -> int:
    return faiss.METRIC_INNER_PRODUCT if spec.metric == "ip" else faiss.METRIC_L2


def _new_base(spec: IndexSpec, dim: int) -> Any:
    """An empty base index that takes labels: IVF indexes natively, others inside IDMap2."""
    raw = faiss.index_factory(dim, spec.factory, _raw_metric(spec))
    if faiss.try_extract_index_ivf(raw) is not None:
        if spec.refine is None:  # reconstruct and remove by label without a scan
            faiss.extract_index_ivf(raw).set_direct_map_type(faiss.DirectMap.Hashtable)
        return raw
    return faiss.IndexIDMap2(raw)


def _new_store(spec: IndexSpec, dim: int) -> Any:
    """The re-ranking store (its metric must equal the base's for the IndexRefine file; search ignores it)."""
    raw = faiss.index_factory(dim, REFINES[spec.refine], _raw_metric(spec))
    return faiss.IndexIDMap2(raw)


class FaissIndex:
    """A base faiss index with int64 labels, an optional exact re-ranking store, and search settings.

    Not thread-safe: the caller serialises calls (`raytrieval.serving.index.ImageIndex` holds a lock).
    """

    def __init__(self, spec: IndexSpec, dim: int, base: Any, store: Any = None, holder: Any = None) -> None:
        self.spec = spec
        self.dim = dim
        self.base = base
        self.store = store
        self._holder = holder  # a deserialized IndexRefine that owns base and store
        self.nprobe = 16
        self.ef_search = 64
        self.k_factor = 4
        self._gpu: Any = None
        self._gpu_dirty = True
        self.use_gpu = False
        self.can_remove = self._probe_remove()

    def _probe_remove(self) -> bool:
        try:
            self.base.remove_ids(np.zeros(0, np.int64))
        except RuntimeError:
            return False
        return True

    @property
    def ntotal(self) -> int:
        return int(self.base.ntotal)

    def configure(self, nprobe: int | None = None, ef_search: int | None = None, k_factor: int | None = None,
                  use_gpu: bool | None = None) -> None:
        """Search settings: IVF/IMI lists probed, HNSW beam, re-ranking shortlist factor, GPU copy."""
        if nprobe is not None:
            self.nprobe = int(nprobe)
            ivf = faiss.try_extract_index_ivf(self.base)
            if ivf is not None:
                ivf.nprobe = self.nprobe
                self._gpu_dirty = True
        if ef_search is not None:
            self.ef_search = int(ef_search)
            self._set_ef(self.ef_search)
        if k_factor is not None:
            self.k_factor = int(k_factor)
        if use_gpu is not None:
            if use_gpu and not gpu_available():
                raise ValueError("use_gpu: faiss sees no GPU; install faiss-gpu (pip install 'raytrieval[gpu]')")
            self.use_gpu = bool(use_gpu) and self.spec.kind in KIND_REGISTRY and KIND_REGISTRY[self.spec.kind].gpu

    def _set_ef(self, ef: int) -> None:
        inner = faiss.downcast_index(self.base.index) if isinstance(self.base, faiss.IndexIDMap2) else None
        if inner is not None and hasattr(inner, "hnsw"):
            inner.hnsw.efSearch = ef

    def add(self, vectors: np.ndarray, labels: np.ndarray) -> None:
        """Add (n, D) vectors under int64 labels."""
        if len(labels):
            self.base.add_with_ids(vectors, labels)
            if self.store is not None:
                self.store.add_with_ids(vectors, labels)
            self._gpu_dirty = True

    def remove(self, labels: np.ndarray) -> bool:
        """Remove labels in place; False (and nothing changes) for a base that cannot remove."""
        if not self.can_remove:
            return False
        self.base.remove_ids(np.ascontiguousarray(labels, np.int64))
        if self.store is not None:
            self.store.remove_ids(np.ascontiguousarray(labels, np.int64))
        self._gpu_dirty = True
        return True

    def reconstruct(self, labels: np.ndarray) -> np.ndarray:
        """(n, D) stored vectors (the store's, else the base's reconstruction)."""
        source = self.store if self.store is not None else self.base
        return np.ascontiguousarray(source.reconstruct_batch(np.ascontiguousarray(labels, np.int64)), np.float32)

    def search(self, queries: np.ndarray, k: int, selector: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(cosine scores (Nq, k), labels (Nq, k)) best first; label -1 / score -inf pad a short list.

        Args:
            queries: (Nq, D) float32.
            k: results per query.
            selector: a faiss IDSelector of the labels allowed (kinds that cannot remove).
        """
        shortlist = k * self.k_factor if self.store is not None else k
        if self.ef_search < shortlist:
            self._set_ef(shortlist)
        try:
            index = self._search_target(selector)
            if selector is not None:
                dist, labels = index.search(queries, shortlist, params=faiss.SearchParameters(sel=selector))
            else:
                dist, labels = index.search(queries, shortlist)
        finally:
            if self.ef_search < shortlist:
                self._set_ef(self.ef_search)
        if self.store is not None:
            return self._rerank(queries, labels, k)
        scores = self._to_cosine(dist)
        return np.where(labels < 0, -np.inf, scores).astype(np.float32), labels.astype(np.int64)

    def _to_cosine(self, dist: np.ndarray) -> np.ndarray:
        if self.spec.metric == "l2":
            return 1.0 - dist / 2.0
        if self.spec.metric == "hamming":
            bits = faiss.downcast_index(self.base.index).nbits
            return np.cos(np.pi * dist / bits)
        return dist

    def _rerank(self, queries: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products of the shortlist from the store; the best k of each row."""
        valid = labels >= 0
        flat = labels[valid]
        sims = np.full(labels.shape, -np.inf, np.float32)
        if flat.size:
            vecs = self.store.reconstruct_batch(flat)  # (m, D)
            rows = np.nonzero(valid)[0]
            sims[valid] = np.einsum("md,md->m", vecs, queries[rows])
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(sims, order, axis=1)
        lab = np.where(np.isfinite(top), np.take_along_axis(labels, order, axis=1), -1)
        return np.ascontiguousarray(top, np.float32), np.ascontiguousarray(lab, np.int64)

    def _search_target(self, selector: Any) -> Any:
        if not self.use_gpu or selector is not None:
            return self.base
        if self._gpu_dirty:
            self._gpu = faiss.index_cpu_to_gpu(gpu_resources(), 0, self.base)
            ivf = faiss.try_extract_index_ivf(self._gpu)
            if ivf is not None:
                ivf.nprobe = self.nprobe
            self._gpu_dirty = False
        return self._gpu

    def serialize(self) -> np.ndarray:
        """The index as faiss bytes (base and store together as one IndexRefine)."""
        if self.store is None:
            return faiss.serialize_index(self.base)
        container = faiss.IndexRefine(self.base, self.store)
        return faiss.serialize_index(container)

    def bytes_per_vector(self) -> float:
        """Serialized bytes per stored vector (the memory the index needs)."""
        return float(self.serialize().nbytes) / max(1, self.ntotal)


def read_index(data: bytes | np.ndarray, spec: IndexSpec, dim: int) -> FaissIndex:
    """A `FaissIndex` from `FaissIndex.serialize` bytes."""
    raw = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data)
    if spec.refine is None:
        return FaissIndex(spec, dim, raw)
    holder = faiss.downcast_index(raw)
    return FaissIndex(spec, dim, faiss.downcast_index(holder.base_index), faiss.downcast_index(holder.refine_index),
                      holder=(raw, holder))  # raw owns the memory of both


def build_index(vectors: np.ndarray, labels: np.ndarray, spec: IndexSpec, train_size: int = 100_000,
                seed: int = 0, ef_construction: int | None = None) -> FaissIndex:
    """Train (on at most `train_size` vectors) and fill an index of `spec` over (N, D) vectors.

    `ef_construction` sets the HNSW build beam (faiss's default when None).

    Raises:
        ValueError: too few vectors to train the kind, or a factory faiss does not accept.
    """
    vectors = as_descriptors(vectors, "vectors", min_rows=0)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    n, dim = vectors.shape
    if labels.shape != (n,):
        raise ValueError(f"labels: expected shape ({n},), got {labels.shape}")
    need = min_train(spec)
    if n < need:
        raise ValueError(f"kind: {spec.kind} needs at least {need} vectors to train ({spec.factory}), got {n}; "
                         f"use 'flat' or 'auto'")
    try:
        base = _new_base(spec, dim)
    except RuntimeError as exc:
        raise ValueError(f"factory: faiss cannot build {spec.factory!r} for dimension {dim}: "
                         f"{str(exc).splitlines()[-1]}") from None
    store = _new_store(spec, dim) if spec.refine else None
    if ef_construction is not None and isinstance(base, faiss.IndexIDMap2):
        inner = faiss.downcast_index(base.index)
        if hasattr(inner, "hnsw"):
            inner.hnsw.efConstruction = int(ef_construction)
    if not base.is_trained or (store is not None and not store.is_trained):
        rng = np.random.default_rng(seed)
        train = vectors if n <= train_size else vectors[np.sort(rng.choice(n, train_size, replace=False))]
        if not base.is_trained:
            base.train(train)
        if store is not None and not store.is_trained:
            store.train(train)
    index = FaissIndex(spec, dim, base, store)
    for start in range(0, n, 262_144):  # bounded temporary memory while encoding
        index.add(vectors[start : start + 262_144], labels[start : start + 262_144])
    return index


def min_train(spec: IndexSpec) -> int:
    """The fewest vectors that train a spec (39 points per centroid, as faiss warns below)."""
    need = 0
    ivf = re.search(r"IVF(\d+)", spec.factory)
    if ivf:
        need = max(need, int(ivf.group(1)))
    imi = re.search(r"IMI2x(\d+)", spec.factory)
    if imi:
        need = max(need, 2 ** int(imi.group(1)))
    pq = re.search(r"PQ\d+(?:x(\d+))?", spec.factory)
    if pq:
        need = max(need, 2 ** int(pq.group(1) or 8))
    return need
