"""The verification actor pool: complete, duplicate-free matches.parquet, even when an actor dies."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from sceneviews import all_pairs, write_views

from raytrieval.mining.cleaning import MATCHES_SCHEMA, read_matches
from raytrieval.mining.verify import PairVerifier, VerifyConfig, locality_order, make_tasks, read_fingerprint, verify_pairs

@pytest.fixture(scope="module")
def views(tmp_path_factory):
    """3 scenes x 3 views, about 300 px, as files: id -> path, and id -> scene."""
    return write_views(tmp_path_factory.mktemp("views"))


def test_make_tasks_dedups_and_carries_paths(views):
    paths, _ = views
    pairs = all_pairs(paths)
    tasks = make_tasks(pairs + pairs[:3], paths, pairs_per_task=5, order="given")
    flat = [(a, b) for t in tasks for a, _, b, _ in t.pairs]
    assert flat == pairs and [t.index for t in tasks] == list(range(len(tasks)))
    local = [(a, b) for t in make_tasks(pairs[::-1], paths, pairs_per_task=5) for a, _, b, _ in t.pairs]
    assert sorted(local) == pairs  # the same pairs, as given (a, b), in another order
    assert all(pa == paths[a] and pb == paths[b] for t in tasks for a, pa, b, pb in t.pairs)
    with pytest.raises(ValueError, match="paths"):
        make_tasks([("astronaut_0", "nope")], paths)


def test_in_process_verification_finds_the_scenes(views, tmp_path):
    paths, scene_of = views
    pairs = all_pairs(paths)
    out = tmp_path / "matches.parquet"
    res = verify_pairs(pairs, paths, out, VerifyConfig(max_features=500), workers=0, fingerprint="abc", progress=False)
    assert res.pairs == len(pairs) and res.failures == {}
    assert res.extracted == len(paths)  # every image described once: the cache works
    table = read_matches(out)
    assert read_fingerprint(out) == "abc" and pq.read_schema(out).remove_metadata().equals(MATCHES_SCHEMA)
    for row in table.to_pylist():
        same = scene_of[row["a"]] == scene_of[row["b"]]
        assert (row["inliers"] >= 30) == same, row
        if same:
            assert row["model"] == "homography" and len(row["box_a"]) == 4
            x0, y0, x1, y1 = row["box_a"]
            assert 0 <= x0 < x1 <= 320 and 0 <= y0 < y1 <= 300
    empty = verify_pairs([], {}, tmp_path / "empty.parquet", workers=2, progress=False)  # no actor needed
    assert empty.pairs == 0 and read_matches(tmp_path / "empty.parquet").num_rows == 0


@pytest.mark.parametrize("max_restarts", [1, 0])  # 0: Ray does not restart it, a fresh actor takes over
def test_actor_killed_mid_run_loses_and_duplicates_nothing(ray_session, views, tmp_path, max_restarts):
    paths, scene_of = views
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    paths = {**paths, "broken": str(bad)}
    pairs = all_pairs(paths)
    marker = tmp_path / "crashed-once"

    class CrashOnce(PairVerifier):
        """Dies (os._exit, no cleanup) the first time it meets task 3."""

        def verify(self, task):
            if task.index == 3 and not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)
            return super().verify(task)

    out = tmp_path / "matches.parquet"
    res = verify_pairs(
        pairs, paths, out, VerifyConfig(max_features=500), workers=2, pairs_per_task=4,
        max_restarts=max_restarts, max_task_retries=1, cpus_per_worker=1, verifier_cls=CrashOnce, progress=False,
    )
    assert marker.exists()  # the actor really died once
    assert res.failures == {"broken": "not an image"}
    good = [p for p in pairs if "broken" not in p]
    table = read_matches(out)
    got = list(zip(table.column("a").to_pylist(), table.column("b").to_pylist()))
    assert len(got) == len(set(got)) == res.pairs == len(good)  # no duplicates
    assert set(got) == set(good)  # nothing missing
    for row in table.to_pylist():
        assert (row["inliers"] >= 30) == (scene_of[row["a"]] == scene_of[row["b"]]), row
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]  # no temporary left behind


def test_locality_order_narrows_the_image_window():
    """A ring of 60 images shuffled: in locality order each run of 10 pairs touches few images."""
    rng = np.random.default_rng(0)
    names = [f"im{i:02d}" for i in rng.permutation(60)]
    ring = [(names[i], names[(i + 1) % 60]) for i in range(60)] + [(names[i], names[(i + 2) % 60]) for i in range(60)]
    shuffled = [ring[i] for i in rng.permutation(len(ring))]
    ordered = locality_order(shuffled)
    assert sorted(ordered) == sorted(shuffled)

    def window(ps):
        return max(len({x for p in ps[s : s + 10] for x in p}) for s in range(0, len(ps), 10))

    assert window(ordered) <= 12 < window(shuffled)
