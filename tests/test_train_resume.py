"""Fault tolerance: a worker killed mid-epoch, and a stopped run continued from its storage path.

Three tiny Ray Train runs (2 workers, 64 px):
- A: 3 epochs, uninterrupted (the reference);
- B: 2 epochs, rank 0 exits (os._exit) in the middle of epoch 2 the first time; the worker group
  restarts from the epoch-1 checkpoint (FailureConfig(max_failures=1)) and finishes;
- B again with epochs=3: resumed from B's storage path (epoch 2) and its MLflow run.
Sampling is seeded by epoch and the optimizer state is checkpointed, so B ends bit-identical to A.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from trainset import make_collection, tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    from raytrieval.trainers.fit import fit

    paths = make_collection(tmp_path_factory.mktemp("collection"))
    out = tmp_path_factory.mktemp("train")
    common = dict(val_max_queries=2, registered_model=None)
    a = fit(tiny_config(paths, out, name="a", epochs=3, **common))
    marker = out / "killed.txt"
    b_cfg = tiny_config(paths, out, name="b", epochs=2, **common)
    b1 = fit(b_cfg, fault={"marker": str(marker), "epoch": 2, "step": 1, "rank": 0})
    b2 = fit(b_cfg.with_overrides(epochs=3))
    return {"a": a, "b1": b1, "b2": b2, "marker": marker, "cfg": b_cfg}


def _state(result) -> dict[str, torch.Tensor]:
    return torch.load(result.checkpoint / "model.pt", weights_only=True)


def test_killed_worker_resumes_from_last_checkpoint_without_losing_an_epoch(runs):
    b1 = runs["b1"]
    assert runs["marker"].read_text().startswith("killed at epoch 2 step 1")
    assert [h["epoch"] for h in b1.history] == [0, 1, 2]
    assert [h["resumed_from"] for h in b1.history] == [-1, -1, 1]  # epoch 2 redone after the restart
    assert all(h["tuples"] == runs["cfg"].num_queries for h in b1.history[1:])


def test_stopped_run_continues_from_its_storage_path(runs):
    b1, b2 = runs["b1"], runs["b2"]
    assert [h["epoch"] for h in b2.history] == [0, 1, 2, 3]
    assert b2.history[3]["resumed_from"] == 2
    assert b2.history[:3] == b1.history  # the first epochs were not trained again
    assert b2.run_id == b1.run_id  # the same MLflow run, continued


def test_interrupted_and_resumed_training_equals_uninterrupted(runs):
    a, b2 = runs["a"], runs["b2"]
    for key in ("loss", "val_map_medium", "gem_p"):
        assert [h[key] for h in b2.history[1:]] == [h[key] for h in a.history[1:]], key
    sa, sb = _state(a), _state(b2)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_mlflow_has_each_epoch_once_and_the_run_finished(runs):
    from mlflow import MlflowClient

    cfg, b2 = runs["cfg"], runs["b2"]
    client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri)
    run = client.get_run(b2.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("resumed.epochs") == "3"
    assert sorted(m.step for m in client.get_metric_history(b2.run_id, "val_map_medium")) == [0, 1, 2, 3]
    assert sorted(m.step for m in client.get_metric_history(b2.run_id, "loss")) == [1, 2, 3]
