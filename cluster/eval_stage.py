"""`raytrieval eval`: descriptors for a benchmark, ranking, revisitop metrics, metrics.json."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.datasets import Benchmark, load_benchmark
from evaluation.report import format_table, headline
from retrieval.artifacts import atomic_write_json
from retrieval.model import ModelSpec


@dataclass
class EvalConfig:
    """Configuration of an evaluation run.

    Args:
        dataset: benchmark name ('rparis6k-mini', 'ukbench-56', 'demo', ...).
        data_root: folder holding `<dataset>/`; the demo collection is generated there if missing.
        model: the off-the-shelf model (ignored when `checkpoint` is set).
        checkpoint: a checkpoint directory to evaluate instead.
        workers: Ray embedding actors; 0 embeds in this process without Ray.
        address: Ray cluster address (None: embedded local Ray).
        out: output directory for metrics.json.
    """

    dataset: str = "demo"
    data_root: str = "runs/data"
    model: ModelSpec = field(default_factory=ModelSpec)
    checkpoint: str | None = None
    workers: int = 2
    address: str | None = None
    out: str | None = None

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0, got {self.workers}")
        if self.checkpoint is not None and not (Path(self.checkpoint) / "meta.json").is_file():
            raise ValueError(f"checkpoint: no meta.json in {self.checkpoint}")

    @property
    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        tag = Path(self.checkpoint).name if self.checkpoint else f"{self.model.backbone}-{self.model.pooling}"
        scales = "ms" if len(self.model.scales) > 1 else "ss"
        return Path("runs") / "eval" / f"{self.dataset}-{tag}-{scales}"


def prepare_benchmark(dataset: str, data_root: str | Path) -> Benchmark:
    """Load a benchmark, generating the embedded demo collection first when asked for."""
    if dataset == "demo":
        from evaluation.demo import generate_demo

        generate_demo(Path(data_root))
    return load_benchmark(dataset, data_root)


def embed_benchmark(cfg: EvalConfig, bench: Benchmark) -> tuple[np.ndarray, np.ndarray]:
    """(queries (Nq, D), database (Ndb, D)) descriptors, through Ray actors or in-process."""
    source: Any = cfg.checkpoint or cfg.model.to_dict()
    if cfg.checkpoint:
        from retrieval.checkpoint import read_meta

        meta = read_meta(cfg.checkpoint)
        scales, max_size = tuple(meta["scales"]), int(meta["max_size"])
    else:
        scales, max_size = cfg.model.scales, cfg.model.max_size
    if cfg.workers == 0:
        from mining.embed import load_model_source
        from retrieval.extract import extract_descriptors

        model = load_model_source(source)
        db = extract_descriptors(model, bench.images, scales=scales, max_size=max_size)
        q = extract_descriptors(model, bench.queries, bench.qboxes, scales=scales, max_size=max_size)
        return q, db
    from cluster.runtime import init_ray
    from mining.embed import embed_images

    init_ray(cfg.address)
    kw = dict(scales=scales, max_size=max_size, workers=cfg.workers)
    db = embed_images(source, bench.images, **kw)
    q = embed_images(source, bench.queries, bench.qboxes, **kw)
    bad = {**db.failures, **{f"query {i}": r for i, r in q.failures.items()}}
    if bad:
        raise ValueError(f"dataset: {len(bad)} benchmark images could not be decoded: {bad}")
    return q.descriptors, db.descriptors


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate, print the table, write `metrics.json`; returns the metrics."""
    bench = prepare_benchmark(cfg.dataset, cfg.data_root)
    t0 = time.perf_counter()
    q, db = embed_benchmark(cfg, bench)
    t_embed = time.perf_counter() - t0
    ranks = np.argsort(-(q @ db.T), axis=1, kind="stable")
    metrics = bench.evaluate(ranks)
    title = (f"{bench.name}: {bench.num_images} images, {bench.num_queries} queries, "
             f"{cfg.checkpoint or cfg.model.backbone + '/' + cfg.model.pooling}, scales {list(cfg.model.scales)}")
    print(format_table(metrics, title))
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "config": {**asdict(cfg), "model": cfg.model.to_dict()},
        "dataset": bench.name,
        "num_images": bench.num_images,
        "num_queries": bench.num_queries,
        "metrics": metrics,
        "headline": headline(metrics),
        "timings": {"embed_s": t_embed, "images_per_s": (bench.num_images + bench.num_queries) / t_embed},
    }
    atomic_write_json(out / "metrics.json", record)
    print(f"wrote {out / 'metrics.json'}")
    return record
