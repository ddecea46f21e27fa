"""The image index of the serving stage: a faiss index, its ids, a snapshot and a mutation log.

Directory layout (one index directory)::

    meta.json                    config, dim, kind, model, and the current snapshot (commit point)
    index-<seq>.faiss            faiss index of the snapshot taken after mutation <seq>
    ids-<seq>.parquet            label, image_id, uri, width, height, deleted
    log.jsonl                    append-only mutations after the snapshot, one JSON object a line
    uploads/<sha1>.<ext>         bytes of images added through the API

Durability: `ImageIndex.add` / `delete` append their mutation to `log.jsonl` and fsync it before
they touch memory or return, so every acknowledged mutation survives a crash; `ImageIndex.open`
replays the entries newer than the snapshot. A snapshot writes the two data files under new
names, then atomically replaces `meta.json` (the commit point), then empties the log; a crash
at any moment leaves a consistent (snapshot, log) pair. A torn last log line (a write that was
never acknowledged) is dropped at open.

Index kinds (all inner product over L2-normalised descriptors, i.e. cosine similarity):
- ``flat``: exact (`IndexIDMap2(IndexFlatIP)`), deletes remove the vector.
- ``hnsw``: `IndexIDMap2(IndexHNSWFlat)`; faiss HNSW cannot remove, so deletes are tombstones
  filtered with an `IDSelector` at search time and compacted at snapshot time.
- ``ivfpq``: `IndexIVFPQ` with a hash-table direct map (reconstruct and remove by label).
``auto`` picks by collection size (`IndexConfig.flat_max`, `IndexConfig.hnsw_max`). With GPU
faiss (`faiss.get_num_gpus() > 0`) flat and IVF-PQ searches run on a GPU copy; the CPU index
stays the source of truth for mutations and snapshots.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raytrieval.retrieval.artifacts import atomic_dir, atomic_open, atomic_write_bytes, atomic_write_json, atomic_write_table

__all__ = [
    "DuplicateImageId",
    "ImageIndex",
    "IndexConfig",
    "KINDS",
    "UnknownImageId",
    "build_faiss_index",
    "choose_kind",
]

KINDS = ("auto", "flat", "hnsw", "ivfpq")
META_FILE = "meta.json"
LOG_FILE = "log.jsonl"
UPLOADS = "uploads"
FORMAT_VERSION = 1
IDS_SCHEMA = pa.schema([
    pa.field("label", pa.int64(), nullable=False),
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("uri", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("deleted", pa.bool_(), nullable=False),
])
log = logging.getLogger("raytrieval.serving")
_SNAPSHOT_FILE = re.compile(r"^(index-\d{12}\.faiss|ids-\d{12}\.parquet)$")


class DuplicateImageId(ValueError):
    """An add names an image_id the index already holds."""


class UnknownImageId(KeyError):
    """A delete or lookup names an image_id the index does not hold."""


@dataclass
class IndexConfig:
    """How the faiss index is built and searched.

    Args:
        kind: 'auto', 'flat' (exact), 'hnsw' or 'ivfpq'.
        flat_max: 'auto' builds an exact index up to this many vectors.
        hnsw_max: 'auto' builds HNSW up to this many vectors and IVF-PQ beyond.
        nlist: IVF lists; None for 4 * sqrt(N), clipped to [1, N / 39].
        pq_m: PQ sub-quantizers (bytes per vector); None for the largest divisor of D that is
            at most min(128, D / 2) (2 dimensions per byte for 128-d vectors, 10 for 1280-d).
        pq_nbits: bits per PQ code.
        nprobe: IVF lists visited per query.
        hnsw_m: HNSW neighbours per node.
        ef_construction: HNSW build beam width.
        ef_search: HNSW search beam width (raised to k when k is larger).
        train_size: at most this many vectors train IVF-PQ.
        use_gpu: None = GPU faiss for flat/IVF-PQ searches when faiss sees a GPU; False = CPU.
        snapshot_every: automatic snapshot after this many logged mutations, or after 5% of the
            index size when that is more (a snapshot rewrites the whole index); 0: never.
        compact_ratio: rebuild HNSW at snapshot time when tombstones exceed this share.
    """

    kind: str = "auto"
    flat_max: int = 100_000
    hnsw_max: int = 1_000_000
    nlist: int | None = None
    pq_m: int | None = None
    pq_nbits: int = 8
    nprobe: int = 16
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64
    train_size: int = 100_000
    use_gpu: bool | None = None
    snapshot_every: int = 1000
    compact_ratio: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        for name in ("flat_max", "hnsw_max", "pq_nbits", "nprobe", "hnsw_m", "ef_construction", "ef_search",
                     "train_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("nlist", "pq_m"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: must be >= 1 or None, got {value}")
        if self.snapshot_every < 0:
            raise ValueError(f"snapshot_every: must be >= 0, got {self.snapshot_every}")
        if not 0 < self.compact_ratio <= 1:
            raise ValueError(f"compact_ratio: must be in (0, 1], got {self.compact_ratio}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def choose_kind(n: int, config: IndexConfig) -> str:
    """The index kind for `n` vectors: `config.kind`, or by size when it is 'auto'."""
    if config.kind != "auto":
        return config.kind
    if n <= config.flat_max:
        return "flat"
    return "hnsw" if n <= config.hnsw_max else "ivfpq"


def _pq_m(dim: int, config: IndexConfig) -> int:
    if config.pq_m is not None:
        if dim % config.pq_m:
            raise ValueError(f"pq_m: {config.pq_m} does not divide the dimension {dim}")
        return config.pq_m
    cap = max(1, min(128, dim // 2))
    return max(m for m in range(1, cap + 1) if dim % m == 0)


def _nlist(n: int, config: IndexConfig) -> int:
    if config.nlist is not None:
        return config.nlist
    return int(max(1, min(round(4 * math.sqrt(n)), n // 39)))


def _as_vectors(x: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        want = f"(N, {dim})" if dim is not None else "(N, D)"
        raise ValueError(f"{name}: expected shape {want}, got {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name}: expected floating point values, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return x


def build_faiss_index(vectors: np.ndarray, labels: np.ndarray, kind: str, config: IndexConfig) -> Any:
    """Build a CPU faiss index of the given kind over (N, D) vectors with int64 labels.

    Args:
        vectors: (N, D) float32 L2-normalised descriptors.
        labels: (N,) int64 labels (faiss ids).
        kind: 'flat', 'hnsw' or 'ivfpq' (not 'auto': see `choose_kind`).
        config: build parameters.

    Returns:
        The filled faiss index (inner-product metric).

    Raises:
        ValueError: IVF-PQ with too few vectors to train, or a bad kind.
    """
    vectors = _as_vectors(vectors, "vectors")
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    n, dim = vectors.shape
    if labels.shape != (n,):
        raise ValueError(f"labels: expected shape ({n},), got {labels.shape}")
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    elif kind == "hnsw":
        base = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = config.ef_construction
        base.hnsw.efSearch = config.ef_search
        index = faiss.IndexIDMap2(base)
    elif kind == "ivfpq":
        nlist = _nlist(n, config)
        need = max(nlist, 2 ** config.pq_nbits)
        if n < need:
            raise ValueError(f"kind: ivfpq needs at least {need} vectors to train (nlist={nlist}, "
                             f"pq_nbits={config.pq_nbits}), got {n}; use 'flat' or 'auto'")
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, _pq_m(dim, config), config.pq_nbits,
                                 faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        train = vectors if n <= config.train_size else vectors[np.sort(rng.choice(n, config.train_size, replace=False))]
        index.train(train)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        index.nprobe = config.nprobe
    else:
        raise ValueError(f"kind: expected 'flat', 'hnsw' or 'ivfpq', got {kind!r}")
    if n:
        index.add_with_ids(vectors, labels)
    return index


def _encode_vector(v: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii")


def _decode_vector(text: str, dim: int) -> np.ndarray:
    v = np.frombuffer(base64.b64decode(text), dtype="<f4")
    if v.shape != (dim,):
        raise ValueError(f"log: vector of {v.shape[0]} values, index dimension is {dim}")
    return v.astype(np.float32)


def _write_faiss(index: Any, path: Path) -> None:
    """Write a faiss index atomically (temp name in the same directory, fsync, rename)."""
    with atomic_open(path) as f:
        f.write(faiss.serialize_index(index).tobytes())


@dataclass
class _Record:
    image_id: str
    uri: str | None
    width: int | None
    height: int | None


class ImageIndex:
    """A mutable, durable image index: faiss vectors + image ids + snapshot + mutation log.

    Thread-safe: one lock serialises mutations, searches and snapshots of an instance. One
    process writes a directory at a time (a Serve deployment with one searcher replica).

    Use `ImageIndex.create` to build a new directory and `ImageIndex.open` to load one.
    """

    def __init__(self, directory: Path, meta: dict[str, Any], index: Any, records: dict[int, _Record],
                 deleted: set[int], seq: int, next_label: int, config: IndexConfig) -> None:
        self.directory = directory
        self.meta = meta
        self.config = config
        self.kind: str = meta["kind"]
        self.dim: int = int(meta["dim"])
        self._index = index
        self._records = records  # live labels only
        self._by_id = {r.image_id: label for label, r in records.items()}
        self._deleted = deleted  # HNSW tombstones: labels still inside the faiss index
        self._selector: Any = None
        self._seq = seq
        self._next_label = next_label
        self._since_snapshot = 0
        self._lock = threading.RLock()
        self._log_fd: int | None = None
        self._gpu_index: Any = None
        self._gpu_dirty = True
        self._use_gpu = self._want_gpu(config.use_gpu)
        self._refresh_selector()

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike,
        vectors: np.ndarray,
        image_ids: Sequence[str],
        uris: Sequence[str | None] | None = None,
        sizes: Sequence[tuple[int, int] | None] | None = None,
        config: IndexConfig | None = None,
        model: dict[str, Any] | None = None,
    ) -> "ImageIndex":
        """Build a new index directory atomically (replacing one that exists) and open it.

        Args:
            directory: the index directory to write.
            vectors: (N, D) float32 L2-normalised descriptors (N may be 0 with kind flat/hnsw).
            image_ids: N unique image ids.
            uris: N image paths (for thumbnails and spatial verification), or None.
            sizes: N (width, height) of the images, or None.
            config: index parameters.
            model: what embeds the queries (recorded in meta.json: source, meta, fingerprint).

        Returns:
            The opened `ImageIndex`.
        """
        config = config or IndexConfig()
        vectors = _as_vectors(vectors, "vectors")
        n, dim = vectors.shape
        ids = [str(i) for i in image_ids]
        if len(ids) != n:
            raise ValueError(f"image_ids: {len(ids)} ids for {n} vectors")
        if len(set(ids)) != n:
            dup = next(i for i, c in collections.Counter(ids).items() if c > 1)
            raise ValueError(f"image_ids: duplicate id {dup!r}")
        if any(not i for i in ids):
            raise ValueError("image_ids: empty id")
        uris = list(uris) if uris is not None else [None] * n
        sizes = list(sizes) if sizes is not None else [None] * n
        if len(uris) != n or len(sizes) != n:
            raise ValueError(f"uris/sizes: expected {n} entries, got {len(uris)} and {len(sizes)}")
        kind = choose_kind(n, config)
        labels = np.arange(n, dtype=np.int64)
        index = build_faiss_index(vectors, labels, kind, config)
        records = {
            int(label): _Record(ids[label], None if uris[label] is None else str(uris[label]),
                                None if sizes[label] is None else int(sizes[label][0]),
                                None if sizes[label] is None else int(sizes[label][1]))
            for label in range(n)
        }
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "dim": dim,
            "metric": "ip",
            "config": config.to_dict(),
            "model": model or {},
            "snapshot": None,
        }
        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            obj = cls(tmp, meta, index, records, set(), seq=0, next_label=n, config=config)
            obj._write_snapshot()
        return cls.open(directory, config=config)

    @classmethod
    def open(cls, directory: str | os.PathLike, config: IndexConfig | None = None) -> "ImageIndex":
        """Load the snapshot named by meta.json, replay the log, and get ready to mutate.

        Args:
            directory: an index directory written by `create`.
            config: search/snapshot parameters to use instead of the recorded ones (the build
                parameters of the stored index do not change).

        Returns:
            The opened index.

        Raises:
            FileNotFoundError: no meta.json or snapshot files.
            ValueError: a corrupt log line that is not the last one.
        """
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"index: no {META_FILE} in {directory}")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"index: {meta_path} has format_version {meta.get('format_version')}, "
                             f"expected {FORMAT_VERSION}")
        snap = meta.get("snapshot") or {}
        index_path, ids_path = directory / snap.get("index", ""), directory / snap.get("ids", "")
        if not snap or not index_path.is_file() or not ids_path.is_file():
            raise FileNotFoundError(f"index: snapshot files named in {meta_path} are missing")
        if config is None:
            recorded = {k: v for k, v in (meta.get("config") or {}).items() if k in IndexConfig.__dataclass_fields__}
            config = IndexConfig(**recorded)
        index = faiss.read_index(str(index_path))
        records: dict[int, _Record] = {}
        deleted: set[int] = set()
        table = pq.read_table(ids_path)
        cols = {name: table.column(name).to_pylist() for name in IDS_SCHEMA.names}
        for label, image_id, uri, width, height, gone in zip(*(cols[n] for n in IDS_SCHEMA.names)):
            if gone:
                deleted.add(int(label))
            else:
                records[int(label)] = _Record(image_id, uri, width, height)
        obj = cls(directory, meta, index, records, deleted, seq=int(snap["seq"]),
                  next_label=int(snap["next_label"]), config=config)
        obj._apply_index_params()
        obj._replay()
        obj._remove_stale_files()
        return obj

    # ------------------------------------------------------------------ properties

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._by_id

    @property
    def seq(self) -> int:
        """Number of the last applied mutation."""
        return self._seq

    @property
    def ntotal(self) -> int:
        """Vectors inside the faiss index (live + tombstones)."""
        return int(self._index.ntotal)

    @property
    def model(self) -> dict[str, Any]:
        """The model record from meta.json (source, meta, fingerprint)."""
        return dict(self.meta.get("model") or {})

    def image_ids(self) -> list[str]:
        """Live image ids in label order."""
        with self._lock:
            return [self._records[label].image_id for label in sorted(self._records)]

    def label_of(self, image_id: str) -> int:
        """The faiss label of an image id (raises `UnknownImageId`)."""
        try:
            return self._by_id[image_id]
        except KeyError:
            raise UnknownImageId(image_id) from None

    @property
    def lock(self) -> threading.RLock:
        """Hold it to make several calls (search, vectors, record) see one state."""
        return self._lock

    def record(self, label: int) -> dict[str, Any]:
        """{'image_id', 'uri' (absolute path or None), 'width', 'height'} of a live label.

        Raises:
            UnknownImageId: the label is not live (deleted meanwhile, or never added).
        """
        r = self._records.get(int(label))
        if r is None:
            raise UnknownImageId(f"label {label}")
        return {"image_id": r.image_id, "uri": self.resolve_uri(r.uri), "width": r.width, "height": r.height}

    def resolve_uri(self, uri: str | None) -> str | None:
        """Relative uris (uploads) are relative to the index directory."""
        if uri is None:
            return None
        return uri if os.path.isabs(uri) else str(self.directory / uri)

    # ------------------------------------------------------------------ search

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nearest live images by inner product.

        Args:
            queries: (Nq, D) float32 L2-normalised descriptors.
            k: results per query (>= 1); fewer come back when the index holds fewer images.

        Returns:
            (scores (Nq, k') float32, labels (Nq, k') int64) best first, with
            k' = min(k, len(self)); approximate kinds may pad with label -1 / score -inf.
        """
        queries = _as_vectors(queries, "queries", self.dim)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k: must be an int >= 1, got {k!r}")
        with self._lock:
            kk = min(int(k), len(self._records))
            if kk == 0 or queries.shape[0] == 0:
                return np.zeros((queries.shape[0], kk), np.float32), np.zeros((queries.shape[0], kk), np.int64)
            index, params = self._search_target(kk)
            scores, labels = index.search(queries, kk, params=params) if params is not None else index.search(queries, kk)
        scores = np.where(labels < 0, -np.inf, scores).astype(np.float32)
        return np.ascontiguousarray(scores), np.ascontiguousarray(labels, dtype=np.int64)

    def vectors(self, labels: Sequence[int] | np.ndarray) -> np.ndarray:
        """Stored vectors of live labels, (n, D) float32 (IVF-PQ: the PQ reconstruction)."""
        labels = np.ascontiguousarray(labels, dtype=np.int64).ravel()
        with self._lock:
            missing = [int(x) for x in labels if int(x) not in self._records]
            if missing:
                raise UnknownImageId(f"label {missing[0]}")
            if labels.size == 0:
                return np.zeros((0, self.dim), np.float32)
            return np.ascontiguousarray(self._index.reconstruct_batch(labels), dtype=np.float32)

    def _search_target(self, k: int) -> tuple[Any, Any]:
        if self.kind == "hnsw":
            ef = max(self.config.ef_search, k)
            if self._selector is not None:
                return self._index, faiss.SearchParametersHNSW(sel=self._selector, efSearch=ef)
            return self._index, faiss.SearchParametersHNSW(efSearch=ef)
        params = faiss.SearchParametersIVF(nprobe=self.config.nprobe) if self.kind == "ivfpq" else None
        if self._use_gpu:
            if self._gpu_dirty:
                self._gpu_index = self._to_gpu(self._index)
                self._gpu_dirty = False
            if self.kind == "ivfpq":
                self._gpu_index.nprobe = self.config.nprobe
            return self._gpu_index, None
        return self._index, params

    @staticmethod
    def _want_gpu(use_gpu: bool | None) -> bool:
        has = getattr(faiss, "get_num_gpus", lambda: 0)() > 0 and hasattr(faiss, "StandardGpuResources")
        if use_gpu and not has:
            raise ValueError("use_gpu: faiss sees no GPU; install faiss-gpu (pip install 'raytrieval[gpu]')")
        return has if use_gpu is None else bool(use_gpu)

    def _to_gpu(self, index: Any) -> Any:
        if not hasattr(self, "_gpu_res"):
            self._gpu_res = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(self._gpu_res, 0, index)

    def _apply_index_params(self) -> None:
        if self.kind == "ivfpq":
            faiss.extract_index_ivf(self._index).nprobe = self.config.nprobe
        elif self.kind == "hnsw":
            faiss.downcast_index(self._index.index).hnsw.efSearch = self.config.ef_search
        self._use_gpu = self._use_gpu and self.kind in ("flat", "ivfpq")

    def _refresh_selector(self) -> None:
        if self._deleted:
            batch = faiss.IDSelectorBatch(np.fromiter(self._deleted, np.int64, len(self._deleted)))
            self._selector_parts = batch  # the Not selector does not own its child
            self._selector = faiss.IDSelectorNot(batch)
        else:
            self._selector_parts = None
            self._selector = None

    # ------------------------------------------------------------------ mutations

    def add(
        self,
        image_ids: Sequence[str],
        vectors: np.ndarray,
        uris: Sequence[str | None] | None = None,
        sizes: Sequence[tuple[int, int] | None] | None = None,
        data: Sequence[tuple[bytes, str] | None] | None = None,
    ) -> list[int]:
        """Add images durably: logged and fsynced before they become searchable.

        Args:
            image_ids: new unique ids.
            vectors: (n, D) descriptors.
            uris: where each image lies (ignored for items that come with `data`).
            sizes: (width, height) per image.
            data: per image (encoded bytes, extension) to keep under uploads/, or None.

        Returns:
            The new labels.

        Raises:
            DuplicateImageId: an id exists already (nothing is added).
        """
        vectors = _as_vectors(vectors, "vectors", self.dim)
        ids = [str(i) for i in image_ids]
        n = len(ids)
        if vectors.shape[0] != n:
            raise ValueError(f"vectors: {vectors.shape[0]} vectors for {n} image ids")
        uris = list(uris) if uris is not None else [None] * n
        sizes = list(sizes) if sizes is not None else [None] * n
        data = list(data) if data is not None else [None] * n
        if not (len(uris) == len(sizes) == len(data) == n):
            raise ValueError("uris/sizes/data: expected one entry per image id")
        with self._lock:
            seen: set[str] = set()
            for image_id in ids:
                if not image_id:
                    raise ValueError("image_id: empty id")
                if image_id in self._by_id or image_id in seen:
                    raise DuplicateImageId(f"image_id {image_id!r} exists already")
                seen.add(image_id)
            for i, item in enumerate(data):  # bytes land on disk before the log names them
                if item is not None:
                    uris[i] = self._store_upload(*item)
            labels = list(range(self._next_label, self._next_label + n))
            entries = []
            for i, label in enumerate(labels):
                size = sizes[i]
                entries.append({
                    "seq": self._seq + 1 + i, "op": "add", "label": label, "image_id": ids[i], "uri": uris[i],
                    "width": None if size is None else int(size[0]),
                    "height": None if size is None else int(size[1]),
                    "vector": _encode_vector(vectors[i]),
                })
            self._append_log(entries)
            for i, entry in enumerate(entries):
                self._apply(entry, vectors[i : i + 1])
            self._after_mutation(n)
            return labels

    def delete(self, image_id: str) -> int:
        """Delete an image durably (logged and fsynced first).

        Returns:
            The removed label.

        Raises:
            UnknownImageId: no such image.
        """
        with self._lock:
            label = self.label_of(image_id)
            entry = {"seq": self._seq + 1, "op": "delete", "label": label, "image_id": image_id}
            self._append_log([entry])
            self._apply(entry, None)
            self._after_mutation(1)
            return label

    def _store_upload(self, blob: bytes, ext: str) -> str:
        if not re.fullmatch(r"[a-z0-9]{1,8}", ext):
            raise ValueError(f"ext: expected a short lowercase extension, got {ext!r}")
        name = f"{UPLOADS}/{hashlib.sha1(blob).hexdigest()}.{ext}"
        path = self.directory / name
        if not path.is_file():
            atomic_write_bytes(path, blob)
        return name

    def _append_log(self, entries: list[dict[str, Any]]) -> None:
        if self._log_fd is None:
            self._log_fd = os.open(self.directory / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        payload = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in entries).encode("utf-8")
        view = memoryview(payload)
        while view:
            written = os.write(self._log_fd, view)
            view = view[written:]
        os.fsync(self._log_fd)

    def _apply(self, entry: dict[str, Any], vector: np.ndarray | None) -> None:
        seq = int(entry["seq"])
        if seq != self._seq + 1:
            raise ValueError(f"log: entry seq {seq} does not follow {self._seq}")
        label = int(entry["label"])
        if entry["op"] == "add":
            if vector is None:
                vector = _decode_vector(entry["vector"], self.dim)[None, :]
            self._index.add_with_ids(np.ascontiguousarray(vector, np.float32), np.array([label], np.int64))
            self._records[label] = _Record(entry["image_id"], entry.get("uri"), entry.get("width"), entry.get("height"))
            self._by_id[entry["image_id"]] = label
            self._next_label = max(self._next_label, label + 1)
        elif entry["op"] == "delete":
            record = self._records.pop(label, None)
            if record is None or record.image_id != entry["image_id"]:
                raise ValueError(f"log: delete of {entry['image_id']!r} (label {label}) which is not live")
            del self._by_id[record.image_id]
            if self.kind == "hnsw":
                self._deleted.add(label)
                self._refresh_selector()
            else:
                self._index.remove_ids(np.array([label], np.int64))
        else:
            raise ValueError(f"log: unknown op {entry['op']!r}")
        self._seq = seq
        self._gpu_dirty = True

    def _after_mutation(self, count: int) -> None:
        self._since_snapshot += count
        every = self.config.snapshot_every
        if every and self._since_snapshot >= max(every, len(self._records) // 20):
            try:
                self.snapshot()
            except OSError as exc:  # the mutation is durable in the log; retry at the next one
                log.warning("index: automatic snapshot of %s failed (%s); the log keeps growing", self.directory, exc)

    def _replay(self) -> None:
        """Apply the log entries newer than the snapshot; drop a torn final line."""
        path = self.directory / LOG_FILE
        if not path.is_file():
            return
        raw = path.read_bytes()
        keep = len(raw)
        lines = raw.split(b"\n")
        entries: list[dict[str, Any]] = []
        pos = 0
        for i, line in enumerate(lines):
            if line.strip():
                try:
                    entry = json.loads(line)
                    if not isinstance(entry, dict) or not {"seq", "op", "label", "image_id"} <= entry.keys():
                        raise ValueError("not a log entry")
                except ValueError as exc:
                    if i == len(lines) - 1:  # torn final write: never acknowledged, drop it
                        keep = pos
                        break
                    raise ValueError(f"log: {path} line {i + 1} is corrupt ({exc})") from None
                entries.append(entry)
            pos += len(line) + 1
        replayed = 0
        for entry in entries:
            if int(entry["seq"]) > self._seq:
                self._apply(entry, None)
                replayed += 1
        if keep < len(raw) or (keep and raw[keep - 1 : keep] != b"\n"):
            with open(path, "r+b") as f:  # leave a file that ends at a line boundary
                f.truncate(keep)
                if keep and raw[keep - 1 : keep] != b"\n":
                    f.seek(keep)
                    f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
        self._since_snapshot = replayed

    # ------------------------------------------------------------------ snapshots

    def snapshot(self) -> None:
        """Write the current state as a new snapshot and empty the log (atomic at every step)."""
        with self._lock:
            if self.kind == "hnsw" and self._deleted and len(self._deleted) > self.config.compact_ratio * self.ntotal:
                self._compact()
            self._write_snapshot()
            if self._log_fd is not None:
                os.close(self._log_fd)
                self._log_fd = None
            atomic_write_bytes(self.directory / LOG_FILE, b"")
            self._since_snapshot = 0
            self._remove_stale_files()

    def _compact(self) -> None:
        labels = np.array(sorted(self._records), np.int64)
        vectors = self._index.reconstruct_batch(labels) if labels.size else np.zeros((0, self.dim), np.float32)
        self._index = build_faiss_index(vectors, labels, "hnsw", self.config)
        self._deleted = set()
        self._refresh_selector()

    def _write_snapshot(self) -> None:
        tag = f"{self._seq:012d}"
        index_name, ids_name = f"index-{tag}.faiss", f"ids-{tag}.parquet"
        _write_faiss(self._index, self.directory / index_name)
        rows = [(label, r, False) for label, r in self._records.items()]
        rows += [(label, None, True) for label in self._deleted]
        rows.sort(key=lambda t: t[0])
        table = pa.table({
            "label": pa.array([t[0] for t in rows], pa.int64()),
            "image_id": pa.array([t[1].image_id if t[1] else "" for t in rows], pa.string()),
            "uri": pa.array([t[1].uri if t[1] else None for t in rows], pa.string()),
            "width": pa.array([t[1].width if t[1] else None for t in rows], pa.int32()),
            "height": pa.array([t[1].height if t[1] else None for t in rows], pa.int32()),
            "deleted": pa.array([t[2] for t in rows], pa.bool_()),
        }, schema=IDS_SCHEMA)
        atomic_write_table(table, self.directory / ids_name)
        meta = {**self.meta, "snapshot": {"seq": self._seq, "next_label": self._next_label, "index": index_name,
                                          "ids": ids_name, "count": len(self._records), "ntotal": self.ntotal}}
        atomic_write_json(self.directory / META_FILE, meta)  # the commit point
        self.meta = meta

    def _remove_stale_files(self) -> None:
        snap = self.meta.get("snapshot") or {}
        keep = {snap.get("index"), snap.get("ids")}
        for path in self.directory.iterdir():
            stale_snapshot = _SNAPSHOT_FILE.match(path.name) and path.name not in keep
            stale_temp = path.name.startswith(".tmp-") and path.is_file()
            if stale_snapshot or stale_temp:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        """Close the log file (the state on disk is already durable)."""
        with self._lock:
            if self._log_fd is not None:
                os.close(self._log_fd)
                self._log_fd = None

    def __del__(self) -> None:  # best effort; the log is fsynced after every mutation anyway
        fd = getattr(self, "_log_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def stats(self) -> dict[str, Any]:
        """Counts and settings for /healthz and benchmarks."""
        with self._lock:
            return {"images": len(self._records), "ntotal": self.ntotal, "kind": self.kind, "dim": self.dim,
                    "seq": self._seq, "tombstones": len(self._deleted), "gpu": self._use_gpu}
