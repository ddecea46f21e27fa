"""Ray Tune sweeps: config and search space, concurrency, and a real 4-trial sweep on 2 CPUs.

The sweep (tiny collection, 64 px, 1 worker x 0.9 CPU per trial, 2 epochs, ASHA) is a grid
over the learning rate (1e-4 learns, 0.5 wrecks the network) and the whitening dimension (64
cannot be initialised from the 16 images of the collection: the workers raise), so it must
finish one trial, stop one early and record two errors, while leaving no MLflow run open.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from raytrieval.trainers.sweep import derive_concurrency, max_epochs
from raytrieval.trainers.sweep_config import SweepConfig

sys.path.insert(0, str(Path(__file__).parent))
from trainset import make_collection, tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return make_collection(tmp_path_factory.mktemp("collection"))


def tiny_train(collection, **overrides) -> dict:
    """The tiny TrainConfig's fields, minus those a sweep sets per trial and the derived defaults."""
    overrides.setdefault("split", str(collection["split"]))  # trials are compared on self_map
    cfg = tiny_config(collection, Path("unused"), workers=1, cpus_per_worker=0.9, max_failures=0, **overrides)
    return {k: v for k, v in cfg.to_dict().items() if k not in ("out", "name", "registered_model", "model_alias",
                                                                "tracking_uri", "experiment", "address",
                                                                "margin", "gem_p_lr")}


# ------------------------------------------------------------------------------ config


def test_search_space_lists_become_grid_axes_or_choices(collection):
    from ray.tune.search.sample import Categorical, Float

    train = tiny_train(collection)
    space = {"margin": [0.5, 0.7], "lr": {"loguniform": [1e-6, 1e-4]}, "pooling": {"grid": ["gem", "mac"]}}
    grid = SweepConfig(train=train, search_space=space, searcher="grid").param_space()
    assert grid["margin"] == {"grid_search": [0.5, 0.7]} and grid["pooling"] == {"grid_search": ["gem", "mac"]}
    assert isinstance(grid["lr"], Float)
    rand = SweepConfig(train=train, search_space=space, searcher="random").param_space()
    assert isinstance(rand["margin"], Categorical) and rand["pooling"] == {"grid_search": ["gem", "mac"]}
    with pytest.raises(ValueError, match="tpe"):
        SweepConfig(train=train, search_space=space, searcher="tpe")


def test_config_validation(collection, tmp_path):
    train = tiny_train(collection)
    ok = {"train": train, "search_space": {"margin": [0.5]}}
    for bad, match in [
        ({"search_space": {}}, "empty"),
        ({"search_space": {"margn": [0.5]}}, "unknown TrainConfig fields"),
        ({"search_space": {"lr": {"loguniform": [0, 1]}}}, "low > 0"),
        ({"search_space": {"lr": {"uniform": [1, 0]}}}, "low < high"),
        ({"search_space": {"lr": {"normal": [0, 1]}}}, "expected a list"),
        ({"search_space": {"out": ["a"]}}, "set per trial"),
        ({"train": {**train, "name": "x"}}, "set per trial"),
        ({"train": {**train, "split": None}}, "split"),
        ({"train": {**train, "val_dataset": None}, "metric": "val_map_medium"}, "val_dataset"),
        ({"train": {**train, "lr": -1.0}}, "lr"),
        ({"scheduler": "pbt"}, "scheduler"),
        ({"trial_cpu": 0}, "trial_cpu"),
    ]:
        with pytest.raises(ValueError, match=match):
            SweepConfig(**{**ok, **bad})
    path = tmp_path / "tune.yaml"
    path.write_text(json.dumps({**ok, "nme": "x"}))
    with pytest.raises(ValueError, match="unknown fields"):
        SweepConfig.from_yaml(path)
    shipped = SweepConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "tune.yaml")
    assert shipped.scheduler == "asha" and shipped.registered_model and shipped.champion_alias == "champion"


def test_trial_config_and_default_point(collection):
    cfg = SweepConfig(train=tiny_train(collection, lr=1e-4), search_space={"lr": [1e-4, 1e-3], "loss": ["contrastive", "triplet"]})
    trial = cfg.trial_config({"lr": 1e-3, "loss": "triplet"}, "abc_00001")
    assert (trial.lr, trial.loss, trial.margin, trial.name, trial.val_every) == (1e-3, "triplet", 0.1, "abc_00001", 1)
    assert trial.registered_model is None and Path(trial.out) == cfg.sweep_dir / "trials"
    assert cfg.default_point() == {"lr": 1e-4, "loss": "contrastive"}
    assert SweepConfig(train=tiny_train(collection), search_space={"lr": [1e-3]}).default_point() is None
    assert max_epochs(SweepConfig(train=tiny_train(collection), search_space={"epochs": [1, 5, 3]})) == 5


def test_concurrency_from_cluster_resources(collection):
    one = SweepConfig(train=tiny_train(collection), search_space={"lr": [1e-4]})  # 0.9 + 0.1 per trial
    assert derive_concurrency(one, {"CPU": 2.0, "GPU": 0.0}) == 2
    assert derive_concurrency(one, {"CPU": 16.0, "GPU": 0.0}) == 16
    # what is busy now limits it too (Train workers wait only so long), but one always starts
    assert derive_concurrency(one, {"CPU": 16.0}, {"CPU": 3.5}) == 3
    assert derive_concurrency(one, {"CPU": 2.0}, {"CPU": 0.2}) == 1
    capped = SweepConfig(train=tiny_train(collection), search_space={"lr": [1e-4]}, max_concurrent_trials=3)
    assert derive_concurrency(capped, {"CPU": 16.0}) == 3
    two = SweepConfig(train={**tiny_train(collection), "workers": 2, "cpus_per_worker": 1}, search_space={"lr": [1e-4]})
    with pytest.raises(ValueError, match="needs 2.1 CPUs"):
        derive_concurrency(two, {"CPU": 2.0})
    gpu = SweepConfig(train={**tiny_train(collection), "use_gpu": True}, search_space={"lr": [1e-4]})
    assert derive_concurrency(gpu, {"CPU": 16.0, "GPU": 4.0}) == 4


# ------------------------------------------------------------------------------ a real sweep


@pytest.fixture(scope="module")
def sweep(ray_session, collection, tmp_path_factory):
    from raytrieval.trainers.sweep import run_sweep

    out = tmp_path_factory.mktemp("tune")
    cfg = SweepConfig(
        train=tiny_train(collection, epochs=2, lr=1e-4, split=None), metric="val_map_medium",  # benchmark-scored
        search_space={"whiten_dim": {"grid": [None, 64]}, "lr": {"grid": [1e-4, 0.5]}},
        searcher="grid", include_default=False, scheduler="asha", grace_period=1, reduction_factor=2,
        max_concurrent_trials=1, out=str(out), name="tiny", registered_model="raytrieval-tune-test",
    )
    return cfg, run_sweep(cfg)


def test_sweep_finishes_stops_early_and_records_errors(sweep):
    cfg, result = sweep
    status = {(r["params"]["whiten_dim"], r["params"]["lr"]): r["status"] for r in result.trials}
    assert status == {(None, 1e-4): "FINISHED", (None, 0.5): "STOPPED", (64, 1e-4): "ERROR", (64, 0.5): "ERROR"}
    rows = {r["params"]["lr"]: r for r in result.trials if r["params"]["whiten_dim"] is None}
    assert [h["epoch"] for h in rows[1e-4]["history"]] == [0, 1, 2]
    assert [h["epoch"] for h in rows[0.5]["history"]] == [0, 1]  # ASHA cut it at the first rung
    assert rows[0.5]["history"][1]["val_map_medium"] < rows[1e-4]["history"][1]["val_map_medium"]
    assert all("whiten_dim" in r["error"] for r in result.trials if r["status"] == "ERROR")
    assert result.best["trial_id"] == rows[1e-4]["trial_id"]
    assert result.best["best"] == max(h["val_map_medium"] for h in rows[1e-4]["history"])


def test_champion_checkpoint_is_the_best_epoch_and_registered(sweep):
    import mlflow
    from mlflow import MlflowClient

    from raytrieval.retrieval.checkpoint import read_meta

    cfg, result = sweep
    meta = read_meta(result.champion)
    assert meta["epoch"] == result.best["best_epoch"]
    assert not (result.champion / "train_state.pt").exists()
    client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri)
    version = client.get_model_version_by_alias(cfg.registered_model, "champion")
    assert int(version.version) == result.model_version
    run = client.get_run(version.run_id)
    assert run.data.tags["raytrieval.trial_id"] == result.best["trial_id"]
    assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id
    from raytrieval.retrieval.source import fluent_tracking_uri

    with fluent_tracking_uri(cfg.resolved_tracking_uri):
        assert mlflow.pyfunc.load_model(f"models:/{cfg.registered_model}@champion") is not None


def test_mlflow_parent_and_nested_runs_none_left_running(sweep):
    from mlflow import MlflowClient

    cfg, result = sweep
    client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri)
    parent = client.get_run(result.parent_run_id)
    runs = client.search_runs([parent.info.experiment_id])
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_map_medium"] == pytest.approx(result.best["best"])
    nested = {r.data.tags["raytrieval.trial_id"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id}
    assert set(nested) == {r["trial_id"] for r in result.trials}
    by_status = {r["trial_id"]: r["status"] for r in result.trials}
    want = {"FINISHED": "FINISHED", "STOPPED": "KILLED", "ERROR": "FAILED"}
    assert {t: r.info.status for t, r in nested.items()} == {t: want[s] for t, s in by_status.items()}
    stopped = next(t for t, s in by_status.items() if s == "STOPPED")
    assert nested[stopped].data.tags["raytrieval.early_stopped"] == "after epoch 1"
    finished = next(t for t, s in by_status.items() if s == "FINISHED")
    history = client.get_metric_history(nested[finished].info.run_id, "val_map_medium")
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert nested[finished].data.params["lr"] == "0.0001"


def test_report_table_and_plots(sweep):
    cfg, result = sweep
    table = (cfg.sweep_dir / "trials.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line.split(" | ")[0][2:] in
            {r["trial_id"] for r in result.trials}]
    assert len(rows) == 4 and rows[0].startswith(f"| {result.best['trial_id']} ")
    assert "1 finished, 1 stopped early, 2 errored" in table
    for name in ("map_vs_margin.png", "map_per_epoch.png"):
        assert (cfg.sweep_dir / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((cfg.sweep_dir / "sweep_result.json").read_text())
    assert saved["model_version"] == result.model_version and saved["errored"] == 2


def test_rerunning_a_finished_sweep_restores_it_without_training(sweep):
    from mlflow import MlflowClient

    from raytrieval.trainers.sweep import run_sweep

    cfg, first = sweep
    client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri)
    experiment = client.get_run(first.parent_run_id).info.experiment_id
    before = len(client.search_runs([experiment]))
    again = run_sweep(cfg)
    assert again.parent_run_id == first.parent_run_id
    assert {r["trial_id"]: r["status"] for r in again.trials} == {r["trial_id"]: r["status"] for r in first.trials}
    assert len(client.search_runs([experiment])) == before
    assert again.best["trial_id"] == first.best["trial_id"]


# ------------------------------------------------------------------------------ interrupted sweep

_DRIVER = """
import json, sys
from raytrieval.cluster.runtime import init_ray
from raytrieval.trainers.sweep import run_sweep
from raytrieval.trainers.sweep_config import SweepConfig
init_ray(sys.argv[1])
run_sweep(SweepConfig(**json.loads(sys.argv[2])))
"""


def test_killed_sweep_resumes_where_it_stopped(ray_session, collection, tmp_path):
    """The sweep's driver is killed while its second trial trains; re-running the sweep keeps
    the finished trial, resumes the other from its last Ray Train checkpoint, and leaves
    MLflow with every epoch of both trials and no run open."""
    import os
    import signal
    import subprocess
    import time

    from mlflow import MlflowClient

    from raytrieval.trainers.sweep import run_sweep

    cfg = SweepConfig(
        train=tiny_train(collection, epochs=4, split=None), metric="val_map_medium", search_space={"lr": {"grid": [1e-4, 2e-4]}}, searcher="grid",
        include_default=False, scheduler="fifo", max_concurrent_trials=1, out=str(tmp_path), name="killed",
        registered_model=None,
    )
    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, address, json.dumps(cfg.to_dict())],
                            cwd=Path(__file__).resolve().parents[1], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list((cfg.sweep_dir / "trials").glob("*_00001/epoch_0002")):
            assert proc.poll() is None, "the sweep ended before it could be interrupted"
            assert time.monotonic() < deadline, "the second trial never reached epoch 2"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (cfg.sweep_dir / "sweep_result.json").exists()

    result = run_sweep(cfg)
    assert [r["status"] for r in result.trials] == ["FINISHED", "FINISHED"]
    resumed = {r["params"]["lr"]: r for r in result.trials}[2e-4]
    ckpt = cfg.sweep_dir / "trials" / resumed["trial_id"] / "final"
    history = json.loads((ckpt / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, 4]
    # continued from its last committed checkpoint (-1 would be a fresh start); which epoch that is
    # depends on when the controller last wrote its checkpoint snapshot before the kill
    assert history[-1]["resumed_from"] >= 0
    client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri)
    runs = client.search_runs([client.get_run(result.parent_run_id).info.experiment_id])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        if run.info.run_id != result.parent_run_id:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_map_medium")]
            assert sorted(set(steps)) == [0, 1, 2, 3, 4]
