"""`raytrieval eval`: descriptors for a benchmark, ranking, revisitop metrics, metrics.json."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raytrieval.evaluation.datasets import Benchmark, load_benchmark
from raytrieval.evaluation.report import format_table, headline
from raytrieval.evaluation.rerank import ImageAccess, RerankConfig, rerank
from raytrieval.retrieval.artifacts import atomic_write_json, atomic_write_npy
from raytrieval.retrieval.model import ModelSpec
from raytrieval.retrieval.source import ModelSource, load_model


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


def prepare_benchmark(dataset: str, data_root: str | Path) -> Benchmark:
    """Load a benchmark, generating the embedded demo collection first when it is missing."""
    if dataset == "demo" and not (Path(data_root) / "demo" / "gnd_demo.json").is_file():
        from raytrieval.evaluation.demo import generate_demo

        generate_demo(Path(data_root))
    return load_benchmark(dataset, data_root)


def embed_benchmark(cfg: EvalConfig, bench: Benchmark) -> tuple[np.ndarray, np.ndarray]:
    """(queries (Nq, D), database (Ndb, D)) descriptors, through Ray actors or in-process."""
    source = cfg.source
    scales, max_size = source.preprocessing()
    if cfg.workers == 0:
        from raytrieval.retrieval.extract import extract_descriptors

        model = load_model(source)
        db = extract_descriptors(model, bench.images, scales=scales, max_size=max_size)
        q = extract_descriptors(model, bench.queries, bench.qboxes, scales=scales, max_size=max_size)
        return q, db
    from raytrieval.cluster.runtime import init_ray
    from raytrieval.mining.embed import embed_images

    init_ray(cfg.address)
    kw = dict(scales=scales, max_size=max_size, workers=cfg.workers)
    db = embed_images(source, bench.images, **kw)
    q = embed_images(source, bench.queries, bench.qboxes, **kw)
    bad = {**db.failures, **{f"query {i}": r for i, r in q.failures.items()}}
    if bad:
        raise ValueError(f"dataset: {len(bad)} benchmark images could not be decoded: {bad}")
    return q.descriptors, db.descriptors


def image_access(cfg: EvalConfig, bench: Benchmark) -> ImageAccess:
    """Cached local features and region descriptors of the benchmark images, loaded on demand."""
    from functools import lru_cache

    from raytrieval.retrieval.features import FeatureCache
    from raytrieval.retrieval.imageio import crop_box, load_image
    from raytrieval.retrieval.region import proposal_descriptors, region_descriptors

    source = cfg.source
    _, max_size = source.preprocessing()
    # SIFT at the extraction size, keypoints in pixels of the stored image
    cache = FeatureCache(max_side=max_size, max_features=2000, capacity=None)
    model = None

    @lru_cache(maxsize=None)
    def regions(i: int):
        nonlocal model
        model = model or load_model(source)
        return region_descriptors(model, bench.images[i], max_size)

    learned = None
    if cfg.regions:
        from raytrieval.retrieval.regions import read_regions, regions_by_image

        learned = regions_by_image(read_regions(cfg.regions))

    @lru_cache(maxsize=None)
    def proposals(i: int):
        nonlocal model
        model = model or load_model(source)
        boxes = None
        if learned is not None:
            name = Path(bench.images[i]).stem
            if name not in learned:
                raise ValueError(f"regions: no proposals for image {name!r} in {cfg.regions}")
            boxes = learned[name][0]
        return proposal_descriptors(model, bench.images[i], boxes, max_size, pool=cfg.rerank.casr_pool)

    @lru_cache(maxsize=None)
    def query_region(q: int) -> np.ndarray:
        """RPA-max of the query box: the crop pooled as one whole-image proposal."""
        nonlocal model
        model = model or load_model(source)
        img = load_image(bench.queries[q])
        crop = crop_box(img, bench.qboxes[q]) if bench.qboxes[q] is not None else img
        whole = np.array([[0, 0, *crop.size]], np.float32)
        return proposal_descriptors(model, crop, whole, max_size, pool=cfg.rerank.casr_pool).descriptors[0]

    return ImageAccess(
        query_features=lambda q: cache.get(("query", q), bench.queries[q], bench.qboxes[q]).stored,
        db_features=lambda i: cache.get(("db", i), bench.images[i]).stored,
        db_regions=regions,
        query_region=query_region,
        db_proposals=proposals,
    )


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate, print the table, write `metrics.json` and the descriptors (`queries.npy`,
    `database.npy`) into the output directory; returns the metrics record."""
    bench = prepare_benchmark(cfg.dataset, cfg.data_root)
    t0 = time.perf_counter()
    q, db = embed_benchmark(cfg, bench)
    t_embed = time.perf_counter() - t0
    baseline = bench.evaluate(np.argsort(-(q @ db.T), axis=1, kind="stable"))
    title = (f"{bench.name}: {bench.num_images} images, {bench.num_queries} queries, "
             f"{cfg.checkpoint or cfg.model.backbone + '/' + cfg.model.pooling}, scales {list(cfg.model.scales)}")
    print(format_table(baseline, title))
    metrics, reranked = baseline, None
    if cfg.rerank.label != "baseline":
        reranked = rerank(cfg.rerank, q, db, image_access(cfg, bench))
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
            "embed_s": t_embed,
            "images_per_s": (bench.num_images + bench.num_queries) / t_embed,
            "rerank_ms_per_query": reranked.ms_per_query if reranked else {},
        },
    }
    atomic_write_npy(out / "queries.npy", q)
    atomic_write_npy(out / "database.npy", db)
    atomic_write_json(out / "metrics.json", record)
    print(f"wrote {out / 'metrics.json'}")
    return record
