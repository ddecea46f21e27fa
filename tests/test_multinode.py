"""Node loss on a simulated 3-node Ray cluster (`ray.cluster_utils.Cluster`): no result lost or
duplicated, a training run resumed from its last checkpoint, and a Serve app that keeps its
acknowledged adds and answers again from a new searcher replica."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sceneviews import all_pairs, write_views
from trainset import make_collection, tiny_config

from raytrieval.mining.cleaning import read_matches
from raytrieval.mining.embed import EmbedBatch, embed_images
from raytrieval.mining.verify import PairVerifier, VerifyConfig, verify_pairs
from raytrieval.retrieval.model import ModelSpec

# a dead raylet is noticed after about 4 s instead of Ray's default 30 s: long enough that Ray's
# own task retries run out while a node is unreachable but not yet declared dead, as on a real
# cluster (at 1.5 s they often outlasted it, and a pool without resends passed)
FAST_HEALTH_CHECK = {"health_check_period_ms": 500, "health_check_failure_threshold": 8}


@pytest.fixture
def three_nodes():
    """A head and two workers of 1 CPU each; the session's embedded Ray is put back afterwards."""
    import ray
    from ray.cluster_utils import Cluster

    from raytrieval.cluster.runtime import apply_offline_env, init_ray

    had_session = ray.is_initialized()
    ray.shutdown()
    apply_offline_env()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": FAST_HEALTH_CHECK},
    )
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    try:
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()
        if had_session:
            init_ray(num_cpus=2)


def node_recorder(folder: Path) -> Callable[[str], None]:
    """A function for actors to call as a task starts: it writes "<node id> <time>" to folder/<task>
    (a resent task overwrites its line). A local function, so Ray ships it by value."""
    folder.mkdir()

    def record(task: str) -> None:
        import os

        import ray

        tmp = folder / f".{task}.{os.getpid()}"
        tmp.write_text(f"{ray.get_runtime_context().get_node_id()} {time.time()}")
        os.replace(tmp, folder / task)  # a reader never sees half a line

    return record


def started(folder: Path) -> dict[str, tuple[str, float]]:
    """Task -> (node id, start time), as written by `node_recorder`."""
    return {f.name: (node, float(t)) for f in folder.iterdir() if not f.name.startswith(".")
            for node, t in [f.read_text().split()]}


def remove_first_busy_worker(cluster, workers, log: Path) -> Callable[[], tuple[str, float]]:
    """Start removing (ungracefully) the first worker node a task reports from, in a thread.

    Returns:
        A function that waits for the thread and gives (removed node id, time of removal).
    """
    removed: list[tuple[str, float]] = []

    def watch() -> None:
        ids = {node.node_id: node for node in workers}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for node_id, _ in started(log).values():
                if node_id in ids:
                    cluster.remove_node(ids[node_id], allow_graceful=False)
                    removed.append((node_id, time.time()))
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    def result() -> tuple[str, float]:
        watcher.join(timeout=5)
        assert removed, "no task ran on a worker node"
        return removed[0]

    return result


def assert_went_on_elsewhere(log: Path, gone: str, at: float) -> None:
    """Tasks started after the removal, and none on the removed node."""
    later = [node for node, t in started(log).values() if t > at]
    assert later and gone not in later


def test_node_removed_during_cleaning_loses_and_duplicates_no_pair(three_nodes, tmp_path):
    """The node running a verification actor is removed after its first task: the actor restarts
    on a surviving node, and matches.parquet holds every pair exactly once, as in one process."""
    cluster, workers = three_nodes
    paths, scene_of = write_views(tmp_path)
    pairs = all_pairs(paths)
    log = tmp_path / "seen"
    record = node_recorder(log)

    class SlowReportingVerifier(PairVerifier):
        """Logs its node once per task and takes 0.4 s a task, so the removal lands mid-run."""

        def verify(self, task):
            record(str(task.index))
            time.sleep(0.4)
            return super().verify(task)

    removal = remove_first_busy_worker(cluster, workers, log)
    config = VerifyConfig(max_features=500)
    out = tmp_path / "matches.parquet"
    res = verify_pairs(
        pairs, paths, out, config, workers=2, pairs_per_task=2, max_restarts=3, max_task_retries=3,
        cpus_per_worker=1, verifier_cls=SlowReportingVerifier, progress=False,
    )
    assert_went_on_elsewhere(log, *removal())
    table = read_matches(out)
    got = list(zip(table.column("a").to_pylist(), table.column("b").to_pylist()))
    assert len(got) == len(set(got)) == res.pairs == len(pairs)  # no pair twice
    assert set(got) == set(pairs)  # no pair missing
    reference = read_matches(
        verify_pairs(pairs, paths, tmp_path / "ref.parquet", config, workers=0, progress=False).path
    )
    inliers = dict(zip(got, table.column("inliers").to_pylist()))
    ref = dict(zip(zip(reference.column("a").to_pylist(), reference.column("b").to_pylist()),
                   reference.column("inliers").to_pylist()))
    for pair in pairs:
        assert (inliers[pair] >= 30) == (ref[pair] >= 30) == (scene_of[pair[0]] == scene_of[pair[1]]), pair


def test_node_removed_during_embedding_loses_no_image(three_nodes, tmp_path):
    """The node running a Ray Data embedding actor is removed during its first batch: every image
    still gets its descriptor once, equal to one embedded in this process, and no failure is
    reported."""
    cluster, workers = three_nodes
    rng = np.random.default_rng(0)
    images = []
    for i in range(48):
        images.append(tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (48 + i % 5 * 4, 64, 3), dtype=np.uint8)).save(images[-1])
    log = tmp_path / "seen"
    record = node_recorder(log)

    class SlowReportingEmbedBatch(EmbedBatch):
        """Logs its node once per batch and takes 0.3 s a batch, so the removal lands mid-run."""

        def __call__(self, batch):
            record(str(batch["index"][0]))
            time.sleep(0.3)
            return super().__call__(batch)

    spec = ModelSpec(max_size=64).to_dict()
    removal = remove_first_busy_worker(cluster, workers, log)
    result = embed_images(spec, images, max_size=64, workers=2, chunk_size=4, progress=False,
                          batch_cls=SlowReportingEmbedBatch)
    assert_went_on_elsewhere(log, *removal())
    assert result.failures == {}
    assert sorted(int(task) for task in started(log)) == list(range(0, 48, 4))  # every batch ran
    reference = embed_images(spec, images, max_size=64, workers=0, progress=False)
    assert result.descriptors.shape == reference.descriptors.shape == (48, reference.descriptors.shape[1])
    np.testing.assert_allclose(np.linalg.norm(result.descriptors, axis=1), 1.0, rtol=1e-5)  # no zero row
    np.testing.assert_allclose(result.descriptors, reference.descriptors, atol=1e-5)


def committed_epochs(run_dir: Path) -> list[int]:
    """The epochs whose checkpoints the Ray Train controller has committed, from its snapshot
    (`checkpoint_manager_snapshot.json`, rewritten as each reported checkpoint is registered)."""
    try:
        state = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not there yet, or being rewritten: next time
        return []
    return [int(result["metrics"]["epoch"]) for result in state["checkpoint_results"]]


def train_worker_nodes() -> tuple[str, set[str]] | None:
    """(placement group id, node ids of its bundles) of the one created placement group (Ray
    Train's worker group), or None while there is none."""
    import ray

    groups = [(pg_id, set(pg["bundles_to_node_id"].values()))
              for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] == "CREATED"]
    return groups[0] if len(groups) == 1 else None


def remove_train_worker_node_after(cluster, workers, run_dir: Path, epoch: int) -> Callable[[], dict]:
    """In a thread: once the controller has committed the checkpoint of `epoch`, remove
    (ungracefully) a worker node that hosts a Ray Train worker, then note the nodes of the next
    worker group.

    Returns:
        A function that waits for the thread and gives {"node", "removed_at", "committed"
        (epochs committed just before the removal), "next_nodes"}.
    """
    seen: dict = {}

    def watch() -> None:
        ids = {node.node_id: node for node in workers}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "node" not in seen:
            group, done = train_worker_nodes(), committed_epochs(run_dir)
            if epoch in done and group is not None and group[1] & ids.keys():
                seen["committed"], seen["group"] = done, group[0]
                seen["node"] = sorted(group[1] & ids.keys())[0]
                cluster.remove_node(ids[seen["node"]], allow_graceful=False)
                seen["removed_at"] = time.time()
            time.sleep(0.05)
        while time.monotonic() < deadline:
            group = train_worker_nodes()
            if group is not None and group[0] != seen.get("group"):
                seen["next_nodes"] = group[1]
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    def result() -> dict:
        watcher.join(timeout=5)
        assert "node" in seen, f"no worker node was removed after epoch {epoch}'s checkpoint"
        return seen

    return result


def test_node_removed_during_training_resumes_from_the_last_checkpoint(three_nodes, tmp_path):
    """2 Ray Train workers on 2 of the 3 nodes; the worker node of one of them is removed once
    epoch 1's checkpoint is committed: the worker group restarts on the 2 surviving nodes from
    that checkpoint, and the run ends with each of its 3 epochs once."""
    import ray

    from raytrieval.retrieval.source import load_model
    from raytrieval.trainers.fit import RESULT_FILE, fit
    from raytrieval.trainers.loop import TRAIN_STATE_FILE

    cluster, workers = three_nodes
    paths = make_collection(tmp_path / "collection")
    cfg = tiny_config(paths, tmp_path / "train", name="node-loss", epochs=3, cpus_per_worker=1,
                      val_max_queries=2, registered_model=None, max_failures=1)
    removal = remove_train_worker_node_after(cluster, workers, cfg.run_dir, epoch=1)
    t0 = time.time()
    result = fit(cfg, track=False)
    seen = removal()

    assert json.loads((cfg.run_dir / RESULT_FILE).read_text())["history"] == result.history
    assert [h["epoch"] for h in result.history] == [0, 1, 2, 3]  # none lost, none twice
    # epochs 0-1 by the first worker group, 2-3 by one that started from epoch 1's checkpoint
    assert [h["resumed_from"] for h in result.history] == [-1, -1, 1, 1]
    assert all(h["tuples"] == cfg.num_queries for h in result.history[1:])
    # the node went after epoch 1 was committed and before epoch 2 was: epoch 2 was trained again
    assert max(seen["committed"]) == 1
    ckpt_time = {e: (cfg.run_dir / f"epoch_{e:04d}" / TRAIN_STATE_FILE).stat().st_mtime for e in range(4)}
    assert t0 < ckpt_time[1] < seen["removed_at"] < ckpt_time[2] < ckpt_time[3]
    # the restarted worker group ran on the two surviving nodes
    survivors = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert seen["node"] not in survivors and seen.get("next_nodes") == survivors and len(survivors) == 2
    last = torch.load(cfg.run_dir / "epoch_0003" / TRAIN_STATE_FILE, weights_only=True)
    assert last["epoch"] == 3 and last["scheduler"]["last_epoch"] == 3  # 3 epochs of lr decay, not 2
    assert load_model(result.checkpoint).dim > 0  # the final checkpoint loads


# ---------------------------------------------------------------------------------------------
# serving

# the retry window of a lost searcher node: the new replica must answer within the ingress's 30 s
# handle timeout (`raytrieval.serving.app.ServeBackend`; a request that waits longer for a replica
# gets 503), and a request may fail (503, Retry-After) only within 35 s of the loss: that wait for
# one sent just before it, or the lost replica's own requests failing when the node is declared
# dead (about 4 s here); docs/scaling.md §4 documents the same bound
SERVING_HANDLE_TIMEOUT_S = 30.0
SERVING_RETRY_WINDOW_S = 35.0
CLIENT_TIMEOUT_S = 45.0  # above the ingress's own 30 s: a client timeout means a request hung


def serving_images(folder: Path, n: int, seed: int) -> list[Path]:
    """n small PNGs of distinct smooth colour patterns (upscaled 6x6 noise): descriptors far apart."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"img{i:02d}.png")
        pattern = Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8))
        pattern.resize((64, 48), Image.BILINEAR).save(paths[-1])
    return paths


def build_small_index(folder: Path, images: list[Path]) -> Path:
    """A flat index of `images` (ids db/<i>) embedded by a fresh ModelSpec(max_size=64) model."""
    from raytrieval.retrieval.extract import extract_descriptors
    from raytrieval.retrieval.model import RetrievalNet
    from raytrieval.serving.engine import model_record
    from raytrieval.serving.index import ImageIndex, IndexConfig

    spec = ModelSpec(max_size=64)
    model = RetrievalNet(spec).eval()
    vectors = extract_descriptors(model, images, max_size=64, progress=False)
    ImageIndex.create(folder, vectors, [f"db/{i}" for i in range(len(images))], images,
                      [Image.open(p).size for p in images], config=IndexConfig(kind="flat"),
                      model=model_record(model, {"spec": spec.to_dict()}))
    return folder


def live_actor_nodes() -> dict[str, str]:
    """Name -> node id of the live named actors (Serve's controller, proxies and replicas), from
    the GCS actor table (the state API needs the dashboard, which these clusters do not start)."""
    from ray._private.state import actors

    return {a["Name"]: a["Address"]["NodeID"] for a in actors(actor_state_name="ALIVE").values() if a["Name"]}


def node_of(nodes: dict[str, str], part: str) -> str:
    """The node of the one live actor whose name contains `part`."""
    found = [node for name, node in nodes.items() if part in name]
    assert len(found) == 1, (part, nodes)
    return found[0]


def start_serving_on_workers(index: Path, port: int, monkeypatch) -> None:
    """Serve on the 3-node cluster: controller, HTTP proxy and Ingress on the head, the Embedder
    and the Searcher (1 CPU each) on the two workers, one each. The head's CPU is held while the
    app deploys and freed afterwards, so that a replacement replica has somewhere to go."""
    import ray
    from ray import serve
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raytrieval.serving import app

    @ray.remote(num_cpus=1)
    class Holder:
        def ready(self) -> bool:
            return True

    head = ray.get_runtime_context().get_node_id()
    holder = Holder.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
    ray.get(holder.ready.remote())
    monkeypatch.delenv("RAYTRIEVAL_TOKEN", raising=False)  # the app generates index/api-token
    monkeypatch.setattr(app, "Ingress", app.Ingress.options(  # 0 CPUs: it would go anywhere
        ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE_NAME: 0.001}}))
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    app.run_server(app.AppArgs(index=str(index), embedder_cpus=1, searcher_cpus=1), host="127.0.0.1", port=port)
    ray.kill(holder)


@dataclass
class Call:
    """One HTTP request: kind, when it was sent and answered (monotonic s), status (-1: no answer)."""

    kind: str
    sent: float
    done: float
    status: int


class ServingLoad:
    """Two client threads: one searching in a loop, one adding images (ids added/<i>) one by one
    without retries; `acked` holds the adds answered 201."""

    def __init__(self, base: str, auth: dict[str, str], query: bytes, images: list[bytes]) -> None:
        self.base, self.auth, self.query, self.images = base, auth, query, images
        self.calls: list[Call] = []
        self.acked: dict[str, bytes] = {}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._searches, self._adds)]

    def __enter__(self) -> "ServingLoad":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=CLIENT_TIMEOUT_S + 5)

    def _post(self, kind: str, **kwargs) -> int:
        import requests

        sent = time.monotonic()
        try:
            status = requests.post(f"{self.base}/{kind}", timeout=CLIENT_TIMEOUT_S, **kwargs).status_code
        except requests.RequestException:
            status = -1
        self.calls.append(Call(kind, sent, time.monotonic(), status))
        return status

    def _searches(self) -> None:
        while not self.stop.is_set():
            self._post("search", files={"image": ("q.png", self.query, "image/png")}, data={"k": "3"})
            time.sleep(0.05)

    def _adds(self) -> None:
        for i, data in enumerate(self.images):
            if self.stop.wait(0.1):
                return
            files = [("images", ("a.png", data, "image/png"))]
            if self._post("images", files=files, data={"image_id": f"added/{i}"}, headers=self.auth) == 201:
                self.acked[f"added/{i}"] = data

    def first(self, kind: str, status: int, sent_after: float) -> Call | None:
        """The earliest answered call of `kind` with `status` sent after a time, if any."""
        found = [c for c in list(self.calls) if c.kind == kind and c.status == status and c.sent > sent_after]
        return min(found, key=lambda c: c.done, default=None)


def wait_for(condition: Callable[[], object], timeout: float, what: str):
    """Poll `condition` every 0.1 s until it gives something true, and return that."""
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.1)
    return found


def test_node_removed_under_serving_load_keeps_acknowledged_adds(three_nodes, tmp_path, monkeypatch):
    """Searches and adds run against the Serve app while the worker node of its Searcher replica
    is removed ungracefully: a new replica answers from a surviving node, every acknowledged add
    is found by its own image at rank 1, and requests fail only with 503, only within the retry
    window after the removal and never once a search went through again."""
    import ray
    import requests
    from ray import serve

    from raytrieval.serving.app import ServeBackend

    assert ServeBackend(None, None).timeout_s == SERVING_HANDLE_TIMEOUT_S  # the window's basis
    cluster, workers = three_nodes
    index = build_small_index(tmp_path / "index", serving_images(tmp_path / "db", 8, seed=0))
    extra = [p.read_bytes() for p in serving_images(tmp_path / "extra", 40, seed=1)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    start_serving_on_workers(index, port, monkeypatch)
    try:
        head, nodes = ray.get_runtime_context().get_node_id(), live_actor_nodes()
        assert {node_of(nodes, part) for part in ("SERVE_CONTROLLER", "SERVE_PROXY", "#Ingress#")} == {head}
        gone = node_of(nodes, "#Searcher#")
        assert {gone, node_of(nodes, "#Embedder#")} == {w.node_id for w in workers}
        auth = {"Authorization": f"Bearer {(index / 'api-token').read_text().strip()}"}

        with ServingLoad(base, auth, extra[0], extra[1:]) as load:
            wait_for(lambda: len(load.acked) >= 3, 60, "3 adds acknowledged before the removal")
            cluster.remove_node(next(w for w in workers if w.node_id == gone), allow_graceful=False)
            removed_at = time.monotonic()
            new_node = wait_for(lambda: [n for name, n in live_actor_nodes().items() if "#Searcher#" in name
                                         and n != gone], 60, "a new Searcher replica")[0]
            back_at = time.monotonic()
            recovered = wait_for(lambda: load.first("search", 200, back_at), 60, "a search answered again")
            time.sleep(2)  # more load after the recovery
        calls = load.calls
        failed = [c for c in calls if c.status not in (200, 201)]
        failures = [(c.kind, c.status, round(c.sent - removed_at, 1), round(c.done - removed_at, 1)) for c in failed]
        print(f"searcher node removed: a new replica alive after {back_at - removed_at:.1f} s, the first search "
              f"answered {recovered.done - removed_at:.1f} s after the removal; {len(calls)} requests, the slowest "
              f"{max(c.done - c.sent for c in calls):.1f} s; failed (kind, status, sent, answered; s after the "
              f"removal): {failures}")

        survivors = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        assert gone not in survivors and new_node in survivors
        assert recovered.done - removed_at < SERVING_HANDLE_TIMEOUT_S
        assert all(c.status == 503 for c in failed), failures  # no other 5xx, no 4xx, no client timeout
        assert all(removed_at <= c.done <= removed_at + SERVING_RETRY_WINDOW_S for c in failed), failures
        assert not [c for c in failed if c.sent >= recovered.done], failures  # none once it answers again
        assert load.first("images", 201, recovered.done), "no add acknowledged after the recovery"

        attempted = sum(c.kind == "images" for c in calls)
        images = requests.get(f"{base}/healthz", timeout=30).json()["images"]
        assert 8 + len(load.acked) <= images <= 8 + attempted  # an unanswered add may have gone in
        for image_id, data in load.acked.items():
            r = requests.post(f"{base}/search", files={"image": ("q.png", data, "image/png")}, data={"k": "1"},
                              timeout=30)
            top = r.json()["results"][0]
            assert top["image_id"] == image_id and top["score"] > 0.99, (image_id, top)
    finally:
        serve.shutdown()
