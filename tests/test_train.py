"""Fine-tuning: config, per-epoch tuples, a plain loop that learns, and a tracked Ray Train run.

The Ray run (2 workers, gloo, 64 px images, 2 epochs) is shared by the tests of this module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from raytrieval.trainers.config import TrainConfig
from raytrieval.mining.tuples import build_tuples, components, plan_epoch
from raytrieval.trainers.data import ImageStore, load_training_set, shard_batches
from raytrieval.trainers.loop import TupleNet, build_optimizer, embed_indices, new_model, train_epoch

sys.path.insert(0, str(Path(__file__).parent))
from trainset import make_collection, tiny_config, write_knn  # noqa: E402


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return make_collection(tmp_path_factory.mktemp("collection"))


# ------------------------------------------------------------------------------ config


def test_config_yaml_overrides_and_validation(tmp_path, collection):
    path = tmp_path / "train.yaml"
    path.write_text(f"manifest: {collection['manifest']}\nclusters: {collection['clusters']}\nloss: triplet\nepochs: 4\n")
    cfg = TrainConfig.from_yaml(path, epochs=7, workers=None)
    assert (cfg.epochs, cfg.loss, cfg.margin, cfg.workers) == (7, "triplet", 0.1, 2)
    assert cfg.gem_p_lr == pytest.approx(10 * cfg.lr)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.resolved_tracking_uri == f"sqlite:///{Path('runs/train').resolve() / 'mlflow.db'}"
    base = dict(manifest="m.parquet", clusters="c.parquet")
    for field, value in [("loss", "arcface"), ("pairs", "labels"), ("num_negatives", 0), ("margin", -1.0),
                         ("lr_decay", 1.5), ("image_size", 8), ("negatives", "listed"), ("name", "a/b")]:
        with pytest.raises(ValueError, match=field if field != "negatives" else "negatives"):
            TrainConfig(**base, **{field: value})
    with pytest.raises(ValueError, match="clusters"):
        TrainConfig(manifest="m.parquet", pairs="clusters")
    with pytest.raises(ValueError, match="unknown fields"):
        TrainConfig.from_dict({**base, "epochz": 3})
    shipped = TrainConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "train.yaml")
    assert shipped.pairs == "clusters" and shipped.val_dataset is None and shipped.split.endswith("split.parquet")
    assert shipped.exclude_knn == 10  # the mine stage's default, one place (raytrieval.mining.tuples)
    assert "knn" in TrainConfig.PATH_FIELDS and "split" in TrainConfig.PATH_FIELDS


# ------------------------------------------------------------------------------ tuples


def test_epoch_tuples_respect_clusters(collection):
    cfg = tiny_config(collection, Path("unused"), num_queries=6, num_negatives=3)
    ts = load_training_set(cfg)
    plan = plan_epoch(ts, cfg.tuple_rules(), epoch=1)
    assert plan.queries.size == 6
    assert np.array_equal(plan_epoch(ts, cfg.tuple_rules(), epoch=1).queries, plan.queries)  # same on every rank
    rng = np.random.default_rng(0)
    desc = rng.normal(size=(plan.embed.size, 8)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    tuples = build_tuples(ts, cfg.tuple_rules(), plan, desc)
    row = {int(i): r for r, i in enumerate(plan.embed)}
    for q, p, *negs in tuples:
        assert ts.labels[p] == ts.labels[q] and p != q
        negs = [n for n in negs if n >= 0]
        labels = [ts.labels[n] for n in negs]
        assert ts.labels[q] not in labels and len(set(labels)) == len(labels)  # one per other cluster
        sims = [float(desc[row[n]] @ desc[row[q]]) for n in negs]
        assert sims == sorted(sims, reverse=True)  # hardest first


def test_knn_linked_clusters_are_never_negatives(collection, tmp_path):
    from raytrieval.mining.stages import knn_table
    from raytrieval.retrieval.artifacts import atomic_write_table

    cfg = tiny_config(collection, Path("unused"), num_queries=16, num_negatives=3)
    ts = load_training_set(cfg)
    ids = ts.ids
    scene = np.array([int(i.split("_")[0][1:]) for i in ids])
    # rank 0: a view of the next scene for scenes 0 and 1 (0 <-> 1 linked); rank 1: itself-ish
    nbrs = np.array([[ids.index(f"s1_v{j % 4}") if scene[i] == 0 else
                      ids.index(f"s0_v{j % 4}") if scene[i] == 1 else (i + 1) % len(ids)
                      for j in range(2)] for i in range(len(ids))])
    atomic_write_table(knn_table(ids, np.ones(nbrs.shape, np.float32), nbrs), tmp_path / "knn.parquet")
    desc = np.ones((ts.num_images, 8), np.float32) / np.sqrt(8)  # every candidate equally hard
    seen = {}
    for exclude in (0, 1):
        linked = cfg.with_overrides(knn=str(tmp_path / "knn.parquet"), exclude_knn=exclude)
        lts = load_training_set(linked)
        plan = plan_epoch(lts, linked.tuple_rules(), epoch=1)
        tuples = build_tuples(lts, linked.tuple_rules(), plan, desc[plan.embed])
        pairs = {(scene[q], scene[n]) for q, _, *negs in tuples for n in negs if n >= 0}
        seen[exclude] = pairs
    assert (0, 1) in seen[0] and (1, 0) in seen[0]  # cirtorch's rule: any other cluster
    assert not {(0, 1), (1, 0)} & seen[1] and (0, 2) in seen[1]  # linked clusters excluded
    with pytest.raises(ValueError, match="exclude_knn"):
        TrainConfig(manifest="m.parquet", clusters="c.parquet", exclude_knn=5)


def test_listed_negatives_come_from_the_tuples_file(collection):
    cfg = tiny_config(collection, Path("unused"), pairs="tuples", tuples=str(collection["tuples"]), clusters=None,
                      negatives="listed", num_negatives=2)
    ts = load_training_set(cfg)
    assert set(ts.labels[ts.labels >= 0]) == {0, 1, 2, 3}  # components of the query-positive graph
    plan = plan_epoch(ts, cfg.tuple_rules(), epoch=1)
    tuples = build_tuples(ts, cfg.tuple_rules(), plan, np.eye(plan.embed.size, dtype=np.float32))
    for q, p, *negs in tuples:
        listed = ts.listed[int(np.flatnonzero((ts.pairs[:, 0] == q) & (ts.pairs[:, 1] == p))[0])]
        assert set(n for n in negs if n >= 0) <= set(listed.tolist())


def test_components_and_shards():
    assert components(5, np.array([[0, 1], [3, 1]])).tolist() == [0, 0, -1, 0, -1]
    shards = [shard_batches(7, 2, r, 2, seed=0, epoch=3) for r in range(2)]
    assert len(shards[0]) == len(shards[1])  # equal step counts under DDP
    dealt = np.concatenate([b for s in shards for b in s])
    assert set(dealt.tolist()) == set(range(7)) and dealt.size == 8


# ------------------------------------------------------------------------------ plain loop


def test_plain_loop_lowers_the_loss(collection):
    torch.set_num_threads(1)
    cfg = tiny_config(collection, Path("unused"), num_queries=8, lr=1e-4, batch_size=4)
    ts = load_training_set(cfg)
    model = new_model(cfg)
    store = ImageStore(ts.paths, cfg.image_size)
    plan = plan_epoch(ts, cfg.tuple_rules(), epoch=1)
    tuples = build_tuples(ts, cfg.tuple_rules(), plan, embed_indices(model, store, plan.embed))
    optimizer, _ = build_optimizer(model, cfg)
    net = TupleNet(model)
    losses = [train_epoch(net, model, store, tuples, cfg, optimizer, epoch=1)["loss"] for _ in range(4)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_tuple_net_batches_by_shape_and_keeps_the_order():
    from raytrieval.retrieval.model import ModelSpec, RetrievalNet

    torch.manual_seed(0)
    model = RetrievalNet(ModelSpec(weights="imagenet", max_size=64)).eval()
    images = [torch.rand(3, 64, 48), torch.rand(3, 48, 64), torch.rand(3, 64, 48), torch.rand(3, 40, 64)]
    got = TupleNet(model)(images)
    want = torch.cat([model(model.normalize(x[None])) for x in images])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_training_embedding_matches_extraction(collection):
    """Mining and validation embed exactly what `extract_descriptors` (eval, serving) does."""
    from raytrieval.retrieval.extract import extract_descriptors

    cfg = tiny_config(collection, Path("unused"))
    ts = load_training_set(cfg)
    model = new_model(cfg)
    got = embed_indices(model, ImageStore(ts.paths, 64), np.arange(len(ts.paths)))
    want = extract_descriptors(model, ts.paths, max_size=64, progress=False)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_image_store_keeps_decoded_images_up_to_its_budget(collection):
    """Images past `cache_bytes` are decoded again at every `get`, and equal the kept ones."""
    paths = sorted(str(p) for p in (collection["root"] / "jpg").glob("*.png"))[:3]
    one = 3 * 64 * 64  # a 64 px uint8 image
    store = ImageStore(paths, 64, cache_bytes=2 * one)
    first = [store.get(i) for i in range(3)]
    assert sorted(store._store) == [0, 1]
    assert all(torch.equal(a, store.get(i)) for i, a in enumerate(first))
    assert sorted(store._store) == [0, 1]
    everything = ImageStore(paths, 64)
    [everything.get(i) for i in range(3)]
    assert sorted(everything._store) == [0, 1, 2]


def test_validation_embeds_each_file_once_and_scores_like_direct_calls(collection, monkeypatch):
    """A benchmark over the collection's own files (the demo's case): every file is embedded
    once per validation, and self-mAP and mAP equal separate embeddings of each set."""
    import dataclasses

    from raytrieval.evaluation.selfval import self_map
    from raytrieval.trainers import loop

    cfg = tiny_config(collection, Path("unused"), split=str(collection["split"]), max_size=48)
    selfval_paths, sv = loop.load_selfval(cfg)
    tiny = loop.load_validation(cfg)
    scene = [int(Path(p).stem.split("_")[0][1:]) for p in selfval_paths]
    gnd = [{"easy": np.flatnonzero(np.array(scene) == q), "hard": np.zeros(0, np.int64), "junk": np.zeros(0, np.int64)}
           for q in range(len(tiny.queries))]
    own = dataclasses.replace(tiny, images=[str(Path(p).resolve()) for p in selfval_paths], gnd=gnd)
    monkeypatch.setattr(loop, "load_validation", lambda _: own)
    val = loop.load_validations(cfg)
    assert len(val.store) == len(selfval_paths)  # the collection and the benchmark database: one set of files

    model = new_model(cfg)
    got = loop.validate(model, val)
    X = embed_indices(model, ImageStore(selfval_paths, 48), np.arange(len(selfval_paths)))
    Q = embed_indices(model, ImageStore([selfval_paths[q] for q in sv.queries], 48, sv.boxes), np.arange(sv.num_queries))
    q = embed_indices(model, ImageStore(own.queries, 48, own.qboxes), np.arange(len(own.queries)))
    want = own.evaluate(np.argsort(-(q @ X.T), axis=1, kind="stable"))
    assert got["self_map"] == pytest.approx(self_map(X, sv), abs=1e-6)  # whole-image pseudo-queries: chooses
    assert got["self_map_crop"] == pytest.approx(self_map(X, sv, Q=Q), abs=1e-6)
    assert got["val_map_medium"] == pytest.approx(want["medium"]["map"], abs=1e-6) and got["val_map_medium"] > 0


# ------------------------------------------------------------------------------ Ray Train run


@pytest.fixture(scope="module")
def trained(ray_session, collection, tmp_path_factory):
    from raytrieval.trainers.fit import fit

    out = tmp_path_factory.mktemp("train")
    cfg = tiny_config(collection, out, epochs=2)
    return cfg, fit(cfg)


def test_run_learns_and_reports_every_epoch(trained):
    cfg, result = trained
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert all(h["resumed_from"] == -1 for h in result.history)
    assert result.history[2]["loss"] < result.history[1]["loss"]
    assert result.history[2]["tuples"] == cfg.num_queries
    assert result.history[2]["val_map_medium"] >= result.history[0]["val_map_medium"]
    assert 2.5 < result.history[2]["gem_p"] < 3.5
    ray_ckpts = sorted(p.name for p in Path(result.ray_path).glob("epoch_*"))
    assert ray_ckpts == ["epoch_0000", "epoch_0001", "epoch_0002"]
    assert (Path(result.ray_path) / "epoch_0002" / "model.pt").read_bytes() == (result.checkpoint / "model.pt").read_bytes()


_FRESH = """
import hashlib, json, sys
import numpy as np
import torch
torch.set_num_threads(1)
from raytrieval.retrieval.checkpoint import load_checkpoint
from raytrieval.retrieval.extract import extract_descriptors
model = load_checkpoint(sys.argv[1])
digest = hashlib.sha1()
for k, v in sorted(model.state_dict().items()):
    digest.update(k.encode()); digest.update(v.numpy().tobytes())
images = json.loads(sys.argv[2])
np.save(sys.argv[3], extract_descriptors(model, images, max_size=model.spec.max_size, progress=False))
print(digest.hexdigest())
"""


def test_checkpoint_reloads_bit_exactly_in_a_fresh_process(trained, tmp_path):
    import hashlib

    from raytrieval.evaluation.datasets import load_benchmark
    from raytrieval.retrieval.checkpoint import load_checkpoint, read_meta
    from raytrieval.retrieval.extract import extract_descriptors

    cfg, result = trained
    torch.set_num_threads(1)  # as in the fresh process: same kernels, same summation order
    meta = read_meta(result.checkpoint)
    assert meta["epoch"] == 2 and meta["max_size"] == cfg.max_size and meta["backbone"] == cfg.backbone
    model = load_checkpoint(result.checkpoint)
    state = torch.load(result.checkpoint / "model.pt", weights_only=True)
    digest = hashlib.sha1()
    for k, v in sorted(state.items()):
        digest.update(k.encode())
        digest.update(v.numpy().tobytes())
    bench = load_benchmark(cfg.val_dataset, cfg.val_data_root)
    out = tmp_path / "fresh.npy"
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH, str(result.checkpoint), json.dumps(bench.images), str(out)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert proc.stdout.strip().splitlines()[-1] == digest.hexdigest()
    here = extract_descriptors(model, bench.images, max_size=cfg.max_size, progress=False)
    assert np.array_equal(np.load(out), here)
    # the reloaded model scores what the workers reported for the last epoch
    q = extract_descriptors(model, bench.queries, bench.qboxes, max_size=cfg.max_size, progress=False)
    metrics = bench.evaluate(np.argsort(-(q @ here.T), axis=1, kind="stable"))
    assert metrics["medium"]["map"] == pytest.approx(result.history[-1]["val_map_medium"], abs=1e-9)


def test_mlflow_run_metrics_and_registered_model(trained):
    import mlflow
    from mlflow import MlflowClient

    from raytrieval.retrieval.source import fluent_tracking_uri

    cfg, result = trained
    # registering used MLflow's fluent API; it must not leave this store exported to the process
    assert os.environ.get("MLFLOW_TRACKING_URI") is None and not mlflow.is_tracking_uri_set()
    client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["loss"] == "contrastive" and run.data.params["epochs"] == "2"
    assert [m.step for m in client.get_metric_history(result.run_id, "val_map_medium")] == [0, 1, 2]
    assert sorted(m.step for m in client.get_metric_history(result.run_id, "loss")) == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.json", "history.json", "plots", "checkpoint"} <= artifacts
    assert {a.path for a in client.list_artifacts(result.run_id, "plots")} == {"plots/curves.png"}
    version = client.get_model_version(cfg.registered_model, str(result.model_version))
    assert version.run_id == result.run_id
    assert json.loads(version.tags["max_size"]) == cfg.max_size
    # the registered model embeds like the checkpoint
    with fluent_tracking_uri(cfg.resolved_tracking_uri):
        pyfunc = mlflow.pyfunc.load_model(f"models:/{cfg.registered_model}/{result.model_version}")
    images = sorted(str(p) for p in (Path(cfg.val_data_root) / "tiny" / "jpg").glob("*.jpg"))[:3]
    from raytrieval.retrieval.checkpoint import load_checkpoint
    from raytrieval.retrieval.extract import extract_descriptors

    want = extract_descriptors(load_checkpoint(result.checkpoint), images, max_size=cfg.max_size, progress=False)
    np.testing.assert_allclose(np.array(pyfunc.predict(images), dtype=np.float32), want, atol=1e-6)


# ------------------------------------------------------------------------------ ray job submit


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_head(tmp_path):
    """`ray start --head --block` on 127.0.0.1 with its job server, stopped in teardown.

    Yields (dashboard address, client environment, the head's temp dir: where Ray unpacks
    a job's `--working-dir`, under `session_*/runtime_resources/`).

    Offline as ../shared/STACK.md says: HOME holds ray_bootstrap_config.yaml with a local
    provider (no cloud probe), usage stats off and reported to 127.0.0.1:9, token auth off.
    Teardown ends only what this fixture started: the `ray start` process and its process group.
    """
    import os
    import signal
    import tempfile
    import time
    import urllib.request

    venv_bin = Path(sys.executable).parent
    home = tmp_path / "home"
    home.mkdir()
    (home / "ray_bootstrap_config.yaml").write_text("provider:\n  type: local\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    env.update({
        "HOME": str(home), "PATH": f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0", "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
        "RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
    })
    temp_dir = tempfile.mkdtemp(prefix="rtj-", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dash = _free_port(), _free_port()
    head = subprocess.Popen(
        [str(venv_bin / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         # another Ray on this machine (the test session's) may hold the default agent ports
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
         f"--ray-client-server-port={_free_port()}"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
                break
            except OSError:
                if time.time() > deadline or head.poll() is not None:
                    raise RuntimeError("ray start --head did not bring up the job server") from None
                time.sleep(1)
        yield address, env, Path(temp_dir)
    finally:
        # the whole process group of this head at once (`ray start --block` alone, on SIGTERM,
        # stops its children one by one: about 30 s), then SIGKILL for what is left after 5 s
        for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                pass
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_cli_train_through_ray_job_submit(local_head, collection, tmp_path):
    """`ray job submit --working-dir <inputs> -- raytrieval train --config train.yaml` against a
    local head, the config naming the manifest, clusters and kNN graph by relative paths.

    The job runs in Ray's unpacked copy of the working dir (not the repo: raytrieval comes
    from the installed package), and the workers must read the kNN file from that copy: the
    driver resolves the relative paths (`TrainConfig.resolved`) before they reach the workers.
    """
    import shutil

    import yaml
    from mlflow import MlflowClient

    address, env, ray_temp = local_head
    workdir = tmp_path / "job"
    workdir.mkdir()
    for name in ("images.parquet", "clusters.parquet"):  # the manifest keeps absolute image uris
        shutil.copy(collection["root"] / name, workdir / name)
    write_knn(workdir / "images.parquet", workdir / "knn.parquet", k=6)
    exclude = 5  # more than the 3 other views of a scene: cross-cluster links
    cfg = tiny_config(collection, tmp_path / "runs", name="job", epochs=1, val_max_queries=2,
                      manifest="images.parquet", clusters="clusters.parquet", knn="knn.parquet", exclude_knn=exclude)
    (workdir / "train.yaml").write_text(
        yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k not in ("workers", "epochs")}))
    for _ in range(6):  # the head's job agent registers a few seconds after the dashboard answers
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "job", "submit", f"--address={address}", "--working-dir",
             str(workdir), "--", "raytrieval", "train", "--config", "train.yaml", "--workers", "2", "--epochs", "1"],
            env=env, cwd=workdir, capture_output=True, text=True, timeout=600,
        )
        if "No available agent" not in proc.stdout + proc.stderr:
            break
        time.sleep(10)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "final checkpoint" in proc.stdout
    record = json.loads((cfg.run_dir / "result.json").read_text())
    assert [h["epoch"] for h in record["history"]] == [0, 1]
    assert Path(record["checkpoint"], "model.pt").is_file()
    run = MlflowClient(tracking_uri=cfg.resolved_tracking_uri).get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["workers"] == "2"
    # what the workers received: the kNN graph of Ray's unpacked working dir, not of workdir
    used = TrainConfig.from_dict(json.loads((cfg.run_dir / "config.json").read_text()))
    knn = Path(used.knn)
    assert knn.is_absolute() and knn.name == "knn.parquet" and used.exclude_knn == exclude
    assert knn.is_relative_to(ray_temp.resolve()) and "runtime_resources" in knn.parts, knn
    assert not knn.is_relative_to(tmp_path.resolve())
    assert knn.read_bytes() == (workdir / "knn.parquet").read_bytes()
    assert Path(used.manifest).parent == knn.parent == Path(used.clusters).parent
    assert (run.data.params["knn"], run.data.params["exclude_knn"]) == (str(knn), str(exclude))
    # and that config turns the file into kNN exclusion links, some across clusters
    ts = load_training_set(used)
    assert ts.links.shape == (ts.num_images * exclude, 2)
    assert np.any(ts.labels[ts.links[:, 0]] != ts.labels[ts.links[:, 1]])


def test_one_mlflow_default_for_training_sweeps_and_the_pipeline(monkeypatch, tmp_path):
    """Explicit URI, else MLFLOW_TRACKING_URI, else `<out>/mlflow.db`: the same rule everywhere."""
    from raytrieval.cluster.pipeline import Pipeline, PipelineConfig
    from raytrieval.trainers.sweep_config import SweepConfig

    train = TrainConfig(manifest="m.parquet", clusters="c.parquet", out=str(tmp_path))
    sweep = SweepConfig(out=str(tmp_path), train={"manifest": "m.parquet", "clusters": "c.parquet", "split": "s.parquet"},
                        search_space={"lr": [1e-4]})
    pipeline = Pipeline(PipelineConfig(run_dir=str(tmp_path)))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    local = f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert train.resolved_tracking_uri == sweep.resolved_tracking_uri == pipeline.tracking_uri == local
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert train.resolved_tracking_uri == sweep.resolved_tracking_uri == pipeline.tracking_uri == "http://127.0.0.1:5000"
    explicit = TrainConfig(manifest="m.parquet", clusters="c.parquet", tracking_uri="sqlite:///x.db")
    assert explicit.resolved_tracking_uri == "sqlite:///x.db"
