"""The web page in headless Chromium: it uploads an image, shows the results grid, and the
screenshot (saved under runs/test-artifacts/) is not blank.

The page runs a search by itself when opened as `/?sample=<image id>`: it fetches the indexed
image, uploads it to `POST /search` as a user's file would be, and renders the grid. The server
is the FastAPI app over an in-process backend (`LocalBackend`) run by uvicorn on 127.0.0.1.
Skips when no Chromium is installed (`apt-get install -y chromium`).
"""

from __future__ import annotations

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


def _run_chromium(binary: str, profile: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-extensions",
             "--disable-default-apps", "--mute-audio", f"--user-data-dir={profile}", "--window-size=1280,900",
             "--virtual-time-budget=20000"]
    return subprocess.run([binary, *flags, *extra, url], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(profile)})


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
    assert 'data-image-id="chelsea"' in html and "1. chelsea" in html
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
