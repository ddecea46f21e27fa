"""MLflow tracking of a training run: one run per training, resumed with it.

- The driver creates (or resumes) the run before `TorchTrainer.fit` and logs the params and the
  resolved config.
- `MlflowEpochLogger`, a Ray Train `UserCallback`, runs in the Train controller (on the driver's
  node, so a local sqlite store works) and logs each epoch's metrics as they are reported.
- After the fit the driver fills in any epoch the callback missed (from the checkpoint's
  history), logs the loss/mAP plots and the final checkpoint, registers the model with its
  preprocessing meta, and ends the run FINISHED (FAILED if the fit raised).

The run id is kept in `<run dir>/mlflow_run.json`, so re-running a stopped training (same
`out`/`name`) continues the same MLflow run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from raytrieval.retrieval.source import fluent_tracking_uri
from raytrieval.trainers.config import TrainConfig

logger = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
PIP_REQUIREMENTS = ["torch", "numpy", "pillow", "tqdm", "mlflow"]
RUN_TAG = "raytrieval.run_dir"


def _offline() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def _client(tracking_uri: str):
    _offline()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numeric entries of a metrics dict (what MLflow accepts)."""
    import math

    return {
        k: float(v) for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def _epoch_metrics(client, run_id: str, metrics: dict[str, Any]) -> None:
    from mlflow.entities import Metric

    step = int(metrics.get("epoch", 0))
    now = int(time.time() * 1000)
    batch = [Metric(k, v, now, step) for k, v in numeric(metrics).items() if k != "epoch"]
    if batch:
        client.log_batch(run_id, metrics=batch)


@dataclass
class TrackedRun:
    """An MLflow run of a training.

    Args:
        tracking_uri: the tracking store.
        run_id: the run.
        resumed: the run existed before (a stopped training is being continued).
    """

    tracking_uri: str
    run_id: str
    resumed: bool = False

    @property
    def client(self):
        return _client(self.tracking_uri)


def open_experiment(uri: str, name: str):
    """(client, experiment id) of `name` in the store at `uri`, created if needed.

    A sqlite store gets its folder, and a new experiment's artifacts go to `mlartifacts/`
    beside the database (MLflow's default is `./mlruns` of whatever the working directory is).
    """
    location = None
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).resolve().parent
        folder.mkdir(parents=True, exist_ok=True)
        location = (folder / "mlartifacts").as_uri()
    client = _client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment:
        return client, experiment.experiment_id
    return client, client.create_experiment(name, artifact_location=location)


def start_run(cfg: TrainConfig) -> TrackedRun:
    """Create the experiment and run (or resume the run recorded in the run directory).

    Params are logged once; on resume, params that already exist are left as they were and
    changed values are recorded as `resumed.<param>` tags.
    """
    uri = cfg.resolved_tracking_uri
    client, experiment_id = open_experiment(uri, cfg.experiment)
    run_file = cfg.run_dir / RUN_FILE
    run_id, resumed = None, False
    if run_file.is_file():
        recorded = json.loads(run_file.read_text())
        if recorded.get("tracking_uri") == uri:
            try:
                run = client.get_run(recorded["run_id"])
                run_id, resumed = run.info.run_id, True
                client.update_run(run_id, status="RUNNING")
            except Exception:  # noqa: BLE001 - a deleted run: start a new one
                run_id = None
    if run_id is None:
        run = client.create_run(experiment_id, run_name=cfg.name, tags={RUN_TAG: str(cfg.run_dir)})
        run_id = run.info.run_id
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        from raytrieval.retrieval.artifacts import atomic_write_json

        atomic_write_json(run_file, {"run_id": run_id, "tracking_uri": uri, "experiment_id": experiment_id})
    _log_params(client, run_id, cfg, resumed)
    client.log_dict(run_id, cfg.to_dict(), "config.json")
    return TrackedRun(uri, run_id, resumed)


def _log_params(client, run_id: str, cfg: TrainConfig, resumed: bool) -> None:
    from mlflow.entities import Param

    params = {k: "None" if v is None else str(v) for k, v in cfg.to_dict().items()}
    existing = client.get_run(run_id).data.params if resumed else {}
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    if new:
        client.log_batch(run_id, params=new)
    for k, v in params.items():
        if k in existing and existing[k] != v:
            client.set_tag(run_id, f"resumed.{k}", v)


class MlflowEpochLogger(UserCallback):
    """Logs every reported epoch's metrics (rank 0's) to the MLflow run, step = epoch.

    Runs in the Ray Train controller. A tracking error is logged and ignored: the driver fills
    in missing epochs after the fit.

    Args:
        tracking_uri: the tracking store.
        run_id: the run.
    """

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not metrics:
            return
        try:
            _epoch_metrics(_client(self.tracking_uri), self.run_id, metrics[0])
        except Exception:  # noqa: BLE001 - tracking must not kill training
            logger.exception("MLflow: could not log epoch metrics")


def sync_history(run: TrackedRun, history: list[dict[str, Any]]) -> int:
    """Log the epochs of `history` whose metrics the run lacks; returns how many were added."""
    client = run.client
    logged: dict[str, set[int]] = {}
    added = 0
    for metrics in history:
        step = int(metrics.get("epoch", 0))
        missing = {}
        for k, v in numeric(metrics).items():
            if k == "epoch":
                continue
            if k not in logged:
                logged[k] = {m.step for m in client.get_metric_history(run.run_id, k)}
            if step not in logged[k]:
                missing[k] = v
        if missing:
            _epoch_metrics(client, run.run_id, {"epoch": step, **missing})
            added += 1
    return added


def plot_history(history: list[dict[str, Any]], path: Path) -> Path:
    """Loss and validation mAP per epoch, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(10, 4))
    trained = [h for h in history if "loss" in h]
    if trained:
        ax_loss.plot([h["epoch"] for h in trained], [h["loss"] for h in trained], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="loss per tuple", title="training loss")
    ax_loss.grid(alpha=0.3)
    own = {"self_map": "self-mAP (label-free, chooses)", "self_map_crop": "self-mAP, cropped queries"}
    keys = sorted({k for h in history for k in h if k.startswith("val_map") or k in own})
    for key in keys:
        rows = [h for h in history if h.get(key) is not None]
        label = own.get(key) or key[len("val_map_"):] or "mAP"
        ax_map.plot([h["epoch"] for h in rows], [100 * h[key] for h in rows], marker="o", label=label)
    ax_map.set(xlabel="epoch", ylabel="mAP (%)", title="validation mAP")
    ax_map.grid(alpha=0.3)
    if keys:
        ax_map.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def register_checkpoint(
    run: TrackedRun, checkpoint: Path, registered_model: str | None, alias: str | None = None,
) -> dict[str, Any]:
    """Log the checkpoint as an MLflow pyfunc model (models-from-code) and register it.

    The registered version carries the preprocessing meta as tags (and in the MLmodel
    metadata); `alias` is moved to it when given. The run is made active for the call and
    ended FINISHED when it returns.

    Returns:
        {"model_uri", "version"} (version None when not registered).
    """
    _offline()
    import mlflow

    from raytrieval.retrieval.checkpoint import read_meta

    meta = read_meta(checkpoint)
    with (fluent_tracking_uri(run.tracking_uri), mlflow.start_run(run_id=run.run_id),
          tempfile.TemporaryDirectory() as code):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(core_package(Path(code)))],
            pip_requirements=PIP_REQUIREMENTS,
            registered_model_name=registered_model,
            metadata={"raytrieval": {k: meta[k] for k in ("backbone", "pooling", "pooling_kwargs", "whiten_dim", "max_size", "scales", "mean", "std", "dim", "code_version") if k in meta}},
        )
    version = info.registered_model_version
    if registered_model and version is not None:
        client = run.client
        for key in ("backbone", "pooling", "max_size", "scales", "mean", "std", "dim", "epoch"):
            if key in meta:
                client.set_model_version_tag(registered_model, str(version), key, json.dumps(meta[key]))
        if alias:
            client.set_registered_model_alias(registered_model, alias, str(version))
    return {"model_uri": info.model_uri, "version": None if version is None else int(version)}


def finish_run(
    run: TrackedRun, cfg: TrainConfig, checkpoint: Path, history: list[dict[str, Any]],
) -> dict[str, Any]:
    """Fill in missing epochs, log plots and the final checkpoint, register, end FINISHED."""
    client = run.client
    sync_history(run, history)
    plot = plot_history(history, cfg.run_dir / "plots" / "curves.png")
    client.log_artifact(run.run_id, str(plot), "plots")
    client.log_dict(run.run_id, history, "history.json")
    client.log_artifacts(run.run_id, str(checkpoint), "checkpoint")
    registered = register_checkpoint(run, checkpoint, cfg.registered_model, cfg.model_alias)
    client.set_terminated(run.run_id, "FINISHED")
    return registered


def fail_run(run: TrackedRun) -> None:
    """End the run FAILED (the training raised)."""
    try:
        run.client.set_terminated(run.run_id, "FAILED")
    except Exception:  # noqa: BLE001 - do not hide the training error
        logger.exception("MLflow: could not mark the run FAILED")


def core_package(folder: Path) -> Path:
    """`folder/raytrieval` holding only the core (`raytrieval.retrieval`): the model's code path.

    A logged model then loads where raytrieval is not installed, importing the same names.
    """
    import raytrieval.retrieval

    package = folder / "raytrieval"
    shutil.copytree(Path(raytrieval.retrieval.__file__).parent, package / "retrieval",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (package / "__init__.py").write_text('"""raytrieval core, as logged with an MLflow model."""\n')
    return package
