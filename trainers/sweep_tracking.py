"""MLflow tracking of a sweep: one parent run, a nested run per trial, driven from the Tune driver.

`MlflowSweepCallback` is a Ray Tune `Callback`, so it runs in the driver process: a local
sqlite store works on a cluster too, and the trials (whose Tune actors may be killed by the
scheduler at any time) never hold an MLflow run open. Per trial:

- start (or restore): the nested run is created, or found again by its `raytrieval.trial_id`
  tag, with the trial's full `TrainConfig` as params, status RUNNING;
- every reported epoch: the numeric metrics, step = epoch;
- end: FINISHED (ran all its epochs), KILLED with tag `raytrieval.early_stopped` (stopped by
  the scheduler), FAILED with the error (raised).

The parent run id is kept in `<sweep dir>/mlflow_sweep.json`, so a restored sweep continues the
same parent and nested runs.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from raytrieval.trainers.sweep_config import SweepConfig
from raytrieval.trainers.tracking import _client, numeric, open_experiment

logger = logging.getLogger(__name__)

PARENT_FILE = "mlflow_sweep.json"
TRIAL_TAG = "raytrieval.trial_id"
SWEEP_TAG = "raytrieval.sweep"
# Tune's own bookkeeping in every result: not logged as metrics.
TUNE_KEYS = {"timestamp", "pid", "time_since_restore", "iterations_since_restore", "done", "epoch",
             "training_iteration", "time_this_iter_s", "checkpoint_dir_name", "resumed_from"}


def start_parent(cfg: SweepConfig) -> str:
    """Create the sweep's parent run (or reopen the one recorded in the sweep directory)."""
    from raytrieval.retrieval.artifacts import atomic_write_json

    uri = cfg.resolved_tracking_uri
    client, experiment_id = open_experiment(uri, cfg.experiment)
    record = cfg.sweep_dir / PARENT_FILE
    if record.is_file():
        recorded = json.loads(record.read_text())
        if recorded.get("tracking_uri") == uri:
            try:
                client.get_run(recorded["run_id"])
                client.update_run(recorded["run_id"], status="RUNNING")
                return recorded["run_id"]
            except Exception:  # noqa: BLE001 - a deleted run: start a new one
                logger.warning("MLflow: recorded sweep run %s is gone; starting a new one", recorded["run_id"])
    run = client.create_run(experiment_id, run_name=cfg.name, tags={SWEEP_TAG: str(cfg.sweep_dir)})
    params = {k: json.dumps(v) for k, v in cfg.to_dict().items() if k not in ("train", "search_space")}
    params.update({f"space.{k}": json.dumps(v) for k, v in cfg.search_space.items()})
    from mlflow.entities import Param

    client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
    client.log_dict(run.info.run_id, cfg.to_dict(), "sweep.json")
    cfg.sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, {"run_id": run.info.run_id, "tracking_uri": uri, "experiment_id": experiment_id})
    return run.info.run_id


def end_parent(uri: str, run_id: str, status: str, best: dict[str, Any] | None = None) -> None:
    """Log the best trial's summary on the parent run and end it with `status`."""
    client = _client(uri)
    if best:
        client.log_batch(run_id, metrics=_metrics({f"best_{k}": v for k, v in best["metrics"].items()}, 0))
        client.set_tag(run_id, "raytrieval.best_trial", best["trial_id"])
    client.set_terminated(run_id, status)


def close_open_trials(uri: str, parent_run_id: str, status: str = "KILLED") -> int:
    """End every nested run of the sweep still RUNNING (the sweep was interrupted); how many."""
    client = _client(uri)
    parent = client.get_run(parent_run_id)
    open_runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'",
    )
    for run in open_runs:
        client.set_terminated(run.info.run_id, status)
    return len(open_runs)


def find_trial_run(uri: str, parent_run_id: str, trial_id: str) -> str | None:
    """The nested run of a trial of the sweep, or None."""
    client = _client(uri)
    found = client.search_runs(
        [client.get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`mlflow.parentRunId` = '{parent_run_id}'",
        max_results=1,
    )
    return found[0].info.run_id if found else None


def _metrics(values: dict[str, Any], step: int) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, v, now, step) for k, v in numeric(values).items() if k not in TUNE_KEYS]


class MlflowSweepCallback(Callback):
    """Nested MLflow run per trial under the sweep's parent run (see the module docstring).

    Args:
        cfg: the sweep (its `trial_config` gives each trial's params).
        parent_run_id: the sweep's parent run.
    """

    def __init__(self, cfg: SweepConfig, parent_run_id: str):
        self.cfg = cfg
        self.uri = cfg.resolved_tracking_uri
        self.parent = parent_run_id
        self.runs: dict[str, str] = {}

    # ------------------------------------------------------------------ run per trial

    def run_id(self, trial) -> str:
        """The nested run of `trial`, found by tag or created (params logged once)."""
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        client = _client(self.uri)
        run_id = find_trial_run(self.uri, self.parent, trial.trial_id)
        if run_id is None:
            experiment_id = client.get_run(self.parent).info.experiment_id
            run = client.create_run(experiment_id, run_name=trial.trial_id, tags={
                "mlflow.parentRunId": self.parent, TRIAL_TAG: trial.trial_id})
            run_id = run.info.run_id
            from mlflow.entities import Param

            params = {**self.cfg.train, **trial.config}  # as given: a trial may fail on its own config
            client.log_batch(run_id, params=[Param(k, "None" if v is None else str(v)) for k, v in params.items()])
            client.set_tag(run_id, "raytrieval.searched", json.dumps(trial.config))
        self.runs[trial.trial_id] = run_id
        return run_id

    def _guard(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - tracking must not stop the sweep
            logger.exception("MLflow: could not %s", what)

    def _start(self, trial) -> None:
        _client(self.uri).update_run(self.run_id(trial), status="RUNNING")

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._guard("start a trial run", self._start, trial)

    def on_trial_restore(self, iteration: int, trials: list, trial, **info) -> None:
        self._guard("restore a trial run", self._start, trial)

    def _result(self, trial, result: dict[str, Any]) -> None:
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        batch = _metrics(result, step)
        if batch:
            _client(self.uri).log_batch(self.run_id(trial), metrics=batch)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict[str, Any], **info) -> None:
        self._guard("log trial metrics", self._result, trial, result)

    def _complete(self, trial) -> None:
        client = _client(self.uri)
        run_id = self.run_id(trial)
        last = trial.last_result or {}
        finished = int(last.get("epoch", -1)) >= self.cfg.trial_epochs(trial.config)
        if not finished:
            client.set_tag(run_id, "raytrieval.early_stopped", f"after epoch {last.get('epoch', '?')}")
        client.set_terminated(run_id, "FINISHED" if finished else "KILLED")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._guard("end a trial run", self._complete, trial)

    def _error(self, trial) -> None:
        client = _client(self.uri)
        run_id = self.run_id(trial)
        error = trial.error_file and Path(trial.error_file).is_file() and Path(trial.error_file).read_text()
        client.set_tag(run_id, "raytrieval.error", (error or "trial raised")[-4000:])
        client.set_terminated(run_id, "FAILED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._guard("fail a trial run", self._error, trial)
