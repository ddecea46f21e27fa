"""Node loss on a simulated 3-node Ray cluster (`ray.cluster_utils.Cluster`): no result lost or duplicated."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sceneviews import all_pairs, write_views

from raytrieval.mining.cleaning import read_matches
from raytrieval.mining.embed import EmbedWorker, embed_images
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
    """The node running an embedding actor is removed during its first chunk: every image still
    gets its descriptor, equal to one embedded in this process, and no failure is reported."""
    cluster, workers = three_nodes
    rng = np.random.default_rng(0)
    images = []
    for i in range(48):
        images.append(tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (48 + i % 5 * 4, 64, 3), dtype=np.uint8)).save(images[-1])
    log = tmp_path / "seen"
    record = node_recorder(log)

    class SlowReportingEmbedWorker(EmbedWorker):
        """Logs its node once per chunk and takes 0.3 s a chunk, so the removal lands mid-run."""

        def embed(self, chunk):
            record(str(chunk.indices[0]))
            time.sleep(0.3)
            return super().embed(chunk)

    spec = ModelSpec(max_size=64).to_dict()
    removal = remove_first_busy_worker(cluster, workers, log)
    result = embed_images(spec, images, max_size=64, workers=2, chunk_size=4, progress=False,
                          worker_cls=SlowReportingEmbedWorker)
    assert_went_on_elsewhere(log, *removal())
    assert result.failures == {}
    assert sorted(int(task) for task in started(log)) == list(range(0, 48, 4))  # every chunk ran
    reference = embed_images(spec, images, max_size=64, workers=0, progress=False)
    assert result.descriptors.shape == reference.descriptors.shape == (48, reference.descriptors.shape[1])
    np.testing.assert_allclose(np.linalg.norm(result.descriptors, axis=1), 1.0, rtol=1e-5)  # no zero row
    np.testing.assert_allclose(result.descriptors, reference.descriptors, atol=1e-5)
