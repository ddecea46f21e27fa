"""The serving index: exact search equals brute force, approximate kinds recall, durability."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from raytrieval.serving.index import DuplicateImageId, ImageIndex, IndexConfig, UnknownImageId, choose_kind

ROOT = Path(__file__).resolve().parents[1]


def _unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def _clustered(n: int, d: int, seed: int, centers: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d))
    X = _unit(c[rng.integers(0, centers, n)] + 0.6 * rng.standard_normal((n, d)))
    Q = _unit(c[rng.integers(0, centers, 50)] + 0.6 * rng.standard_normal((50, d)))
    return X, Q


def _brute(Q: np.ndarray, X: np.ndarray, live: np.ndarray, k: int) -> np.ndarray:
    """Indices into X of the top-k live rows by dot product, by a plain loop."""
    out = []
    for q in Q:
        sims = [(float(q @ X[i]), i) for i in live]
        sims.sort(key=lambda t: (-t[0], t[1]))
        out.append([i for _, i in sims[:k]])
    return np.array(out)


def _ids(n: int) -> list[str]:
    return [f"img{i:05d}" for i in range(n)]


def test_exact_search_equals_brute_force(tmp_path):
    X, Q = _clustered(400, 24, seed=0)
    idx = ImageIndex.create(tmp_path / "idx", X, _ids(400), config=IndexConfig(kind="flat"))
    scores, labels = idx.search(Q, 10)
    ref = _brute(Q, X, np.arange(400), 10)
    np.testing.assert_array_equal(labels, ref)
    np.testing.assert_allclose(scores, np.take_along_axis(Q @ X.T, ref, axis=1), rtol=1e-5, atol=1e-6)

    # mutations keep it exact: delete some, add new ones
    gone = [3, 17, 250]
    for i in gone:
        idx.delete(f"img{i:05d}")
    extra, _ = _clustered(20, 24, seed=1)
    idx.add([f"new{i}" for i in range(20)], extra)
    all_x = np.concatenate([X, extra])
    live = np.array([i for i in range(420) if i not in gone])
    scores, labels = idx.search(Q, 10)
    np.testing.assert_array_equal(labels, _brute(Q, all_x, live, 10))  # labels are assigned in order
    assert len(idx) == 417 and "img00003" not in idx and "new5" in idx


def test_k_larger_than_index_and_bad_input(tmp_path):
    X, Q = _clustered(5, 8, seed=2)
    idx = ImageIndex.create(tmp_path / "idx", X, _ids(5))
    scores, labels = idx.search(Q[:2], 50)
    assert labels.shape == (2, 5)
    with pytest.raises(ValueError, match="k"):
        idx.search(Q[:1], 0)
    with pytest.raises(ValueError, match="queries"):
        idx.search(np.zeros((1, 9), np.float32), 3)
    with pytest.raises(DuplicateImageId):
        idx.add(["img00001"], X[:1])
    with pytest.raises(UnknownImageId):
        idx.delete("nope")
    with pytest.raises(ValueError, match="NaN"):
        idx.add(["x"], np.full((1, 8), np.nan, np.float32))


@pytest.mark.parametrize("kind,floor", [("hnsw", 0.9), ("ivfpq", 0.5)])
def test_approximate_recall(tmp_path, kind, floor):
    X, Q = _clustered(3000, 32, seed=3)
    idx = ImageIndex.create(tmp_path / kind, X, _ids(3000), config=IndexConfig(kind=kind, nprobe=16, pq_m=8, pq_nbits=6))
    assert idx.kind == kind
    _, labels = idx.search(Q, 10)
    ref = np.argsort(-(Q @ X.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(labels, ref)])
    assert recall >= floor, f"{kind} recall@10 {recall:.2f}"
    # delete and re-open: deleted images never come back, for either kind
    idx.delete(f"img{int(labels[0, 0]):05d}")
    again = ImageIndex.open(tmp_path / kind)
    _, labels2 = again.search(Q[:1], 10)
    assert int(labels[0, 0]) not in labels2[0]


def test_auto_kind_by_size():
    cfg = IndexConfig(flat_max=10, hnsw_max=100)
    assert [choose_kind(n, cfg) for n in (5, 50, 500)] == ["flat", "hnsw", "ivfpq"]
    assert choose_kind(5, IndexConfig(kind="hnsw")) == "hnsw"
    with pytest.raises(ValueError, match="kind"):
        IndexConfig(kind="kdtree")


def test_ivfpq_needs_training_data(tmp_path):
    X, _ = _clustered(100, 16, seed=4)
    with pytest.raises(ValueError, match="ivfpq needs at least"):
        ImageIndex.create(tmp_path / "i", X, _ids(100), config=IndexConfig(kind="ivfpq"))


def _state(idx: ImageIndex, Q: np.ndarray) -> tuple[list[str], np.ndarray]:
    return idx.image_ids(), idx.search(Q, 5)[1]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_log_replay_restores_mutations(tmp_path, kind):
    X, Q = _clustered(60, 16, seed=5)
    d = tmp_path / "idx"
    idx = ImageIndex.create(d, X[:50], _ids(50), config=IndexConfig(kind=kind, snapshot_every=0))
    idx.add([f"a{i}" for i in range(10)], X[50:])
    idx.delete("img00007")
    idx.delete("a3")
    expected = _state(idx, Q)
    del idx  # "crash": no snapshot, no close; only the fsynced log is on disk
    log = (d / "log.jsonl").read_text().splitlines()
    assert len(log) == 12 and json.loads(log[-1])["op"] == "delete"
    reopened = ImageIndex.open(d)
    assert _state(reopened, Q)[0] == expected[0]
    np.testing.assert_array_equal(_state(reopened, Q)[1], expected[1])
    # a snapshot folds the log in; the next open reads the same state from the snapshot alone
    reopened.snapshot()
    assert (d / "log.jsonl").read_bytes() == b""
    third = ImageIndex.open(d)
    assert _state(third, Q)[0] == expected[0]
    np.testing.assert_array_equal(_state(third, Q)[1], expected[1])
    assert sorted(p.name for p in d.glob("index-*.faiss")) == [f"index-{third.seq:012d}.faiss"]


def test_torn_last_line_is_dropped_and_corrupt_middle_line_refused(tmp_path):
    X, Q = _clustered(12, 8, seed=6)
    d = tmp_path / "idx"
    idx = ImageIndex.create(d, X[:10], _ids(10))
    idx.add(["a0"], X[10:11])
    del idx
    with open(d / "log.jsonl", "ab") as f:
        f.write(b'{"seq": 2, "op": "add", "label": 11, "image_id": "a1", "vec')  # torn, never acked
    idx = ImageIndex.open(d)
    assert "a0" in idx and "a1" not in idx
    idx.add(["a1"], X[11:12])  # appends after the truncated tail
    del idx
    idx = ImageIndex.open(d)
    assert "a1" in idx and len(idx) == 12
    del idx
    lines = (d / "log.jsonl").read_bytes().split(b"\n")
    lines[0] = b"garbage"
    (d / "log.jsonl").write_bytes(b"\n".join(lines))
    with pytest.raises(ValueError, match="corrupt"):
        ImageIndex.open(d)


def test_snapshot_is_atomic(tmp_path, monkeypatch):
    import raytrieval.serving.mutation_log as log_mod
    import raytrieval.serving.snapshot_store as mod

    X, Q = _clustered(30, 8, seed=7)
    d = tmp_path / "idx"
    idx = ImageIndex.create(d, X[:20], _ids(20), config=IndexConfig(snapshot_every=0))
    idx.add([f"a{i}" for i in range(10)], X[20:])
    idx.delete("img00002")
    expected = _state(idx, Q)
    before = json.loads((d / "meta.json").read_text())

    real = mod.atomic_write_json

    def crash(path, obj):  # data files are written, the commit point is not
        raise OSError("disk full")

    monkeypatch.setattr(mod, "atomic_write_json", crash)
    with pytest.raises(OSError):
        idx.snapshot()
    assert json.loads((d / "meta.json").read_text()) == before
    del idx
    monkeypatch.setattr(mod, "atomic_write_json", real)
    reopened = ImageIndex.open(d)  # old snapshot + full log
    assert _state(reopened, Q)[0] == expected[0]
    np.testing.assert_array_equal(_state(reopened, Q)[1], expected[1])
    assert len(list(d.glob("index-*.faiss"))) == 1  # the orphaned new files are cleaned up

    # crash after the commit point but before the log is emptied: old entries are skipped
    real_bytes = log_mod.atomic_write_bytes

    def crash_log(path, data):
        if Path(path).name == "log.jsonl":
            raise OSError("crash")
        return real_bytes(path, data)

    monkeypatch.setattr(log_mod, "atomic_write_bytes", crash_log)
    with pytest.raises(OSError):
        reopened.snapshot()
    monkeypatch.setattr(log_mod, "atomic_write_bytes", real_bytes)
    del reopened
    assert len((d / "log.jsonl").read_text().splitlines()) == 11
    final = ImageIndex.open(d)
    assert _state(final, Q)[0] == expected[0]
    np.testing.assert_array_equal(_state(final, Q)[1], expected[1])
    assert not list(d.glob(".tmp-*"))


def test_hnsw_tombstones_are_compacted(tmp_path):
    X, Q = _clustered(200, 16, seed=8)
    d = tmp_path / "idx"
    idx = ImageIndex.create(d, X, _ids(200), config=IndexConfig(kind="hnsw", snapshot_every=0, compact_ratio=0.1))
    for i in range(30):
        idx.delete(f"img{i:05d}")
    assert idx.ntotal == 200 and len(idx) == 170
    _, labels = idx.search(Q, 20)
    assert labels.min() >= 30
    idx.snapshot()
    assert idx.ntotal == 170
    _, again = ImageIndex.open(d).search(Q, 20)
    np.testing.assert_array_equal(np.sort(again, axis=1), np.sort(labels, axis=1))


def test_uploads_are_stored_before_the_log(tmp_path):
    X, _ = _clustered(3, 8, seed=9)
    d = tmp_path / "idx"
    idx = ImageIndex.create(d, X[:2], _ids(2))
    idx.add(["up"], X[2:], sizes=[(4, 3)], data=[(b"pretend-jpeg", "jpg")])
    rec = idx.record(idx.label_of("up"))
    assert Path(rec["uri"]).read_bytes() == b"pretend-jpeg" and (rec["width"], rec["height"]) == (4, 3)
    entry = json.loads((d / "log.jsonl").read_text().splitlines()[-1])
    assert entry["uri"].startswith("uploads/") and not os.path.isabs(entry["uri"])


_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from raytrieval.serving.index import ImageIndex
    idx = ImageIndex.open(sys.argv[1])
    rng = np.random.default_rng(0)
    for i in range(10_000):
        v = rng.standard_normal((1, 8)).astype(np.float32)
        v /= np.linalg.norm(v)
        if i % 7 == 3:
            idx.delete(f"w{i - 1}")
            print(f"del w{i - 1}", flush=True)
        else:
            idx.add([f"w{i}"], v)
            print(f"add w{i}", flush=True)
""")


def test_killed_writer_loses_nothing_acknowledged(tmp_path):
    """SIGKILL a process in the middle of adds and deletes; every printed (acked) mutation survives."""
    X, _ = _clustered(10, 8, seed=10)
    d = tmp_path / "idx"
    ImageIndex.create(d, X, _ids(10), config=IndexConfig(snapshot_every=25))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(d)], stdout=subprocess.PIPE, text=True, env=env)
    acked: list[str] = []
    for line in proc.stdout:
        acked.append(line.split()[0] + " " + line.split()[1])
        if len(acked) >= 120:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    idx = ImageIndex.open(d)
    added = {a.split()[1] for a in acked if a.startswith("add")}
    deleted = {a.split()[1] for a in acked if a.startswith("del")}
    for image_id in added - deleted:
        assert image_id in idx, image_id
    for image_id in deleted:
        assert image_id not in idx, image_id


def test_cli_index_build(tmp_path, capsys):
    """`raytrieval index build` embeds a folder in-process and writes an index that opens."""
    import skimage.data
    from PIL import Image

    from raytrieval.cluster.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(np.asarray(getattr(skimage.data, name)())).save(folder / f"{name}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "index"
    assert main(["index", "build", "--images", str(folder), "--out", str(out), "--max-size", "64", "--workers", "0"]) == 0
    assert "3 images, flat index" in capsys.readouterr().out
    idx = ImageIndex.open(out)
    assert sorted(idx.image_ids()) == ["astronaut", "chelsea", "coffee"]
    assert idx.model["source"]["spec"]["max_size"] == 64 and idx.model["dim"] == idx.dim
    assert main(["index", "build", "--images", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_index_build_from_stored_vectors_equals_embedding(tmp_path):
    """The pipeline passes the clean stage's descriptors for the off-the-shelf model: the index
    is the one embedding would give, and an image without a stored vector is skipped."""
    import skimage.data
    from PIL import Image

    from raytrieval.cluster.index_stage import build_index
    from raytrieval.retrieval.model import ModelSpec

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(np.asarray(getattr(skimage.data, name)())).save(folder / f"{name}.png")
    source = {"spec": ModelSpec(max_size=64).to_dict()}
    embedded = build_index(folder, source, tmp_path / "a", log=lambda _: None)
    ids = embedded.image_ids()
    X = embedded.vectors([embedded.label_of(i) for i in ids])
    stored = build_index(folder, source, tmp_path / "b", vectors=(ids[:2], X[:2]), log=lambda _: None)
    assert stored.image_ids() == ids[:2]
    np.testing.assert_allclose(stored.vectors([stored.label_of(i) for i in ids[:2]]), X[:2], atol=1e-6)
