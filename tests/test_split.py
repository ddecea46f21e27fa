"""The split stage: whole clusters held out, seeded, with a stated rule for too few clusters."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raytrieval.mining.cleaning import clusters_table, write_clusters
from raytrieval.mining.split import SplitConfig, read_split, split_clusters, split_stage, validation_ids


def test_split_holds_out_whole_clusters_seeded():
    cids = np.repeat(np.arange(10), 3)
    val, rule, message = split_clusters(cids, 0.3, seed=0)
    assert rule == "split" and "3 of 10 verified clusters (9 of 30" in message
    held = set(cids[val])
    assert len(held) == 3 and all(val[cids == c].all() for c in held) and not val[~np.isin(cids, list(held))].any()
    assert np.array_equal(split_clusters(cids, 0.3, seed=0)[0], val)
    assert any(not np.array_equal(split_clusters(cids, 0.3, seed=s)[0], val) for s in range(1, 5))
    # three clusters: one validates, two train (training needs negatives from another cluster)
    val, rule, _ = split_clusters(np.repeat(np.arange(3), 2), 0.9, seed=0)
    assert rule == "split" and len(set(np.repeat(np.arange(3), 2)[val])) == 1


def test_a_large_cluster_does_not_take_the_training_pairs():
    cids = np.r_[np.zeros(60, np.int64), np.repeat(np.arange(1, 21), 2)]  # one cluster of 60, twenty of 2
    for seed in range(10):
        val, _, _ = split_clusters(cids, 0.3, seed=seed)
        assert 0 < val.sum() <= 0.3 * cids.size and not val[:60].any()
    # nothing fits the budget: the smallest cluster validates
    val, _, message = split_clusters(np.r_[np.zeros(10), np.ones(10), np.full(3, 2)].astype(np.int64), 0.1, seed=0)
    assert val.tolist() == [False] * 20 + [True] * 3 and "1 of 3" in message


@pytest.mark.parametrize("cids, rule", [([], "none"), ([0, 0], "validate-only"), ([0, 0, 1, 1], "validate-only")])
def test_too_few_clusters_state_their_rule(cids, rule):
    val, got, message = split_clusters(np.array(cids, np.int64), 0.3, seed=0)
    assert got == rule and "no fine-tuning" in message
    assert val.all() if cids else val.size == 0


def test_stage_writes_the_artifact(tmp_path):
    ids = [f"img{i}" for i in range(12)]
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 3, 3, -1, -1, 4])
    labels[11] = 4
    labels[10] = 4
    write_clusters(clusters_table(ids, labels), tmp_path / "clusters.parquet")
    record = split_stage(SplitConfig(run_dir=str(tmp_path), fraction=0.4, seed=3))
    table = read_split(tmp_path / "split.parquet")
    assert table.num_rows == 11 and record["rule"] == "split" and record["counts"]["val_clusters"] == 2
    assert json.loads((tmp_path / "split.json").read_text())["counts"] == record["counts"]
    val = validation_ids(tmp_path / "split.parquet")
    by_cluster = {}
    for i, c, r in zip(*(table.column(n).to_pylist() for n in ("image_id", "cluster_id", "role"))):
        by_cluster.setdefault(c, set()).add(r)
    assert all(len(r) == 1 for r in by_cluster.values()) and len(val) == record["counts"]["val_images"]
    with pytest.raises(ValueError, match="fraction"):
        SplitConfig(run_dir=str(tmp_path), fraction=1.0)
    with pytest.raises(FileNotFoundError, match="clean"):
        split_stage(SplitConfig(run_dir=str(tmp_path / "nothing")))
