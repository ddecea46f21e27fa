"""CS-SR (class-specific spatial re-ranking): a box classifier over pseudo-landmarks, trained label-free.

Synthetic scenes: two objects (a cat, a coffee cup) pasted at random places and sizes onto crops
of natural textures; the "clusters" are the object identities, the verified boxes the pasted ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raytrieval.evaluation.rerank import ImageAccess, RerankConfig, rerank
from raytrieval.retrieval.cssr import (
    BoxClassifier, BoxClassifierConfig, box_iou, cssr_rerank, fit_box_classifier, load_box_classifier,
    train_box_classifier,
)
from raytrieval.retrieval.region import RegionSet, casr_rerank, proposal_descriptors

sys.path.insert(0, str(Path(__file__).parent))

SIZE = 256  # images and max_size
CAT, CUP = 7, 3  # cluster ids (not 0..C-1 on purpose)


def _objects():
    from skimage import data

    return {CAT: Image.fromarray(data.chelsea()).crop((100, 0, 400, 300)),
            CUP: Image.fromarray(data.coffee()).crop((150, 0, 550, 400))}


def _backgrounds():
    from skimage import data

    return [np.asarray(Image.fromarray(a).convert("RGB"))
            for a in (data.rocket(), data.brick(), data.grass(), data.gravel(), data.camera(), data.hubble_deep_field())]


def scene(rng: np.random.Generator, obj: Image.Image, backgrounds: list[np.ndarray]) -> tuple[Image.Image, np.ndarray]:
    """(image, pasted box) of one object on a random texture crop."""
    bg = backgrounds[rng.integers(len(backgrounds))]
    y, x = rng.integers(0, bg.shape[0] - SIZE), rng.integers(0, bg.shape[1] - SIZE)
    canvas = Image.fromarray(bg[y : y + SIZE, x : x + SIZE].copy())
    s = int(rng.integers(100, 150))
    ox, oy = int(rng.integers(0, SIZE - s)), int(rng.integers(0, SIZE - s))
    canvas.paste(obj.resize((s, s)), (ox, oy))
    return canvas, np.array([ox, oy, ox + s, oy + s], np.float32)


def whole(model, img: Image.Image) -> np.ndarray:
    """A query box: the image pooled as one proposal (as `benchmark_access` pools a query crop)."""
    return proposal_descriptors(model, img, np.array([[0, 0, *img.size]], np.float32), SIZE).descriptors[0]


@pytest.fixture(scope="module")
def world():
    from skimage import data

    from raytrieval.retrieval.model import build_model

    torch.set_num_threads(2)
    model = build_model()
    objects, backgrounds = _objects(), _backgrounds()
    rng = np.random.default_rng(0)
    train = [(scene(rng, objects[c], backgrounds), c) for c in (CAT, CUP) for _ in range(5)]
    clf = train_box_classifier(model, [im for (im, _), _ in train], [c for _, c in train],
                               np.stack([b for (_, b), _ in train]), config=BoxClassifierConfig(max_size=SIZE))
    rng = np.random.default_rng(1)
    held = [(scene(rng, objects[c], backgrounds), c) for c in (CAT, CUP, CAT, CUP, CAT, CUP)]
    sets = [proposal_descriptors(model, im, None, SIZE) for (im, _), _ in held]
    queries = {"cat": whole(model, objects[CAT].resize((120, 120))),
               "cup": whole(model, objects[CUP].resize((120, 120))),
               "astronaut": whole(model, Image.fromarray(data.astronaut()).crop((150, 50, 350, 250)).resize((120, 120))),
               "coins": whole(model, Image.fromarray(data.coins()).convert("RGB").resize((120, 120)))}
    return model, clf, held, sets, queries


def test_classifier_separates_the_classes_from_background(world):
    model, clf, held, sets, queries = world
    assert clf.classes == (CUP, CAT) and clf.background == 2
    bg_right = []
    for ((im, box), c), rs in zip(held, sets):
        p = clf.predict_proba(proposal_descriptors(model, im, box[None], SIZE).descriptors)[0]
        assert int(np.argmax(p)) == clf.class_index(c) and p.max() > 0.8, (c, p)
        far = box_iou(rs.boxes, box)[:, 0] == 0  # proposals that miss the object
        bg_right.append((clf.predict_proba(rs.descriptors[far]).argmax(1) == clf.background).mean())
    assert np.mean(bg_right) > 0.8, bg_right
    for name, c in (("cat", CAT), ("cup", CUP)):
        p = clf.predict_proba(queries[name][None])[0]
        assert int(np.argmax(p)) == clf.class_index(c) and p.max() > 0.9, (name, p)
    np.testing.assert_allclose(clf.predict_proba(sets[0].descriptors).sum(1), 1.0, rtol=1e-5)


def test_cssr_ranks_the_query_class_first_and_localises(world):
    _, clf, held, sets, queries = world
    ranks_row = np.arange(len(held))
    for name, c in (("cat", CAT), ("cup", CUP)):
        res = cssr_rerank(queries[name], sets, ranks_row, len(held), clf)
        assert not res.fell_back
        top = res.ranks[:3].tolist()
        assert sorted(top) == sorted(i for i, (_, ci) in enumerate(held) if ci == c), (name, res.ranks)
        assert res.scores[2] > res.scores[3] and res.scores[0] > 0.5
        ious = [float(box_iou(b, held[i][0][1])[0, 0]) for i, b in zip(top, res.boxes)]
        assert ious[0] > 0.5 and np.mean(ious) > 0.5, (name, ious)
    # the score is the best proposal's probability of the query class (brute force)
    k = clf.class_index(CAT)
    res = cssr_rerank(queries["cat"], sets, ranks_row, len(held), clf)
    expected = [max(clf.predict_proba(rs.descriptors)[:, k]) for rs in sets]
    np.testing.assert_allclose(res.scores, np.array(expected)[res.ranks[: len(held)]], rtol=1e-5)
    # with query expansion after re-ranking the class still leads
    expand = lambda q, found: (q + found[0]) / np.linalg.norm(q + found[0])  # noqa: E731
    res = cssr_rerank(queries["cat"], sets, ranks_row, len(held), clf, qe=expand)
    assert held[res.ranks[0]][1] == CAT and not res.fell_back


def test_unknown_queries_fall_back_to_casr(world):
    _, clf, held, sets, queries = world
    ranks_row = np.arange(len(held))
    for name in ("astronaut", "coins"):
        res = cssr_rerank(queries[name], sets, ranks_row, len(held), clf)
        assert res.fell_back, (name, clf.predict_proba(queries[name][None]))
        new, scores, boxes = casr_rerank(queries[name], sets, ranks_row, len(held))
        assert res.ranks.tolist() == new.tolist()
        np.testing.assert_array_equal(res.scores, scores)
        np.testing.assert_array_equal(res.boxes, boxes)
    # a known query below the confidence asked for falls back too
    assert cssr_rerank(queries["cat"], sets, ranks_row, len(held), clf, min_confidence=1.0).fell_back


def test_save_load_round_trip_and_refusals(world, tmp_path):
    _, clf, _, sets, _ = world
    path = clf.save(tmp_path / "box_classifier.pt")
    back = load_box_classifier(path)
    assert back.classes == clf.classes and back.pool == clf.pool == "sum"
    assert back.meta["examples"] == clf.meta["examples"]
    np.testing.assert_array_equal(back.predict_proba(sets[0].descriptors), clf.predict_proba(sets[0].descriptors))
    (tmp_path / "notes.txt").write_text("not a classifier")
    torch.save({"weight": torch.zeros(3, 4)}, tmp_path / "state.pt")
    torch.save(torch.nn.Linear(4, 3).state_dict(), tmp_path / "model.pt")
    for name in ("notes.txt", "state.pt", "model.pt"):
        with pytest.raises(ValueError, match="not a box classifier"):
            load_box_classifier(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        load_box_classifier(tmp_path / "missing.pt")


def _toy_classifier(rng: np.random.Generator, dim: int = 8) -> tuple[BoxClassifier, np.ndarray]:
    unit = lambda a: (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    centres = unit(rng.normal(size=(3, dim)))
    X = unit(np.repeat(centres, 40, 0) + 0.3 * rng.normal(size=(120, dim)))
    return fit_box_classifier(X, np.repeat([0, 1, 2], 40), [5, 9], BoxClassifierConfig(steps=100)), centres


def test_cssr_step_matches_direct_calls(tmp_path):
    rng = np.random.default_rng(2)
    clf, centres = _toy_classifier(rng)
    path = clf.save(tmp_path / "clf.pt")
    unit = lambda a: (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    X = unit(rng.normal(size=(10, 8)))
    Q = unit(rng.normal(size=(3, 8)))
    props = [RegionSet(unit(np.vstack([rng.normal(size=(4, 8)), centres[i % 3] + 0.1 * rng.normal(size=(1, 8))])),
                       rng.uniform(0, 50, (5, 4)).astype(np.float32)) for i in range(10)]
    qreg = np.stack([centres[0], centres[1], unit(rng.normal(size=8))])  # class 5, class 9, likely unknown
    access = ImageAccess(query_region=lambda q: qreg[q], db_proposals=lambda i: props[i])
    for steps in (("cssr",), ("cssr", "aqe")):
        cfg = RerankConfig(steps=steps, casr_top=6, box_classifier=str(path))
        res = rerank(cfg, Q, X, access)
        qe = None
        if "aqe" in steps:
            qe = lambda q, found: (q + found[:2].sum(0)) / np.linalg.norm(q + found[:2].sum(0))  # noqa: E731
        fell = 0
        for q in range(3):
            filtering = np.argsort(-(X @ Q[q]), kind="stable")
            direct = cssr_rerank(qreg[q], [props[i] for i in filtering[:6]], filtering, 6, clf, qe=qe)
            fell += direct.fell_back
            assert res.ranks[q].tolist() == direct.ranks.tolist()
            assert res.boxes[q] == {int(i): tuple(float(v) for v in b) for i, b in zip(direct.ranks, direct.boxes)}
        assert res.counts == {"cssr_fallback": fell} and set(res.ms_per_query) == {"search", "cssr"}
    assert not cssr_rerank(qreg[0], props[:6], np.arange(10), 6, clf).fell_back  # class 5's centre


def test_cssr_config_checks(tmp_path):
    with pytest.raises(ValueError, match="box_classifier"):
        RerankConfig(steps=("cssr",))
    with pytest.raises(ValueError, match="one of 'casr' and 'cssr'"):
        RerankConfig(steps=("casr", "cssr"), box_classifier="x.pt")
    with pytest.raises(ValueError, match="cssr_min_confidence"):
        RerankConfig(cssr_min_confidence=1.5)
    clf, _ = _toy_classifier(np.random.default_rng(3))
    path = clf.save(tmp_path / "clf.pt")
    x = np.eye(8, dtype=np.float32)
    access = ImageAccess(query_region=lambda q: x[q], db_proposals=lambda i: RegionSet(x[i : i + 1], np.ones((1, 4))))
    with pytest.raises(ValueError, match="casr_pool"):
        rerank(RerankConfig(steps=("cssr",), box_classifier=str(path), casr_pool="max"), x[:1], x, access)
    with pytest.raises(ValueError, match="needs query_region"):
        rerank(RerankConfig(steps=("cssr",), box_classifier=str(path)), x[:1], x)


def test_box_classifier_cli_trains_from_a_run_directory(tmp_path):
    from raytrieval.cluster.cli import main
    from raytrieval.retrieval.clusters import write_clusters
    from raytrieval.retrieval.manifest import build_manifest, write_manifest
    from raytrieval.mining.cleaning import clusters_table

    objects, backgrounds = _objects(), _backgrounds()
    rng = np.random.default_rng(4)
    folder = tmp_path / "run" / "jpg"
    folder.mkdir(parents=True)
    labels, boxes = [], []
    for i, c in enumerate((CAT, CUP, CAT, CUP, CAT)):
        img, box = scene(rng, objects[c], backgrounds)
        img.save(folder / f"im{i}.png")
        labels.append(c)
        boxes.append(box)
    Image.fromarray(backgrounds[0][:SIZE, :SIZE]).save(folder / "unclustered.png")
    run = tmp_path / "run"
    manifest = build_manifest(folder, progress=False)
    write_manifest(manifest, run / "images.parquet")
    boxes[-1] = np.full(4, np.nan, np.float32)  # a clustered image without a box is skipped
    write_clusters(clusters_table([f"im{i}" for i in range(5)], np.array(labels), np.stack(boxes)),
                   run / "clusters.parquet")
    assert main(["box-classifier", "--run-dir", str(run), "--max-size", "128", "--steps", "50"]) == 0
    clf = load_box_classifier(run / "box_classifier.pt")
    assert clf.classes == (CUP, CAT) and clf.meta["images"] == 4 and clf.meta["max_size"] == 128
    assert main(["box-classifier", "--run-dir", str(tmp_path / "nowhere")]) == 2
