"""The image index of the serving stage: a faiss index, its ids, a snapshot and a mutation log.

Directory layout (one index directory)::

    meta.json                    config, dim, kind, spec (factory string), model, why `auto` chose as
                                 it did, and the current snapshot (the commit point)
    index-<seq>.faiss            faiss index of the snapshot taken after mutation <seq>
    ids-<seq>.parquet            label, image_id, uri, width, height, deleted
    log.jsonl                    append-only mutations after the snapshot (`raytrieval.serving.mutation_log`)
    uploads/<sha1>.<ext>         bytes of images added through the API

Durability: `ImageIndex.add` / `delete` append their mutation to the log and fsync it before they
touch memory or return, so every acknowledged mutation survives a crash; `ImageIndex.open` replays
the entries newer than the snapshot (`raytrieval.serving.snapshot_store`). A snapshot writes the
data files under new names, atomically replaces `meta.json`, then empties the log.

Index kinds: every kind of `raytrieval.retrieval.faiss_index` (flat, lsh, pq, ivfflat, ivfpq, imi,
opq, hnsw, or a faiss factory string), optionally re-ranked exactly from a vector store
(`IndexConfig.refine`), and ``auto`` (`raytrieval.retrieval.index_select`: a memory budget and a
recall target verified against exact search). A kind that cannot remove in place (HNSW) keeps
deletes as tombstones filtered at search time; when they pass `compact_ratio` of the index it is
rebuilt in a background thread from the current state (snapshot + log) while searches and
mutations go on against the old one; mutations made meanwhile are replayed onto the new index
before the swap. With GPU faiss (`faiss.get_num_gpus() > 0`) the flat and IVF kinds search on a
GPU copy; the CPU index stays the source of truth for mutations and snapshots.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np

from raytrieval.retrieval.arrays import as_descriptors
from raytrieval.retrieval.artifacts import atomic_dir, atomic_write_bytes
from raytrieval.retrieval.faiss_index import (
    REFINES,
    FaissIndex,
    IndexSpec,
    build_index,
    estimate_bytes,
    factory_string,
    parse_factory,
    read_index,
)
from raytrieval.retrieval.faiss_index import KINDS as FAISS_KINDS
from raytrieval.retrieval.index_select import select_index, size_rule
from raytrieval.retrieval.knn import gpu_available
from raytrieval.serving.mutation_log import MutationLog, decode_vector, encode_vector
from raytrieval.serving.snapshot_store import (
    FORMAT_VERSION,
    META_FILE,
    Record,
    read_index_meta,
    read_snapshot,
    remove_stale_files,
    write_snapshot,
)

__all__ = [
    "DuplicateImageId",
    "ImageIndex",
    "IndexConfig",
    "KINDS",
    "UnknownImageId",
    "choose_kind",
    "read_index_meta",
    "spec_for",
]

KINDS = ("auto",) + FAISS_KINDS
UPLOADS = "uploads"
log = logging.getLogger("raytrieval.serving")


class DuplicateImageId(ValueError):
    """An add names an image_id the index already holds."""


class UnknownImageId(KeyError):
    """A delete or lookup names an image_id the index does not hold."""


@dataclass
class IndexConfig:
    """How the faiss index is built and searched.

    Args:
        kind: 'auto' or a kind of `raytrieval.retrieval.faiss_index.KINDS` ('factory': `factory`).
        factory: a faiss factory string for kind 'factory' (e.g. 'OPQ32,IVF4096,PQ32,RFlat').
        refine: re-rank a shortlist of k * k_factor exactly from a store: None, 'flat', 'fp16', 'sq8'.
        k_factor: re-ranking shortlist factor.
        max_bytes_per_vector: 'auto': the memory budget per vector (None: no budget).
        memory: 'auto': a total memory budget in bytes (divided by N; the smaller budget wins).
        recall_target: 'auto': wanted recall@10 against exact search on a sample.
        auto_sample: 'auto': database vectors used as queries to verify the recall.
        flat_max: 'auto' considers exact search up to this many vectors.
        hnsw_max: 'auto' considers HNSW up to this many vectors.
        nlist: IVF lists; None for 4 * sqrt(N), clipped to [1, N / 39].
        pq_m: PQ sub-quantizers (bytes per vector); None for the largest divisor of D that is
            at most min(128, D / 2).
        pq_nbits: bits per PQ code.
        rabitq_bits: bits per dimension of a RaBitQ code (kind 'rabitq'), 1..9.
        lsh_bits: LSH code bits (None: 4 D).
        imi_bits: bits per half of the inverted multi-index (None: by N).
        nprobe: IVF lists (inverted multi-index: cells) visited per query.
        hnsw_m: HNSW neighbours per node.
        ef_construction: HNSW build beam width.
        ef_search: HNSW search beam width (raised to the shortlist when that is larger).
        train_size: at most this many vectors train the quantizers.
        use_gpu: None = GPU faiss for flat/IVF searches when faiss sees a GPU; False = CPU.
        snapshot_every: automatic snapshot after this many logged mutations, or after 5% of the
            index size when that is more (a snapshot rewrites the whole index); 0: no automatic
            snapshots and no background rebuilds.
        compact_ratio: rebuild a kind that keeps tombstones (HNSW) when they pass this share.
    """

    kind: str = "auto"
    factory: str | None = None
    refine: str | None = None
    k_factor: int = 4
    max_bytes_per_vector: float | None = None
    memory: float | None = None
    recall_target: float = 0.95
    auto_sample: int = 200
    flat_max: int = 100_000
    hnsw_max: int = 1_000_000
    nlist: int | None = None
    pq_m: int | None = None
    pq_nbits: int = 8
    rabitq_bits: int = 4
    lsh_bits: int | None = None
    imi_bits: int | None = None
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
        if self.kind == "factory" and not self.factory:
            raise ValueError("factory: kind 'factory' needs a faiss factory string")
        if self.refine is not None and self.refine not in REFINES:
            raise ValueError(f"refine: expected None or one of {tuple(REFINES)}, got {self.refine!r}")
        if not 1 <= self.rabitq_bits <= 9:
            raise ValueError(f"rabitq_bits: must be in 1..9, got {self.rabitq_bits}")
        for name in ("flat_max", "hnsw_max", "pq_nbits", "nprobe", "hnsw_m", "ef_construction", "ef_search",
                     "train_size", "k_factor", "auto_sample"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("nlist", "pq_m", "lsh_bits", "imi_bits", "max_bytes_per_vector", "memory"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}: must be > 0 or None, got {value}")
        if not 0 < self.recall_target <= 1:
            raise ValueError(f"recall_target: must be in (0, 1], got {self.recall_target}")
        if self.snapshot_every < 0:
            raise ValueError(f"snapshot_every: must be >= 0, got {self.snapshot_every}")
        if not 0 < self.compact_ratio <= 1:
            raise ValueError(f"compact_ratio: must be in (0, 1], got {self.compact_ratio}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def factory_kwargs(self) -> dict[str, Any]:
        """The `factory_string` parameters of this config."""
        return {"nlist": self.nlist, "pq_m": self.pq_m, "pq_nbits": self.pq_nbits, "hnsw_m": self.hnsw_m,
                "lsh_bits": self.lsh_bits, "imi_bits": self.imi_bits, "rabitq_bits": self.rabitq_bits}


def choose_kind(n: int, config: IndexConfig) -> str:
    """`config.kind`, or for 'auto' the kind tried first by size alone (`select_index` then verifies)."""
    if config.kind != "auto":
        return config.kind
    return size_rule(n, config.flat_max, config.hnsw_max)


def spec_for(kind: str, n: int, dim: int, config: IndexConfig) -> IndexSpec:
    """The `IndexSpec` of a concrete kind (not 'auto') for n vectors under `config`."""
    if kind == "factory":
        base, refine = parse_factory(str(config.factory))
        metric = "hamming" if base.startswith("LSH") or ",LSH" in base else "l2" if "IMI" in base else "ip"
        return IndexSpec("factory", base, metric, refine or config.refine)
    factory, metric = factory_string(kind, n, dim, **config.factory_kwargs())
    return IndexSpec(kind, factory, metric, config.refine)


def _build(vectors: np.ndarray, labels: np.ndarray, spec: IndexSpec, config: IndexConfig) -> FaissIndex:
    """Build an index of `spec` with the configured training size and HNSW build beam."""
    return build_index(vectors, labels, spec, train_size=config.train_size, ef_construction=config.ef_construction)


class ImageIndex:
    """A mutable, durable image index: faiss vectors + image ids + snapshot + mutation log.

    Thread-safe: one lock serialises mutations, searches and snapshots of an instance (a
    background rebuild builds outside it and swaps under it). One process writes a directory
    at a time (a Serve deployment with one searcher replica).

    Use `ImageIndex.create` to build a new directory and `ImageIndex.open` to load one.
    """

    def __init__(self, directory: Path, meta: dict[str, Any], index: FaissIndex, records: dict[int, Record],
                 deleted: set[int], seq: int, next_label: int, config: IndexConfig) -> None:
        self.directory = directory
        self.meta = meta
        self.config = config
        self.kind: str = meta["kind"]
        self.dim: int = int(meta["dim"])
        self._index = index
        self._records = records  # live labels only
        self._by_id = {r.image_id: label for label, r in records.items()}
        self._deleted = deleted  # tombstones: labels still inside a faiss index that cannot remove
        self._selector: Any = None
        self._seq = seq
        self._next_label = next_label
        self._since_snapshot = 0
        self._lock = threading.RLock()
        self._log = MutationLog(directory)
        self._pending: list[tuple[dict[str, Any], np.ndarray | None]] | None = None  # during a rebuild
        self._rebuild_thread: threading.Thread | None = None
        self.last_rebuild_s: float | None = None
        self._configure(index)
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
            vectors: (N, D) float32 L2-normalised descriptors (N may be 0 with kinds that need no training).
            image_ids: N unique image ids.
            uris: N image paths (for thumbnails and spatial verification), or None.
            sizes: N (width, height) of the images, or None.
            config: index parameters; kind 'auto' chooses (and records why in meta.json).
            model: what embeds the queries (recorded in meta.json: source, meta, fingerprint).

        Returns:
            The opened `ImageIndex`.
        """
        config = config or IndexConfig()
        vectors = as_descriptors(vectors, "vectors", min_rows=0)
        _check_finite(vectors, "vectors")
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
        labels = np.arange(n, dtype=np.int64)
        start = time.perf_counter()
        auto = None
        if config.kind == "auto" and n > 1 and (n > config.flat_max or config.max_bytes_per_vector or config.memory):
            choice = select_index(vectors, labels, max_bytes_per_vector=config.max_bytes_per_vector,
                                  memory=config.memory, recall_target=config.recall_target,
                                  sample=config.auto_sample, flat_max=config.flat_max, hnsw_max=config.hnsw_max,
                                  k_factor=config.k_factor, factory_kwargs=config.factory_kwargs(),
                                  train_size=config.train_size)
            index, auto = choice.index, choice.report
            config = dataclasses.replace(config, **choice.search)
        else:
            kind = choose_kind(n, config)
            index = _build(vectors, labels, spec_for(kind, n, dim, config), config)
        records = {
            int(label): Record(ids[label], None if uris[label] is None else str(uris[label]),
                               None if sizes[label] is None else int(sizes[label][0]),
                               None if sizes[label] is None else int(sizes[label][1]))
            for label in range(n)
        }
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": index.spec.kind,
            "dim": dim,
            "metric": index.spec.metric,
            "spec": index.spec.to_dict(),
            "config": config.to_dict(),
            "model": model or {},
            "build_s": round(time.perf_counter() - start, 3),
            "snapshot": None,
        }
        if auto is not None:
            meta["auto"] = auto
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
        snap = read_snapshot(directory)
        meta = snap.meta
        if config is None:
            recorded = {k: v for k, v in (meta.get("config") or {}).items() if k in IndexConfig.__dataclass_fields__}
            config = IndexConfig(**recorded)
        spec_fields = meta.get("spec") or {}
        spec = (IndexSpec(**spec_fields) if spec_fields else
                spec_for(meta["kind"], int(meta["snapshot"]["ntotal"]), int(meta["dim"]), config))
        index = read_index(snap.faiss_bytes, spec, int(meta["dim"]))
        obj = cls(directory, meta, index, snap.records, snap.deleted, seq=int(meta["snapshot"]["seq"]),
                  next_label=int(meta["snapshot"]["next_label"]), config=config)
        obj._replay()
        remove_stale_files(directory, obj.meta)
        return obj

    def _configure(self, index: FaissIndex) -> None:
        use_gpu = gpu_available() if self.config.use_gpu is None else self.config.use_gpu
        index.configure(nprobe=self.config.nprobe, ef_search=self.config.ef_search,
                        k_factor=self.config.k_factor, use_gpu=use_gpu)

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
        """k nearest live images by cosine similarity.

        Args:
            queries: (Nq, D) float32 L2-normalised descriptors.
            k: results per query (>= 1); fewer come back when the index holds fewer images.

        Returns:
            (scores (Nq, k') float32, labels (Nq, k') int64) best first, with
            k' = min(k, len(self)); approximate kinds may pad with label -1 / score -inf.
        """
        queries = as_descriptors(queries, "queries", dim=self.dim, min_rows=0)
        _check_finite(queries, "queries")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k: must be an int >= 1, got {k!r}")
        with self._lock:
            kk = min(int(k), len(self._records))
            if kk == 0 or queries.shape[0] == 0:
                return np.zeros((queries.shape[0], kk), np.float32), np.zeros((queries.shape[0], kk), np.int64)
            scores, labels = self._index.search(queries, kk, self._selector)
        return np.ascontiguousarray(scores), np.ascontiguousarray(labels, dtype=np.int64)

    def vectors(self, labels: Sequence[int] | np.ndarray) -> np.ndarray:
        """Stored vectors of live labels, (n, D) float32 (quantized kinds: their reconstruction)."""
        labels = np.ascontiguousarray(labels, dtype=np.int64).ravel()
        with self._lock:
            missing = [int(x) for x in labels if int(x) not in self._records]
            if missing:
                raise UnknownImageId(f"label {missing[0]}")
            if labels.size == 0:
                return np.zeros((0, self.dim), np.float32)
            return self._index.reconstruct(labels)

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
        vectors = as_descriptors(vectors, "vectors", dim=self.dim, min_rows=0)
        _check_finite(vectors, "vectors")
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
                    "vector": encode_vector(vectors[i]),
                })
            self._log.append(entries)
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
            self._log.append([entry])
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

    def _apply(self, entry: dict[str, Any], vector: np.ndarray | None) -> None:
        seq = int(entry["seq"])
        if seq != self._seq + 1:
            raise ValueError(f"log: entry seq {seq} does not follow {self._seq}")
        label = int(entry["label"])
        if entry["op"] == "add":
            if vector is None:
                vector = decode_vector(entry["vector"], self.dim)[None, :]
            vector = np.ascontiguousarray(vector, np.float32)
            self._index.add(vector, np.array([label], np.int64))
            self._records[label] = Record(entry["image_id"], entry.get("uri"), entry.get("width"), entry.get("height"))
            self._by_id[entry["image_id"]] = label
            self._next_label = max(self._next_label, label + 1)
        elif entry["op"] == "delete":
            record = self._records.pop(label, None)
            if record is None or record.image_id != entry["image_id"]:
                raise ValueError(f"log: delete of {entry['image_id']!r} (label {label}) which is not live")
            del self._by_id[record.image_id]
            if not self._index.remove(np.array([label], np.int64)):
                self._deleted.add(label)
                self._refresh_selector()
        else:
            raise ValueError(f"log: unknown op {entry['op']!r}")
        if self._pending is not None:  # a rebuild is running: replay this onto the new index too
            self._pending.append((entry, vector))
        self._seq = seq

    def _after_mutation(self, count: int) -> None:
        self._since_snapshot += count
        every = self.config.snapshot_every
        if not every:
            return
        if self._needs_compaction() and self._rebuild_thread is None:
            self.rebuild(background=True)
        elif self._since_snapshot >= max(every, len(self._records) // 20):
            try:
                self.snapshot()
            except OSError as exc:  # the mutation is durable in the log; retry at the next one
                log.warning("index: automatic snapshot of %s failed (%s); the log keeps growing", self.directory, exc)

    def _replay(self) -> None:
        """Apply the log entries newer than the snapshot."""
        replayed = 0
        for entry in self._log.read():
            if int(entry["seq"]) > self._seq:
                self._apply(entry, None)
                replayed += 1
        self._since_snapshot = replayed

    # ------------------------------------------------------------------ snapshots and rebuilds

    def _needs_compaction(self) -> bool:
        return bool(self._deleted) and len(self._deleted) > self.config.compact_ratio * self.ntotal

    def snapshot(self) -> None:
        """Write the current state as a new snapshot and empty the log (atomic at every step).

        A kind with tombstones past `compact_ratio` is rebuilt first (unless a background rebuild
        is running: it snapshots when it swaps).
        """
        with self._lock:
            if self._needs_compaction() and self._rebuild_thread is None:
                self.rebuild(background=False)
                return
            self._snapshot_locked()

    def _snapshot_locked(self) -> None:
        self._write_snapshot()
        self._log.reset()
        self._since_snapshot = 0
        remove_stale_files(self.directory, self.meta)

    def rebuild(self, background: bool = True) -> threading.Thread | None:
        """Rebuild the faiss index from the live vectors (dropping tombstones), then snapshot.

        The build runs without the lock: searches and mutations go on against the current index;
        mutations made meanwhile are replayed onto the new one, which is swapped in under the lock.

        Args:
            background: run in a daemon thread and return it (None when one runs already);
                False: build in this thread and return None.
        """
        with self._lock:
            if self._rebuild_thread is not None:
                return None
            labels = np.array(sorted(self._records), np.int64)
            vectors = self._index.reconstruct(labels) if labels.size else np.zeros((0, self.dim), np.float32)
            self._pending = []
            spec = self._index.spec
            self._rebuild_thread = threading.current_thread()

        def work() -> None:
            start = time.perf_counter()
            try:
                new = _build(vectors, labels, spec, self.config)
                self._configure(new)
                with self._lock:
                    deleted: set[int] = set()
                    for entry, vector in self._pending or []:
                        label = np.array([int(entry["label"])], np.int64)
                        if entry["op"] == "add":
                            new.add(vector, label)
                        elif not new.remove(label):
                            deleted.add(int(label[0]))
                    self._index, self._deleted = new, deleted
                    self._refresh_selector()
                    self.last_rebuild_s = time.perf_counter() - start
                    self._pending = None
                    self._rebuild_thread = None
                    self._snapshot_locked()
            except Exception:  # keep serving the old index; the state on disk is untouched
                log.exception("index: rebuild of %s failed", self.directory)
            finally:
                with self._lock:
                    self._pending = None
                    self._rebuild_thread = None

        if not background:
            work()
            return None
        thread = threading.Thread(target=work, name="index-rebuild", daemon=True)
        with self._lock:
            self._rebuild_thread = thread
        thread.start()
        return thread

    def _write_snapshot(self) -> None:
        self.meta = write_snapshot(self.directory, self.meta, self._index.serialize(), self._records, self._deleted,
                                   self._seq, self._next_label, self.ntotal)

    def close(self) -> None:
        """Close the log file (the state on disk is already durable)."""
        with self._lock:
            self._log.close()

    def stats(self) -> dict[str, Any]:
        """Counts and settings for /healthz and benchmarks."""
        with self._lock:
            return {"images": len(self._records), "ntotal": self.ntotal, "kind": self.kind, "dim": self.dim,
                    "seq": self._seq, "tombstones": len(self._deleted), "gpu": self._index.use_gpu}

    def info(self) -> dict[str, Any]:
        """What the index is and costs: factory, memory per vector, build and rebuild times, auto's reason."""
        with self._lock:
            snap = self.meta.get("snapshot") or {}
            path = self.directory / str(snap.get("index", ""))
            size = path.stat().st_size if snap and path.is_file() else None
            spec = self._index.spec
            auto = self.meta.get("auto") or {}
            return {
                **self.stats(),
                "factory": spec.full_factory,
                "metric": spec.metric,
                "bytes_per_vector": round(size / max(1, int(snap.get("ntotal") or 0)), 1) if size else None,
                "estimated_bytes_per_vector": round(estimate_bytes(spec, self.dim), 1),
                "deletes_in_place": self._index.can_remove,
                "search": {"nprobe": self._index.nprobe, "ef_search": self._index.ef_search,
                           "k_factor": self._index.k_factor},
                "build_s": self.meta.get("build_s"),
                "last_rebuild_s": None if self.last_rebuild_s is None else round(self.last_rebuild_s, 3),
                "rebuilding": self._rebuild_thread is not None,
                "auto_reason": auto.get("reason"),
            }


def _check_finite(x: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: contains NaN or infinite values")
