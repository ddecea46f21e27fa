"""`raytrieval pipeline`: ingest -> clean -> split -> mine -> train | tune -> select -> [evaluate]
-> index -> report -> serve.

A folder of photos is enough (`raytrieval pipeline --images DIR`): every decision after mining
(best epoch, Tune champion, serving gate, re-ranking parameters) is taken on self-mAP, the
label-free metric of the split stage's held-out verified clusters (`raytrieval.evaluation.selfval`).
A `benchmark` is optional and only scores: the evaluate stage then scores exactly what is
served, beside the off-the-shelf and the fine-tuned model.

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

from raytrieval.cluster.stage import Stage, run_stage
from raytrieval.retrieval.configfile import read_yaml_mapping
from raytrieval.retrieval.model import ModelSpec
from raytrieval.retrieval.regions import REGIONS_FILE


# Training sized for the embedded demo on 2 CPU cores (configs/demo.yaml says the same): a few
# minutes per epoch instead of TrainConfig's full-size defaults.
# Triplet, margin 0.1, lr 1e-4: the best on average over rparis6k-mini, ukbench-56 and the demo
# (benchmarks/selfval.md, fine-tuning section; contrastive at lr 1e-5 gained nothing on either).
# One DDP rank with both cores and 10 tuples per step (the steps of 2 ranks x 5): a second rank
# holds its own torch, model and images, 7.00 -> 5.15 GiB peak for 40 s more (benchmarks/pipeline.md).
DEMO_TRAIN = {"epochs": 3, "num_queries": 60, "pool_size": 150, "num_negatives": 3, "image_size": 288,
              "loss": "triplet", "margin": 0.1, "lr": 1.0e-4, "batch_size": 10, "workers": 1, "cpus_per_worker": 2}
SELECTION_FILE = "selection.json"
FINE_TUNED_DESCRIPTORS_FILE = "descriptors_fine_tuned.parquet"  # the select stage's, read by evaluate and index


@dataclass
class PipelineConfig:
    """The whole pipeline (YAML: configs/demo.yaml; the defaults are that file).

    Args:
        run_dir: everything of this run goes here.
        benchmark: a benchmark that only scores ('demo', 'rparis6k-mini', ...): the evaluate
            stage and the report's true mAP; None for none (a user's own photos).
        data_root: folder holding the benchmark (the demo collection is generated there).
        collection: folder of unlabeled images to train on and index; None takes the
            benchmark's database images (their ground truth is only used to score).
        workers: Ray actors (cleaning, embedding); Ray Train workers too unless `train` sets
            `workers` (the default, sized for 2 cores, trains on 1 worker with 2 threads).
        address: Ray cluster address (None: RAY_ADDRESS or an embedded local Ray).
        model: the off-the-shelf model the pipeline starts from.
        clean: `raytrieval.mining.stages.CleanConfig` overrides.
        split: `raytrieval.mining.split.SplitConfig` overrides (fraction, seed, min_clusters).
        mine: `raytrieval.mining.stages.MineConfig` overrides (method sfm | hardneg | manifold).
        train: `raytrieval.trainers.config.TrainConfig` overrides.
        tune: run a Ray Tune sweep instead of one training: `raytrieval.trainers.sweep_config.SweepConfig`
            fields (at least `search_space`); the trials start from the `train` config (its
            own `train` mapping overrides fields of it); the champion (by self-mAP) is the
            fine-tuned model.
        gate_margin: self-mAP points (in [0, 1]) the fine-tuned model must gain over the
            off-the-shelf one to be served.
        index: `raytrieval.serving.index.IndexConfig` overrides.
        serve: end with the HTTP endpoint up (blocks until Ctrl-C).
        port: HTTP port of the endpoint (127.0.0.1).
    """

    run_dir: str = "runs/pipeline/demo"
    benchmark: str | None = "demo"
    data_root: str = "runs/data"
    collection: str | None = None
    workers: int = 2
    address: str | None = None
    model: ModelSpec = field(default_factory=ModelSpec)
    clean: dict[str, Any] = field(default_factory=lambda: {"k": 10, "min_inliers": 15, "min_size": 2})
    split: dict[str, Any] = field(default_factory=dict)
    mine: dict[str, Any] = field(default_factory=lambda: {"method": "sfm"})
    train: dict[str, Any] = field(default_factory=lambda: dict(DEMO_TRAIN))
    tune: dict[str, Any] | None = None
    gate_margin: float = 0.005
    index: dict[str, Any] = field(default_factory=lambda: {"kind": "auto"})
    serve: bool = True
    port: int = 8000

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelSpec(**self.model)
        if self.workers < 1:
            raise ValueError(f"workers: must be >= 1, got {self.workers}")
        if self.collection is not None and not Path(self.collection).is_dir():
            raise ValueError(f"collection: {self.collection} is not a folder")
        if self.collection is None and self.benchmark is None:
            raise ValueError("collection: required without a benchmark (a folder of images: --images DIR)")
        if not 0.0 <= self.gate_margin < 1.0:
            raise ValueError(f"gate_margin: must be in [0, 1), got {self.gate_margin}")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "PipelineConfig":
        data = read_yaml_mapping(path)
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
        """The fine-tuned model: the training's best epoch, or the sweep's champion."""
        if self.cfg.tune:
            return self.path("tune", "sweep", "champion")
        return self.path("train", "finetune", "final")

    def fine_tune(self) -> bool:
        """Whether the split stage left enough verified clusters to fine-tune (split.json)."""
        return bool(json.loads(self.path("split.json").read_text())["fine_tune"])

    def selection(self) -> dict[str, Any]:
        return json.loads(self.path(SELECTION_FILE).read_text())

    # ---- stages
    def ingest(self) -> dict[str, Any]:
        from raytrieval.evaluation.datasets import prepare_benchmark
        from raytrieval.retrieval.manifest import build_manifest, write_manifest

        if self.cfg.collection:
            table = build_manifest(self.cfg.collection)
        else:
            bench = prepare_benchmark(self.cfg.benchmark, self.cfg.data_root)
            table = build_manifest(bench.images, root=Path(bench.images[0]).parent)
        status = table.column("status").to_pylist()
        ok = sum(s == "ok" for s in status)
        if ok < 2:
            reasons = sorted({s for s in status if s != "ok"})
            raise ValueError(f"collection: {ok} decodable image(s) among {len(status)} files; a collection needs at "
                             f"least 2 to search in (rejected: {', '.join(reasons) or 'none'})")
        write_manifest(table, self.path("images.parquet"))
        return {"images": len(status), "rejected": len(status) - ok}

    def clean(self) -> dict[str, Any]:
        from raytrieval.mining.stages import CleanConfig, clean

        record = clean(CleanConfig(run_dir=str(self.run_dir), model=self.cfg.model, workers=self.cfg.workers,
                                   **self.cfg.clean))
        return record["counts"]

    def split(self) -> dict[str, Any]:
        from raytrieval.mining.split import SplitConfig, split_stage

        record = split_stage(SplitConfig(run_dir=str(self.run_dir), **self.cfg.split))
        print(f"[split] {record['message']}")
        return {"rule": record["rule"], "message": record["message"], "fine_tune": record["fine_tune"],
                **record["counts"]}

    def mine(self) -> dict[str, Any]:
        from raytrieval.mining.stages import MineConfig, mine

        if not self.fine_tune():
            return {"skipped": "no fine-tuning (see the split stage)"}
        record = mine(MineConfig(run_dir=str(self.run_dir), model=self.cfg.model, workers=self.cfg.workers,
                                 **self.cfg.mine))
        return record["counts"]

    def train_config(self):
        from raytrieval.trainers.config import TrainConfig

        manifold = self.cfg.mine.get("method") == "manifold"
        model = self.cfg.model
        pooling_kwargs = dict(model.pooling_kwargs)
        gem_p = {"gem_p": pooling_kwargs.pop("p")} if model.pooling == "gem" and "p" in pooling_kwargs else {}
        base = {
            "manifest": str(self.path("images.parquet")),
            "pairs": "tuples" if manifold else "clusters",
            "clusters": str(self.path("clusters.parquet")),
            "knn": str(self.path("knn.parquet")),
            "split": str(self.path("split.parquet")),
            "tuples": str(self.path("tuples.parquet")) if manifold else None,
            "negatives": "listed" if manifold else "pool",
            "backbone": model.backbone,
            "pooling": model.pooling,
            **gem_p,
            "pooling_kwargs": pooling_kwargs,
            "weights": model.weights,
            "whiten_dim": model.whiten_dim,
            "max_size": model.max_size,
            "val_dataset": self.cfg.benchmark,  # scored beside self_map, never chooses
            "val_data_root": self.cfg.data_root,
            "workers": self.cfg.workers,
            "out": str(self.path("train")),
            "name": "finetune",
            "tracking_uri": self.tracking_uri,
            "address": self.cfg.address,
        }
        if "exclude_knn" in self.cfg.mine:
            base["exclude_knn"] = self.cfg.mine["exclude_knn"]
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
        from raytrieval.trainers.loop import best_epoch

        if not self.fine_tune():
            return {"skipped": "no fine-tuning (see the split stage)", "history": []}
        if self.cfg.tune:
            return self.tune()
        result = fit(self.train_config())
        return {"checkpoint": str(result.checkpoint), "history": result.history, "run_id": result.run_id,
                "model_version": result.model_version, "best_epoch": best_epoch(result.history)}

    def embed(self, source: dict[str, Any], ids: list[str], boxes: list | None = None) -> np.ndarray:
        """(N, D) descriptors of the collection's images `ids` (cropped to `boxes` when given)
        under a model source ({"checkpoint": dir} or {"spec": ModelSpec dict})."""
        from raytrieval.mining.embed import embed_images
        from raytrieval.retrieval.manifest import read_manifest
        from raytrieval.retrieval.source import ModelSource

        manifest = read_manifest(self.path("images.parquet"))
        uri = dict(zip(manifest.column("image_id").to_pylist(), manifest.column("uri").to_pylist()))
        source = ModelSource.from_dict(source)
        scales, max_size = source.preprocessing()
        result = embed_images(source, [uri[i] for i in ids], boxes, scales=scales, max_size=max_size,
                              workers=self.cfg.workers, progress=False)
        if result.failures:
            raise ValueError(f"select: {len(result.failures)} images embedded before failed now: {result.failures}")
        return result.descriptors

    def select(self) -> dict[str, Any]:
        """The serving gate and the re-ranking, both on self-mAP; writes `selection.json`."""
        return write_selection(self, self.final_checkpoint if self.fine_tune() else None)

    def served_source(self) -> dict[str, Any]:
        """The model the index and the endpoint use: {"checkpoint": dir} or {"spec": ModelSpec dict}."""
        return self.selection()["model"]

    def evaluate(self) -> dict[str, Any]:
        from raytrieval.cluster.eval_stage import EvalConfig, run_eval
        from raytrieval.evaluation.rerank import RerankConfig
        from raytrieval.retrieval.manifest import read_manifest

        common = {"dataset": self.cfg.benchmark, "data_root": self.cfg.data_root, "workers": self.cfg.workers,
                  "address": self.cfg.address}
        served = self.served_source()
        rows = {"off-the-shelf": {"model": self.cfg.model}}
        if self.fine_tune():
            rows["fine-tuned"] = {"checkpoint": str(self.final_checkpoint)}
        served_row = "fine-tuned" if "checkpoint" in served else "off-the-shelf"
        rows["served"] = {**rows[served_row], "rerank": RerankConfig(**self.selection()["rerank"]),
                          "descriptors": str(self.path("eval", served_row))}  # the same model: not embedded again
        manifest = read_manifest(self.path("images.parquet"))
        uri = dict(zip(manifest.column("image_id").to_pylist(), manifest.column("uri").to_pylist()))
        out = {}
        for label, kw in rows.items():
            known = None
            if "descriptors" not in kw:  # benchmark images of the collection: their descriptors are on disk
                ids, X = self.collection_descriptors({"checkpoint": kw["checkpoint"]} if "checkpoint" in kw
                                                     else {"spec": self.cfg.model.to_dict()})
                known = {os.path.realpath(uri[i]): x for i, x in zip(ids, X)}
            record = run_eval(EvalConfig(**common, **kw, out=str(self.path("eval", label.replace(" ", "")))), known)
            out[label] = record["metrics"]
        return out

    def index(self) -> dict[str, Any]:
        from raytrieval.cluster.index_stage import build_index
        from raytrieval.retrieval.artifacts import atomic_write_json

        served = self.served_source()
        regions = self.path(REGIONS_FILE)  # learned proposals of `raytrieval regions`, when run
        index = build_index(self.path("images.parquet"), served, self.path("index"), workers=self.cfg.workers,
                            config=self.cfg.index, vectors=self.collection_descriptors(served),
                            regions=regions if regions.is_file() else None)
        # the endpoint applies the re-ranking the selection chose (raytrieval.serving.engine)
        atomic_write_json(self.path("index", SELECTION_FILE), self.selection())
        summary = {"vectors": len(index), "kind": index.kind, "dim": index.dim}
        return summary | self.calibrate_recognition(len(index))

    def descriptors_file(self, source: dict[str, Any]) -> str:
        """The collection's descriptors artifact of a model: the clean stage's for the off-the-shelf
        spec, the select stage's for the fine-tuned checkpoint."""
        from raytrieval.mining.stages import DESCRIPTORS_FILE

        return FINE_TUNED_DESCRIPTORS_FILE if "checkpoint" in source else DESCRIPTORS_FILE

    def collection_descriptors(self, source: dict[str, Any]) -> tuple[list[str], np.ndarray]:
        """(image ids, (N, D) descriptors) of the collection under a model source, read from its
        artifact when current (`descriptors_file`), else embedded and written there."""
        from raytrieval.mining.stages import embed_manifest
        from raytrieval.retrieval.manifest import read_manifest

        ids, X, _, _, _ = embed_manifest(self.run_dir, read_manifest(self.path("images.parquet")), source,
                                         self.cfg.workers, progress=False, file=self.descriptors_file(source))
        return ids, X

    def calibrate_recognition(self, num_vectors: int) -> dict[str, Any]:
        """The verified clusters as pseudo-landmarks of `/recognize` (`raytrieval.serving.recognition`),
        its "unknown" threshold calibrated on the index; nothing when no image is clustered."""
        from raytrieval.retrieval.clusters import read_clusters
        from raytrieval.retrieval.recognition import RecognitionConfig
        from raytrieval.serving.recognition import write_recognition

        cfg = RecognitionConfig()
        if read_clusters(self.path("clusters.parquet")).num_rows == 0 or num_vectors <= cfg.k:
            print("[index] recognition: not calibrated (no verified cluster, or too few images)")
            return {"recognition_threshold": None}
        cal = write_recognition(self.path("index"), self.path("clusters.parquet"), cfg)
        threshold = "none reaches the target" if cal.threshold is None else f"{cal.threshold:.3f}"
        print(f"[index] recognition: {cal.counts['clusters']} pseudo-landmarks, unknown below {threshold}")
        return {"recognition_threshold": cal.threshold}

    def report(self) -> dict[str, Any]:
        from raytrieval.cluster.report_stage import build_report

        path = build_report(self.run_dir, self.cfg.benchmark, self.cfg.data_root)
        return {"html": str(path)}

    @property
    def tracking_uri(self) -> str:
        """MLFLOW_TRACKING_URI when set (a shared server), else `sqlite:///<run dir>/mlflow.db`."""
        from raytrieval.trainers.config import tracking_uri_for

        return tracking_uri_for(self.run_dir, None)

    def stages(self) -> list[Stage]:
        cfg = self.cfg.to_dict()
        manifest, clusters, tuples = self.path("images.parquet"), self.path("clusters.parquet"), self.path("tuples.parquet")
        split, selection = self.path("split.parquet"), self.path(SELECTION_FILE)
        final = self.final_checkpoint
        trained = [final] if split.is_file() and self.fine_tune() else []
        stages = [
            Stage("ingest", {k: cfg[k] for k in ("benchmark", "collection")}, [], [manifest], self.ingest),
            Stage("clean", {"model": cfg["model"], **self.cfg.clean}, [manifest], [clusters], self.clean),
            Stage("split", self.cfg.split, [clusters], [split], self.split),
            Stage("mine", {"model": cfg["model"], **self.cfg.mine}, [clusters, split], [], self.mine),
            Stage("train", self.train_config().to_dict() | {"address": None, "workers": None}
                  | ({"tune": self.cfg.tune} if self.cfg.tune else {}),
                  [manifest, clusters, split], trained, self.train),
            Stage("select", {"gate_margin": cfg["gate_margin"], "model": cfg["model"]},
                  [self.path("descriptors.parquet"), split, self.path("stages", "train.json")], [selection], self.select),
        ]
        if self.cfg.benchmark:
            stages.append(Stage("evaluate", {"benchmark": cfg["benchmark"], "model": cfg["model"]},
                                [selection], [self.path("eval")], self.evaluate))
        # the index follows what is served (model and re-ranking), not the rest of the selection
        served = json.loads(selection.read_text()) if selection.is_file() else {}
        model = served.get("model", {})
        stages += [
            Stage("index", {**self.cfg.index, "served": model, "serving": served.get("serving")},
                  [manifest, self.path("clusters.parquet")]
                  + ([Path(model["checkpoint"])] if "checkpoint" in model else [])
                  + [p for p in [self.path(REGIONS_FILE)] if p.is_file()],  # learned proposals, once `regions` ran
                  [self.path("index")], self.index),
            Stage("report", {"benchmark": cfg["benchmark"]},
                  [self.path("stages", f"{n}.json") for n in ("train", "select", "evaluate")[: 3 if self.cfg.benchmark else 2]],
                  [self.path("report", "index.html")], self.report),
        ]
        return stages

    def run(self) -> dict[str, dict[str, Any]]:
        """Run (or skip) every stage under one MLflow parent run; returns the stage records.

        MLflow is driven through the client (no active fluent run), so the training stage can
        open its own run; it is then tagged as a child of the pipeline run.
        """
        import traceback

        from raytrieval.cluster.runtime import init_ray
        from raytrieval.trainers.tracking import open_experiment

        self.run_dir.mkdir(parents=True, exist_ok=True)
        init_ray(self.cfg.address, log_file=self.run_dir / "ray.log")  # the console keeps our own lines
        client, exp_id = open_experiment(self.tracking_uri, "raytrieval-pipeline")
        tag = {"raytrieval.run_dir": str(self.run_dir)}
        for stale in client.search_runs([exp_id], "attributes.status = 'RUNNING'"):
            if stale.data.tags.get("raytrieval.run_dir") == str(self.run_dir):  # a killed earlier attempt
                client.set_terminated(stale.info.run_id, "KILLED")
        parent = client.create_run(exp_id, run_name=self.run_dir.name, tags=tag).info.run_id
        client.log_dict(parent, self.cfg.to_dict(), "pipeline_config.json")
        current = parent
        try:
            names = [s.name for s in self.stages()]
            for name in names:  # built one at a time: a stage's outputs depend on the stages before
                stage = next(s for s in self.stages() if s.name == name)
                current = client.create_run(exp_id, run_name=stage.name,
                                            tags={"mlflow.parentRunId": parent, **tag}).info.run_id
                record = run_stage(stage, self.run_dir)
                self.records[stage.name] = record
                client.log_param(current, "skipped", record["skipped"])
                client.log_param(current, "fingerprint", record["fingerprint"])
                client.log_metric(current, "seconds", record["seconds"])
                for key, value in _numeric(record["summary"]).items():
                    client.log_metric(current, key, value)
                client.set_terminated(current, "FINISHED")
            train_run = self.records["train"]["summary"].get("run_id")
            if train_run:
                client.set_tag(train_run, "mlflow.parentRunId", parent)
            client.log_artifacts(parent, str(self.path("report")), "report")
        except BaseException as exc:
            error = "".join(traceback.format_exception(exc))[-4000:]
            for run_id in {current, parent}:
                client.set_tag(run_id, "raytrieval.error", error)
                client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(parent, "FINISHED")
        return self.records


def _numeric(summary: dict[str, Any]) -> dict[str, float]:
    """The top-level finite numbers of a stage summary (self-mAP of the select stage, counts)."""
    return {k: float(v) for k, v in summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)}


def serving_options(cfg, num_images: int) -> dict[str, Any]:
    """The endpoint's `raytrieval.serving.engine.SearchOptions` fields for a chosen re-ranking."""
    if "alpha_qe" in cfg.steps:
        return {"aqe": True, "aqe_k": cfg.qe_k, "aqe_alpha": cfg.qe_alpha}
    if "diffusion" in cfg.steps:  # the whole (small) collection as the shortlist, as evaluated
        return {"diffusion": True, "diffusion_k": cfg.diffusion_k, "diffusion_kq": cfg.diffusion_kq,
                "shortlist": max(100, min(num_images, 1000))}
    return {}


def write_selection(pipeline: Pipeline, checkpoint: Path | None) -> dict[str, Any]:
    """Gate the fine-tuned `checkpoint` (None: none) and choose the re-ranking, on self-mAP.

    Writes `<run dir>/selection.json`: self-mAP of each model and of each re-ranking setting,
    the gate's decision and why, the served model and re-ranking (also as endpoint options).

    Returns:
        The stage summary.
    """
    from raytrieval.evaluation.rerank import RerankConfig
    from raytrieval.evaluation.selfval import describe, gate, rerank_grid, select_rerank, self_map
    from raytrieval.mining.split import read_split
    from raytrieval.mining.stages import DESCRIPTORS_FILE, descriptors_fingerprint, read_descriptors, write_descriptors
    from raytrieval.retrieval.artifacts import atomic_write_json
    from raytrieval.retrieval.manifest import read_manifest
    from raytrieval.trainers.data import selfval_for

    split_record = json.loads(pipeline.path("split.json").read_text())
    ids, X, failures = read_descriptors(pipeline.path(DESCRIPTORS_FILE))
    sv = selfval_for(ids, str(pipeline.path("clusters.parquet")), str(pipeline.path("split.parquet")),
                     str(pipeline.path("knn.parquet")))
    queries = [ids[q] for q in sv.queries]
    off_the_shelf = {"spec": pipeline.cfg.model.to_dict()}
    ots = self_map(X, sv)  # models: whole-image pseudo-queries; re-ranking: cropped (see selfval)
    ft = float("nan")
    if checkpoint is not None:
        fine_tuned = {"checkpoint": str(checkpoint)}
        both = pipeline.embed(fine_tuned, ids + queries, [None] * len(ids) + sv.boxes)  # one embedding pass
        Xft, Qft = both[: len(ids)], (both[len(ids):] if queries else None)
        manifest = read_manifest(pipeline.path("images.parquet"))  # evaluate and index read them from here
        write_descriptors(pipeline.path(FINE_TUNED_DESCRIPTORS_FILE), ids, Xft,
                          descriptors_fingerprint(manifest, fine_tuned), failures, fine_tuned)
        ft = self_map(Xft, sv)
        use_ft, why = gate(ft, ots, pipeline.cfg.gate_margin)
    else:
        use_ft, why = False, split_record["message"]
    if use_ft:
        served, served_q = Xft, Qft
    else:
        served, served_q = X, (pipeline.embed(off_the_shelf, queries, sv.boxes) if queries else None)
    if sv.num_queries:
        sizes = np.unique(read_split(pipeline.path("split.parquet")).column("cluster_id").to_numpy(),
                          return_counts=True)[1]
        grid = rerank_grid(len(ids), sizes)
        chosen, scores = select_rerank(served, sv, grid, served_q)
        rerank_why = (f"the simplest of {len(grid)} settings within one standard error of the highest self-mAP "
                      f"({100 * max(scores):.1f}) over {sv.num_queries} pseudo-queries")
    else:
        grid, chosen, scores = [RerankConfig()], 0, [float("nan")]
        rerank_why = "no validation queries: no re-ranking (nothing could show that it helps)"
    choice = grid[chosen]
    selection = {
        "split": {"rule": split_record["rule"], "message": split_record["message"]},
        "pseudo_queries": sv.num_queries,
        "self_map": {"off-the-shelf": ots, "fine-tuned": None if np.isnan(ft) else ft},
        "gate": {"serve_fine_tuned": use_ft, "margin": pipeline.cfg.gate_margin, "why": why},
        "model": fine_tuned if use_ft else off_the_shelf,
        "candidates": [{"setting": describe(c), "self_map": s} for c, s in zip(grid, scores)],
        "rerank": dataclasses.asdict(choice),
        "rerank_setting": describe(choice),
        "rerank_why": rerank_why,
        "serving": serving_options(choice, len(ids)),
        "served_self_map": scores[chosen],
    }
    atomic_write_json(pipeline.path(SELECTION_FILE), selection)
    print(f"[select] gate: {why}")
    print(f"[select] re-ranking: {describe(choice)} ({rerank_why})")
    return {"serve_fine_tuned": use_ft, "self_map_off_the_shelf": ots, "self_map_fine_tuned": ft,
            "rerank": describe(choice), "self_map_served": scores[chosen], "why": why}


def example_query(pipeline: Pipeline, port: int) -> str:
    """POST one query (the benchmark's first, else the collection's first image) to the live
    endpoint, with the re-ranking the selection chose, and format its top results."""
    import urllib.request

    from raytrieval.evaluation.datasets import prepare_benchmark
    from raytrieval.retrieval.manifest import ok_images, read_manifest

    if pipeline.cfg.benchmark:
        bench = prepare_benchmark(pipeline.cfg.benchmark, pipeline.cfg.data_root)
        query, box = bench.queries[0], list(bench.qboxes[0]) if bench.qboxes[0] is not None else None
    else:
        query, box = ok_images(read_manifest(pipeline.path("images.parquet"))).column("uri")[0].as_py(), None
    body = json.dumps({"image": _b64(query), "box": box, "k": 5})
    req = urllib.request.Request(f"http://127.0.0.1:{port}/search", body.encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 - loopback only
        answer = json.loads(resp.read())
    lines = [f"example query {Path(query).name} -> top {len(answer['results'])}:"]
    lines += [f"  {r['rank']}. {r['image_id']}  score {r['score']:.3f}" for r in answer["results"]]
    return "\n".join(lines)


def _b64(path: str) -> str:
    import base64

    return base64.b64encode(Path(path).read_bytes()).decode()


def headline_table(records: dict[str, dict[str, Any]]) -> str:
    """The gate's decision, and the mAP of each evaluated model when a benchmark scored them."""
    select = records.get("select", {}).get("summary", {})
    rows = [f"gate: {select.get('why', '-')}", f"re-ranking: {select.get('rerank', '-')}"]
    metrics = records.get("evaluate", {}).get("summary", {})
    if any("medium" in m for m in metrics.values()):
        rows.append(f"{'model':<40} {'E':>6} {'M':>6} {'H':>6}")
    for label, m in metrics.items():
        if "medium" in m:
            rows.append(f"{label:<40} " + " ".join(f"{100 * m[p]['map']:6.1f}" for p in ("easy", "medium", "hard")))
        else:
            rows.append(f"{label:<40} mAP {100 * m['map']:.1f}" + (f", N-S {m['ns_score']:.2f}" if "ns_score" in m else ""))
    return "\n".join(rows)


def stage_seconds(records: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {name: float(np.round(r["seconds"], 1)) for name, r in records.items()}
