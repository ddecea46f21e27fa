"""Spatial verification of candidate pairs by a pool of Ray actors, streamed into `matches.parquet`.

Each actor (`PairVerifier`) computes the local features (RootSIFT) of the images it sees and
keeps them in a bounded LRU cache, so an image shared by several pairs of a task, or of later
tasks, is decoded and described once per actor. Tasks carry image ids and paths, never pixels;
results are small per-pair records (inliers, model, two boxes).

Pairs are put in a locality order (reverse Cuthill-McKee numbering of the images: the two
images of a pair get close numbers) and cut into tasks; each actor owns a contiguous block of
tasks, i.e. a window of images, and steals from the longest other block when its own is done.
So an actor describes mostly its own images, and 2 actors do not describe everything twice.
Results are written to the Parquet file as they arrive, in row groups,
through a temporary file that is renamed only when every pair has come back: the file holds
each submitted pair exactly once or does not appear at all.

Actors are restarted when they die (`max_restarts`) and the task they were running is
resubmitted (`max_task_retries`). A task whose actor is unreachable (its node lost, not yet
declared dead) is sent again until the actor is back or replaced; an actor dead for good is
replaced by a fresh one (`raytrieval.mining.actor_pool`). The driver drops a pair it has
already written, so a retry can never duplicate a row. `workers=0` runs the same verifier in
this process (no Ray).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from raytrieval.mining.cleaning import MATCHES_SCHEMA, MODELS
from raytrieval.retrieval.artifacts import atomic_open

__all__ = [
    "PairVerifier", "VerifyConfig", "VerifyResult", "VerifyTask", "locality_order", "make_tasks", "read_fingerprint",
    "verify_pairs",
]

FINGERPRINT_KEY = b"raytrieval.fingerprint"


@dataclass
class VerifyConfig:
    """How pairs are verified.

    Args:
        max_size: longer image side for local features (images are never upscaled).
        max_features: SIFT keypoints per image, strongest first.
        root: RootSIFT descriptors (else plain SIFT).
        ratio: Lowe ratio test.
        model: 'homography' (planar scenes, buildings at a distance) or 'fundamental'.
        method: robust estimator, 'usac_magsac' or 'ransac'.
        reproj: inlier threshold in pixels of the resized image (None: the model's default).
        cache_size: images whose features an actor keeps (about 0.5 MB each at 1000 features).
    """

    max_size: int = 1024
    max_features: int = 1000
    root: bool = True
    ratio: float = 0.8
    model: str = "homography"
    method: str = "usac_magsac"
    reproj: float | None = None
    cache_size: int = 256

    def __post_init__(self) -> None:
        if self.max_size < 32:
            raise ValueError(f"max_size: must be >= 32, got {self.max_size}")
        if self.max_features < 8:
            raise ValueError(f"max_features: must be >= 8, got {self.max_features}")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio: must be in (0, 1], got {self.ratio}")
        if self.model not in MODELS:
            raise ValueError(f"model: expected one of {MODELS}, got {self.model!r}")
        if self.method not in ("usac_magsac", "ransac"):
            raise ValueError(f"method: expected 'usac_magsac' or 'ransac', got {self.method!r}")
        if self.reproj is not None and not self.reproj > 0:
            raise ValueError(f"reproj: must be > 0, got {self.reproj}")
        if self.cache_size < 2:
            raise ValueError(f"cache_size: must be >= 2, got {self.cache_size}")


@dataclass
class VerifyTask:
    """A unit of work: pairs of (id, path) to verify.

    Args:
        index: the task's number (stable across retries).
        pairs: (id_a, path_a, id_b, path_b) per pair.
    """

    index: int
    pairs: list[tuple[str, str, str, str]] = field(default_factory=list)


class PairVerifier:
    """Verifies pairs with a cache of local features; wrapped as a Ray actor by `verify_pairs`.

    Args:
        config: a VerifyConfig as a dict.
        threads: OpenCV / faiss threads (the CPUs given to this worker).
    """

    def __init__(self, config: dict[str, Any], threads: int = 1):
        import cv2
        import faiss

        from raytrieval.retrieval.features import FeatureCache

        cv2.setNumThreads(max(1, threads))
        faiss.omp_set_num_threads(max(1, threads))
        self.config = VerifyConfig(**config)
        self.cache = FeatureCache(self.config.max_size, self.config.max_features, self.config.root,
                                  capacity=self.config.cache_size)
        self.token = f"{os.getpid()}-{id(self)}-{time.time_ns()}"  # tells workers (and restarts) apart

    @property
    def extracted(self) -> int:
        """Features computed (cache misses), for tests and benchmarks."""
        return self.cache.extracted

    def features(self, image_id: str, path: str):
        """(LocalFeatures in pixels of the shrunk image, scale back to stored pixels) of one image.

        Raises:
            raytrieval.retrieval.imageio.ImageDecodeError: the image cannot be decoded.
        """
        item = self.cache.get(image_id, path)
        return item.shrunk, item.scale

    def verify(self, task: VerifyTask) -> dict[str, Any]:
        """Verify a task's pairs.

        Returns:
            {'task': index, 'rows': {column: list} in MATCHES_SCHEMA order,
            'failures': {image_id: reason} for images that could not be decoded (their pairs
            are not in rows), 'worker': this worker's token, 'extracted': features computed so
            far by this worker}.
        """
        from raytrieval.retrieval.imageio import ImageDecodeError
        from raytrieval.retrieval.spatial import verify_pair

        cfg = self.config
        rows: dict[str, list] = {name: [] for name in MATCHES_SCHEMA.names}
        failures: dict[str, str] = {}
        for id_a, path_a, id_b, path_b in task.pairs:
            try:
                fa, sa = self.features(id_a, path_a)
            except ImageDecodeError as exc:
                failures[id_a] = exc.reason
                continue
            try:
                fb, sb = self.features(id_b, path_b)
            except ImageDecodeError as exc:
                failures[id_b] = exc.reason
                continue
            ver = verify_pair(fa, fb, ratio=cfg.ratio, method=cfg.method, reproj=cfg.reproj, model=cfg.model)
            fitted = ver.inliers > 0 and ver.box_a is not None and ver.box_b is not None
            rows["a"].append(id_a)
            rows["b"].append(id_b)
            rows["inliers"].append(int(ver.inliers))
            rows["model"].append(cfg.model if fitted else None)
            rows["box_a"].append((ver.box_a.astype(np.float64) * sa).tolist() if fitted else None)
            rows["box_b"].append((ver.box_b.astype(np.float64) * sb).tolist() if fitted else None)
        return {
            "task": task.index, "rows": rows, "failures": failures, "worker": self.token, "extracted": self.extracted,
        }


@dataclass
class VerifyResult:
    """What `verify_pairs` did.

    Args:
        path: the matches file.
        pairs: pairs written (one row each).
        failures: image id -> reason, for images that could not be decoded (pairs dropped).
        seconds: wall time of the verification.
        extracted: local-feature extractions summed over workers (cache misses).
        first_result_s: wall time until the first task came back (start-up included).
        first_pairs: pairs in the first task that came back.
    """

    path: str
    pairs: int
    failures: dict[str, str]
    seconds: float
    extracted: int = 0
    first_result_s: float = float("nan")
    first_pairs: int = 0

    @property
    def pairs_per_second(self) -> float:
        """Pairs per second of wall time, start-up included."""
        return self.pairs / self.seconds if self.seconds > 0 else float("nan")

    @property
    def steady_pairs_per_second(self) -> float:
        """Pairs per second after the first result (workers started and warm)."""
        rest = self.seconds - self.first_result_s
        return (self.pairs - self.first_pairs) / rest if rest > 0 else float("nan")


def locality_order(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Pairs reordered so that consecutive pairs share images (cache hits in the verifiers).

    Images are numbered by the reverse Cuthill-McKee order of the pair graph (a bandwidth
    reducing order: the two images of a pair get close numbers) and pairs are sorted by their
    lower, then higher number. A contiguous run of pairs then touches a narrow window of images.

    Args:
        pairs: (id_a, id_b) pairs.

    Returns:
        The same pairs (each as given), in locality order.
    """
    import scipy.sparse as sp
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    if not pairs:
        return []
    names = sorted({x for pair in pairs for x in pair})
    index = {name: i for i, name in enumerate(names)}
    a = np.array([index[x] for x, _ in pairs])
    b = np.array([index[y] for _, y in pairs])
    n = len(names)
    graph = sp.csr_matrix((np.ones(2 * a.size, np.int8), (np.r_[a, b], np.r_[b, a])), shape=(n, n))
    perm = reverse_cuthill_mckee(graph, symmetric_mode=True)  # perm[k] = image at position k
    pos = np.empty(n, np.int64)
    pos[perm] = np.arange(n)
    lo, hi = np.minimum(pos[a], pos[b]), np.maximum(pos[a], pos[b])
    return [pairs[i] for i in np.lexsort((hi, lo))]


def make_tasks(
    pairs: Sequence[tuple[str, str]],
    paths: Mapping[str, str],
    pairs_per_task: int = 16,
    order: str = "locality",
) -> list[VerifyTask]:
    """Cut pairs into tasks that carry ids and paths.

    Args:
        pairs: (id_a, id_b) pairs; duplicates are removed (first occurrence kept).
        paths: image id -> path.
        pairs_per_task: pairs per task.
        order: 'locality' (see `locality_order`) or 'given'.

    Returns:
        Tasks numbered 0..T-1; consecutive tasks share images under 'locality'.
    """
    if pairs_per_task < 1:
        raise ValueError(f"pairs_per_task: must be >= 1, got {pairs_per_task}")
    if order not in ("locality", "given"):
        raise ValueError(f"order: expected 'locality' or 'given', got {order!r}")
    seen: set[tuple[str, str]] = set()
    unique = []
    for a, b in pairs:
        if a == b:
            raise ValueError(f"pairs: pair ({a!r}, {b!r}) pairs an image with itself")
        if (a, b) not in seen:
            seen.add((a, b))
            unique.append((a, b))
    missing = sorted({x for pair in unique for x in pair if x not in paths})
    if missing:
        raise ValueError(f"paths: no path for {len(missing)} image ids, e.g. {missing[:3]}")
    if order == "locality":
        unique = locality_order(unique)
    return [
        VerifyTask(t, [(a, os.fspath(paths[a]), b, os.fspath(paths[b])) for a, b in unique[s : s + pairs_per_task]])
        for t, s in enumerate(range(0, len(unique), pairs_per_task))
    ]


def _results_in_process(tasks: list[VerifyTask], config: dict[str, Any], verifier_cls: type) -> Iterator[dict]:
    import cv2
    import faiss

    threads = cv2.getNumThreads(), faiss.omp_get_max_threads()
    try:
        verifier = verifier_cls(config, threads=1)  # sets this process's OpenCV / faiss threads
        for task in tasks:
            yield verifier.verify(task)
    finally:
        cv2.setNumThreads(threads[0])
        faiss.omp_set_num_threads(threads[1])


def _block_assignment(tasks: list[VerifyTask], workers: int) -> Callable[[int], VerifyTask | None]:
    """Slot i owns the i-th contiguous block of tasks (a window of images it caches); a slot whose
    block is done steals from the end of the longest remaining block."""
    bounds = np.linspace(0, len(tasks), workers + 1).round().astype(int)
    queues = [deque(tasks[bounds[i] : bounds[i + 1]]) for i in range(workers)]

    def next_task(i: int) -> VerifyTask | None:
        queue = queues[i] if queues[i] else max(queues, key=len)
        if not queue:
            return None
        return queue.popleft() if queue is queues[i] else queue.pop()

    return next_task


def _results_on_ray(
    tasks: list[VerifyTask],
    config: dict[str, Any],
    verifier_cls: type,
    workers: int,
    max_restarts: int,
    max_task_retries: int,
    cpus_per_worker: float,
) -> Iterator[dict]:
    """Run tasks on `workers` actors (`raytrieval.mining.actor_pool.run_on_actors`) with block
    affinity and work stealing (`_block_assignment`)."""
    import ray

    from raytrieval.mining.actor_pool import run_on_actors

    if not ray.is_initialized():
        raise ValueError("workers: Ray is not initialised (call raytrieval.cluster.runtime.init_ray) or use workers=0")
    # an actor that cannot be placed would hold its queued tasks forever: no more actors than fit
    fit = int(ray.cluster_resources().get("CPU", 0) // cpus_per_worker) if cpus_per_worker > 0 else workers
    workers = max(1, min(workers, fit))
    remote_cls = ray.remote(num_cpus=cpus_per_worker, max_restarts=max_restarts, max_task_retries=max_task_retries)(
        verifier_cls
    )
    # one thread per actor: parallelism comes from the actors. More OpenCV / faiss threads per
    # pair cost CPU (OpenMP spin-waits) and, on a busy 2-core machine, doubled the time per pair.
    return run_on_actors(
        lambda: remote_cls.remote(config, 1), workers, lambda actor, task: actor.verify.remote(task),
        _block_assignment(tasks, workers), max_task_retries, name="verify",
    )


def verify_pairs(
    pairs: Sequence[tuple[str, str]],
    paths: Mapping[str, str],
    out: str | os.PathLike,
    config: VerifyConfig | None = None,
    workers: int = 2,
    pairs_per_task: int = 16,
    max_restarts: int = 2,
    max_task_retries: int = 2,
    cpus_per_worker: float = 1.0,
    fingerprint: str | None = None,
    flush_rows: int = 4096,
    verifier_cls: type = PairVerifier,
    order: str = "locality",
    progress: bool = True,
) -> VerifyResult:
    """Verify candidate pairs and stream the results into a matches Parquet file.

    Args:
        pairs: (id_a, id_b) candidate pairs (ids are manifest image_ids).
        paths: image id -> image path, for every id in pairs.
        out: the matches file (written atomically).
        config: verification settings.
        workers: Ray actors (at most as many as the cluster's CPUs hold); 0 verifies in this
            process without Ray.
        pairs_per_task: pairs per task.
        max_restarts: restarts of a dead actor.
        max_task_retries: resubmissions of a task whose actor died.
        cpus_per_worker: CPUs Ray reserves per actor (each actor runs one single-threaded pair at a time).
        fingerprint: stored in the file's Parquet metadata, to skip a current file later.
        flush_rows: rows buffered before a row group is written.
        verifier_cls: the worker class (a PairVerifier subclass; tests inject failures).
        order: task order, 'locality' (pairs sharing images travel together) or 'given'.
        progress: show a progress bar.

    Returns:
        A VerifyResult.

    Raises:
        RuntimeError: if a pair never came back (a task failed beyond its retries).
    """
    config = config or VerifyConfig()
    if workers < 0:
        raise ValueError(f"workers: must be >= 0, got {workers}")
    tasks = make_tasks(pairs, paths, pairs_per_task, order)
    expected = {(a, b) for t in tasks for a, _, b, _ in t.pairs}
    cfg = asdict(config)
    extracted: dict[str, int] = {}
    schema = MATCHES_SCHEMA.with_metadata({FINGERPRINT_KEY: (fingerprint or "").encode()})
    seen: set[tuple[str, str]] = set()
    failures: dict[str, str] = {}
    start = time.perf_counter()
    bar = tqdm(total=len(expected), desc=f"verify x{workers}", unit="pair", disable=not progress)
    buffer: dict[str, list] = {name: [] for name in MATCHES_SCHEMA.names}
    with atomic_open(out) as f:
        with pq.ParquetWriter(f, schema) as writer:

            def flush() -> None:
                if buffer["a"]:
                    writer.write_table(pa.Table.from_pydict(buffer, schema=schema))
                    for values in buffer.values():
                        values.clear()

            if not tasks:
                results: Iterator[dict] = iter(())
            elif workers == 0:
                results = _results_in_process(tasks, cfg, verifier_cls)
            else:
                results = _results_on_ray(
                    tasks, cfg, verifier_cls, workers, max_restarts, max_task_retries, cpus_per_worker
                )
            done_tasks: set[int] = set()
            first: tuple[float, int] | None = None
            try:
                for result in results:
                    if result["task"] in done_tasks:
                        continue
                    done_tasks.add(result["task"])
                    if first is None:
                        first = (time.perf_counter() - start, len(result["rows"]["a"]))
                    rows = result["rows"]
                    failures.update(result["failures"])
                    for i, (a, b) in enumerate(zip(rows["a"], rows["b"])):
                        if (a, b) in seen or (a, b) not in expected:
                            continue
                        seen.add((a, b))
                        for name in MATCHES_SCHEMA.names:
                            buffer[name].append(rows[name][i])
                    bar.update(len(rows["a"]))
                    extracted[result["worker"]] = max(extracted.get(result["worker"], 0), result["extracted"])
                    if len(buffer["a"]) >= flush_rows:
                        flush()
            finally:
                close = getattr(results, "close", None)
                if close is not None:
                    close()  # stops the actors now, also when a result raised
            flush()
            lost = {(a, b) for a, b in expected - seen if a not in failures and b not in failures}
            if lost:
                raise RuntimeError(f"verify: {len(lost)} pairs never came back, e.g. {sorted(lost)[:3]}")
    bar.close()
    return VerifyResult(
        path=os.fspath(out),
        pairs=len(seen),
        failures=failures,
        seconds=time.perf_counter() - start,
        extracted=sum(extracted.values()),
        first_result_s=first[0] if first else float("nan"),
        first_pairs=first[1] if first else 0,
    )


def read_fingerprint(path: str | os.PathLike) -> str | None:
    """The fingerprint stored in a Parquet file's metadata by this package, or None."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    value = meta.get(FINGERPRINT_KEY)
    return value.decode() if value else None
