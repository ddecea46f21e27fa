"""Node loss on a simulated 3-node Ray cluster (`ray.cluster_utils.Cluster`): no result lost or duplicated."""

from __future__ import annotations

import threading
import time

import pytest
from sceneviews import all_pairs, write_views

from raytrieval.mining.cleaning import read_matches
from raytrieval.mining.verify import PairVerifier, VerifyConfig, verify_pairs

# a dead raylet is noticed after about 1.5 s instead of Ray's default 30 s
FAST_HEALTH_CHECK = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}


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


def test_node_removed_during_cleaning_loses_and_duplicates_no_pair(three_nodes, tmp_path):
    """The node running a verification actor is removed after its first task: the actor restarts
    on a surviving node, and matches.parquet holds every pair exactly once, as in one process."""
    cluster, workers = three_nodes
    paths, scene_of = write_views(tmp_path)
    pairs = all_pairs(paths)
    seen = tmp_path / "seen"
    seen.mkdir()

    class SlowReportingVerifier(PairVerifier):
        """Writes its node id once per task and takes 0.4 s a task, so the removal lands mid-run."""

        def verify(self, task):
            import ray

            (seen / f"{task.index}").write_text(f"{ray.get_runtime_context().get_node_id()} {time.time()}")
            time.sleep(0.4)
            return super().verify(task)

    removed: list[tuple[str, float]] = []

    def remove_a_busy_worker() -> None:
        ids = {node.node_id: node for node in workers}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not removed:
            for f in seen.iterdir():
                node_id = f.read_text().split()[0]
                if node_id in ids:
                    cluster.remove_node(ids[node_id], allow_graceful=False)
                    removed.append((node_id, time.time()))
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=remove_a_busy_worker, daemon=True)
    killer.start()
    config = VerifyConfig(max_features=500)
    out = tmp_path / "matches.parquet"
    res = verify_pairs(
        pairs, paths, out, config, workers=2, pairs_per_task=2, max_restarts=3, max_task_retries=3,
        cpus_per_worker=1, verifier_cls=SlowReportingVerifier, progress=False,
    )
    killer.join(timeout=5)
    assert removed, "no verification actor ran on a worker node"
    [(gone, at)] = removed
    started = [f.read_text().split() for f in seen.iterdir()]
    later = [node for node, t in started if float(t) > at]
    assert later and gone not in later  # the run went on after the removal, on the other nodes
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
