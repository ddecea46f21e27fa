"""The web page in headless Chromium: it uploads an image, shows the results grid, and the
screenshot (saved under runs/test-artifacts/) is not blank; its Browse section pages through the
collection and a click on an image searches with it (driven over the DevTools protocol).

The page runs a search by itself when opened as `/?sample=<image id>`: it fetches the indexed
image, uploads it to `POST /search` as a user's file would be, and renders the grid. The server
is the FastAPI app over an in-process backend (`LocalBackend`) run by uvicorn on 127.0.0.1.
Skips when no Chromium is installed (`apt-get install -y chromium`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "runs" / "test-artifacts"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "horse", "clock", "coins")


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    import skimage.data
    import uvicorn

    from raytrieval.retrieval.model import ModelSpec, RetrievalNet
    from raytrieval.serving.engine import embed_arrays, model_record, prepare_query
    from raytrieval.serving.index import ImageIndex
    from raytrieval.serving.ingress import ApiSettings, LocalBackend, create_app

    folder = tmp_path_factory.mktemp("page")
    files, arrays, sizes = [], [], []
    for name in PHOTOS:
        img = np.asarray(getattr(skimage.data, name)())
        path = folder / f"{name}.png"
        Image.fromarray(img).convert("RGB").save(path)
        prepared = prepare_query(path.read_bytes(), None, 128)
        files.append(str(path))
        arrays.append(prepared.pixels)
        sizes.append((prepared.width, prepared.height))
    model = RetrievalNet(ModelSpec(max_size=128)).eval()
    index = ImageIndex.create(folder / "index", embed_arrays(model, arrays, max_size=128), list(PHOTOS), files,
                              sizes, model=model_record(model, {"spec": model.spec.to_dict()}))
    app = create_app(LocalBackend(model, index), ApiSettings(token=""))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if requests.get(f"{base}/healthz", timeout=2).ok:
                break
        except requests.RequestException:
            time.sleep(0.1)
    yield base
    server.should_exit = True
    thread.join(timeout=10)


def _flags(profile: Path) -> list[str]:
    return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-extensions",
            "--disable-default-apps", "--mute-audio", f"--user-data-dir={profile}", "--window-size=1280,900"]


def _run_chromium(binary: str, profile: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary, *_flags(profile), "--virtual-time-budget=20000", *extra, url], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "HOME": str(profile)})


@contextlib.contextmanager
def _devtools(binary: str, profile: Path, url: str):
    """Chromium on `url`, yielding `evaluate(expression)` (the page's JavaScript, awaited, by value)."""
    from websockets.sync.client import connect  # websockets comes with uvicorn[standard] (ray[serve])

    proc = subprocess.Popen([binary, *_flags(profile), "--remote-debugging-port=0", url], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "HOME": str(profile)})
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = []
        while not pages and time.monotonic() < deadline:
            pages = [t for t in requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
                     if t["type"] == "page"]
            time.sleep(0.1)
        with connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
            ids = itertools.count(1)

            def evaluate(expression: str):
                call = next(ids)
                ws.send(json.dumps({"id": call, "method": "Runtime.evaluate", "params": {
                    "expression": expression, "awaitPromise": True, "returnByValue": True}}))
                while True:
                    answer = json.loads(ws.recv(timeout=60))
                    if answer.get("id") == call:
                        result = answer["result"]
                        assert "exceptionDetails" not in result, result
                        return result["result"].get("value")

            yield evaluate
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wait(evaluate, expression: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.1)


def test_page_uploads_and_shows_results(page_server, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no Chromium found (apt-get install -y chromium)")
    url = f"{page_server}/?sample=chelsea&k=6&spatial=1"

    dom = _run_chromium(binary, tmp_path / "profile-dom", url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'data-state="done"' in html, html[-3000:]
    assert html.count('class="card"') == 6
    assert 'class="card" data-image-id="chelsea"' in html and "1. chelsea" in html
    assert "blob:" in html  # thumbnails were fetched and shown

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "webpage.png"
    shot.unlink(missing_ok=True)
    run = _run_chromium(binary, tmp_path / "profile-shot", url, f"--screenshot={shot}")
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (900, 1280)
    grid = pixels[80:520, 380:1270]  # where the result cards are drawn
    assert pixels.std() > 20 and grid.std() > 30, "screenshot looks blank"
    assert len(np.unique(grid.reshape(-1, 3).astype(np.uint8), axis=0)) > 2000  # photos, not flat colour


_BROWSE = """(() => ({
  text: document.getElementById("browse-text").textContent,
  ids: [...document.querySelectorAll("#browse-grid .tile")].map((t) => t.dataset.imageId),
  shown: [...document.querySelectorAll("#browse-grid .tile img")]
    .every((i) => i.src.startsWith("blob:") && i.naturalWidth > 0),
  prev: document.getElementById("browse-prev").disabled,
  next: document.getElementById("browse-next").disabled,
}))()"""
_BROWSED = 'document.getElementById("browse")?.dataset.state === "done"'  # null until the page has loaded


def test_page_browses_the_collection_and_searches_a_clicked_image(page_server, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no Chromium found (apt-get install -y chromium)")
    listed = [im["image_id"] for im in requests.get(f"{page_server}/images", params={"limit": 200}, timeout=10)
              .json()["images"]]
    assert listed == list(PHOTOS)  # the index was built in this order
    with _devtools(binary, tmp_path / "profile-cdp", f"{page_server}/?per_page=3") as evaluate:
        _wait(evaluate, _BROWSED)
        pages = [evaluate(_BROWSE)]
        for button in ("browse-next", "browse-next", "browse-prev"):
            evaluate(f'document.getElementById("{button}").click()')  # sets the state to "loading" at once
            _wait(evaluate, _BROWSED)
            pages.append(evaluate(_BROWSE))
        want = [("images 1-3 of 8", listed[0:3], True, False), ("images 4-6 of 8", listed[3:6], False, False),
                ("images 7-8 of 8", listed[6:8], False, True), ("images 4-6 of 8", listed[3:6], False, False)]
        assert [(p["text"], p["ids"], p["prev"], p["next"]) for p in pages] == want
        assert all(p["shown"] for p in pages)  # every tile shows its fetched thumbnail

        clicked = listed[4]
        evaluate(f'document.querySelector(\'#browse-grid .tile[data-image-id="{clicked}"]\').click()')
        _wait(evaluate, 'document.body.dataset.state === "done" || document.body.dataset.state === "error"')
        status = evaluate('document.getElementById("status").textContent')
        assert evaluate("document.body.dataset.state") == "done", status
        first = evaluate('document.querySelector("#grid .card .id").textContent')
        assert first == f"1. {clicked}"  # the clicked image found itself first
        assert evaluate('document.getElementById("preview").src').startswith("blob:")  # it became the query


def test_page_draws_the_region_reranking_boxes(page_server, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no Chromium found (apt-get install -y chromium)")
    dom = _run_chromium(binary, tmp_path / "profile-casr", f"{page_server}/?sample=coffee&k=4&casr=1", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'data-state="done"' in html, html[-3000:]
    assert html.count('class="card"') == 4 and "1. coffee" in html
    assert html.count('class="box region"') == 4  # CA-SR localised every result (dashed: no inliers)
