"""`raytrieval eval`: descriptors for a benchmark, ranking, revisitop metrics, metrics.json."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raytrieval.evaluation.datasets import Benchmark, prepare_benchmark
from raytrieval.evaluation.image_access import benchmark_access
from raytrieval.evaluation.report import format_table, headline
from raytrieval.evaluation.rerank import RerankConfig, rerank
from raytrieval.retrieval.artifacts import atomic_write_json, atomic_write_npy
from raytrieval.retrieval.model import ModelSpec
from raytrieval.retrieval.source import ModelSource


@dataclass
class EvalConfig:
    """Configuration of an evaluation run.

    Args:
        dataset: benchmark name ('rparis6k-mini', 'ukbench-56', 'demo', ...).
        data_root: folder holding `<dataset>/`; the demo collection is generated there if missing.
        model: the off-the-shelf model (ignored when `checkpoint` is set).
        checkpoint: a checkpoint directory to evaluate instead.
        rerank: whitening and re-ranking applied after the search.
        workers: Ray embedding actors; 0 embeds in this process without Ray.
        address: Ray cluster address (None: embedded local Ray).
        out: output directory for metrics.json.
        regions: `regions.parquet` of learned proposals for the `casr` step, keyed by image name
            (file stem); None: the label-free grid proposals (`grid_proposals`).
        descriptors: the output directory of an earlier run of the same model on the same
            benchmark; its `queries.npy` and `database.npy` are read instead of embedding again.
    """

    dataset: str = "demo"
    data_root: str = "runs/data"
    model: ModelSpec = field(default_factory=ModelSpec)
    checkpoint: str | None = None
    rerank: RerankConfig = field(default_factory=RerankConfig)
    workers: int = 2
    address: str | None = None
    out: str | None = None
    regions: str | None = None
    descriptors: str | None = None

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0, got {self.workers}")
        if self.checkpoint is not None and not (Path(self.checkpoint) / "meta.json").is_file():
            raise ValueError(f"checkpoint: no meta.json in {self.checkpoint}")

    @property
    def source(self) -> ModelSource:
        """The evaluated model: the checkpoint when set, else the off-the-shelf spec."""
        return ModelSource(checkpoint=self.checkpoint) if self.checkpoint else ModelSource(spec=self.model)

    @property
    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        tag = Path(self.checkpoint).name if self.checkpoint else f"{self.model.backbone}-{self.model.pooling}"
        scales = "ms" if len(self.model.scales) > 1 else "ss"
        return Path("runs") / "eval" / f"{self.dataset}-{tag}-{scales}-{self.rerank.label}"


def embed_benchmark(
    cfg: EvalConfig, bench: Benchmark, known: Mapping[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(queries (Nq, D), database (Ndb, D), database images read from `known`): descriptors
    through Ray actors or in-process.

    Args:
        cfg: the evaluation (its model and preprocessing).
        bench: the benchmark.
        known: real path -> descriptor of whole images under the same model and preprocessing
            (a pipeline's collection descriptors); those database images are not embedded again.
    """
    source = cfg.source
    scales, max_size = source.preprocessing()
    n = bench.num_images
    reuse = {i: known[p] for i, p in enumerate(map(os.path.realpath, bench.images)) if p in known} if known else {}
    todo = [i for i in range(n) if i not in reuse]
    if cfg.workers > 0:
        from raytrieval.cluster.runtime import init_ray

        init_ray(cfg.address)
    from raytrieval.mining.embed import embed_images

    # one pass (one model load, one Ray Data pass): the database images to embed, then the cropped queries
    result = embed_images(source, [*(bench.images[i] for i in todo), *bench.queries],
                          [None] * len(todo) + list(bench.qboxes), scales=scales, max_size=max_size,
                          workers=cfg.workers)
    bad = {(todo[i] if i < len(todo) else f"query {i - len(todo)}"): reason for i, reason in result.failures.items()}
    if bad:
        raise ValueError(f"dataset: {len(bad)} benchmark images could not be decoded: {bad}")
    dim = result.descriptors.shape[1]
    db = np.zeros((n, dim), np.float32)
    db[todo] = result.descriptors[: len(todo)]
    for i, x in reuse.items():
        if x.shape != (dim,):
            raise ValueError(f"known: descriptor of {bench.images[i]} has shape {x.shape}, the model gives ({dim},)")
        db[i] = x
    return result.descriptors[len(todo):], db, len(reuse)


def read_descriptors(cfg: EvalConfig, bench: Benchmark) -> tuple[np.ndarray, np.ndarray]:
    """(queries, database) descriptors written by an earlier `run_eval` into `cfg.descriptors`."""
    folder = Path(cfg.descriptors)
    q, db = np.load(folder / "queries.npy"), np.load(folder / "database.npy")
    if (len(q), len(db)) != (bench.num_queries, bench.num_images):
        raise ValueError(f"descriptors: {folder} holds {len(q)} queries and {len(db)} images, "
                         f"{bench.name} has {bench.num_queries} and {bench.num_images}")
    return q, db


def run_eval(cfg: EvalConfig, known: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Evaluate, print the table, write `metrics.json` and the descriptors (`queries.npy`,
    `database.npy`) into the output directory; returns the metrics record.

    `known`: descriptors of some database images under the same model (see `embed_benchmark`).
    """
    bench = prepare_benchmark(cfg.dataset, cfg.data_root)
    t0 = time.perf_counter()
    if cfg.descriptors:
        (q, db), reused = read_descriptors(cfg, bench), bench.num_images
    else:
        q, db, reused = embed_benchmark(cfg, bench, known)
    t_embed = time.perf_counter() - t0
    embedded = bench.num_images - reused + (0 if cfg.descriptors else bench.num_queries)
    baseline = bench.evaluate(np.argsort(-(q @ db.T), axis=1, kind="stable"))
    title = (f"{bench.name}: {bench.num_images} images, {bench.num_queries} queries, "
             f"{cfg.checkpoint or cfg.model.backbone + '/' + cfg.model.pooling}, scales {list(cfg.model.scales)}")
    print(format_table(baseline, title))
    metrics, reranked = baseline, None
    if cfg.rerank.label != "baseline":
        reranked = rerank(cfg.rerank, q, db, benchmark_access(bench, cfg.source, cfg.regions, cfg.rerank.casr_pool))
        metrics = bench.evaluate(reranked.ranks)
        times = ", ".join(f"{k} {v:.1f}" for k, v in reranked.ms_per_query.items())
        print(format_table(metrics, f"with {cfg.rerank.label} (ms per query: {times})"))
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "config": {**asdict(cfg), "model": cfg.model.to_dict()},
        "dataset": bench.name,
        "num_images": bench.num_images,
        "num_queries": bench.num_queries,
        "metrics": metrics,
        "baseline_metrics": baseline,
        "headline": headline(metrics),
        "timings": {
            **({"descriptors_from": cfg.descriptors} if cfg.descriptors else
               {"embed_s": t_embed, "images_per_s": embedded / t_embed, "database_reused": reused}),
            "rerank_ms_per_query": reranked.ms_per_query if reranked else {},
        },
        **({"rerank_counts": reranked.counts} if reranked and reranked.counts else {}),
    }
    atomic_write_npy(out / "queries.npy", q)
    atomic_write_npy(out / "database.npy", db)
    atomic_write_json(out / "metrics.json", record)
    print(f"wrote {out / 'metrics.json'}")
    return record
