"""Hyper-parameter sweeps with Ray Tune: every trial is a full Ray Train fine-tuning run.

Ray 2.60's Train V2 cannot be handed to `Tuner` directly; the trainable is a Tune *function*
(`run_trial`) that builds and fits a `TorchTrainer` (see `raytrieval.trainers.fit.build_trainer`) with a
`TuneReportCallback`, which forwards every epoch the workers report (metrics and checkpoint
path) to Tune. The scheduler (ASHA on the validation metric, time axis = epochs) sees each
epoch and may stop a trial; its Tune actor is then killed and its workers with it.

Layout of a sweep (`<out>/<name>/`, the Tune experiment directory):

    trials/<trial_id>/epoch_NNNN/  each trial's Ray Train checkpoints (`final/` when it ran out)
    champion/                      the best trial's best-epoch checkpoint (a retrieval checkpoint)
    trials.json, trials.md         one row per trial: params, status, epochs, metrics, time
    plots/                         mAP vs margin per pooling, mAP per epoch per trial
    mlflow_sweep.json              the MLflow parent run
    sweep_result.json              best trial, champion, registered version, timings

Re-running an interrupted sweep (same `out`/`name`) restores it with `Tuner.restore`: finished
trials are kept, unfinished ones resume from their last Ray Train checkpoint. A trial that
raises is recorded as errored (and its MLflow run FAILED) while the others go on.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytrieval.trainers.sweep_config import SweepConfig

logger = logging.getLogger(__name__)

CHAMPION_DIR = "champion"
RESULT_FILE = "sweep_result.json"


@dataclass
class SweepResult:
    """What a sweep produced.

    Args:
        trials: one row per trial (see `raytrieval.trainers.sweep_report.trial_rows`).
        best: the best trial's row (None if no trial reported the metric).
        champion: the best trial's checkpoint copied to `<sweep dir>/champion` (or None).
        model_version: the registered champion version (None when not registered).
        parent_run_id: the MLflow parent run.
        wall_s: wall time of the sweep, summed over its invocations (an interrupted sweep that
            did not reach the end adds nothing).
    """

    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    champion: Path | None
    model_version: int | None
    parent_run_id: str
    wall_s: float


def run_trial(params: dict[str, Any], sweep: dict[str, Any]) -> None:
    """The Tune function trainable: fit one trial's `TorchTrainer`, forwarding its reports."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raytrieval.trainers.fit import build_trainer, export_final

    cfg = SweepConfig(**sweep)
    trial = cfg.trial_config(params, tune.get_context().get_trial_id())
    result = build_trainer(trial, callbacks=[TuneReportCallback()]).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"trial {trial.name}: no checkpoint was reported")
    export_final(result.checkpoint.path, trial.run_dir)


def trial_resources(cfg: SweepConfig) -> dict[str, float]:
    """What one trial holds at once: its workers plus its Tune actor's share."""
    base = cfg.base_config()
    return {"CPU": base.workers * base.cpus_per_worker + cfg.trial_cpu, "GPU": float(base.workers if base.use_gpu else 0)}


def _fits(need: dict[str, float], resources: dict[str, float]) -> int:
    """How many trials of `need` fit in `resources`."""
    fits = math.floor(resources.get("CPU", 0.0) / need["CPU"] + 1e-9)
    if need["GPU"]:
        fits = min(fits, math.floor(resources.get("GPU", 0.0) / need["GPU"] + 1e-9))
    return fits


def derive_concurrency(cfg: SweepConfig, cluster: dict[str, float], available: dict[str, float] | None = None) -> int:
    """Trials that fit side by side (`max_concurrent_trials` wins when set).

    Tune reserves only a trial's own CPU; its Train workers ask for theirs once it runs, and
    wait at most Ray Train's worker-group start timeout. So trials are also limited to what is
    free now (`available`, e.g. while another job holds part of the cluster), at least one.

    Raises:
        ValueError: not even one trial fits on the whole cluster (it would wait forever).
    """
    need = trial_resources(cfg)
    fits = _fits(need, cluster)
    if fits < 1:
        base = cfg.base_config()
        gpus = f" and {need['GPU']:g} GPUs" if need["GPU"] else ""
        raise ValueError(
            f"a trial needs {need['CPU']:g} CPUs ({base.workers} workers x {base.cpus_per_worker:g} + "
            f"{cfg.trial_cpu:g} for its Tune actor){gpus}; the cluster has {cluster.get('CPU', 0):g} CPUs "
            f"and {cluster.get('GPU', 0):g} GPUs. Lower train.workers or train.cpus_per_worker "
            "(it may be fractional, e.g. 0.9)")
    if available is not None:
        fits = min(fits, max(1, _fits(need, available)))
    return min(fits, cfg.max_concurrent_trials) if cfg.max_concurrent_trials else fits


def max_epochs(cfg: SweepConfig) -> int:
    """The longest trial (ASHA's max_t): the base epochs or the largest searched value."""
    spec = cfg.search_space.get("epochs")
    if spec is None:
        return cfg.base_config().epochs
    values = spec if isinstance(spec, list) else next(iter(spec.values()))
    return int(max(v for v in values[:2] if isinstance(v, (int, float))))


def build_search(cfg: SweepConfig, concurrency: int):
    """The searcher (at most `concurrency` trials at once) and scheduler of the sweep."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    point = cfg.default_point() if cfg.include_default else None
    if cfg.include_default and point is None:
        logger.warning("include_default: the base configuration lies outside the search space; not added")
    points = [point] if point else None
    if cfg.searcher == "tpe":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        search = OptunaSearch(metric=cfg.metric, mode=cfg.mode, points_to_evaluate=points,
                              sampler=optuna.samplers.TPESampler(seed=cfg.seed))
    else:
        # Tune applies max_concurrent_trials only to `Searcher`s: a generator takes it itself
        search = BasicVariantGenerator(points_to_evaluate=points, random_state=cfg.seed, max_concurrent=concurrency)
    if cfg.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=max_epochs(cfg), grace_period=cfg.grace_period,
                                  reduction_factor=cfg.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return search, scheduler


def build_tuner(cfg: SweepConfig, parent_run_id: str, concurrency: int):
    """A new `Tuner`, or the restored one when the sweep directory holds an interrupted sweep."""
    from ray import tune

    from raytrieval.trainers.sweep_tracking import MlflowSweepCallback

    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=cfg.to_dict()), {"CPU": cfg.trial_cpu})
    if tune.Tuner.can_restore(str(cfg.sweep_dir)):
        logger.info("restoring the interrupted sweep in %s", cfg.sweep_dir)
        return tune.Tuner.restore(str(cfg.sweep_dir), trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False, param_space=cfg.param_space())
    search, scheduler = build_search(cfg, concurrency)
    return tune.Tuner(
        trainable,
        param_space=cfg.param_space(),
        tune_config=tune.TuneConfig(
            metric=cfg.metric, mode=cfg.mode, search_alg=search, scheduler=scheduler,
            num_samples=cfg.num_samples, reuse_actors=False,
            # a Searcher is wrapped in a ConcurrencyLimiter by Tune; the generator limits itself
            max_concurrent_trials=concurrency if cfg.searcher == "tpe" else None,
        ),
        run_config=tune.RunConfig(
            name=cfg.name, storage_path=str(cfg.sweep_dir.parent),
            callbacks=[MlflowSweepCallback(cfg, parent_run_id)],
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            verbose=1,
        ),
    )


def export_champion(checkpoint_path: str | Path, sweep_dir: Path) -> Path:
    """Copy a trial's checkpoint to `<sweep dir>/champion` (model, meta, history; no optimizer)."""
    import shutil

    from raytrieval.retrieval.artifacts import atomic_dir
    from raytrieval.trainers.loop import TRAIN_STATE_FILE

    target = sweep_dir / CHAMPION_DIR
    with atomic_dir(target) as tmp:
        for item in Path(checkpoint_path).iterdir():
            if item.is_file() and item.name != TRAIN_STATE_FILE:
                shutil.copy2(item, tmp / item.name)
    return target


def register_champion(cfg: SweepConfig, best: dict[str, Any], champion: Path) -> int | None:
    """Register the champion from its trial's MLflow run; move the alias; keep the run's status."""
    from raytrieval.trainers.sweep_tracking import find_trial_run
    from raytrieval.trainers.tracking import TrackedRun, _client, register_checkpoint

    uri = cfg.resolved_tracking_uri
    client = _client(uri)
    run_id = find_trial_run(uri, best["parent_run_id"], best["trial_id"])
    status = client.get_run(run_id).info.status
    registered = register_checkpoint(TrackedRun(uri, run_id), champion, cfg.registered_model, cfg.champion_alias)
    client.set_tag(run_id, "raytrieval.champion", "true")
    client.set_terminated(run_id, status)
    return registered["version"]


def _previous_wall(sweep_dir: Path) -> float:
    import json

    path = sweep_dir / RESULT_FILE
    return float(json.loads(path.read_text()).get("wall_s", 0.0)) if path.is_file() else 0.0


def run_sweep(cfg: SweepConfig) -> SweepResult:
    """Run (or resume) a sweep on the connected Ray cluster, tracked in MLflow.

    Ray must be initialised by the caller (`raytrieval.cluster.runtime.init_ray`).

    Returns:
        The `SweepResult`; also written to `<sweep dir>/sweep_result.json`, with the trial
        table (`trials.md`, `trials.json`) and plots (`plots/`).
    """
    import ray

    from raytrieval.retrieval.artifacts import atomic_write_json
    from raytrieval.trainers.sweep_report import best_trial, trial_rows, write_report
    from raytrieval.trainers.sweep_tracking import close_open_trials, end_parent, start_parent

    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call raytrieval.cluster.runtime.init_ray() before run_sweep()")
    concurrency = derive_concurrency(cfg, {k: float(v) for k, v in ray.cluster_resources().items()},
                                     {k: float(v) for k, v in ray.available_resources().items()})
    cfg.sweep_dir.mkdir(parents=True, exist_ok=True)
    uri = cfg.resolved_tracking_uri
    parent = start_parent(cfg)
    t0 = time.perf_counter()
    try:
        grid = build_tuner(cfg, parent, concurrency).fit()
    except BaseException:
        close_open_trials(uri, parent)
        end_parent(uri, parent, "KILLED")
        raise
    wall = time.perf_counter() - t0 + _previous_wall(cfg.sweep_dir)  # a resumed sweep adds up
    close_open_trials(uri, parent)
    rows = trial_rows(grid, cfg)
    best = best_trial(rows, cfg)
    champion, version = None, None
    if best is not None:
        best["parent_run_id"] = parent
        champion = export_champion(best["checkpoint_path"], cfg.sweep_dir)
        if cfg.registered_model:
            version = register_champion(cfg, best, champion)
    write_report(rows, best, cfg, wall)
    end_parent(uri, parent, "FINISHED", best)
    atomic_write_json(cfg.sweep_dir / RESULT_FILE, {
        "best": best, "champion": str(champion) if champion else None, "model_version": version,
        "parent_run_id": parent, "wall_s": wall, "concurrency": concurrency, "tracking_uri": uri,
        "trials": len(rows), "errored": sum(r["status"] == "ERROR" for r in rows),
    })
    return SweepResult(rows, best, champion, version, parent, wall)
