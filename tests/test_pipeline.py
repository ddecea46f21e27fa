"""`raytrieval pipeline` end to end on a tiny demo collection: runs, skips, resumes, reports."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from raytrieval.cluster.pipeline import Pipeline, PipelineConfig
from raytrieval.cluster.stage import Stage, run_stage
from trainset import tiny_pipeline_config

ROOT = Path(__file__).resolve().parents[1]


def test_stage_runs_once_then_skips_until_an_input_changes(tmp_path):
    calls = []
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text("a")

    def work():
        calls.append(1)
        out.write_text(src.read_text().upper())
        return {"n": len(calls)}

    stage = lambda cfg: Stage("upper", cfg, [src], [out], work)  # noqa: E731
    assert run_stage(stage({"x": 1}), tmp_path, log=lambda _: None)["skipped"] is False
    assert run_stage(stage({"x": 1}), tmp_path, log=lambda _: None)["skipped"] is True
    src.write_text("b")
    assert run_stage(stage({"x": 1}), tmp_path, log=lambda _: None)["skipped"] is False
    assert run_stage(stage({"x": 2}), tmp_path, log=lambda _: None)["skipped"] is False
    out.unlink()
    assert run_stage(stage({"x": 2}), tmp_path, log=lambda _: None)["skipped"] is False
    assert len(calls) == 4 and out.read_text() == "B"


def test_config_validation(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run_dir: x\nbogus: 1\n")
    with pytest.raises(ValueError, match="bogus"):
        PipelineConfig.from_yaml(path)
    with pytest.raises(ValueError, match="workers"):
        PipelineConfig(workers=0)
    # no --config runs exactly the shipped demo configuration
    assert PipelineConfig.from_yaml(ROOT / "configs" / "demo.yaml").to_dict() == PipelineConfig().to_dict()


@pytest.mark.parametrize("model, want", [
    ({"pooling": "gem", "pooling_kwargs": {"p": 2.5}, "whiten_dim": 32, "weights": None},
     {"pooling_kwargs": {"p": 2.5}, "whiten_dim": 32, "weights": None}),
    ({"pooling": "rmac", "pooling_kwargs": {"levels": 2}, "weights": "w.pt"},
     {"pooling_kwargs": {"levels": 2}, "whiten_dim": None, "weights": "w.pt"}),
])
def test_training_builds_the_configured_model(tmp_path, model, want):
    """The pipeline's `model` reaches training whole: pooling arguments, whitening, weights."""
    cfg = PipelineConfig(run_dir=str(tmp_path / "run"), benchmark="demo", model={**model, "max_size": 96})
    spec = Pipeline(cfg).train_config().model_spec()
    assert {k: getattr(spec, k) for k in want} == want
    assert (spec.pooling, spec.max_size) == (model["pooling"], 96)
    if model["pooling"] == "gem":  # GeM's power has one field, gem_p
        with pytest.raises(ValueError, match="gem_p"):
            Pipeline(dataclasses.replace(cfg, train={"pooling_kwargs": {"p": 2.0}})).train_config()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 3-scene demo collection and a pipeline config sized for a 2-core CI machine."""
    return tiny_pipeline_config(tmp_path_factory.mktemp("pipeline"), serve=False)


def _train_checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "train" / "finetune").glob("epoch_*"))


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_pipeline_killed_in_training_resumes_then_skips(tiny, ray_session):
    cfg = PipelineConfig.from_yaml(tiny)
    run_dir = Path(cfg.run_dir)
    # the killed driver shares the session's Ray (one Ray instance on the machine)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "raytrieval.cluster.cli", "pipeline", "--config", str(tiny), "--no-serve"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not _train_checkpoints(run_dir):
            assert proc.poll() is None, "the pipeline ended before training checkpointed"
            time.sleep(1)
        assert _train_checkpoints(run_dir), "no training checkpoint within 10 minutes"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (run_dir / "stages" / "train.json").exists()

    records = Pipeline(cfg).run()
    assert [records[s]["skipped"] for s in ("ingest", "clean", "split", "mine")] == [True, True, True, True]
    assert records["train"]["skipped"] is False
    history = records["train"]["summary"]["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]  # no lost epoch
    evaluated = records["evaluate"]["summary"]
    assert set(evaluated) >= {"off-the-shelf", "fine-tuned", "served"}
    # the demo's database is the collection: evaluation read its descriptors (the clean stage's, the
    # select stage's), embedding only the cropped queries; the rows are those of the evaluated model
    from raytrieval.evaluation.datasets import prepare_benchmark
    from raytrieval.mining.embed import embed_images

    bench = prepare_benchmark("demo", cfg.data_root)
    for label in ("off-the-shelf", "fine-tuned"):
        assert json.loads((run_dir / "eval" / label / "metrics.json").read_text())["timings"]["database_reused"] == bench.num_images
    from raytrieval.retrieval.source import ModelSource

    source = ModelSource(checkpoint=str(Pipeline(cfg).final_checkpoint))
    scales, max_size = source.preprocessing()
    fresh = embed_images(source, bench.images[-2:], scales=scales, max_size=max_size, workers=0,
                         progress=False).descriptors
    np.testing.assert_allclose(np.load(run_dir / "eval" / "fine-tuned" / "database.npy")[-2:], fresh, atol=1e-5)
    selection = json.loads((run_dir / "selection.json").read_text())
    assert selection["self_map"]["off-the-shelf"] > 0 and selection["gate"]["why"]
    html = Path(records["report"]["summary"]["html"])
    assert html.is_file() and "Mean average precision" in html.read_text()
    assert (html.parent / "dims.png").is_file() and list(html.parent.glob("grid_q0_r*.jpg"))

    again = Pipeline(cfg).run()
    assert all(r["skipped"] for r in again.values())

    # the same run with a sweep in place of the single training: the champion is what follows
    tuned = dataclasses.replace(cfg, tune={
        "search_space": {"lr": {"grid": [1e-4, 3e-4]}}, "searcher": "grid", "include_default": False,
        "scheduler": "fifo", "registered_model": None, "train": {"epochs": 1, "workers": 1, "cpus_per_worker": 0.9}})
    pipeline = Pipeline(tuned)
    swept = pipeline.run()
    assert [swept[s]["skipped"] for s in ("ingest", "clean", "mine", "train")] == [True, True, True, False]
    # the index follows the gate: rebuilt exactly when the served model changed
    served = json.loads((run_dir / "selection.json").read_text())["model"]
    assert swept["index"]["skipped"] is (served == selection["model"])
    summary = swept["train"]["summary"]
    assert summary["trials"] == 2 and Path(summary["checkpoint"]) == pipeline.final_checkpoint
    assert pipeline.final_checkpoint.parent == pipeline.path("tune", "sweep")
    assert [h["epoch"] for h in summary["history"]][-1] <= 1
    trials = json.loads((pipeline.path("tune", "sweep") / "trials.json").read_text())
    assert not [t for t in trials if t["status"] == "ERROR"], trials

    from mlflow import MlflowClient

    client = MlflowClient(Pipeline(cfg).tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("raytrieval-pipeline").experiment_id])
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]
    failed = [(r.info.run_name, r.data.tags.get("raytrieval.error", "")[-800:]) for r in runs if r.info.status == "FAILED"]
    assert not failed, failed
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"}  # KILLED: the attempt killed above


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tiny, tmp_path):
    chromium = next((c for c in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(c).exists()), None)
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    html = Path(PipelineConfig.from_yaml(tiny).run_dir) / "report" / "index.html"
    if not html.is_file():
        pytest.skip("the pipeline test did not produce a report")
    shot = ROOT / "runs" / "test-artifacts" / "report.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600",
                    html.as_uri()], check=True, timeout=120, capture_output=True)
    from PIL import Image, ImageStat

    img = Image.open(shot).convert("L")
    assert max(ImageStat.Stat(img).stddev) > 10, "the screenshot is blank"
