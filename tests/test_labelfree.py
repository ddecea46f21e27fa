"""Label-free decisions: the serving gate and the re-ranking choice (pure), then the pipeline on
a bare folder (ukbench-56 images copied without their ground truth)."""

from __future__ import annotations

import numpy as np
import pytest

from raytrieval.evaluation.rerank import RerankConfig
from raytrieval.evaluation.selfval import describe, gate, rerank_grid, select_rerank, self_map, selfval_set


def _chains(seed: int, clusters: int = 8, length: int = 15, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Clusters that are curved chains crossing each other: descriptor neighbours along a chain
    are its own, neighbours far along it are other chains'. Diffusion over a small graph follows
    the chains; a large graph (k=20 > a chain's reach) jumps between them."""
    rng = np.random.default_rng(seed)
    points, labels = [], []
    for c in range(clusters):
        x, d = 0.3 * rng.normal(size=dim), rng.normal(size=dim)
        for _ in range(length):
            d += 0.3 * rng.normal(size=dim)
            d /= np.linalg.norm(d)
            x = x + 0.6 * d
            points.append(x + 0.15 * rng.normal(size=dim))
            labels.append(c)
    X = np.array(points) + 3.0 / np.sqrt(dim)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32), np.array(labels)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_rerank_selection_picks_the_diffusion_graph_the_ground_truth_prefers(seed):
    X, labels = _chains(seed)
    grid = rerank_grid(len(X), np.bincount(labels))
    # the truth: mAP of every setting with every image a query and its chain its positives
    truth = [self_map(X, selfval_set(labels, np.ones(len(X), bool)), cfg) for cfg in grid]
    best = grid[int(np.argmax(truth))]
    assert "diffusion" in best.steps and best.diffusion_k < 20  # the published k=20 is wrong here
    # the label-free choice sees only half of the clusters (the validation clusters)
    chosen, scores = select_rerank(X, selfval_set(labels, np.isin(labels, [0, 1, 2, 3])), grid)
    assert "diffusion" in grid[chosen].steps and grid[chosen].diffusion_k == best.diffusion_k
    assert truth[chosen] > max(truth) - 0.01 and truth[chosen] > truth[0] + 0.05
    assert scores[chosen] > scores[0]  # better than no re-ranking


def test_grid_is_narrowed_by_the_collection():
    grid = [describe(c) for c in rerank_grid(8, np.array([2, 3]))]
    assert grid[0] == "none" and "alpha_qe k=2 alpha=3" in grid and "alpha_qe k=3 alpha=0" not in grid
    assert "diffusion k=5 kq=3" in grid and not any(g.startswith("diffusion k=10") for g in grid)


def test_best_epoch_is_the_highest_self_map_the_earliest_among_equals():
    from raytrieval.trainers.loop import best_epoch

    history = [{"epoch": 0, "self_map": 0.5}, {"epoch": 1, "self_map": 0.7}, {"epoch": 2, "self_map": 0.7},
               {"epoch": 3, "self_map": 0.6}]
    assert best_epoch(history) == 1
    assert best_epoch([{"epoch": 0}, {"epoch": 1, "loss": 0.2}]) == 1  # no self-validation: the last
    assert best_epoch([{"epoch": 0, "self_map": float("nan")}, {"epoch": 1, "self_map": 0.1}]) == 1


def test_gate_serves_the_fine_tuned_model_only_with_a_margin():
    ok, why = gate(0.62, 0.60, 0.01)
    assert ok and "fine-tuned model is served" in why
    ok, why = gate(0.605, 0.60, 0.01)
    assert not ok and "off-the-shelf model is served" in why
    assert not gate(0.40, 0.60, 0.01)[0]
    assert not gate(float("nan"), 0.60, 0.01)[0]


# ------------------------------------------------------------------------------ the pipeline on a bare folder

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

UKBENCH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ukbench-56" / "jpg"
TINY = {"workers": 1, "model": {"max_size": 256}, "clean": {"k": 5, "min_inliers": 12},
        "train": {"epochs": 1, "num_queries": 12, "pool_size": 30, "num_negatives": 2, "image_size": 160,
                  "batch_size": 3, "cpus_per_worker": 1, "loss": "triplet", "lr": 1.0e-4},
        "serve": False}


def _pipeline(tmp: Path, images: Path, name: str) -> tuple[int, Path]:
    from raytrieval.cluster.cli import main

    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "run_dir": str(tmp / name), "benchmark": None}))
    return main(["pipeline", "--config", str(cfg), "--images", str(images), "--no-serve"]), tmp / name


def _copy(names: list[str], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy(UKBENCH / n, folder / n)
    return folder


@pytest.fixture(scope="module")
def bare(ray_session, tmp_path_factory):
    """ukbench-56's 56 photos in a plain folder, without its ground truth, through the pipeline."""
    if not UKBENCH.is_dir():
        pytest.skip("../shared/data/ukbench-56 is not there (see its README)")
    tmp = tmp_path_factory.mktemp("bare")
    folder = _copy(sorted(p.name for p in UKBENCH.glob("*.jpg")), tmp / "photos")
    rc, run = _pipeline(tmp, folder, "run")
    assert rc == 0
    return tmp, run


@pytest.mark.slow
def test_bare_folder_runs_to_the_index_with_label_free_decisions(bare):
    from raytrieval.mining.split import read_split
    from raytrieval.mining.tuples import read_tuples

    _, run = bare
    records = {p.stem: json.loads(p.read_text()) for p in (run / "stages").glob("*.json")}
    assert set(records) == {"ingest", "clean", "split", "mine", "train", "select", "index", "report"}  # no evaluate
    split = read_split(run / "split.parquet").to_pylist()
    val = {r["image_id"] for r in split if r["role"] == "val"}
    assert val and records["split"]["summary"]["rule"] == "split"
    used = {i for t in read_tuples(run / "tuples.parquet").to_pylist() for i in (t["query"], t["positive"], *t["negatives"])}
    assert used and not used & val  # the mine stage kept the validation clusters out
    history = records["train"]["summary"]["history"]
    assert [h["epoch"] for h in history] == [0, 1] and all(0 <= h["self_map"] <= 1 for h in history)
    from raytrieval.trainers.loop import best_epoch

    final = run / "train" / "finetune" / "final"  # the best epoch by self-mAP, with the whole history
    assert json.loads((final / "meta.json").read_text())["epoch"] == best_epoch(history)
    assert json.loads((final / "history.json").read_text()) == history
    selection = json.loads((run / "selection.json").read_text())
    assert selection["pseudo_queries"] == len(val) and selection["gate"]["why"]
    scores = [c["self_map"] for c in selection["candidates"]]
    served = [c["setting"] for c in selection["candidates"]].index(selection["rerank_setting"])
    assert selection["served_self_map"] == scores[served]
    assert served <= scores.index(max(scores))  # the one-SE rule: the best or a simpler setting
    assert json.loads((run / "index" / "selection.json").read_text()) == selection  # what the endpoint applies
    meta = json.loads((run / "index" / "meta.json").read_text())
    served_ckpt = selection["model"].get("checkpoint")
    assert (served_ckpt is not None) == selection["gate"]["serve_fine_tuned"]
    assert json.dumps(meta).count("checkpoint") >= (1 if served_ckpt else 0)
    page = (run / "report" / "index.html").read_text()
    assert "self-mAP" in page and selection["gate"]["why"] in page.replace("&gt;", ">")
    # the verified clusters are the endpoint's pseudo-landmarks, calibrated on the index
    from raytrieval.retrieval.clusters import read_clusters

    recognition = json.loads((run / "index" / "recognition.json").read_text())
    assert records["index"]["summary"]["recognition_threshold"] == recognition["threshold"]
    assert recognition["counts"]["clusters"] == len(set(read_clusters(run / "clusters.parquet").column("cluster_id").to_pylist()))


@pytest.mark.slow
def test_a_damaged_checkpoint_is_refused_by_the_gate(bare, tmp_path):
    import torch

    from raytrieval.cluster.pipeline import Pipeline, PipelineConfig, write_selection

    tmp, run = bare
    other = tmp_path / "run"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("train", "index", "mlflow.db", "report", "eval"))
    damaged = tmp_path / "damaged"
    shutil.copytree(run / "train" / "finetune" / "final", damaged)
    state = torch.load(damaged / "model.pt", weights_only=True)
    gen = torch.Generator().manual_seed(0)
    for key, value in state.items():  # shuffle the last block and the head convolution
        if key.startswith(("backbone.blocks.15.", "backbone.conv_head.")) and value.is_floating_point():
            state[key] = value.flatten()[torch.randperm(value.numel(), generator=gen)].reshape(value.shape)
    torch.save(state, damaged / "model.pt")
    pipeline = Pipeline(PipelineConfig(run_dir=str(other), benchmark=None, collection=str(tmp / "photos"), workers=1,
                                       model={"max_size": 256}))
    summary = write_selection(pipeline, damaged)
    assert summary["self_map_fine_tuned"] < summary["self_map_off_the_shelf"] - 0.05
    assert not summary["serve_fine_tuned"] and "off-the-shelf model is served" in summary["why"]
    assert "spec" in json.loads((other / "selection.json").read_text())["model"]


@pytest.mark.slow
def test_the_endpoint_search_applies_the_selected_reranking(bare, tmp_path):
    from raytrieval.serving.engine import SearchOptions, search_images
    from raytrieval.serving.index import ImageIndex

    _, run = bare
    shutil.copytree(run / "index", tmp_path / "index")
    chosen = {"diffusion": True, "diffusion_k": 5, "diffusion_kq": 3, "shortlist": 100}
    selection = json.loads((tmp_path / "index" / "selection.json").read_text())
    (tmp_path / "index" / "selection.json").write_text(json.dumps({**selection, "serving": chosen}))
    index = ImageIndex.open(tmp_path / "index")
    q = index.vectors(np.array([7]))[0]
    plain = ImageIndex.open(run / "index")
    default = [h["image_id"] for h in search_images(index, q, SearchOptions(k=10))]
    explicit = [h["image_id"] for h in search_images(plain, q, SearchOptions(k=10, **chosen))]
    assert default == explicit
    if not json.loads((run / "index" / "selection.json").read_text())["serving"]:
        unranked = [h["image_id"] for h in search_images(plain, q, SearchOptions(k=10))]
        assert unranked == [plain.record(int(i))["image_id"] for i in plain.search(q[None], 10)[1][0]]


@pytest.mark.slow
@pytest.mark.parametrize("case, names, rule", [
    ("no-cluster", ["ukbench00000.jpg", "ukbench00004.jpg", "ukbench00008.jpg", "ukbench00012.jpg"], "none"),
    ("one-cluster", ["ukbench00000.jpg", "ukbench00001.jpg", "ukbench00002.jpg", "ukbench00008.jpg"], "validate-only"),
])
def test_too_few_verified_clusters_serve_the_off_the_shelf_model(ray_session, tmp_path, case, names, rule, capsys):
    if not UKBENCH.is_dir():
        pytest.skip("../shared/data/ukbench-56 is not there")
    rc, run = _pipeline(tmp_path, _copy(names, tmp_path / "photos"), case)
    assert rc == 0
    out = capsys.readouterr().out
    split = json.loads((run / "split.json").read_text())
    assert split["rule"] == rule and "no fine-tuning" in split["message"] and split["message"] in out
    train = json.loads((run / "stages" / "train.json").read_text())["summary"]
    assert "skipped" in train and not (run / "train").exists()
    selection = json.loads((run / "selection.json").read_text())
    assert not selection["gate"]["serve_fine_tuned"] and "spec" in selection["model"]
    assert (selection["pseudo_queries"] > 0) == (rule == "validate-only")
    if rule == "none":
        assert selection["serving"] == {} and selection["rerank_setting"] == "none"
    from raytrieval.serving.index import ImageIndex

    assert len(ImageIndex.open(run / "index")) == len(names)  # the whole collection is searchable
    assert (run / "report" / "index.html").is_file()
    index_summary = json.loads((run / "stages" / "index.json").read_text())["summary"]
    assert index_summary["recognition_threshold"] is None and not (run / "index" / "recognition.json").exists()


@pytest.mark.parametrize("files", [{"a.jpg": b"not an image", "b.png": b"\x89PNG broken"}, {"one.jpg": None}])
def test_unusable_collections_get_a_clear_message(tmp_path, files, capsys):
    from raytrieval.cluster.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    for name, data in files.items():
        if data is None:
            shutil.copy(UKBENCH / "ukbench00000.jpg", folder / name) if UKBENCH.is_dir() else pytest.skip("no ukbench")
        else:
            (folder / name).write_bytes(data)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "run_dir": str(tmp_path / "run"), "benchmark": None}))
    assert main(["pipeline", "--config", str(cfg), "--images", str(folder), "--no-serve"]) == 2
    err = capsys.readouterr().err
    assert "collection:" in err and "decodable image" in err and "at least 2" in err


@pytest.mark.parametrize("aps, expected", [
    # a consistent gain of 10 points on every query: the best setting is chosen
    ([[0.5, 0.6, 0.7, 0.4], [0.6, 0.7, 0.8, 0.5], [0.55, 0.65, 0.75, 0.45]], 1),
    # +1.25 points on average, but +25 on one query and -7 on the others: noise, plain search stays
    ([[0.5, 0.6, 0.7, 0.4], [0.75, 0.53, 0.63, 0.33], [0.5, 0.6, 0.7, 0.4]], 0),
    # settings 1 and 2 both beat plain; 1 is 0.5 points below 2 with a deficit SE of 0.9 points
    ([[0.3, 0.3, 0.3, 0.3], [0.60, 0.61, 0.59, 0.60], [0.62, 0.60, 0.61, 0.59]], 1),
    # the same but 2 beats 1 on every query: 2 is chosen
    ([[0.3, 0.3, 0.3, 0.3], [0.60, 0.61, 0.59, 0.60], [0.61, 0.62, 0.60, 0.61]], 2),
])
def test_rerank_selection_is_the_simplest_within_one_standard_error(monkeypatch, aps, expected):
    import raytrieval.evaluation.selfval as selfval

    table = iter(np.array(aps))
    monkeypatch.setattr(selfval, "self_aps", lambda *_: next(table))
    grid = [RerankConfig(), RerankConfig(steps=("alpha_qe",)), RerankConfig(steps=("diffusion",))]
    sv = selfval_set(np.repeat([0, 1], 2), np.ones(4, bool))
    chosen, scores = select_rerank(np.zeros((4, 2), np.float32), sv, grid)
    assert chosen == expected
    assert scores == pytest.approx(np.mean(aps, axis=1))
    # by hand: deficit to the best, its standard error, the earliest within it
    best = int(np.argmax(np.mean(aps, axis=1)))
    deficit = np.array(aps[best]) - np.array(aps)
    within = [d.mean() <= d.std(ddof=1) / 2 + 1e-12 for d in deficit]
    assert within.index(True) == expected
