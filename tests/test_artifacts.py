"""raytrieval.retrieval.artifacts: atomic writes, hashes, fingerprints."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytrieval.retrieval.artifacts import (
    atomic_dir,
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_npy,
    atomic_write_table,
    fingerprint,
    sha1_file,
)


def _names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_write_bytes_creates_parents_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a" / "b" / "blob.bin"
    assert atomic_write_bytes(path, b"hello") == path
    assert path.read_bytes() == b"hello"
    atomic_write_bytes(path, b"again")
    assert path.read_bytes() == b"again"
    assert _names(path.parent) == ["blob.bin"]


def test_written_files_get_umask_permissions_not_0600(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    path = atomic_write_bytes(tmp_path / "perm.bin", b"x")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failing_write_keeps_old_file_and_removes_temp(tmp_path):
    path = tmp_path / "x.bin"
    atomic_write_bytes(path, b"old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_open(path) as f:
            f.write(b"half of the new cont")
            raise RuntimeError("disk on fire")
    assert path.read_bytes() == b"old"
    assert _names(tmp_path) == ["x.bin"]


def test_failing_table_write_keeps_old_file(tmp_path):
    path = tmp_path / "t.parquet"
    table = pa.table({"a": [1, 2, 3]})
    atomic_write_table(table, path)
    with pytest.raises(Exception):
        atomic_write_table("not a table", path)  # type: ignore[arg-type]
    assert pq.read_table(path).equals(table)
    assert _names(tmp_path) == ["t.parquet"]


def test_failing_npy_write_keeps_old_file(tmp_path):
    path = tmp_path / "d.npy"
    old = np.arange(6, dtype=np.float32).reshape(2, 3)
    atomic_write_npy(path, old)
    with pytest.raises(ValueError):
        atomic_write_npy(path, np.array([{"a": 1}], dtype=object))  # pickles are refused
    assert np.array_equal(np.load(path), old)
    assert _names(tmp_path) == ["d.npy"]


def test_failing_json_write_keeps_old_file(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert _names(tmp_path) == ["m.json"]


def test_json_sorted_indented_and_converted(tmp_path):
    @dataclasses.dataclass
    class Cfg:
        lr: float = 0.1

    path = tmp_path / "meta.json"
    atomic_write_json(
        path,
        {"z": 1, "a": {"y": np.float32(0.5), "b": Path("/x/y")}, "arr": np.arange(3), "cfg": Cfg()},
    )
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    assert text.index('"a"') < text.index('"arr"') < text.index('"cfg"') < text.index('"z"')
    assert '\n  "a": {\n    "b": "/x/y",' in text
    assert json.loads(text) == {"z": 1, "a": {"y": 0.5, "b": "/x/y"}, "arr": [0, 1, 2], "cfg": {"lr": 0.1}}


def test_table_roundtrip(tmp_path):
    table = pa.table({"id": ["a", "b"], "x": pa.array([1.5, 2.5], pa.float32())})
    path = atomic_write_table(table, tmp_path / "sub" / "t.parquet")
    assert pq.read_table(path).equals(table)


def test_npy_roundtrip_keeps_the_exact_name(tmp_path):
    desc = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    path = atomic_write_npy(tmp_path / "desc.bin", desc)
    assert _names(tmp_path) == ["desc.bin"]
    back = np.load(path)
    assert back.dtype == np.float32 and np.array_equal(back, desc)


def test_atomic_dir_replaces_existing_and_keeps_it_on_failure(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as d:
        (d / "model.pt").write_bytes(b"v1")
    assert (target / "model.pt").read_bytes() == b"v1"
    with atomic_dir(target) as d:
        (d / "model.pt").write_bytes(b"v2")
        (d / "meta.json").write_text("{}")
    assert _names(target) == ["meta.json", "model.pt"]
    assert (target / "model.pt").read_bytes() == b"v2"
    with pytest.raises(KeyError):
        with atomic_dir(target) as d:
            (d / "model.pt").write_bytes(b"v3")
            raise KeyError("boom")
    assert (target / "model.pt").read_bytes() == b"v2"
    assert _names(tmp_path) == ["ckpt"]


@pytest.mark.parametrize("size", [0, 1, 1000, 5 * 1024 + 3])
@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_sha1_file_matches_hashlib(tmp_path, size, chunk):
    data = np.random.default_rng(size).bytes(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert sha1_file(path, chunk=chunk) == hashlib.sha1(data).hexdigest()


def test_fingerprint_stable_under_key_order():
    a = {"model": {"backbone": "resnet50", "pooling": "gem", "p": 3.0}, "size": 1024}
    b = {"size": 1024, "model": {"p": 3.0, "pooling": "gem", "backbone": "resnet50"}}
    assert fingerprint(a, "abc") == fingerprint(b, "abc")
    fp = fingerprint(a)
    assert len(fp) == 16 and all(c in "0123456789abcdef" for c in fp)


def test_fingerprint_changes_with_content_and_order():
    base = fingerprint({"p": 3.0}, "sha1-of-input")
    assert fingerprint({"p": 3.1}, "sha1-of-input") != base
    assert fingerprint({"p": 3.0}, "sha1-of-other") != base
    assert fingerprint("sha1-of-input", {"p": 3.0}) != base
    assert fingerprint({"p": 3.0}) != base
    assert fingerprint({"p": "3.0"}, "sha1-of-input") != base


def test_fingerprint_is_stable_across_processes():
    # a golden value: a change here invalidates every cached stage output
    expected = hashlib.sha1(b'[{"a":1,"b":[1,2]},"x"]').hexdigest()[:16]
    assert fingerprint({"b": [1, 2], "a": 1}, "x") == expected


def test_fingerprint_of_file_content(tmp_path):
    path = tmp_path / "in.parquet"
    path.write_bytes(b"one")
    first = fingerprint({"k": 1}, sha1_file(path))
    path.write_bytes(b"two")
    assert fingerprint({"k": 1}, sha1_file(path)) != first
