"""Recognition: the kNN vote, the label-free calibration and GAP against hand computations, the
leave-one-out calibration of an index against brute force, "unknown" for an unrelated query,
`raytrieval recognize` on a tiny collection, and `POST /recognize` through FastAPI's TestClient."""

from __future__ import annotations

import base64
import json
import shutil
import warnings

import numpy as np
import pytest

warnings.filterwarnings("ignore", message=".*httpx.*", category=DeprecationWarning)

from fastapi.testclient import TestClient  # noqa: E402

from raytrieval.evaluation.metrics import accuracy_at_coverage, global_average_precision  # noqa: E402
from raytrieval.retrieval.clusters import CLUSTERS_SCHEMA, write_clusters  # noqa: E402
from raytrieval.retrieval.recognition import (  # noqa: E402
    RecognitionConfig,
    apply_threshold,
    calibrate,
    drop_self,
    vote,
)
from raytrieval.serving.index import ImageIndex, IndexConfig  # noqa: E402
from raytrieval.serving.recognition import (  # noqa: E402
    RECOGNITION_FILE,
    Recognizer,
    calibrate_index,
    write_recognition,
)


def _naive_vote(sims, labels, power, confidence):
    pred, conf = [], []
    for srow, lrow in zip(sims, labels):
        mass: dict[int, float] = {}
        total = 0.0
        for s, c in zip(srow, lrow):
            w = max(float(s), 0.0) ** power if np.isfinite(s) else 0.0
            total += w
            if c >= 0 and w > 0:
                mass[int(c)] = mass.get(int(c), 0.0) + w
        if not mass:
            pred.append(-1)
            conf.append(0.0)
            continue
        best = min(mass, key=lambda c: (-mass[c], c))
        pred.append(best)
        conf.append(mass[best] / (len(srow) if confidence == "mass" else total))
    return np.array(pred), np.array(conf)


def test_vote_by_hand():
    sims = np.array([[0.9, 0.8, 0.5, 0.4], [0.7, 0.6, 0.6, 0.1], [0.9, 0.8, -0.2, 0.0], [0.5, 0.5, 0.3, 0.3]])
    labels = np.array([[1, 2, 1, -1], [-1, 3, 4, 3], [-1, -1, 5, 5], [7, 6, -1, -1]])
    pred, conf = vote(sims, labels, confidence="mass")
    # row 0: cluster 1 gets 0.9 + 0.5, cluster 2 gets 0.8; row 1: 3 -> 0.7, 4 -> 0.6;
    # row 2: only clustered neighbours have similarity <= 0: nothing votes; row 3: a tie, smaller id wins
    assert pred.tolist() == [1, 3, -1, 6]
    np.testing.assert_allclose(conf, [1.4 / 4, 0.7 / 4, 0.0, 0.5 / 4])
    pred, conf = vote(sims, labels, confidence="share")
    np.testing.assert_allclose(conf, [1.4 / 2.6, 0.7 / 2.0, 0.0, 0.5 / 1.6])
    pred, conf = vote(sims, labels, power=2.0)
    assert pred[0] == 1 and np.isclose(conf[0], (0.81 + 0.25) / 4)


def test_vote_matches_a_loop():
    rng = np.random.default_rng(0)
    sims = rng.uniform(-0.2, 1.0, (200, 7))
    sims[rng.random(sims.shape) < 0.05] = -np.inf  # faiss padding
    labels = rng.integers(-1, 4, sims.shape)
    for power in (1.0, 3.0):
        for confidence in ("mass", "share"):
            pred, conf = vote(sims, labels, power, confidence)
            ref_pred, ref_conf = _naive_vote(sims, labels, power, confidence)
            np.testing.assert_array_equal(pred, ref_pred)
            np.testing.assert_allclose(conf, ref_conf, atol=1e-12)
    with pytest.raises(ValueError, match="confidence"):
        vote(sims, labels, confidence="max")
    with pytest.raises(ValueError, match="shape"):
        vote(sims, labels[:, :3])


def test_drop_self():
    nbrs = np.array([[0, 5, 6], [4, 1, 7], [8, 9, 3]])
    sims = np.array([[1.0, 0.5, 0.4], [0.9, 0.8, 0.3], [0.7, 0.6, 0.2]])
    n2, s2 = drop_self(nbrs, sims, 2)
    assert n2.tolist() == [[5, 6], [4, 7], [8, 9]]  # row 2 does not hold image 2: its last column goes
    assert s2.tolist() == [[0.5, 0.4], [0.9, 0.3], [0.7, 0.6]]
    n3, _ = drop_self(nbrs, sims, 2, self_ids=np.array([5, 7, 9]))
    assert n3.tolist() == [[0, 6], [4, 1], [8, 3]]


def _naive_threshold(pred, conf, truth, target):
    best = None
    for t in sorted({c for p, c in zip(pred, conf) if p >= 0 and c > 0}):
        answered = [(p, y) for p, c, y in zip(pred, conf, truth) if p >= 0 and c >= t]
        precision = sum(p == y for p, y in answered) / len(answered)
        if precision >= target and best is None:
            best = (t, precision, sum(y >= 0 for _, y in answered) / sum(y >= 0 for y in truth))
    return best


def test_calibrate_by_hand():
    # sorted by confidence: right, right, wrong (a pseudo-negative answered), right, wrong, right
    conf = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.0])
    pred = np.array([1, 2, 3, 1, 2, 3, -1])
    truth = np.array([1, 2, -1, 1, 1, 3, 2])
    cfg = RecognitionConfig(target=0.75)
    cal = calibrate(pred, conf, truth, cfg)
    # precision at t = 0.9, 0.8, 0.7, 0.6, 0.5, 0.4: 1, 1, 2/3, 3/4, 3/5, 4/6 -> lowest t with >= 0.75 is 0.6
    assert cal.threshold == 0.6 and cal.precision == 0.75
    assert cal.coverage == pytest.approx(3 / 6)  # 3 of the 6 clustered pseudo-queries answered
    assert cal.negatives_answered == 1.0 and cal.counts == {"pseudo_queries": 7, "clustered": 6, "unclustered": 1}
    assert (cal.threshold, cal.precision, cal.coverage) == pytest.approx(_naive_threshold(pred, conf, truth, 0.75))
    assert [p["threshold"] for p in cal.curve] == [0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    rng = np.random.default_rng(1)
    for _ in range(20):
        truth = rng.integers(-1, 3, 50)
        pred = np.where(rng.random(50) < 0.7, truth, rng.integers(-1, 3, 50))
        conf = np.round(rng.random(50), 1)  # ties
        cal = calibrate(pred, conf, truth, RecognitionConfig(target=0.8))
        ref = _naive_threshold(pred, conf, truth, 0.8)
        assert (cal.threshold is None) == (ref is None)
        if ref is not None:
            assert (cal.threshold, cal.precision, cal.coverage) == pytest.approx(ref)
    none = calibrate(np.array([1, 1]), np.array([0.5, 0.4]), np.array([2, -1]), cfg)
    assert none.threshold is None and apply_threshold(np.array([1]), np.array([0.9]), None).tolist() == [-1]
    assert apply_threshold(np.array([1, 2]), np.array([0.6, 0.5]), 0.6).tolist() == [1, -1]


def test_config_checks():
    for bad in ({"k": 0}, {"power": 0.0}, {"confidence": "max"}, {"target": 0.0}, {"target": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RecognitionConfig(**bad)


def test_gap_by_hand():
    # by confidence: q1 right, q0 wrong, q3 right, q2 no prediction, q4 (no landmark) predicted, wrong
    pred = np.array([5, 1, -1, 2, 3])
    conf = np.array([0.8, 0.9, 0.1, 0.7, 0.6])
    truth = np.array([4, 1, 2, 2, -1])
    # P(1) = 1 (right), P(2) = 1/2, P(3) = 2/3 (right), P(4) = 2/4; M = 4 queries with a landmark
    assert global_average_precision(pred, conf, truth) == pytest.approx((1 + 2 / 3) / 4)
    # 90% of 5 queries -> the 5 most confident: 2 right of 5; 60% -> 3: q1, q0, q3 -> 2/3
    assert accuracy_at_coverage(pred, conf, truth, 0.9) == pytest.approx(2 / 5)
    assert accuracy_at_coverage(pred, conf, truth, 0.6) == pytest.approx(2 / 3)
    assert global_average_precision(pred, conf, truth) <= 1.0
    assert global_average_precision(truth, np.ones(5), truth) == 1.0  # every landmark right (the -1 is no prediction)
    assert np.isnan(global_average_precision(pred, conf, -np.ones(5, int)))
    with pytest.raises(ValueError):
        accuracy_at_coverage(pred, conf, truth, 0.0)


# ---------------------------------------------------------------------------------------------
# an index of synthetic descriptors


def _synthetic(seed: int = 0):
    """Three tight clusters of 8 and 12 scattered unclustered vectors, 32-d, L2-normalised."""
    rng = np.random.default_rng(seed)
    centres = np.eye(32)[:3]
    clustered = np.concatenate([c + 0.15 * rng.normal(size=(8, 32)) for c in centres])
    scattered = rng.normal(size=(12, 32))
    X = np.concatenate([clustered, scattered]).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    ids = [f"c{i // 8}_{i % 8}" for i in range(24)] + [f"u{i}" for i in range(12)]
    labels = np.array([i // 8 for i in range(24)] + [-1] * 12)
    return X, ids, labels


def _clusters_file(path, ids, labels):
    import pyarrow as pa

    rows = [(i, int(c)) for i, c in zip(ids, labels) if c >= 0]
    table = pa.Table.from_pylist([{"image_id": i, "cluster_id": c, "box": None} for i, c in rows],
                                 schema=CLUSTERS_SCHEMA)
    write_clusters(table, path)
    return path


def test_index_calibration_is_leave_one_out(tmp_path):
    X, ids, labels = _synthetic()
    index = ImageIndex.create(tmp_path / "index", X, ids, config=IndexConfig(kind="flat"))
    cfg = RecognitionConfig(k=4, target=0.9)
    cal = calibrate_index(index, dict(zip(ids, labels.tolist())), cfg)
    # brute force: every image against all others
    S = X @ X.T
    np.fill_diagonal(S, -np.inf)
    nn = np.argsort(-S, axis=1, kind="stable")[:, :4]
    ref_pred, ref_conf = _naive_vote(np.take_along_axis(S, nn, 1), labels[nn], 1.0, "mass")
    ref = calibrate(ref_pred, ref_conf, labels, cfg)
    assert cal.threshold == pytest.approx(ref.threshold) and cal.coverage == pytest.approx(ref.coverage)
    assert cal.counts["clusters"] == 3 and cal.counts["clustered"] == 24 and cal.counts["unclustered"] == 12
    assert cal.precision >= 0.9
    # the file: written next to the index, reloaded by the Recognizer
    clusters = _clusters_file(tmp_path / "clusters.parquet", ids, labels)
    write_recognition(tmp_path / "index", clusters, cfg)
    record = json.loads((tmp_path / "index" / RECOGNITION_FILE).read_text())
    assert record["threshold"] == pytest.approx(ref.threshold) and record["target"] == 0.9
    assert record["config"]["k"] == 4 and record["curve"]
    rec = Recognizer(tmp_path / "index")
    near = np.eye(32, dtype=np.float32)[1] + 0.1 * np.eye(32, dtype=np.float32)[7]
    unrelated = np.zeros(32, np.float32)
    unrelated[20:] = 1.0  # far from every cluster centre
    answers = rec.recognize(index, np.stack([near / np.linalg.norm(near), unrelated / np.linalg.norm(unrelated)]),
                            neighbours=2)
    assert answers[0]["landmark"] == 1 and answers[0]["confidence"] >= rec.calibration.threshold
    assert [n["cluster"] for n in answers[0]["neighbours"]] == [1, 1]
    assert answers[1]["landmark"] is None and answers[1]["confidence"] < rec.calibration.threshold


def test_calibration_errors(tmp_path):
    X, ids, labels = _synthetic()
    index = ImageIndex.create(tmp_path / "index", X, ids, config=IndexConfig(kind="flat"))
    with pytest.raises(ValueError, match="none of the indexed images"):
        calibrate_index(index, {}, RecognitionConfig(k=3))
    with pytest.raises(ValueError, match="k"):
        calibrate_index(index, dict(zip(ids, labels.tolist())), RecognitionConfig(k=40))
    with pytest.raises(FileNotFoundError):
        write_recognition(tmp_path / "index", tmp_path / "missing.parquet")
    with pytest.raises(FileNotFoundError, match="not calibrated"):
        Recognizer(tmp_path / "index")


# ---------------------------------------------------------------------------------------------
# the CLI on a tiny collection


def test_cli_recognize(tmp_path, capsys):
    from raytrieval.cluster.cli import main
    from tests.trainset import make_collection

    paths = make_collection(tmp_path / "tiny")
    out = tmp_path / "index"
    assert main(["recognize", "--index", str(out)]) == 2  # no index yet
    assert main(["index", "build", "--images", str(paths["manifest"]), "--out", str(out), "--max-size", "64",
                 "--workers", "0"]) == 0
    assert main(["recognize", "--index", str(out)]) == 2  # not calibrated
    assert "not calibrated" in capsys.readouterr().err
    queries = [str(tmp_path / "tiny" / "jpg" / "s1_v2.png"), str(tmp_path / "tiny" / "jpg" / "s3_v0.png")]
    assert main(["recognize", "--index", str(out), "--clusters", str(paths["clusters"]), "--k", "3", *queries]) == 0
    text = capsys.readouterr().out
    assert "calibrated on 16 clustered + 0 unclustered images (4 clusters), target 90%" in text
    record = json.loads((out / RECOGNITION_FILE).read_text())
    assert record["config"] == {"k": 3, "power": 1.0, "confidence": "mass", "target": 0.9}
    assert record["counts"]["clustered"] == 16 and (out / "clusters.parquet").is_file()
    lines = [line for line in text.splitlines() if line.startswith(str(tmp_path))]
    assert [line.split("\t")[0] for line in lines] == queries
    rec = Recognizer(out)
    index = ImageIndex.open(out)
    assert calibrate_index(index, rec.clusters, rec.config).threshold == record["threshold"]  # the file is what it computes
    for line in lines:
        assert line.split("\t")[1] == "unknown" or line.split("\t")[1].startswith("landmark ")
    assert main(["recognize", "--index", str(out), "--clusters", str(paths["clusters"]), "--k", "0"]) == 2
    # pseudo-queries cropped to the cluster boxes, re-embedded with the index's model
    import pyarrow as pa

    from raytrieval.retrieval.clusters import read_clusters
    from raytrieval.retrieval.extract import extract_descriptors
    from raytrieval.retrieval.model import ModelSpec, RetrievalNet

    table = read_clusters(paths["clusters"]).to_pylist()
    boxed = tmp_path / "boxed.parquet"
    write_clusters(pa.Table.from_pylist([{**r, "box": [4.0, 8.0, 60.0, 56.0] if r["cluster_id"] != 2 else None}
                                         for r in table], schema=CLUSTERS_SCHEMA), boxed)
    assert main(["recognize", "--index", str(out), "--clusters", str(boxed), "--k", "3", "--crops"]) == 0
    record = json.loads((out / RECOGNITION_FILE).read_text())
    assert record["pseudo_queries"] == "12 box crops"  # cluster 2 has no boxes: its images stay whole
    model = RetrievalNet(ModelSpec(max_size=64)).eval()
    crops = {r["image_id"]: extract_descriptors(model, [str(tmp_path / "tiny" / "jpg" / f"{r['image_id']}.png")],
                                                boxes=[(4.0, 8.0, 60.0, 56.0)], max_size=64, progress=False)[0]
             for r in table if r["cluster_id"] != 2}
    ref = calibrate_index(index, rec.clusters, rec.config, crops)
    assert record["threshold"] == pytest.approx(ref.threshold, abs=1e-6) and record["coverage"] == ref.coverage


# ---------------------------------------------------------------------------------------------
# POST /recognize


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from raytrieval.retrieval.model import ModelSpec, RetrievalNet
    from tests.test_serving_api import _build_index

    model = RetrievalNet(ModelSpec(max_size=64)).eval()
    folder = tmp_path_factory.mktemp("recognize")
    _build_index(folder, model)  # db00 .. db11, random pictures
    ids = [f"db{i:02d}" for i in range(12)]
    labels = np.array([0, 0, 1, 1, 2, 2, -1, -1, -1, -1, -1, -1])
    _clusters_file(folder / "clusters.parquet", ids, labels)
    return model, folder


def test_recognize_endpoint(served, tmp_path):
    from tests.test_serving_api import AUTH, BASE, TOKEN, _error, _picture, _png

    from raytrieval.serving.engine import embed_arrays, prepare_query
    from raytrieval.serving.ingress import ApiSettings, LocalBackend, create_app

    model, folder = served
    index_dir = tmp_path / "index"
    shutil.copytree(folder / "index", index_dir)

    def client(**settings):
        app = create_app(LocalBackend(model, ImageIndex.open(index_dir)), ApiSettings(token=TOKEN, **settings))
        return TestClient(app, base_url=BASE, raise_server_exceptions=False)

    c = client()
    data = _png(_picture(2))
    _error(c.post("/recognize", files={"image": ("q.png", data, "image/png")}), 409, "not calibrated")
    write_recognition(index_dir, folder / "clusters.parquet", RecognitionConfig(k=3, target=0.5))
    r = c.post("/recognize", files={"image": ("q.png", data, "image/png")}, data={"neighbours": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    # the same answer as the library on the same prepared query
    vector = embed_arrays(model, [prepare_query(data, None, 64).pixels], max_size=64)
    ref = Recognizer(index_dir).recognize(ImageIndex.open(index_dir), vector, 3)[0]
    assert body["landmark"] == ref["landmark"] and body["candidate"] == ref["candidate"]
    assert body["confidence"] == pytest.approx(ref["confidence"]) and body["known"] == (ref["landmark"] is not None)
    assert [n["image_id"] for n in body["neighbours"]] == [n["image_id"] for n in ref["neighbours"]]
    assert body["neighbours"][0]["image_id"] == "db02" and body["neighbours"][0]["cluster"] == 1
    assert body["query"] == {"width": 96, "height": 72, "box": None} and body["timings_ms"]["total"] > 0
    j = c.post("/recognize", json={"image": base64.b64encode(data).decode(), "neighbours": 3})
    assert j.status_code == 200 and j.json()["confidence"] == pytest.approx(body["confidence"])
    # an image unrelated to every cluster: no confident vote
    flat = np.full((72, 96, 3), 127, np.uint8)
    u = c.post("/recognize", files={"image": ("u.png", _png(flat), "image/png")})
    assert u.status_code == 200, u.text
    if u.json()["known"]:  # only when its vote clears the calibrated threshold
        assert u.json()["confidence"] >= u.json()["threshold"]
    # bad input: the query path of /search, 4xx JSON
    _error(c.post("/recognize", files={"image": ("q.png", b"not an image", "image/png")}), 415)
    _error(c.post("/recognize", json={"image": "!!!"}), 422, "invalid base64")
    _error(c.post("/recognize", json={"neighbours": 3}), 422, "invalid request")
    _error(c.post("/recognize", json={"image": base64.b64encode(data).decode(), "k": 3}), 422)  # not a field here
    _error(c.post("/recognize", files={"image": ("q.png", data, "image/png")}, data={"neighbours": "-1"}), 422)
    _error(c.post("/recognize", files={"image": ("q.png", data, "image/png")}, data={"box": "500,500,600,600"}),
           422, "invalid box")
    _error(c.post("/recognize", content=b"raw", headers={"content-type": "image/png"}), 415)
    _error(c.post("/recognize", files={"image": ("q.png", data, "image/png")}, headers={"Host": "evil.example"}), 403)
    # a public server: reads need the token, on /recognize as on /search
    locked = client(public_hosts=("search.example",), reads_need_token=True)
    _error(locked.post("/recognize", files={"image": ("q.png", data, "image/png")}), 401)
    assert locked.post("/recognize", files={"image": ("q.png", data, "image/png")}, headers=AUTH).status_code == 200
    spec = c.get("/openapi.json").json()
    assert "/recognize" in spec["paths"] and "409" in spec["paths"]["/recognize"]["post"]["responses"]
