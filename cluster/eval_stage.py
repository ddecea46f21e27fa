"""`raytrieval eval`: descriptors for a benchmark, ranking, revisitop metrics, metrics.json."""

from __future__ import annotations

import time
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


def embed_benchmark(cfg: EvalConfig, bench: Benchmark) -> tuple[np.ndarray, np.ndarray]:
    """(queries (Nq, D), database (Ndb, D)) descriptors, through Ray actors or in-process."""
    source = cfg.source
    scales, max_size = source.preprocessing()
    if cfg.workers > 0:
        from raytrieval.cluster.runtime import init_ray

        init_ray(cfg.address)
    from raytrieval.mining.embed import embed_images

    # one pass (one model load, one Ray Data pass): the database, then the cropped queries
    n = bench.num_images
    result = embed_images(source, [*bench.images, *bench.queries], [None] * n + list(bench.qboxes),
                          scales=scales, max_size=max_size, workers=cfg.workers)
    bad = {(i if i < n else f"query {i - n}"): reason for i, reason in result.failures.items()}
    if bad:
        raise ValueError(f"dataset: {len(bad)} benchmark images could not be decoded: {bad}")
    return result.descriptors[n:], result.descriptors[:n]


def read_descriptors(cfg: EvalConfig, bench: Benchmark) -> tuple[np.ndarray, np.ndarray]:
    """(queries, database) descriptors written by an earlier `run_eval` into `cfg.descriptors`."""
    folder = Path(cfg.descriptors)
    q, db = np.load(folder / "queries.npy"), np.load(folder / "database.npy")
    if (len(q), len(db)) != (bench.num_queries, bench.num_images):
        raise ValueError(f"descriptors: {folder} holds {len(q)} queries and {len(db)} images, "
                         f"{bench.name} has {bench.num_queries} and {bench.num_images}")
    return q, db


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate, print the table, write `metrics.json` and the descriptors (`queries.npy`,
    `database.npy`) into the output directory; returns the metrics record."""
    bench = prepare_benchmark(cfg.dataset, cfg.data_root)
    t0 = time.perf_counter()
    q, db = read_descriptors(cfg, bench) if cfg.descriptors else embed_benchmark(cfg, bench)
    t_embed = time.perf_counter() - t0
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
               {"embed_s": t_embed, "images_per_s": (bench.num_images + bench.num_queries) / t_embed}),
            "rerank_ms_per_query": reranked.ms_per_query if reranked else {},
        },
    }
    atomic_write_npy(out / "queries.npy", q)
    atomic_write_npy(out / "database.npy", db)
    atomic_write_json(out / "metrics.json", record)
    print(f"wrote {out / 'metrics.json'}")
    return record
