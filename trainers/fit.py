"""Build and run the Ray Train `TorchTrainer` of a fine-tuning run, tracked in MLflow.

Layout of a run (`<out>/<name>/`, the Ray Train storage of the run):

    epoch_0000/ ... epoch_NNNN/   checkpoints reported by the workers (model.pt, meta.json,
                                  train_state.pt, history.json); epoch 0 is the initial model
    final/                        the last checkpoint as a plain retrieval checkpoint
    plots/curves.png              loss and validation mAP per epoch
    mlflow_run.json               the MLflow run of this training
    result.json                   history, final checkpoint, MLflow run and model version

Re-running the same `out`/`name` resumes from the last checkpoint (Ray Train finds it in the
storage path) and continues the same MLflow run; a worker failure during the run restarts
the worker group from the last checkpoint (`max_failures`). The workers wait after each report
until the Train controller has committed the checkpoint (it collects reports when it polls
the workers, every 2 s by default), so a failure loses at most the epoch in progress, which
is then trained again with the same tuples (sampling is seeded by epoch). Each epoch appears
once in the history and in MLflow.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytrieval.trainers.config import TrainConfig

FINAL_DIR = "final"
RESULT_FILE = "result.json"


@dataclass
class TrainResult:
    """What a finished training produced.

    Args:
        checkpoint: the final retrieval checkpoint (`<run dir>/final`).
        history: per-epoch metrics (epoch 0: the initial model).
        run_id: the MLflow run.
        model_version: the registered model version (None if not registered).
        ray_path: the Ray Train run directory.
    """

    checkpoint: Path
    history: list[dict[str, Any]]
    run_id: str
    model_version: int | None
    ray_path: str


def build_trainer(cfg: TrainConfig, callbacks: list | None = None, fault: dict[str, Any] | None = None):
    """The `TorchTrainer` of a run (DDP: gloo on CPU, NCCL on GPU).

    Args:
        cfg: the run configuration.
        callbacks: Ray Train `UserCallback`s (MLflow logging).
        fault: testing aid passed to the workers (see `raytrieval.trainers.loop._fault_hook`).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raytrieval.trainers.loop import train_loop_per_worker

    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    loop_config = cfg.to_dict()
    if fault:
        loop_config["_fault"] = dict(fault)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=str(cfg.run_dir.parent),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            callbacks=list(callbacks or []),
        ),
    )


def chosen_checkpoint(last: str | Path, history: list[dict[str, Any]]) -> Path:
    """The checkpoint of the best epoch by self-mAP (`raytrieval.trainers.loop.best_epoch`),
    a sibling `epoch_NNNN` of the last one; the last one without self-validation."""
    from raytrieval.trainers.loop import best_epoch

    best = Path(last).parent / f"epoch_{best_epoch(history):04d}"
    return best if (best / "model.pt").is_file() else Path(last)


def export_final(ray_checkpoint_dir: str | Path, run_dir: Path, history: list[dict[str, Any]] | None = None) -> Path:
    """Copy a reported checkpoint to `<run dir>/final` (atomically), with the run's whole
    `history` when given (a best epoch's own history stops at that epoch)."""
    from raytrieval.retrieval.artifacts import atomic_dir

    target = run_dir / FINAL_DIR
    with atomic_dir(target) as tmp:
        for item in Path(ray_checkpoint_dir).iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
        if history is not None:
            (tmp / "history.json").write_text(json.dumps(history, indent=2))
    return target


def fit(cfg: TrainConfig, fault: dict[str, Any] | None = None, track: bool = True) -> TrainResult:
    """Train (or resume) a run on the connected Ray cluster and track it in MLflow.

    Ray must be initialised by the caller (`raytrieval.cluster.runtime.init_ray`, which keeps Ray
    offline); this package does not start Ray itself.

    Args:
        cfg: the run configuration.
        fault: testing aid (see `build_trainer`).
        track: log to MLflow and register the model.

    Returns:
        The `TrainResult`; also written to `<run dir>/result.json`.

    Raises:
        RuntimeError: Ray is not initialised, or the run reported no checkpoint.
        ray.train.TrainingFailedError: the workers failed more than `max_failures` times.
    """
    import ray

    from raytrieval.retrieval.artifacts import atomic_write_json
    from raytrieval.trainers import tracking

    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call raytrieval.cluster.runtime.init_ray() before raytrieval.trainers.fit.fit()")
    cfg = cfg.resolved()
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg.run_dir / "config.json", cfg.to_dict())
    run = tracking.start_run(cfg) if track else None
    callbacks = [tracking.MlflowEpochLogger(run.tracking_uri, run.run_id)] if run else []
    try:
        result = build_trainer(cfg, callbacks, fault).fit()
        if result.checkpoint is None:
            raise RuntimeError(f"training {cfg.name}: no checkpoint was reported")
        history = json.loads((Path(result.checkpoint.path) / "history.json").read_text())
        final = export_final(chosen_checkpoint(result.checkpoint.path, history), cfg.run_dir, history)
        registered = tracking.finish_run(run, cfg, final, history) if run else {"version": None}
    except BaseException:
        if run:
            tracking.fail_run(run)
        raise
    out = TrainResult(
        checkpoint=final,
        history=history,
        run_id=run.run_id if run else "",
        model_version=registered.get("version"),
        ray_path=str(result.path),
    )
    atomic_write_json(cfg.run_dir / RESULT_FILE, {
        "checkpoint": str(final), "history": history, "run_id": out.run_id,
        "model_version": out.model_version, "ray_path": out.ray_path,
        "tracking_uri": cfg.resolved_tracking_uri if run else None,
    })
    return out
