"""`raytrieval pipeline`: ingest -> clean -> mine -> train -> evaluate -> index -> report -> serve.

Every stage is skipped when its outputs are current (see `raytrieval.cluster.stage`), so a second run
costs seconds and an interrupted one resumes at the stage that did not finish (training itself
resumes from its last epoch checkpoint). One MLflow parent run links a nested run per stage and
the training's own run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from raytrieval.cluster.stage import Stage, run_stage
from raytrieval.evaluation.rerank import RerankConfig
from raytrieval.retrieval.model import ModelSpec


# Training sized for the embedded demo on 2 CPU cores (configs/demo.yaml says the same): a few
# minutes per epoch instead of TrainConfig's full-size defaults.
DEMO_TRAIN = {"epochs": 3, "num_queries": 60, "pool_size": 150, "num_negatives": 3, "image_size": 288,
              "loss": "contrastive", "margin": 0.7, "lr": 1.0e-5, "batch_size": 5, "cpus_per_worker": 1}


@dataclass
class PipelineConfig:
    """The whole pipeline (YAML: configs/demo.yaml; the defaults are that file).

    Args:
        run_dir: everything of this run goes here.
        benchmark: evaluated before and after fine-tuning ('demo', 'rparis6k-mini', ...).
        data_root: folder holding the benchmark (the demo collection is generated there).
        collection: folder of unlabeled images to train on and index; None takes the
            benchmark's database images (their ground truth is only used to score).
        workers: Ray actors / Train workers.
        address: Ray cluster address (None: RAY_ADDRESS or an embedded local Ray).
        model: the off-the-shelf model the pipeline starts from.
        clean: `raytrieval.mining.stages.CleanConfig` overrides.
        mine: `raytrieval.mining.stages.MineConfig` overrides (method sfm | hardneg | manifold).
        train: `raytrieval.trainers.config.TrainConfig` overrides.
        tune: run a Ray Tune sweep instead of one training: `raytrieval.trainers.sweep_config.SweepConfig`
            fields (at least `search_space`); the trials start from the `train` config (its
            own `train` mapping overrides fields of it) and the sweep's champion is the model
            evaluated, indexed and served.
        rerank: re-ranking evaluated on top of the fine-tuned model.
        index: `raytrieval.serving.index.IndexConfig` overrides.
        serve: end with the HTTP endpoint up (blocks until Ctrl-C).
        port: HTTP port of the endpoint (127.0.0.1).
    """

    run_dir: str = "runs/pipeline/demo"
    benchmark: str = "demo"
    data_root: str = "runs/data"
    collection: str | None = None
    workers: int = 2
    address: str | None = None
    model: ModelSpec = field(default_factory=ModelSpec)
    clean: dict[str, Any] = field(default_factory=lambda: {"k": 10, "min_inliers": 15, "min_size": 2})
    mine: dict[str, Any] = field(default_factory=lambda: {"method": "sfm"})
    train: dict[str, Any] = field(default_factory=lambda: dict(DEMO_TRAIN))
    tune: dict[str, Any] | None = None
    rerank: RerankConfig = field(default_factory=lambda: RerankConfig(steps=("alpha_qe",)))
    index: dict[str, Any] = field(default_factory=lambda: {"kind": "auto"})
    serve: bool = True
    port: int = 8000

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelSpec(**self.model)
        if isinstance(self.rerank, dict):
            self.rerank = RerankConfig(**self.rerank)
        if self.workers < 1:
            raise ValueError(f"workers: must be >= 1, got {self.workers}")
        if self.collection is not None and not Path(self.collection).is_dir():
            raise ValueError(f"collection: {self.collection} is not a folder")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "PipelineConfig":
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config: {path} must hold a mapping")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"config: unknown fields {unknown} in {path}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d


class Pipeline:
    """The stages of one run, wired through the artifacts in `run_dir`."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).resolve()
        self.records: dict[str, dict[str, Any]] = {}

    # ---- paths
    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    @property
    def final_checkpoint(self) -> Path:
        """The model the later stages use: the training's final checkpoint, or the sweep's champion."""
        if self.cfg.tune:
            return self.path("tune", "sweep", "champion")
        return self.path("train", "finetune", "final")

    # ---- stages
    def ingest(self) -> dict[str, Any]:
        from raytrieval.cluster.eval_stage import prepare_benchmark
        from raytrieval.retrieval.manifest import build_manifest, write_manifest

        if self.cfg.collection:
            table = build_manifest(self.cfg.collection)
        else:
            bench = prepare_benchmark(self.cfg.benchmark, self.cfg.data_root)
            table = build_manifest(bench.images, root=Path(bench.images[0]).parent)
        write_manifest(table, self.path("images.parquet"))
        status = table.column("status").to_pylist()
        return {"images": len(status), "rejected": sum(s != "ok" for s in status)}

    def clean(self) -> dict[str, Any]:
        from raytrieval.mining.stages import CleanConfig, clean

        record = clean(CleanConfig(run_dir=str(self.run_dir), model=self.cfg.model, workers=self.cfg.workers,
                                   **self.cfg.clean))
        return record["counts"]

    def mine(self) -> dict[str, Any]:
        from raytrieval.mining.stages import MineConfig, mine

        record = mine(MineConfig(run_dir=str(self.run_dir), model=self.cfg.model, workers=self.cfg.workers,
                                 **self.cfg.mine))
        return record["counts"]

    def train_config(self):
        from raytrieval.trainers.config import TrainConfig

        manifold = self.cfg.mine.get("method") == "manifold"
        base = {
            "manifest": str(self.path("images.parquet")),
            "pairs": "tuples" if manifold else "clusters",
            "clusters": str(self.path("clusters.parquet")),
            "knn": str(self.path("knn.parquet")),  # used when train.exclude_knn > 0
            "tuples": str(self.path("tuples.parquet")) if manifold else None,
            "negatives": "listed" if manifold else "pool",
            "backbone": self.cfg.model.backbone,
            "pooling": self.cfg.model.pooling,
            "max_size": self.cfg.model.max_size,
            "val_dataset": self.cfg.benchmark,
            "val_data_root": self.cfg.data_root,
            "workers": self.cfg.workers,
            "out": str(self.path("train")),
            "name": "finetune",
            "tracking_uri": self.tracking_uri,
            "address": self.cfg.address,
        }
        return TrainConfig.from_dict({**base, **self.cfg.train})

    def sweep_config(self):
        """The `SweepConfig` of the `tune` section: the trials' base is the training config."""
        from raytrieval.trainers.sweep_config import TRIAL_FIELDS, SweepConfig

        derived = ("margin", "gem_p_lr")  # defaults that follow the drawn loss and lr
        base = {k: v for k, v in self.train_config().to_dict().items()
                if k not in TRIAL_FIELDS and (k not in derived or k in self.cfg.train)}
        sweep = {k: v for k, v in self.cfg.tune.items() if k != "train"}
        base.update(self.cfg.tune.get("train", {}))  # e.g. smaller workers so that trials fit side by side
        return SweepConfig(**{"out": str(self.path("tune")), "name": "sweep", "tracking_uri": self.tracking_uri,
                              "address": self.cfg.address, **sweep, "train": base})

    def tune(self) -> dict[str, Any]:
        from raytrieval.trainers.sweep import run_sweep

        result = run_sweep(self.sweep_config())
        if result.champion is None:
            raise RuntimeError(f"tune: no trial reported {self.sweep_config().metric}; see {self.path('tune', 'sweep')}")
        history = json.loads((result.champion / "history.json").read_text())
        return {"checkpoint": str(result.champion), "history": history, "run_id": result.parent_run_id,
                "model_version": result.model_version, "best": result.best["params"],
                "trials": len(result.trials)}

    def train(self) -> dict[str, Any]:
        from raytrieval.trainers.fit import fit

        if self.cfg.tune:
            return self.tune()
        result = fit(self.train_config())
        return {"checkpoint": str(result.checkpoint), "history": result.history, "run_id": result.run_id,
                "model_version": result.model_version}

    def evaluate(self) -> dict[str, Any]:
        from raytrieval.cluster.eval_stage import EvalConfig, run_eval

        common = {"dataset": self.cfg.benchmark, "data_root": self.cfg.data_root, "workers": self.cfg.workers,
                  "address": self.cfg.address}
        out = {}
        for label, kw in {
            "off-the-shelf": {"model": self.cfg.model},
            "off-the-shelf + " + self.cfg.rerank.label: {"model": self.cfg.model, "rerank": self.cfg.rerank},
            "fine-tuned": {"checkpoint": str(self.final_checkpoint)},
            "fine-tuned + " + self.cfg.rerank.label: {"checkpoint": str(self.final_checkpoint),
                                                      "rerank": self.cfg.rerank},
        }.items():
            record = run_eval(EvalConfig(**common, **kw, out=str(self.path("eval", label.replace(" ", "")))))
            out[label] = record["metrics"]
        return out

    def index(self) -> dict[str, Any]:
        from raytrieval.cluster.index_stage import build_index

        index = build_index(self.path("images.parquet"), {"checkpoint": str(self.final_checkpoint)},
                            self.path("index"), workers=self.cfg.workers, config=self.cfg.index)
        return {"vectors": len(index), "kind": index.kind, "dim": index.dim}

    def report(self) -> dict[str, Any]:
        from raytrieval.cluster.report_stage import build_report

        path = build_report(self)
        return {"html": str(path)}

    @property
    def tracking_uri(self) -> str:
        """MLFLOW_TRACKING_URI when set (a shared server), else `sqlite:///<run dir>/mlflow.db`."""
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.path('mlflow.db')}"

    def stages(self) -> list[Stage]:
        cfg = self.cfg.to_dict()
        manifest, clusters, tuples = self.path("images.parquet"), self.path("clusters.parquet"), self.path("tuples.parquet")
        final = self.final_checkpoint
        return [
            Stage("ingest", {k: cfg[k] for k in ("benchmark", "collection")}, [], [manifest], self.ingest),
            Stage("clean", {"model": cfg["model"], **self.cfg.clean}, [manifest], [clusters], self.clean),
            Stage("mine", {"model": cfg["model"], **self.cfg.mine}, [clusters], [tuples], self.mine),
            Stage("train", self.train_config().to_dict() | {"address": None, "workers": None}
                  | ({"tune": self.cfg.tune} if self.cfg.tune else {}),
                  [manifest, clusters, tuples], [final], self.train),
            Stage("evaluate", {"benchmark": cfg["benchmark"], "rerank": cfg["rerank"], "model": cfg["model"]},
                  [final], [self.path("eval")], self.evaluate),
            Stage("index", self.cfg.index, [manifest, final], [self.path("index")], self.index),
            Stage("report", {}, [self.path("stages", "evaluate.json"), self.path("stages", "train.json")],
                  [self.path("report", "index.html")], self.report),
        ]

    def run(self) -> dict[str, dict[str, Any]]:
        """Run (or skip) every stage under one MLflow parent run; returns the stage records.

        MLflow is driven through the client (no active fluent run), so the training stage can
        open its own run; it is then tagged as a child of the pipeline run.
        """
        from mlflow import MlflowClient

        from raytrieval.cluster.runtime import init_ray

        self.run_dir.mkdir(parents=True, exist_ok=True)
        init_ray(self.cfg.address, log_file=self.run_dir / "ray.log")  # the console keeps our own lines
        client = MlflowClient(self.tracking_uri)
        exp = client.get_experiment_by_name("raytrieval-pipeline")
        exp_id = exp.experiment_id if exp else client.create_experiment("raytrieval-pipeline")
        tag = {"raytrieval.run_dir": str(self.run_dir)}
        for stale in client.search_runs([exp_id], "attributes.status = 'RUNNING'"):
            if stale.data.tags.get("raytrieval.run_dir") == str(self.run_dir):  # a killed earlier attempt
                client.set_terminated(stale.info.run_id, "KILLED")
        parent = client.create_run(exp_id, run_name=self.run_dir.name, tags=tag).info.run_id
        client.log_dict(parent, self.cfg.to_dict(), "pipeline_config.json")
        current = parent
        try:
            for stage in self.stages():
                current = client.create_run(exp_id, run_name=stage.name,
                                            tags={"mlflow.parentRunId": parent, **tag}).info.run_id
                record = run_stage(stage, self.run_dir)
                self.records[stage.name] = record
                client.log_param(current, "skipped", record["skipped"])
                client.log_param(current, "fingerprint", record["fingerprint"])
                client.log_metric(current, "seconds", record["seconds"])
                client.set_terminated(current, "FINISHED")
            train_run = self.records["train"]["summary"].get("run_id")
            if train_run:
                client.set_tag(train_run, "mlflow.parentRunId", parent)
            client.log_artifacts(parent, str(self.path("report")), "report")
        except BaseException:
            for run_id in {current, parent}:
                client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(parent, "FINISHED")
        return self.records


def example_query(pipeline: Pipeline, port: int) -> str:
    """POST one benchmark query to the live endpoint and format its top results."""
    import urllib.request

    from raytrieval.cluster.eval_stage import prepare_benchmark

    bench = prepare_benchmark(pipeline.cfg.benchmark, pipeline.cfg.data_root)
    box = list(bench.qboxes[0]) if bench.qboxes[0] is not None else None
    body = json.dumps({"image": _b64(bench.queries[0]), "box": box, "k": 5, "aqe": True})
    req = urllib.request.Request(f"http://127.0.0.1:{port}/search", body.encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 - loopback only
        answer = json.loads(resp.read())
    lines = [f"example query {Path(bench.queries[0]).name} -> top {len(answer['results'])}:"]
    lines += [f"  {r['rank']}. {r['image_id']}  score {r['score']:.3f}" for r in answer["results"]]
    return "\n".join(lines)


def _b64(path: str) -> str:
    import base64

    return base64.b64encode(Path(path).read_bytes()).decode()


def headline_table(records: dict[str, dict[str, Any]]) -> str:
    """Medium/Hard mAP of each evaluated model, from the evaluate stage's record."""
    metrics = records.get("evaluate", {}).get("summary", {})
    rows = [f"{'model':<40} {'E':>6} {'M':>6} {'H':>6}"]
    for label, m in metrics.items():
        rows.append(f"{label:<40} " + " ".join(f"{100 * m[p]['map']:6.1f}" for p in ("easy", "medium", "hard")))
    return "\n".join(rows)


def stage_seconds(records: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {name: float(np.round(r["seconds"], 1)) for name, r in records.items()}
