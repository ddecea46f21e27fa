"""End to end on 127.0.0.1: a real Ray Serve app over a faiss index of rparis6k-mini images.

- the served top results equal a direct in-process ranking (same model, same faiss index);
- locked down on a live server: the token generated into the index directory (mode 600) is
  needed to add or delete, and a DNS-rebinding DELETE (foreign Host with a matching Origin) is
  refused before it reaches the searcher;
- `/recognize` through the Searcher replica: 409 before a calibration, then (recognition.json
  written into the live index directory, picked up without a restart) the answer the library
  gives on the same vectors;
- the searcher replica, killed under a bounded loopback load, answers again within seconds and
  every acknowledged add is still searchable.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

from raytrieval.evaluation.datasets import load_benchmark
from raytrieval.retrieval.extract import extract_descriptors
from raytrieval.retrieval.model import ModelSpec, RetrievalNet
from raytrieval.serving.engine import model_record
from raytrieval.serving.index import ImageIndex, IndexConfig

pytestmark = pytest.mark.timeout(600)

N_DB = 60
MAX_SIZE = 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def paris(shared_data, tmp_path_factory):
    bench = load_benchmark("rparis6k-mini", shared_data)
    spec = ModelSpec(max_size=MAX_SIZE)
    model = RetrievalNet(spec).eval()
    db = bench.images[:N_DB]
    X = extract_descriptors(model, db, max_size=MAX_SIZE, progress=False)
    queries = bench.queries[:3]
    boxes = bench.qboxes[:3]
    Q = extract_descriptors(model, queries, boxes, max_size=MAX_SIZE, progress=False)
    ids = [f"paris/{i:03d}" for i in range(N_DB)]
    sizes = [Image.open(p).size for p in db]
    folder = tmp_path_factory.mktemp("serve")
    ImageIndex.create(folder / "index", X, ids, db, sizes, config=IndexConfig(kind="flat"),
                      model=model_record(model, {"spec": spec.to_dict()}))
    reference = folder / "reference"
    shutil.copytree(folder / "index", reference)  # searched directly, never touched by the server
    return {"index": folder / "index", "reference": reference, "queries": queries, "boxes": boxes, "Q": Q,
            "extra": bench.images[N_DB : N_DB + 6]}


@pytest.fixture(scope="module")
def server(ray_session, paris):
    from ray import serve

    from raytrieval.serving.app import AppArgs, run_server, serve_http_host

    port = _free_port()
    mp = pytest.MonkeyPatch()
    mp.delenv("RAYTRIEVAL_TOKEN", raising=False)  # the server generates its own
    run_server(AppArgs(index=str(paris["index"]), embedder_cpus=0.5, searcher_cpus=0.5), host="127.0.0.1", port=port)
    mp.undo()
    assert serve_http_host() == "127.0.0.1"  # what build_app's public-bind check reads from Serve
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _auth(paris) -> dict[str, str]:
    token_file = paris["index"] / "api-token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    return {"Authorization": f"Bearer {token_file.read_text().strip()}"}


def _search(base: str, data: bytes, timeout: float = 30, **fields) -> requests.Response:
    return requests.post(f"{base}/search", files={"image": ("q.jpg", data, "image/jpeg")},
                         data={k: str(v) for k, v in fields.items()}, timeout=timeout)


def test_served_ranking_equals_direct_ranking(paris, server):
    assert requests.get(f"{server}/healthz", timeout=30).json()["images"] == N_DB
    direct = ImageIndex.open(paris["reference"])
    scores, labels = direct.search(paris["Q"], 10)
    for qi, (path, box) in enumerate(zip(paris["queries"], paris["boxes"])):
        fields = {"k": 10}
        if box is not None:
            fields["box"] = ",".join(str(v) for v in box)
        r = _search(server, open(path, "rb").read(), **fields)
        assert r.status_code == 200, r.text
        served = r.json()["results"]
        want = [direct.record(int(lab))["image_id"] for lab in labels[qi]]
        assert [h["image_id"] for h in served][:5] == want[:5]
        np.testing.assert_allclose([h["score"] for h in served], scores[qi], atol=1e-4)


def test_served_listing_pages_the_index(paris, server):
    """`GET /images` through the Searcher deployment: the ids of the untouched copy, page by page."""
    ids = ImageIndex.open(paris["reference"]).image_ids()
    assert len(ids) == N_DB
    for offset, limit in ((0, 200), (5, 7), (N_DB - 3, 48), (N_DB, 1)):
        r = requests.get(f"{server}/images", params={"offset": offset, "limit": limit}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json() == {"total": N_DB, "offset": offset, "limit": limit,
                            "images": [{"image_id": i} for i in ids[offset:offset + limit]]}
    r = requests.get(f"{server}/images", params={"limit": 201}, timeout=30)
    assert r.status_code == 422 and r.json()["error"] == "invalid request", r.text
    r = requests.get(f"{server}/images", headers={"Origin": "http://evil.example"}, timeout=30)
    assert r.status_code == 403, r.text


def test_live_server_is_locked_down(paris, server):
    data = open(paris["extra"][0], "rb").read()
    files = [("images", ("a.jpg", data, "image/jpeg"))]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = requests.post(f"{server}/images", files=files, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized", r.text
        assert requests.delete(f"{server}/images/paris/000", headers=headers, timeout=30).status_code == 401
    port = server.rsplit(":", 1)[1]
    rebinding = {"Host": f"attacker.example:{port}", "Origin": f"http://attacker.example:{port}", **_auth(paris)}
    r = requests.delete(f"{server}/images/paris/000", headers=rebinding, timeout=30)
    assert r.status_code == 403 and r.json()["error"] == "forbidden", r.text
    thumb = requests.get(f"{server}/images/paris/000", headers={"Origin": "http://evil.example"}, timeout=30)
    assert thumb.status_code == 403
    assert requests.get(f"{server}/healthz", timeout=30).json()["images"] == N_DB  # nothing changed


def test_served_recognition(paris, server):
    import pyarrow as pa

    from raytrieval.retrieval.clusters import CLUSTERS_SCHEMA, write_clusters
    from raytrieval.retrieval.recognition import RecognitionConfig
    from raytrieval.serving.recognition import Recognizer, write_recognition

    path, box = paris["queries"][0], paris["boxes"][0]
    fields = {"box": ",".join(str(v) for v in box)} if box is not None else {}
    data = open(path, "rb").read()

    def recognize() -> requests.Response:
        return requests.post(f"{server}/recognize", files={"image": ("q.jpg", data, "image/jpeg")},
                             data={**fields, "neighbours": "3"}, timeout=30)

    r = recognize()
    assert r.status_code == 409 and r.json()["error"] == "not calibrated", r.text  # NotCalibrated through Ray
    rows = [{"image_id": f"paris/{i:03d}", "cluster_id": i // 6, "box": None} for i in range(0, N_DB, 2)]
    clusters = paris["index"].parent / "clusters.parquet"
    write_clusters(pa.Table.from_pylist(rows, schema=CLUSTERS_SCHEMA), clusters)
    write_recognition(paris["reference"], clusters, RecognitionConfig(k=5, target=0.5))
    write_recognition(paris["index"], clusters, RecognitionConfig(k=5, target=0.5))
    r = recognize()
    assert r.status_code == 200, r.text
    ref = Recognizer(paris["reference"]).recognize(ImageIndex.open(paris["reference"]), paris["Q"][:1], 3)[0]
    body = r.json()
    assert (body["landmark"], body["candidate"]) == (ref["landmark"], ref["candidate"])
    assert body["confidence"] == pytest.approx(ref["confidence"], abs=1e-4)
    assert [n["image_id"] for n in body["neighbours"]] == [n["image_id"] for n in ref["neighbours"]]


def _searcher_actor(ray):
    names = ray.util.list_named_actors(all_namespaces=True)
    found = [n for n in names if "#Searcher#" in n["name"]]
    assert len(found) == 1, names
    return found[0]


def test_killed_searcher_recovers_without_losing_acknowledged_adds(ray_session, paris, server):
    ray = ray_session
    query = open(paris["queries"][0], "rb").read()
    extra = [open(p, "rb").read() for p in paris["extra"]]
    acked: dict[str, bytes] = {}
    after_kill: list[tuple[float, int]] = []
    killed_at: list[float] = []
    stop = threading.Event()

    def searcher_load() -> None:  # one client searching in a loop
        while not stop.is_set():
            try:
                code = _search(server, query, k=5, timeout=20).status_code
            except requests.RequestException:
                code = -1
            if killed_at:
                after_kill.append((time.monotonic() - killed_at[0], code))
            time.sleep(0.05)

    def adder() -> None:  # another client adding images one by one, retrying until acknowledged
        for i, data in enumerate(extra):
            image_id = f"added/{i}"
            for _ in range(100):
                try:
                    r = requests.post(f"{server}/images", files=[("images", ("a.jpg", data, "image/jpeg"))],
                                      data={"image_id": image_id}, headers=auth, timeout=20)
                except requests.RequestException:
                    time.sleep(0.2)
                    continue
                if r.status_code in (201, 409):  # 409: an unacknowledged earlier try went through
                    acked[image_id] = data
                    break
                time.sleep(0.2)

    auth = _auth(paris)
    before = _searcher_actor(ray)
    threads = [threading.Thread(target=searcher_load), threading.Thread(target=adder)]
    for t in threads:
        t.start()
    while len(acked) < 2:
        time.sleep(0.05)
    ray.kill(ray.get_actor(before["name"], namespace=before["namespace"]), no_restart=True)
    killed_at.append(time.monotonic())
    threads[1].join(timeout=120)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(code == 200 for _, code in after_kill):
        time.sleep(0.1)
    time.sleep(1.0)
    stop.set()
    threads[0].join(timeout=60)

    recovered = [t for t, code in after_kill if code == 200]
    assert recovered, f"no successful search after the kill: {after_kill[:10]}"
    print(f"searcher killed: first answer after {recovered[0]:.2f} s, "
          f"{sum(code == 503 for _, code in after_kill)} x 503 meanwhile, {len(after_kill)} searches after the kill")
    assert recovered[0] < 30, f"first answer {recovered[0]:.1f} s after the kill"
    assert all(code in (200, 503) for _, code in after_kill), after_kill
    assert _searcher_actor(ray)["name"] != before["name"]  # a new replica answers
    assert len(acked) == len(extra)

    health = requests.get(f"{server}/healthz", timeout=30).json()
    assert health["images"] == N_DB + len(extra)
    for image_id, data in acked.items():
        top = _search(server, data, k=1).json()["results"][0]
        assert top["image_id"] == image_id and top["score"] > 0.99
