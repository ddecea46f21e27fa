"""The `clean` and `mine` stages over a run directory.

clean: manifest -> descriptors (Ray Data actors) -> kNN graph -> candidate pairs -> spatial
verification (Ray actor pool) -> match graph -> clusters and boxes (connected components, or
the 3-D models of COLMAP with `clusters='colmap'`, see `raytrieval.mining.colmap`).

    <run dir>/descriptors.parquet   image_id, descriptor (fixed-size list<float32>); the Parquet
                                    metadata holds the fingerprint, model source and failures
    <run dir>/knn.parquet           src, dst, rank, similarity
    <run dir>/matches.parquet       a, b, inliers, model, box_a, box_b
    <run dir>/clusters.parquet      image_id, cluster_id, box
    <run dir>/colmap/               COLMAP database and models (clusters='colmap' only)
    <run dir>/clean.json            resolved config, fingerprints, counts, skipped images, timings

mine: tuples from the clean stage's artifacts, or from the descriptors alone (manifold).

    <run dir>/tuples.parquet        query, positive, negatives, source, epoch
    <run dir>/mine.json             resolved config, counts, timings

Bad images never stop a stage: manifest rows whose status is not 'ok', and images that fail to
decode while embedding or verifying, are skipped and listed with their reason in the record.
Each artifact stores the fingerprint of its inputs and config; a stage reuses an artifact whose
fingerprint is current (descriptors and matches are the expensive ones).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raytrieval.mining.cleaning import (
    POSITIVE_METHODS,
    candidate_pairs,
    cluster_boxes,
    clusters_table,
    connected_clusters,
    match_arrays,
    read_clusters,
    read_matches,
    select_positives,
    write_clusters,
)
from raytrieval.mining.colmap import ColmapConfig, require_pycolmap
from raytrieval.mining.manifold import manifold_pools, manifold_tuples
from raytrieval.mining.tuples import (
    DEFAULT_EXCLUDE_KNN,
    TupleRules,
    TupleSource,
    build_tuples,
    knn_links,
    plan_epoch,
    tuples_from_indices,
    write_tuples,
)
from raytrieval.mining.verify import FINGERPRINT_KEY, PairVerifier, VerifyConfig, read_fingerprint, verify_pairs
from raytrieval.retrieval.artifacts import atomic_write_json, atomic_write_table, fingerprint, sha1_file
from raytrieval.retrieval.manifest import STATUS_OK, read_manifest
from raytrieval.retrieval.model import ModelSpec
from raytrieval.retrieval.source import ModelSource, ModelSourceLike

__all__ = [
    "CleanConfig",
    "MineConfig",
    "MINE_METHODS",
    "clean",
    "embed_manifest",
    "knn_table",
    "mine",
    "mine_indices",
    "read_descriptors",
    "write_descriptors",
]

MINE_METHODS = ("sfm", "hardneg", "manifold")
CLUSTER_METHODS = ("components", "colmap")

MANIFEST_FILE = "images.parquet"
DESCRIPTORS_FILE = "descriptors.parquet"
KNN_FILE = "knn.parquet"
MATCHES_FILE = "matches.parquet"
CLUSTERS_FILE = "clusters.parquet"
TUPLES_FILE = "tuples.parquet"
CLEAN_RECORD = "clean.json"
MINE_RECORD = "mine.json"

_FAILURES_KEY = b"raytrieval.failures"
_SOURCE_KEY = b"raytrieval.source"


# ---------------------------------------------------------------------------------------------
# configs


@dataclass
class CleanConfig:
    """Configuration of the clean stage.

    Args:
        run_dir: the run directory that receives the artifacts.
        manifest: the collection manifest (default `<run_dir>/images.parquet`).
        model: the off-the-shelf model that embeds the collection (ignored with `checkpoint`).
        checkpoint: a checkpoint directory to embed with instead.
        workers: Ray actors for embedding and for verification (Ray must be initialised, see
            `raytrieval.cluster.runtime.init_ray`); 0 runs both in this process.
        k: candidate neighbours per image in the kNN graph of the global descriptors.
        min_similarity: drop candidate pairs below this descriptor similarity.
        verify: local features and geometric verification settings.
        pairs_per_task: pairs per verification task.
        min_inliers: inliers for a pair to join two images in the match graph.
        min_size: smallest cluster kept.
        box_quantile: 0 for the union of an image's inlier boxes, q > 0 for a robust extent.
        clusters: ``'components'`` (connected components of the verified pairs) or
            ``'colmap'`` (the 3-D models COLMAP reconstructs from them; needs pycolmap).
        colmap: COLMAP settings (clusters='colmap').
        progress: progress bars.
    """

    run_dir: str
    manifest: str | None = None
    model: ModelSpec = field(default_factory=ModelSpec)
    checkpoint: str | None = None
    workers: int = 2
    k: int = 10
    min_similarity: float | None = None
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    pairs_per_task: int = 16
    min_inliers: int = 15
    min_size: int = 2
    box_quantile: float = 0.0
    clusters: str = "components"
    colmap: ColmapConfig = field(default_factory=ColmapConfig)
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelSpec(**self.model)
        if isinstance(self.verify, dict):
            self.verify = VerifyConfig(**self.verify)
        if isinstance(self.colmap, dict):
            self.colmap = ColmapConfig(**self.colmap)
        if self.clusters not in CLUSTER_METHODS:
            raise ValueError(f"clusters: expected one of {CLUSTER_METHODS}, got {self.clusters!r}")
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0, got {self.workers}")
        if self.k < 1:
            raise ValueError(f"k: must be >= 1, got {self.k}")
        if self.pairs_per_task < 1:
            raise ValueError(f"pairs_per_task: must be >= 1, got {self.pairs_per_task}")
        if self.min_inliers < 1:
            raise ValueError(f"min_inliers: must be >= 1, got {self.min_inliers}")
        if self.min_size < 2:
            raise ValueError(f"min_size: must be >= 2 (a cluster needs a pair), got {self.min_size}")
        if not 0.0 <= self.box_quantile < 0.5:
            raise ValueError(f"box_quantile: must be in [0, 0.5), got {self.box_quantile}")
        if self.checkpoint is not None and not (Path(self.checkpoint) / "meta.json").is_file():
            raise ValueError(f"checkpoint: no meta.json in {self.checkpoint}")

    @property
    def manifest_path(self) -> Path:
        return Path(self.manifest) if self.manifest else Path(self.run_dir) / MANIFEST_FILE


@dataclass
class MineConfig:
    """Configuration of the mine stage.

    Args:
        run_dir: the run directory (holds the clean stage's artifacts).
        method: 'sfm' (positives from clusters, random negatives from other clusters),
            'hardneg' (positives from clusters, hardest negatives by descriptor, cirtorch) or
            'manifold' (Iscen et al. 2018, from the descriptors alone). 'sfm' and 'hardneg'
            go through the tuple builder the trainer re-mines with every epoch
            (`raytrieval.mining.tuples`): for the same seed, rules and descriptors, the mine
            stage's tuples are the trainer's.
        positive: how 'sfm' / 'hardneg' pick a positive: 'inliers' (the mate with the most
            inliers, fixed), 'descriptor' (the most similar mate) or 'random' (a random mate).
        tau: inliers a positive needs ('inliers').
        num_negatives: negatives per tuple.
        pool_size: random pool the negatives come from ('sfm', 'hardneg').
        num_queries: 'sfm' / 'hardneg': at most this many queries (None: every clustered image).
        unclustered_negatives: 'sfm' / 'hardneg': the pool also holds images in no cluster.
        exclude_knn: 'sfm' / 'hardneg': no negative from a cluster linked to the query's
            cluster by the first this-many neighbours of `knn.parquet`: clusters that
            verification failed to join are often the same landmark. 0 disables.
        split: `split.parquet` (default `<run_dir>/split.parquet` when it exists): its
            validation clusters' images never appear in a tuple.
        epoch: recorded in the tuples; also varies the random pool.
        seed: seed of every random choice.
        k: manifold: neighbours per node of the kNN graph.
        k_euclidean: manifold: Euclidean neighbours per anchor.
        k_manifold: manifold: manifold neighbours per anchor.
        alpha: manifold: diffusion parameter.
        num_anchors: manifold: at most this many anchors (None: every local maximum).
        truncate: manifold: in a larger collection, each anchor diffuses on the subgraph of its
            this-many nearest descriptors (None: on the whole graph, quadratic in N).
        positives_per_anchor: manifold: tuples per anchor.
        workers: Ray actors to embed with when the descriptors are missing (0: in-process).
        model: the model to embed with when the descriptors are missing.
        out: the tuples file (default `<run_dir>/tuples.parquet`).
    """

    run_dir: str
    method: str = "sfm"
    positive: str = "inliers"
    tau: int = 15
    num_negatives: int = 5
    pool_size: int = 2000
    num_queries: int | None = None
    unclustered_negatives: bool = False
    exclude_knn: int = DEFAULT_EXCLUDE_KNN
    split: str | None = None
    epoch: int = 0
    seed: int = 0
    k: int = 30
    k_euclidean: int = 50
    k_manifold: int = 50
    alpha: float = 0.99
    num_anchors: int | None = None
    truncate: int | None = 1000
    positives_per_anchor: int = 1
    workers: int = 2
    model: ModelSpec = field(default_factory=ModelSpec)
    out: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelSpec(**self.model)
        if self.method not in MINE_METHODS:
            raise ValueError(f"method: expected one of {MINE_METHODS}, got {self.method!r}")
        if self.positive not in POSITIVE_METHODS:
            raise ValueError(f"positive: expected one of {POSITIVE_METHODS}, got {self.positive!r}")
        for name in ("tau", "num_negatives", "pool_size", "k", "k_euclidean", "k_manifold", "positives_per_anchor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.epoch < 0:
            raise ValueError(f"epoch: must be >= 0, got {self.epoch}")
        if self.exclude_knn < 0:
            raise ValueError(f"exclude_knn: must be >= 0, got {self.exclude_knn}")
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"alpha: must be in [0, 1), got {self.alpha}")
        if self.num_anchors is not None and self.num_anchors < 1:
            raise ValueError(f"num_anchors: must be >= 1 or None, got {self.num_anchors}")
        if self.truncate is not None and self.truncate <= self.k_manifold:
            raise ValueError(f"truncate: must be > k_manifold ({self.k_manifold}) or None, got {self.truncate}")
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0, got {self.workers}")

    @property
    def out_path(self) -> Path:
        return Path(self.out) if self.out else Path(self.run_dir) / TUPLES_FILE

    @property
    def split_path(self) -> Path | None:
        path = Path(self.split) if self.split else Path(self.run_dir) / "split.parquet"
        if self.split and not path.is_file():
            raise FileNotFoundError(f"split: {path} does not exist")
        return path if path.is_file() else None

    def tuple_rules(self) -> TupleRules:
        """The rules of the shared tuple builder for 'sfm' / 'hardneg'."""
        return TupleRules(
            positive="fixed" if self.positive == "inliers" else self.positive,
            negatives="random" if self.method == "sfm" else "hard",
            num_queries=self.num_queries, pool_size=self.pool_size, num_negatives=self.num_negatives,
            unclustered_negatives=self.unclustered_negatives, seed=self.seed,
        )


# ---------------------------------------------------------------------------------------------
# descriptors artifact


def write_descriptors(
    path: str | os.PathLike,
    ids: list[str],
    X: np.ndarray,
    fp: str,
    failures: dict[str, str] | None = None,
    source: Any = None,
) -> Path:
    """Atomically write `descriptors.parquet`: image_id + a fixed-size list<float32> per row.

    Args:
        path: destination.
        ids: (N,) image ids.
        X: (N, D) float32 descriptors.
        fp: fingerprint of the inputs and model.
        failures: image id -> reason for images that could not be embedded (not listed).
        source: the model source (ModelSpec dict or checkpoint path), recorded.

    Returns:
        `path` as a Path.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] != len(ids):
        raise ValueError(f"X: expected shape ({len(ids)}, D), got {X.shape}")
    desc = pa.FixedSizeListArray.from_arrays(pa.array(X.ravel(), pa.float32()), X.shape[1])
    table = pa.table({"image_id": pa.array(ids, pa.string()), "descriptor": desc})
    table = table.replace_schema_metadata({
        FINGERPRINT_KEY: fp.encode(),
        _FAILURES_KEY: json.dumps(failures or {}, sort_keys=True).encode(),
        _SOURCE_KEY: json.dumps(source, sort_keys=True, default=str).encode(),
    })
    return atomic_write_table(table, path)


def read_descriptors(path: str | os.PathLike) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """Read `descriptors.parquet`.

    Args:
        path: the file.

    Returns:
        (ids, (N, D) float32 C-contiguous descriptors, failures {image id: reason}).
    """
    table = pq.read_table(path)
    if table.column_names[:2] != ["image_id", "descriptor"]:
        raise ValueError(f"{path}: expected columns image_id, descriptor; got {table.column_names}")
    col = table.column("descriptor").combine_chunks()
    dim = col.type.list_size if pa.types.is_fixed_size_list(col.type) else None
    if dim is None:
        raise ValueError(f"{path}: column 'descriptor' must be a fixed-size list of float32")
    X = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)
    meta = table.schema.metadata or {}
    failures = json.loads(meta.get(_FAILURES_KEY, b"{}").decode())
    return table.column("image_id").to_pylist(), np.ascontiguousarray(X), failures


def _source_fingerprint(source: ModelSource) -> Any:
    if source.spec is not None:
        return source.spec.to_dict()
    if source.checkpoint is None:
        raise ValueError(f"source: mining embeds a spec or a checkpoint, got {source.to_dict()}")
    path = Path(source.checkpoint)
    return {"checkpoint_model": sha1_file(path / "model.pt"), "meta": sha1_file(path / "meta.json")}


def descriptors_fingerprint(manifest: pa.Table, source: ModelSourceLike) -> str:
    """The fingerprint of a descriptors artifact: the model and the manifest's ok images (id, sha1)."""
    ok = [(r["image_id"], r["sha1"]) for r in manifest.to_pylist() if r["status"] == STATUS_OK]
    return fingerprint("descriptors", _source_fingerprint(ModelSource.from_dict(source)), ok)


def embed_manifest(
    run_dir: str | os.PathLike,
    manifest: pa.Table,
    source: ModelSourceLike,
    workers: int = 2,
    progress: bool = True,
    file: str = DESCRIPTORS_FILE,
) -> tuple[list[str], np.ndarray, dict[str, str], str, dict[str, float]]:
    """Descriptors of the manifest's ok images, reusing `<run_dir>/<file>` when current.

    Args:
        run_dir: the run directory.
        manifest: a manifest table.
        source: the model (a ModelSpec dict, a checkpoint directory or a `ModelSource`),
            recorded as given.
        workers: Ray embedding actors (Ray must be initialised); 0 in this process.
        progress: progress bars.
        file: the descriptors artifact of this model (the clean stage's model: `descriptors.parquet`).

    Returns:
        (ids, (N, D) descriptors, skipped {image id: reason} (manifest rejects and decode
        failures), fingerprint, timings).
    """
    rows = manifest.to_pylist()
    skipped = {r["image_id"]: r["status"] for r in rows if r["status"] != STATUS_OK}
    ok = [r for r in rows if r["status"] == STATUS_OK]
    src = ModelSource.from_dict(source)
    scales, max_size = src.preprocessing()
    fp = descriptors_fingerprint(manifest, src)
    path = Path(run_dir) / file
    if path.is_file() and read_fingerprint(path) == fp:
        ids, X, failures = read_descriptors(path)
        return ids, X, {**skipped, **failures}, fp, {"embed_s": 0.0, "embed_reused": 1.0}
    if not ok:
        raise ValueError(f"manifest: no image has status 'ok' ({len(rows)} rows)")
    uris = [r["uri"] for r in ok]
    t0 = time.perf_counter()
    from raytrieval.mining.embed import embed_images  # imports Ray: only when embedding

    result = embed_images(src, uris, scales=scales, max_size=max_size, workers=workers, progress=progress)
    X, failed = result.descriptors, result.failures
    seconds = time.perf_counter() - t0
    failures = {ok[i]["image_id"]: reason for i, reason in failed.items()}
    keep = [i for i in range(len(ok)) if i not in failed]
    ids = [ok[i]["image_id"] for i in keep]
    X = np.ascontiguousarray(X[keep])
    write_descriptors(path, ids, X, fp, failures, source.to_dict() if isinstance(source, ModelSource) else source)
    return ids, X, {**skipped, **failures}, fp, {"embed_s": seconds, "images_per_s": len(uris) / max(seconds, 1e-9)}


# ---------------------------------------------------------------------------------------------
# clean


def knn_table(ids: list[str], sims: np.ndarray, nbrs: np.ndarray) -> pa.Table:
    """The kNN artifact: one row per (src, neighbour), rank 0 is the nearest.

    Args:
        ids: (N,) image ids.
        sims: (N, k) similarities.
        nbrs: (N, k) neighbour indices.

    Returns:
        Table src, dst (string), rank (int32), similarity (float32).
    """
    n, k = nbrs.shape
    ids_arr = np.asarray(ids, dtype=object)
    return pa.table({
        "src": pa.array(np.repeat(ids_arr, k).tolist(), pa.string()),
        "dst": pa.array(ids_arr[nbrs.ravel()].tolist(), pa.string()),
        "rank": pa.array(np.tile(np.arange(k, dtype=np.int32), n), pa.int32()),
        "similarity": pa.array(sims.ravel().astype(np.float32), pa.float32()),
    })


def _config_record(cfg: Any) -> dict[str, Any]:
    record = asdict(cfg)
    if "model" in record:
        record["model"] = cfg.model.to_dict()
    return record


def clean(cfg: CleanConfig) -> dict[str, Any]:
    """Run the clean stage: descriptors, kNN, verified pairs, clusters (see the module docstring).

    Ray must be initialised when `cfg.workers > 0`.

    Args:
        cfg: the stage configuration.

    Returns:
        The stage record written to `<run_dir>/clean.json`.
    """
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.manifest_path.is_file():
        raise FileNotFoundError(f"manifest: {cfg.manifest_path} does not exist (run `raytrieval ingest` first)")
    timings: dict[str, float] = {}
    t_stage = time.perf_counter()
    manifest = read_manifest(cfg.manifest_path)
    source: Any = cfg.checkpoint or cfg.model.to_dict()
    if cfg.workers > 0:
        from raytrieval.mining.embed import require_ray

        require_ray()  # verification runs on Ray actors too: fail before the expensive steps
    if cfg.clusters == "colmap":
        require_pycolmap()  # before the expensive steps
    ids, X, skipped, desc_fp, t_embed = embed_manifest(run_dir, manifest, source, cfg.workers, cfg.progress)
    timings.update(t_embed)
    n = len(ids)
    if n < 2:
        raise ValueError(f"manifest: need at least 2 decodable images to clean, got {n}")
    paths = dict(zip(manifest.column("image_id").to_pylist(), manifest.column("uri").to_pylist()))

    from raytrieval.retrieval.knn import knn_graph

    t0 = time.perf_counter()
    k = min(cfg.k, n - 1)
    sims, nbrs = knn_graph(X, k)
    atomic_write_table(knn_table(ids, sims, nbrs), run_dir / KNN_FILE)
    pairs = candidate_pairs(nbrs, sims, cfg.min_similarity)
    timings["knn_s"] = time.perf_counter() - t0

    matches_path = run_dir / MATCHES_FILE
    match_fp = fingerprint("matches", desc_fp, k, cfg.min_similarity, asdict(cfg.verify))
    verify_failures: dict[str, str] = {}
    if matches_path.is_file() and read_fingerprint(matches_path) == match_fp:
        timings["verify_s"] = 0.0
        timings["verify_reused"] = 1.0
        record_path = run_dir / CLEAN_RECORD
        if record_path.is_file():
            verify_failures = json.loads(record_path.read_text()).get("verify_failures", {})
    else:
        res = verify_pairs(
            [(ids[i], ids[j]) for i, j in pairs], paths, matches_path, cfg.verify, workers=cfg.workers,
            pairs_per_task=cfg.pairs_per_task, fingerprint=match_fp, progress=cfg.progress,
        )
        verify_failures = res.failures
        timings["verify_s"] = res.seconds
        timings["pairs_per_s"] = res.pairs_per_second
        timings["feature_extractions"] = float(res.extracted)
    skipped.update(verify_failures)

    t0 = time.perf_counter()
    # images that failed verification leave the collection: they have no pairs and no cluster
    matches = match_arrays(read_matches(matches_path), ids)
    colmap_info = None
    if cfg.clusters == "colmap":
        from raytrieval.mining.colmap import colmap_clusters

        use = matches.inliers >= cfg.min_inliers
        labels, boxes, colmap_info = colmap_clusters(
            ids, paths, matches.a[use], matches.b[use], PairVerifier(asdict(cfg.verify), threads=os.cpu_count() or 1),
            run_dir / "colmap", cfg.colmap, cfg.min_size, cfg.box_quantile, cfg.progress,
        )
        skipped.update(colmap_info["failures"])
    else:
        labels = connected_clusters(n, matches.a, matches.b, matches.inliers, cfg.min_inliers, cfg.min_size)
        boxes = cluster_boxes(
            labels, matches.a, matches.b, matches.inliers, matches.box_a, matches.box_b, cfg.min_inliers,
            cfg.box_quantile,
        )
    write_clusters(clusters_table(ids, labels, boxes), run_dir / CLUSTERS_FILE)
    timings["cluster_s"] = time.perf_counter() - t0
    timings["stage_s"] = time.perf_counter() - t_stage

    verified = int((matches.inliers >= cfg.min_inliers).sum())
    record = {
        "stage": "clean",
        "config": _config_record(cfg),
        "manifest": {"path": os.fspath(cfg.manifest_path), "sha1": sha1_file(cfg.manifest_path)},
        "fingerprints": {"descriptors": desc_fp, "matches": match_fp},
        "counts": {
            "manifest_rows": manifest.num_rows,
            "images": n,
            "skipped": len(skipped),
            "candidate_pairs": int(len(pairs)),
            "verified_pairs": verified,
            "clusters": int(labels.max()) + 1 if (labels >= 0).any() else 0,
            "clustered_images": int((labels >= 0).sum()),
        },
        "skipped": dict(sorted(skipped.items())),
        "verify_failures": dict(sorted(verify_failures.items())),
        "timings": timings,
    }
    if colmap_info is not None:
        record["colmap"] = {k: v for k, v in colmap_info.items() if k != "failures"}
    atomic_write_json(run_dir / CLEAN_RECORD, record)
    return record


# ---------------------------------------------------------------------------------------------
# mine


def _cluster_labels(run_dir: Path, ids: list[str]) -> np.ndarray:
    path = run_dir / CLUSTERS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `raytrieval clean --run-dir {run_dir}` first")
    table = read_clusters(path)
    index = {image_id: i for i, image_id in enumerate(ids)}
    labels = np.full(len(ids), -1, np.int64)
    for image_id, cluster in zip(table.column("image_id").to_pylist(), table.column("cluster_id").to_pylist()):
        if image_id in index:
            labels[index[image_id]] = cluster
    return labels


def _descriptors_for_mining(cfg: MineConfig) -> tuple[list[str], np.ndarray]:
    run_dir = Path(cfg.run_dir)
    path = run_dir / DESCRIPTORS_FILE
    if path.is_file():
        ids, X, _ = read_descriptors(path)
        return ids, X
    manifest_path = run_dir / MANIFEST_FILE
    if cfg.method != "manifold" or not manifest_path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `raytrieval clean --run-dir {run_dir}` first")
    ids, X, _, _, _ = embed_manifest(run_dir, read_manifest(manifest_path), cfg.model.to_dict(), cfg.workers)
    return ids, X


def mine_indices(cfg: MineConfig, ids: list[str], X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tuples as index arrays over `ids` (the work of `mine`, without the files).

    Args:
        cfg: the stage configuration.
        ids: (N,) image ids of the descriptors.
        X: (N, D) descriptors.

    Returns:
        (queries (T,), positives (T,), negatives (T, num_negatives) with -1 padding), int64.
    """
    held = set()
    if cfg.split_path is not None:
        from raytrieval.mining.split import validation_ids

        held = validation_ids(cfg.split_path)
    keep = np.array([i not in held for i in ids], bool)
    rows = np.flatnonzero(keep)
    if cfg.method == "manifold":
        pools = manifold_pools(
            X[rows], k=cfg.k, alpha=cfg.alpha, k_euclidean=cfg.k_euclidean, k_manifold=cfg.k_manifold,
            num_anchors=cfg.num_anchors, truncate=cfg.truncate,
        )
        q, p, neg = manifold_tuples(pools, cfg.num_negatives, cfg.positives_per_anchor, seed=[cfg.seed, cfg.epoch])
        return rows[q], np.where(p >= 0, rows[np.maximum(p, 0)], -1), np.where(neg >= 0, rows[np.maximum(neg, 0)], -1)
    src = tuple_source(cfg, [ids[i] for i in rows], X[rows])
    rules = cfg.tuple_rules()
    plan = plan_epoch(src, rules, cfg.epoch)
    out = build_tuples(src, rules, plan, X[rows][plan.embed], cfg.epoch)
    out = np.where(out >= 0, rows[np.maximum(out, 0)], -1)
    return out[:, 0], out[:, 1], out[:, 2:]


def tuple_source(cfg: MineConfig, ids: list[str], X: np.ndarray) -> TupleSource:
    """The clean stage's clusters, kNN links and (positive='inliers') positives over `ids`."""
    run_dir = Path(cfg.run_dir)
    labels = _cluster_labels(run_dir, ids)
    index = {image_id: i for i, image_id in enumerate(ids)}
    pairs = np.zeros((0, 2), np.int64)
    if cfg.positive == "inliers":
        matches = match_arrays(read_matches(run_dir / MATCHES_FILE), ids)  # pairs outside `ids` dropped
        positives = select_positives(labels, matches.a, matches.b, matches.inliers, "inliers", tau=cfg.tau, seed=cfg.seed)
        queries = np.flatnonzero(positives >= 0)
        pairs = np.stack([queries, positives[queries]], axis=1)
    links = np.zeros((0, 2), np.int64)
    if cfg.exclude_knn > 0:
        knn = _known(pq.read_table(run_dir / KNN_FILE, columns=["src", "dst", "rank"]), index, ("src", "dst"))
        src = np.array([index[i] for i in knn.column("src").to_pylist()], np.int64)
        dst = np.array([index[i] for i in knn.column("dst").to_pylist()], np.int64)
        links = knn_links(src, dst, knn.column("rank").to_numpy(), cfg.exclude_knn)
    return TupleSource(ids=ids, labels=labels, pairs=pairs, links=links)


def _known(table: pa.Table, index: dict[str, int], columns: tuple[str, str]) -> pa.Table:
    """Rows whose two image columns are both in `index` (the validation images left out)."""
    import pyarrow.compute as pc

    ids = pa.array(list(index), pa.string())
    return table.filter(pc.and_(pc.is_in(table.column(columns[0]), ids), pc.is_in(table.column(columns[1]), ids)))


def mine(cfg: MineConfig) -> dict[str, Any]:
    """Run the mine stage: write `tuples.parquet` and `mine.json`.

    Ray must be initialised when the descriptors are missing and `cfg.workers > 0`.

    Args:
        cfg: the stage configuration.

    Returns:
        The stage record written to `<run_dir>/mine.json`.
    """
    t0 = time.perf_counter()
    ids, X = _descriptors_for_mining(cfg)
    q, p, neg = mine_indices(cfg, ids, X)
    table = tuples_from_indices(ids, q, p, neg, source=cfg.method, epoch=cfg.epoch)
    write_tuples(table, cfg.out_path)
    lengths = [len(x) for x in table.column("negatives").to_pylist()]
    record = {
        "stage": "mine",
        "config": _config_record(cfg),
        "counts": {
            "images": len(ids),
            "tuples": table.num_rows,
            "queries": len(set(table.column("query").to_pylist())),
            "negatives_per_tuple": float(np.mean(lengths)) if lengths else 0.0,
        },
        "out": os.fspath(cfg.out_path),
        "timings": {"stage_s": time.perf_counter() - t0},
    }
    atomic_write_json(Path(cfg.run_dir) / MINE_RECORD, record)
    return record
