"""The HTTP API in one process (FastAPI TestClient over `LocalBackend`): answers, 4xx as JSON,
the Host/Origin matrix over every route (refused before any handler), the token on mutations
(and on reads of a public server), the generated token file, and a schemathesis run against the
OpenAPI schema, token set, that must find no 5xx."""

from __future__ import annotations

import base64
import io
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

warnings.filterwarnings("ignore", message=".*httpx.*", category=DeprecationWarning)

from fastapi.testclient import TestClient  # noqa: E402

from raytrieval.retrieval.model import ModelSpec, RetrievalNet  # noqa: E402
from raytrieval.serving.engine import embed_arrays, model_record, prepare_query  # noqa: E402
from raytrieval.serving.index import ImageIndex, IndexConfig  # noqa: E402
from raytrieval.serving.ingress import TOKEN_FILE, ApiSettings, LocalBackend, create_app, ensure_token  # noqa: E402

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BASE = "http://127.0.0.1:8000"  # a Host the allowlist accepts (TestClient's default 'testserver' is refused)
DB_IDS = [f"db{i:02d}" for i in range(12)]  # the indexed images, in label order


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _picture(seed: int, size: tuple[int, int] = (96, 72)) -> np.ndarray:
    """A random picture: blurred colour blocks plus texture (for SIFT), (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BILINEAR), dtype=np.int16)
    texture = np.asarray(Image.fromarray(rng.integers(0, 255, (size[1] // 4, size[0] // 4), dtype=np.uint8))
                         .resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    return np.clip(base + (texture[:, :, None] - 128) // 2, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def model():
    return RetrievalNet(ModelSpec(max_size=64)).eval()  # bundled ImageNet weights (offline)


def _build_index(folder, model) -> None:
    files, arrays = [], []
    for i in range(12):
        path = folder / f"db{i:02d}.png"
        path.write_bytes(_png(_picture(i)))
        files.append(str(path))
        arrays.append(prepare_query(path.read_bytes(), None, 64).pixels)
    vectors = embed_arrays(model, arrays, max_size=64)
    spec = {"spec": model.spec.to_dict()}
    ImageIndex.create(folder / "index", vectors, DB_IDS, files,
                      [(96, 72)] * 12, config=IndexConfig(kind="flat"), model=model_record(model, spec))


@pytest.fixture(scope="module")
def base_index(tmp_path_factory, model):
    folder = tmp_path_factory.mktemp("api")
    _build_index(folder, model)
    return folder / "index"


@pytest.fixture()
def index_dir(tmp_path, base_index):
    """A private copy of the index for each test (tests add and delete)."""
    shutil.copytree(base_index, tmp_path / "index")
    return tmp_path / "index"


def _client(index_dir, model, headers: dict[str, str] | None = None, **settings) -> TestClient:
    app = create_app(LocalBackend(model, ImageIndex.open(index_dir)), ApiSettings(**settings))
    return TestClient(app, base_url=BASE, raise_server_exceptions=False, headers=headers)


@pytest.fixture()
def client(index_dir, model):
    """A loopback server whose client sends the token (needed for adds and deletes only)."""
    return _client(index_dir, model, AUTH, token=TOKEN, max_upload_bytes=256 * 1024, max_pixels=4_000_000)


@pytest.fixture()
def locked(index_dir, model):
    """A public server: reads need the token too; the client sends none."""
    return _client(index_dir, model, token=TOKEN, public_hosts=("search.example",), reads_need_token=True)


def _search(client: TestClient, data: bytes, ctype: str = "image/png", **fields):
    return client.post("/search", files={"image": ("q.png", data, ctype)}, data={k: str(v) for k, v in fields.items()})


def _error(resp, status: int, error: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error", "detail"} and body["error"], body
    if error is not None:
        assert body["error"] == error, body
    return body


def test_search_multipart_and_json_agree(client):
    data = _png(_picture(3))
    r = _search(client, data, k=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [h["rank"] for h in body["results"]] == [1, 2, 3, 4, 5]
    assert body["results"][0]["image_id"] == "db03" and body["results"][0]["score"] > 0.999
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)
    j = client.post("/search", json={"image": base64.b64encode(data).decode(), "k": 5})
    assert j.status_code == 200, j.text
    assert [h["image_id"] for h in j.json()["results"]] == [h["image_id"] for h in body["results"]]
    durl = client.post("/search", json={"image": "data:image/png;base64," + base64.b64encode(data).decode(), "k": 2})
    assert durl.status_code == 200


def test_box_crops_the_query(client):
    big = np.concatenate([_picture(5), _picture(9)], axis=1)  # db05 left, db09 right
    r = _search(client, _png(big), k=1, box="96,0,192,72")
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["image_id"] == "db09"
    assert r.json()["query"] == {"width": 192, "height": 72, "box": [96.0, 0.0, 192.0, 72.0]}
    _error(_search(client, _png(big), box="500,500,600,600"), 422, "invalid box")
    _error(_search(client, _png(big), box="10,10,5,5"), 422)
    _error(_search(client, _png(big), box="a,b"), 422)


def test_rerank_options_answer(client):
    query = _picture(4)[8:64, 10:90]  # a crop of db04: spatial verification localises it
    r = _search(client, _png(query), k=4, spatial="true", spatial_top=4, min_inliers=8)
    assert r.status_code == 200, r.text
    top = r.json()["results"][0]
    assert top["image_id"] == "db04" and top["inliers"] >= 8, top
    x0, y0, x1, y1 = top["box"]
    assert abs(x0 - 10) < 4 and abs(y0 - 8) < 4 and abs(x1 - 90) < 4 and abs(y1 - 64) < 4, top["box"]
    assert all(h["inliers"] is not None for h in r.json()["results"])
    r = _search(client, _png(_picture(4)), k=4, aqe="true", diffusion="true", shortlist=12, spatial="true")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["rerank"] == ["aqe", "diffusion", "spatial"] and len(body["results"]) == 4


def test_the_answer_names_the_selected_reranking_it_applied(index_dir, model):
    """With the pipeline's selection.json in the index, a request asking for no re-ranking gets
    the selected one, and the answer says so (as an explicit request for it would)."""
    import json

    (index_dir / "selection.json").write_text(json.dumps({"serving": {"aqe": True, "aqe_k": 2, "aqe_alpha": 3.0}}))
    client = _client(index_dir, model)
    plain = _search(client, _png(_picture(4)), k=5)
    asked = _search(client, _png(_picture(4)), k=5, aqe="true", aqe_k=2, aqe_alpha=3.0)
    assert plain.status_code == asked.status_code == 200, plain.text
    assert plain.json()["rerank"] == asked.json()["rerank"] == ["aqe"]
    assert plain.json()["results"] == asked.json()["results"]
    (index_dir / "selection.json").write_text(json.dumps({"serving": {}}))
    assert _search(client, _png(_picture(4)), k=5).json()["rerank"] == []


@pytest.mark.parametrize("payload,ctype,status,error", [
    (b"", "image/png", 400, "bad image"),                               # empty upload
    (_png(_picture(1))[:60] + b"\0" * 40 + _png(_picture(1))[100:], "image/png", 400, "bad image"),  # corrupt
    (b"hello, not an image", "image/png", 415, "unsupported media type"),  # non-image bytes
    (b"hello", "text/plain", 415, "unsupported media type"),           # non-image content type
])
def test_bad_uploads(client, payload, ctype, status, error):
    _error(_search(client, payload, ctype=ctype), status, error)


def test_truncated_image(client):
    data = _png(_picture(1))
    _error(_search(client, data[: len(data) // 2]), 400, "bad image")


def test_size_limits(client, index_dir, model):
    big = b"\0" * (300 * 1024)
    _error(_search(client, big), 413, "payload too large")
    _error(client.post("/search", content=big, headers={"content-type": "application/json"}), 413)
    bomb = np.zeros((2100, 2100, 3), np.uint8)  # 4.4 Mpx > 4 Mpx cap, tiny as PNG
    _error(_search(client, _png(bomb)), 413, "image too large")


def test_request_shape_errors(client):
    data = _png(_picture(2))
    _error(client.post("/search", data={"k": "3"}, files={"other": ("x", b"1")}), 422)           # no image
    _error(client.post("/search", json={"k": 3}), 422, "invalid request")                         # JSON no image
    _error(client.post("/search", json={"image": "!!!not base64!!!"}), 422, "invalid base64")
    _error(client.post("/search", json={"image": "http://127.0.0.1:9/x.jpg"}), 422, "urls not supported")
    _error(client.post("/search", content=b"{oops", headers={"content-type": "application/json"}), 400)
    _error(client.post("/search", content=b"raw", headers={"content-type": "image/png"}), 415)
    _error(_search(client, data, k=100000), 422)                                                   # huge k
    _error(_search(client, data, k=101), 422, "k too large")                                       # above max_k
    _error(_search(client, data, k=0), 422)
    _error(_search(client, data, k="ten"), 422)
    _error(client.post("/search", json={"image": base64.b64encode(data).decode(), "bogus": 1}), 422)
    _error(client.get("/nothing"), 404)
    _error(client.put("/search"), 405)


def test_add_search_delete_thumbnail(client):
    new = _picture(100)
    r = client.post("/images", files=[("images", ("n.png", _png(new), "image/png"))], data={"image_id": "fresh/1"})
    assert r.status_code == 201, r.text
    assert r.json() == {"added": [{"image_id": "fresh/1", "width": 96, "height": 72}], "count": 13}
    assert _search(client, _png(new), k=1).json()["results"][0]["image_id"] == "fresh/1"
    _error(client.post("/images", files=[("images", ("n.png", _png(new), "image/png"))],
                       data={"image_id": "fresh/1"}), 409)
    j = client.post("/images", json={"images": [{"image": base64.b64encode(_png(_picture(101))).decode()}]})
    assert j.status_code == 201 and j.json()["added"][0]["image_id"].startswith("img-")
    thumb = client.get("/images/fresh/1", params={"size": 32})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 32
    assert client.delete("/images/fresh/1").json() == {"deleted": "fresh/1", "count": 13}
    _error(client.delete("/images/fresh/1"), 404, "unknown image")
    _error(client.get("/images/fresh/1"), 404)
    _error(client.get("/images/db01", params={"size": 5000}), 422)
    _error(client.post("/images", json={"images": [{"image": "aGk=", "image_id": "../../etc"}]}), 422)
    _error(client.post("/images", files=[("images", ("t.txt", b"text", "text/plain"))]), 415)
    many = [("images", (f"{i}.png", _png(_picture(200 + i)), "image/png")) for i in range(17)]
    _error(client.post("/images", files=many), 413)


def _listing(client: TestClient, **params) -> dict:
    r = client.get("/images", params=params)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text
    return r.json()


def test_listing_pages_through_the_collection_in_id_order(client):
    assert _listing(client) == {"total": 12, "offset": 0, "limit": 48, "images": [{"image_id": i} for i in DB_IDS]}
    for offset in (0, 1, 5, 11, 12, 40):
        for limit in (1, 5, 12, 200):
            page = _listing(client, offset=offset, limit=limit)
            assert page["total"] == 12 and page["offset"] == offset and page["limit"] == limit
            assert [im["image_id"] for im in page["images"]] == DB_IDS[offset:offset + limit], (offset, limit)
    pages = [_listing(client, offset=o, limit=5)["images"] for o in range(0, 12, 5)]
    assert [im["image_id"] for page in pages for im in page] == DB_IDS  # pages tile the collection


def test_listing_follows_adds_and_deletes(client):
    r = client.post("/images", files=[("images", ("n.png", _png(_picture(120)), "image/png"))],
                    data={"image_id": "added/1"})
    assert r.status_code == 201, r.text
    assert client.delete("/images/db03").status_code == 200
    want = [i for i in DB_IDS if i != "db03"] + ["added/1"]  # id order, not by name: a new image comes last
    page = _listing(client, limit=200)
    assert page["total"] == 12 and [im["image_id"] for im in page["images"]] == want
    assert [im["image_id"] for im in _listing(client, offset=10, limit=5)["images"]] == want[10:]
    thumb = client.get(f"/images/{page['images'][-1]['image_id']}", params={"size": 32})  # a listed id opens
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 201}, {"limit": -3}, {"offset": -1}, {"limit": "many"},
                                    {"offset": "1.5"}])
def test_listing_bounds(client, params):
    body = _error(client.get("/images", params=params), 422, "invalid request")
    assert body["detail"][0]["loc"] == ["query", next(iter(params))], body


def test_list_images_refuses_a_bad_page():
    from raytrieval.serving.engine import list_images

    for offset, limit in ((-1, 5), (0, 0)):
        with pytest.raises(ValueError, match="list_images"):
            list_images(None, offset, limit)


def test_model_and_index_dimensions_must_agree(index_dir):
    other = RetrievalNet(ModelSpec(max_size=64, whiten_dim=16, weights=None)).eval()
    c = _client(index_dir, other, token="")
    _error(_search(c, _png(_picture(1))), 503, "misconfigured")


# ---------------------------------------------------------------------------------------------
# the token

_ADD_OK = {"images": [{"image": base64.b64encode(_png(_picture(150))).decode(), "image_id": "tok/1"}]}
_MUTATIONS = {  # (method, path, JSON body): a valid add, an add whose body fails validation, a delete
    "add": ("POST", "/images", _ADD_OK),
    "add-invalid-body": ("POST", "/images", {"images": "not a list", "bogus": 1}),
    "delete": ("DELETE", "/images/db01", None),
}


@pytest.mark.parametrize("name", sorted(_MUTATIONS))
@pytest.mark.parametrize("authorization", [None, "Bearer nope", f"Bearer {TOKEN}x", "Basic czNjcmV0LXRva2Vu", TOKEN])
def test_mutations_need_the_token(index_dir, model, name, authorization):
    """No token or a wrong one: 401 (before the body is validated), and the index is unchanged."""
    c = _client(index_dir, model, token=TOKEN)
    method, path, body = _MUTATIONS[name]
    headers = {"Authorization": authorization} if authorization else {}
    r = c.request(method, path, json=body, headers=headers)
    _error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    assert c.get("/healthz").json()["images"] == 12
    assert _search(c, _png(_picture(1)), k=1).status_code == 200  # reads stay open on loopback


def test_mutations_with_the_token(client):
    r = client.post("/images", json=_ADD_OK)
    assert r.status_code == 201, r.text
    _error(client.post("/images", json={"images": "not a list"}), 422)  # validated once authorised
    assert client.delete("/images/tok/1").json() == {"deleted": "tok/1", "count": 12}


def test_without_a_configured_token_nobody_mutates(index_dir, model, monkeypatch):
    monkeypatch.delenv("RAYTRIEVAL_TOKEN", raising=False)
    for settings in ({"token": ""}, {}):
        c = _client(index_dir, model, {"Authorization": "Bearer "}, **settings)
        _error(c.post("/images", json=_ADD_OK), 401)
        _error(c.delete("/images/db01"), 401)
        assert c.get("/images/db01").status_code == 200


def test_public_server_needs_the_token_on_reads(locked):
    data = _png(_picture(1))
    _error(_search(locked, data), 401, "unauthorized")
    wrong = locked.post("/search", files={"image": ("q.png", data, "image/png")},
                        headers={"Authorization": "Bearer nope"})
    _error(wrong, 401)
    assert wrong.headers["www-authenticate"] == "Bearer"
    ok = locked.post("/search", files={"image": ("q.png", data, "image/png")}, headers=AUTH)
    assert ok.status_code == 200
    _error(locked.get("/images/db01"), 401)
    _error(locked.get("/images/db01", params={"size": 99999}), 401)  # before the query is validated
    assert locked.get("/images/db01", headers=AUTH).status_code == 200
    _error(locked.get("/images"), 401)
    _error(locked.get("/images", params={"limit": 99999}), 401)  # before the query is validated
    listed = locked.get("/images", params={"limit": 3}, headers=AUTH)
    assert listed.status_code == 200 and [im["image_id"] for im in listed.json()["images"]] == DB_IDS[:3]
    _error(locked.delete("/images/db01"), 401)
    assert locked.get("/healthz").status_code == 200  # liveness stays open
    page = locked.get("/", headers={"Host": "search.example"})
    assert page.status_code == 200 and "<title>raytrieval</title>" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"


def test_token_from_environment(index_dir, model, monkeypatch):
    monkeypatch.setenv("RAYTRIEVAL_TOKEN", "from-env")
    c = _client(index_dir, model)
    _error(c.delete("/images/db01"), 401)
    _error(c.delete("/images/db01", headers=AUTH), 401)
    assert c.delete("/images/db01", headers={"Authorization": "Bearer from-env"}).status_code == 200


def test_generated_token_file(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAYTRIEVAL_TOKEN", raising=False)
    token, configured = ensure_token(tmp_path)
    path = tmp_path / TOKEN_FILE
    assert not configured and len(token) >= 32
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert path.read_text().strip() == token
    assert token in capsys.readouterr().out  # printed once ...
    assert ensure_token(tmp_path) == (token, False)
    assert token not in capsys.readouterr().out  # ... and not again
    other = tmp_path / "other"
    other.mkdir()
    assert ensure_token(other)[0] != token
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="mode 644"):
        ensure_token(tmp_path)
    monkeypatch.setenv("RAYTRIEVAL_TOKEN", "configured")
    assert ensure_token(tmp_path / "missing") == ("configured", True)
    monkeypatch.delenv("RAYTRIEVAL_TOKEN")
    with pytest.raises(ValueError, match="cannot create"):
        ensure_token(tmp_path / "missing")


def test_build_app_generates_the_token_and_refuses_a_public_bind(index_dir, monkeypatch, capsys):
    from raytrieval.serving import app as serving_app

    monkeypatch.delenv("RAYTRIEVAL_TOKEN", raising=False)
    bound = serving_app.build_app({"index": str(index_dir)})
    path = index_dir / TOKEN_FILE
    assert os.stat(path).st_mode & 0o777 == 0o600
    token = path.read_text().strip()
    assert token in capsys.readouterr().out
    settings = bound._bound_deployment._replica_config.init_args[2]  # what the Ingress replicas get
    assert settings["token"] == token and settings["reads_need_token"] is False
    with pytest.raises(ValueError, match="RAYTRIEVAL_TOKEN"):
        serving_app.build_app({"index": str(index_dir), "public_hosts": ["search.example"]})
    monkeypatch.setattr(serving_app, "serve_http_host", lambda: "0.0.0.0")  # `serve deploy` with host 0.0.0.0
    with pytest.raises(ValueError, match="listen on 0.0.0.0 without RAYTRIEVAL_TOKEN"):
        serving_app.build_app({"index": str(index_dir)})
    monkeypatch.setenv("RAYTRIEVAL_TOKEN", "configured")
    serving_app.build_app({"index": str(index_dir), "public_hosts": ["search.example"]})


# ---------------------------------------------------------------------------------------------
# Host and Origin: one rule for every route, before any handler


class _CountingBackend:
    """Counts every call that reaches the backend."""

    def __init__(self, backend: LocalBackend) -> None:
        self.backend = backend
        self.calls: list[str] = []

    def __getattr__(self, name: str):
        self.calls.append(name)
        return getattr(self.backend, name)


_ROUTES = [("GET", "/"), ("GET", "/healthz"), ("GET", "/openapi.json"), ("POST", "/search"), ("POST", "/recognize"),
           ("POST", "/images"),
           ("GET", "/images"), ("GET", "/images/db01"), ("DELETE", "/images/db01"), ("GET", "/nothing"),
           ("PUT", "/search")]
_REFUSED = {
    "foreign host": {"Host": "attacker.example"},
    "foreign host, matching origin (DNS rebinding)": {"Host": "attacker.example:8000",
                                                      "Origin": "http://attacker.example:8000"},
    "loopback-looking foreign host": {"Host": "127.0.0.1.attacker.example"},
    "empty host": {"Host": ""},
    "foreign origin": {"Origin": "http://evil.example"},
    "null origin": {"Origin": "null"},
    "another loopback port": {"Origin": "http://127.0.0.1:9999"},
    "cross-site, no origin (an <img>)": {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"},
    "same-site, another origin": {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "cors"},
}
_ALLOWED = {
    "no browser headers": {},
    "localhost": {"Host": "localhost:8000"},
    "ipv6 loopback": {"Host": "[::1]:8000", "Origin": "http://[::1]:8000"},
    "same origin": {"Origin": BASE, "Sec-Fetch-Site": "same-origin"},
    "public host": {"Host": "search.example", "Origin": "http://search.example"},
}


@pytest.fixture(scope="module")
def counted(base_index, model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("matrix")
    shutil.copytree(base_index, folder / "index")
    backend = _CountingBackend(LocalBackend(model, ImageIndex.open(folder / "index")))
    app = create_app(backend, ApiSettings(token=TOKEN, public_hosts=("search.example",)))
    reached: list[str] = []
    client = TestClient(app, base_url=BASE, raise_server_exceptions=False)
    client.get("/healthz")  # builds the middleware stack
    inner = app.router.middleware_stack

    async def routing(scope, receive, send):  # everything past the middleware: routes and handlers
        reached.append(scope["path"])
        await inner(scope, receive, send)

    app.router.middleware_stack = routing
    return client, backend, reached


@pytest.mark.parametrize("case", sorted(_REFUSED))
@pytest.mark.parametrize("method,path", _ROUTES)
def test_foreign_host_or_origin_never_reaches_a_handler(counted, case, method, path):
    client, backend, reached = counted
    backend.calls.clear()
    reached.clear()
    r = client.request(method, path, headers={**AUTH, **_REFUSED[case]}, json={"images": []})
    body = _error(r, 403, "forbidden")
    assert "host" in body["detail"] or "cross-" in body["detail"], body
    assert reached == [] and backend.calls == [], (reached, backend.calls)


@pytest.mark.parametrize("case", sorted(_ALLOWED))
@pytest.mark.parametrize("method,path", _ROUTES)
def test_allowed_host_and_origin_reach_the_handler(counted, case, method, path):
    client, backend, reached = counted
    reached.clear()
    r = client.request(method, path, headers={**AUTH, **_ALLOWED[case]},
                       **({"json": {"images": "none"}} if method == "POST" else {}))
    assert r.status_code != 403 and r.status_code < 500, r.text
    assert reached == [path]


def test_cross_site_navigation_opens_only_the_page(counted):
    client, _, reached = counted
    nav = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    assert client.get("/", headers=nav).status_code == 200  # a link from elsewhere opens the web page
    _error(client.get("/images/db01", headers=nav), 403)
    _error(client.post("/search", headers=nav), 403)


def test_public_hosts_must_be_names():
    for bad in ("http://a.example", "a.example:80", "*", "*.example", "", "user@a.example"):
        with pytest.raises(ValueError, match="public_hosts"):
            ApiSettings(public_hosts=(bad,))
    with pytest.raises(ValueError, match="public_hosts"):
        ApiSettings(public_hosts="a.example")
    assert ApiSettings(public_hosts=("Search.Example", "[2001:db8::1]")).allowed_hosts() >= {"search.example",
                                                                                            "2001:db8::1"}


def test_openapi_documents_the_api(client):
    spec = client.get("/openapi.json").json()
    assert {"/search", "/images", "/images/{image_id}", "/healthz"} <= set(spec["paths"])
    body = spec["paths"]["/search"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert {"400", "401", "413", "415", "422"} <= set(spec["paths"]["/search"]["post"]["responses"])
    for method, path in (("post", "/images"), ("delete", "/images/{image_id}")):
        assert spec["paths"][path][method]["security"] == [{"HTTPBearer": []}], (method, path)
        assert "401" in spec["paths"][path][method]["responses"]
    listing = spec["paths"]["/images"]["get"]
    query = {p["name"]: p["schema"] for p in listing["parameters"] if p["in"] == "query"}
    assert query["offset"]["minimum"] == 0 and query["offset"]["default"] == 0
    assert (query["limit"]["minimum"], query["limit"]["maximum"], query["limit"]["default"]) == (1, 200, 48)
    assert listing["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ImageList"}
    assert {"401", "403", "422"} <= set(listing["responses"])
    assert set(spec["components"]["schemas"]["ImageList"]["required"]) == {"total", "offset", "limit", "images"}
    thumbnail = spec["paths"]["/images/{image_id}"]["get"]  # the id route is still the thumbnail
    assert "image/jpeg" in thumbnail["responses"]["200"]["content"]


# ---------------------------------------------------------------------------------------------
# schemathesis: generated requests against the OpenAPI schema must never get a 5xx

try:
    import schemathesis
    from hypothesis import HealthCheck, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )
except ImportError:  # pragma: no cover - schemathesis is in the dev extra
    schemathesis = None


class _LazyBackend:
    """Builds its model and index on first use, so the app exists at import for schemathesis."""

    def __init__(self) -> None:
        self._backend: LocalBackend | None = None

    def __getattr__(self, name: str):
        if self._backend is None:
            m = RetrievalNet(ModelSpec(max_size=64)).eval()
            folder = Path(tempfile.mkdtemp(prefix="rt-fuzz-"))
            _build_index(folder, m)
            self._backend = LocalBackend(m, ImageIndex.open(folder / "index"))
        return getattr(self._backend, name)


if schemathesis is not None:
    fuzz = schemathesis.openapi.from_asgi(
        "/openapi.json", create_app(_LazyBackend(), ApiSettings(token=TOKEN, max_upload_bytes=64 * 1024)),
        headers={"Host": "127.0.0.1:8000"})

    @fuzz.parametrize()
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    def test_schemathesis_finds_no_server_error(case):
        """Every route with the token set (adds and deletes get past the 401): no 5xx, answers as documented."""
        case.headers = {**(case.headers or {}), **AUTH}  # over any generated Authorization value
        response = case.call_and_validate(base_url=BASE,
                                          checks=[not_a_server_error, status_code_conformance,
                                                  content_type_conformance, response_schema_conformance])
        assert response.status_code not in (401, 403), response.text  # the Host and the token got through

else:

    def test_schemathesis_finds_no_server_error():
        pytest.skip("schemathesis is not installed (pip install schemathesis, in the dev extra)")


def test_serve_config_binds_loopback():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from raytrieval.serving.app import AppArgs

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "serving" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(cfg)
    assert schema.http_options.host == "127.0.0.1"
    app = cfg["applications"][0]
    assert app["import_path"] == "raytrieval.serving.app:build_app"
    AppArgs(**app["args"])  # the builder accepts the args


def test_public_host_needs_a_token(monkeypatch):
    from raytrieval.serving.app import run_server

    monkeypatch.delenv("RAYTRIEVAL_TOKEN", raising=False)
    with pytest.raises(ValueError, match="RAYTRIEVAL_TOKEN"):
        run_server({"index": "unused"}, host="0.0.0.0")
    with pytest.raises(ValueError, match="RAYTRIEVAL_TOKEN"):
        run_server({"index": "unused", "public_hosts": ["search.example"]}, host="127.0.0.1")


def test_model_from_mlflow_registry_alias(tmp_path, model, monkeypatch):
    """`models:/<name>@champion` resolves to the checkpoint logged with the registered model."""
    mlflow = pytest.importorskip("mlflow")
    import torch

    from raytrieval.retrieval.checkpoint import save_checkpoint
    from raytrieval.retrieval.source import load_model
    from raytrieval.retrieval.source import fluent_tracking_uri

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    class Stub(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):
            return model_input

    with fluent_tracking_uri(uri), mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=Stub(), artifacts={"checkpoint": str(ckpt)},
                                       pip_requirements=["numpy"], registered_model_name="rt-test")
    mlflow.MlflowClient(uri).set_registered_model_alias("rt-test", "champion", str(info.registered_model_version))
    # the store is named by the model source alone (nothing global points at it any more)
    assert not mlflow.is_tracking_uri_set() and "MLFLOW_TRACKING_URI" not in os.environ
    loaded = load_model({"model_uri": "models:/rt-test@champion", "tracking_uri": uri})
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_query_preparation_is_the_extraction_path():
    """The served query pixels are what `extract.prepare_image` feeds the model (one decode, one
    resize), with the decoded size and the encoded format kept for uploads and verification."""
    import torch

    from raytrieval.retrieval.extract import prepare_image

    arr = _picture(7, size=(300, 200))
    jpeg = io.BytesIO()
    Image.fromarray(arr).save(jpeg, format="JPEG", quality=90)
    for data, fmt in ((_png(arr), "PNG"), (jpeg.getvalue(), "JPEG")):
        for box in (None, (20.4, 10.0, 260.0, 190.6)):
            prepared = prepare_query(data, box, 96)
            want = prepare_image(data, box, 96)  # (3, H, W) in [0, 1]
            got = torch.from_numpy(prepared.pixels.copy()).permute(2, 0, 1).float().div_(255.0)
            assert prepared.pixels.dtype == np.uint8 and max(prepared.pixels.shape[:2]) == 96
            assert torch.equal(got, want)
            assert (prepared.width, prepared.height, prepared.format) == (300, 200, fmt)
