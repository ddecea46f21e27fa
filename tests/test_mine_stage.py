"""The clean and mine stages end to end on a tiny collection, through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data as skdata

from raytrieval.cluster.cli import main
from raytrieval.mining.cleaning import read_clusters, read_matches
from raytrieval.mining.stages import CleanConfig, MineConfig, clean, mine, read_descriptors
from raytrieval.mining.tuples import TUPLES_SCHEMA, read_tuples
from raytrieval.retrieval.manifest import build_manifest, write_manifest
from sceneviews import SCENES, view_of

MODEL = ["--max-size", "96"]
SPEC = {"max_size": 96, "pooling_kwargs": {"p": 3.0}}  # what the CLI builds from MODEL


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """3 scenes x 3 views, 2 unrelated photos, a broken file; its manifest in a run dir."""
    root = tmp_path_factory.mktemp("photos")
    for scene, load in SCENES.items():
        base = np.asarray(Image.fromarray(load()).resize((320, 240)))
        for v in range(3):
            Image.fromarray(view_of(base, v)).save(root / f"{scene}_{v}.png")
    Image.fromarray(np.asarray(Image.fromarray(skdata.rocket()).resize((320, 240)))).save(root / "rocket.png")
    Image.fromarray(skdata.coins()).save(root / "coins.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    run = tmp_path_factory.mktemp("run")
    write_manifest(build_manifest(root, progress=False), run / "images.parquet")
    return root, run


def _scene(image_id: str) -> str:
    return image_id.split("_")[0]


def test_clean_and_mine_through_the_cli(collection):
    root, run = collection
    assert main(["clean", "--manifest", str(run / "images.parquet"), "--run-dir", str(run), "--workers", "0",
                 "--k", "4", *MODEL]) == 0
    record = json.loads((run / "clean.json").read_text())
    assert record["skipped"] == {"broken": "not an image"} and record["counts"]["images"] == 11
    ids, X, _ = read_descriptors(run / "descriptors.parquet")
    assert "broken" not in ids and X.shape == (11, 1280) and X.dtype == np.float32
    assert pq.read_table(run / "knn.parquet").num_rows == 11 * 4
    matches = read_matches(run / "matches.parquet")
    pairs = list(zip(matches.column("a").to_pylist(), matches.column("b").to_pylist()))
    assert len(pairs) == len(set(pairs)) == record["counts"]["candidate_pairs"] and all(a < b for a, b in pairs)
    clusters = read_clusters(run / "clusters.parquet")
    groups: dict[int, set[str]] = {}
    for image_id, c in zip(clusters.column("image_id").to_pylist(), clusters.column("cluster_id").to_pylist()):
        groups.setdefault(c, set()).add(image_id)
    assert sorted(map(sorted, groups.values())) == [[f"{s}_{v}" for v in range(3)] for s in sorted(SCENES)]
    for box in clusters.column("box").to_pylist():
        assert box is not None and 0 <= box[0] < box[2] <= 320 and 0 <= box[1] < box[3] <= 240

    for method in ("sfm", "hardneg", "manifold"):
        extra = {  # 11 images: small neighbourhoods
            "sfm": ["--exclude-knn", "1"], "hardneg": ["--exclude-knn", "0"],
            "manifold": ["--k", "4", "--k-euclidean", "4", "--k-manifold", "4"],
        }[method]
        assert main(["mine", "--method", method, "--run-dir", str(run), "--num-negatives", "2", *extra]) == 0
        tuples = read_tuples(run / "tuples.parquet")
        assert tuples.schema.remove_metadata().equals(TUPLES_SCHEMA)
        assert set(tuples.column("source").to_pylist()) == {method} and tuples.num_rows > 0
        for row in tuples.to_pylist():
            negs = row["negatives"]
            if method != "manifold":  # from the clusters: all 9 views are queries
                assert _scene(row["positive"]) == _scene(row["query"]) and len(negs) == 2
                assert all(_scene(n) != _scene(row["query"]) for n in negs)
                assert len({_scene(n) if n in groups_ids(groups) else n for n in negs}) == 2
        if method != "manifold":
            assert tuples.num_rows == 9


def groups_ids(groups):
    return set().union(*groups.values())


def test_stage_reuses_current_artifacts_and_matches_the_ray_run(collection, ray_session, tmp_path):
    root, run = collection
    if not (run / "matches.parquet").is_file():
        pytest.skip("runs after the CLI test")
    before = read_matches(run / "matches.parquet")
    record = clean(CleanConfig(run_dir=str(run), k=4, workers=0, model=SPEC, progress=False))
    assert record["timings"]["embed_reused"] == 1.0 and record["timings"]["verify_reused"] == 1.0
    assert record["skipped"] == {"broken": "not an image"}
    # the same stage through Ray actors (embedding and verification) gives the same artifacts
    other = tmp_path / "ray-run"
    other.mkdir()
    (other / "images.parquet").write_bytes((run / "images.parquet").read_bytes())
    record = clean(CleanConfig(run_dir=str(other), k=4, workers=2, model=SPEC, progress=False))
    assert record["skipped"] == {"broken": "not an image"}
    _, X0, _ = read_descriptors(run / "descriptors.parquet")
    _, X1, _ = read_descriptors(other / "descriptors.parquet")
    np.testing.assert_allclose(X0, X1, atol=1e-5)
    after = read_matches(other / "matches.parquet")
    assert after.column("a").to_pylist() == before.column("a").to_pylist()
    assert after.column("b").to_pylist() == before.column("b").to_pylist()
    assert read_clusters(other / "clusters.parquet").equals(read_clusters(run / "clusters.parquet"))
    rec = mine(MineConfig(run_dir=str(other), method="hardneg", num_negatives=3, epoch=2, exclude_knn=2))
    assert rec["counts"]["tuples"] == 9
    assert set(read_tuples(other / "tuples.parquet").column("epoch").to_pylist()) == {2}


def test_mine_needs_the_clean_stage(tmp_path):
    assert main(["mine", "--method", "sfm", "--run-dir", str(tmp_path)]) == 2
    with pytest.raises(ValueError, match="method"):
        MineConfig(run_dir=str(tmp_path), method="nope")


@pytest.mark.parametrize("method, positive", [("hardneg", "random"), ("sfm", "descriptor"), ("hardneg", "inliers")])
def test_mine_stage_tuples_are_the_trainers_epoch_0_tuples(collection, tmp_path, method, positive):
    """One tuple builder: the mine stage (epoch 0) and the trainer's re-mining agree for the same
    seed and descriptors, and both keep the split's validation cluster out of every tuple."""
    import shutil

    from raytrieval.mining.split import SplitConfig, split_stage, validation_ids
    from raytrieval.mining.tuples import build_tuples, plan_epoch
    from raytrieval.trainers.config import TrainConfig
    from raytrieval.trainers.data import load_training_set

    root, run = collection
    if not (run / "clusters.parquet").is_file():
        pytest.skip("runs after the CLI test")
    for name in ("images.parquet", "descriptors.parquet", "knn.parquet", "matches.parquet", "clusters.parquet"):
        shutil.copy(run / name, tmp_path / name)
    split_stage(SplitConfig(run_dir=str(tmp_path), fraction=0.3, seed=1))
    held = validation_ids(tmp_path / "split.parquet")
    assert len(held) == 3
    mine(MineConfig(run_dir=str(tmp_path), method=method, positive=positive, num_negatives=2, exclude_knn=2,
                    num_queries=50, pool_size=40, seed=5))
    mined = [(r["query"], r["positive"], r["negatives"]) for r in read_tuples(tmp_path / "tuples.parquet").to_pylist()]
    assert mined and not held & {i for q, p, negs in mined for i in (q, p, *negs)}

    if positive == "inliers":  # a rule of the mine stage only: the trainer has no match graph
        return
    cfg = TrainConfig(manifest=str(tmp_path / "images.parquet"), clusters=str(tmp_path / "clusters.parquet"),
                      knn=str(tmp_path / "knn.parquet"), exclude_knn=2, split=str(tmp_path / "split.parquet"),
                      positive=positive, num_negatives=2, num_queries=50, pool_size=40, seed=5)
    ts = load_training_set(cfg)
    ids, X, _ = read_descriptors(tmp_path / "descriptors.parquet")
    X = X[[ids.index(i) for i in ts.ids]]
    rules = cfg.tuple_rules()
    if method == "sfm":
        rules.negatives = "random"
    plan = plan_epoch(ts, rules, 0)
    rows = build_tuples(ts, rules, plan, X[plan.embed], 0)
    trained = [(ts.ids[q], ts.ids[p], [ts.ids[n] for n in negs if n >= 0]) for q, p, *negs in rows]
    assert trained == mined
