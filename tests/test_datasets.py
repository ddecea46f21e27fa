"""Benchmark loaders and the restricted unpickler, on the shared real data and tiny fakes."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from raytrieval.evaluation.datasets import (
    Benchmark,
    RestrictedUnpickler,
    load_benchmark,
    load_gnd,
    load_grouped,
    load_revisitop,
    safe_load_pickle,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RPARIS = DATA / "rparis6k-mini"
UKBENCH = DATA / "ukbench-56"

needs_rparis = pytest.mark.skipif(
    not (RPARIS / "gnd_rparis6k-mini.pkl").is_file(),
    reason=f"shared evaluation data not found at {RPARIS} (see ../shared/data/README.md)")
needs_ukbench = pytest.mark.skipif(
    not (UKBENCH / "jpg").is_dir(),
    reason=f"shared evaluation data not found at {UKBENCH} (see ../shared/data/README.md)")


class _RunsCommand:
    """Unpickling this would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _CallsEval:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_unpickler_refuses_code_execution(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"gnd": [_RunsCommand(marker)]}, protocol=protocol))
    with pytest.raises(pickle.UnpicklingError, match=r"refused global (posix|nt|os)\.system"):
        safe_load_pickle(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps([_CallsEval()], protocol=protocol))
    # Protocols 0-2 spell the builtins module "__builtin__" (Python 2 compatibility).
    refused_eval = r"refused global (builtins|__builtin__)\.eval"
    with pytest.raises(pickle.UnpicklingError, match=refused_eval):
        safe_load_pickle(path)


def test_unpickler_refuses_other_globals(tmp_path):
    path = tmp_path / "obj.pkl"
    path.write_bytes(pickle.dumps({"p": Path("x")}))
    with pytest.raises(pickle.UnpicklingError, match="refused global pathlib"):
        safe_load_pickle(path)


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_unpickler_admits_numpy_arrays(tmp_path, protocol):
    data = {"easy": np.arange(5, dtype=np.int64), "bbx": np.array([1.5, 2.0, 30.0, 40.0]),
            "n": np.int64(7), "s": {1, 2}, "names": ["a", "b"]}
    path = tmp_path / "np.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    out = safe_load_pickle(path)
    np.testing.assert_array_equal(out["easy"], data["easy"])
    np.testing.assert_array_equal(out["bbx"], data["bbx"])
    assert out["n"] == 7 and out["s"] == {1, 2} and out["names"] == ["a", "b"]
    with open(path, "rb") as f:  # file objects work too
        assert RestrictedUnpickler(f).load()["names"] == ["a", "b"]


@needs_rparis
def test_real_pkl_loads_and_equals_json():
    raw_pkl = safe_load_pickle(RPARIS / "gnd_rparis6k-mini.pkl")
    with open(RPARIS / "gnd_rparis6k-mini.json", encoding="utf-8") as f:
        raw_json = json.load(f)
    assert raw_pkl == raw_json
    a = load_gnd(RPARIS / "gnd_rparis6k-mini.pkl")
    b = load_gnd(RPARIS / "gnd_rparis6k-mini.json")
    assert a["imlist"] == b["imlist"] and a["qimlist"] == b["qimlist"]
    assert len(a["imlist"]) == 397 and len(a["qimlist"]) == 19
    for ga, gb in zip(a["gnd"], b["gnd"]):
        assert ga["bbx"] == gb["bbx"]
        for key in ("easy", "hard", "junk"):
            assert ga[key].dtype == np.int64
            np.testing.assert_array_equal(ga[key], gb[key])


def _write_fake(root: Path, name: str, gnd: dict, make_images: bool = True) -> Path:
    folder = root / name
    (folder / "jpg").mkdir(parents=True)
    if make_images:
        for n in list(gnd["imlist"]) + list(gnd["qimlist"]):
            (folder / "jpg" / f"{n}.jpg").write_bytes(b"")
    (folder / f"gnd_{name}.json").write_text(json.dumps(gnd))
    return folder


def _fake_gnd() -> dict:
    return {"imlist": ["a", "b", "c", "d"], "qimlist": ["q0", "q1"],
            "gnd": [{"bbx": [1, 2, 30, 40], "easy": [0], "hard": [1], "junk": [2]},
                    {"bbx": None, "easy": [], "hard": [3], "junk": []}]}


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("qimlist"), "missing key 'qimlist'"),
    (lambda d: d["gnd"][0].pop("junk"), r"gnd\[0\] missing key 'junk'"),
    (lambda d: d["gnd"][1]["hard"].append(4), r"gnd\[1\]\['hard'\] has index 4 outside"),
    (lambda d: d["gnd"][0]["easy"].append(-1), r"index -1 outside"),
    (lambda d: d["gnd"].pop(), "gnd has 1 entries but qimlist has 2"),
    (lambda d: d["gnd"][0].update(bbx=[5, 5, 1, 9]), r"x1 > x0"),
    (lambda d: d["gnd"][0].update(bbx=[1, 2, 3]), r"4 finite numbers"),
    (lambda d: d.update(imlist="abcd"), "imlist must be a list"),
])
def test_load_gnd_validation(tmp_path, mutate, message):
    d = _fake_gnd()
    mutate(d)
    path = tmp_path / "gnd_x.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=message):
        load_gnd(path)


def test_load_gnd_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_gnd(tmp_path / "gnd_none.json")
    (tmp_path / "gnd.txt").write_text("{}")
    with pytest.raises(ValueError, match=".json or .pkl"):
        load_gnd(tmp_path / "gnd.txt")


def test_load_revisitop_prefers_json_and_never_unpickles(tmp_path):
    folder = _write_fake(tmp_path, "fake", _fake_gnd())
    marker = tmp_path / "pwned"
    (folder / "gnd_fake.pkl").write_bytes(pickle.dumps(_RunsCommand(marker)))
    bench = load_revisitop(tmp_path, "fake")
    assert not marker.exists()
    assert bench.num_images == 4 and bench.num_queries == 2
    assert bench.qboxes == [(1.0, 2.0, 30.0, 40.0), None]
    assert bench.images[0] == str((tmp_path / "fake" / "jpg" / "a.jpg").absolute())
    assert os.path.isabs(bench.queries[1]) and bench.queries[1].endswith("q1.jpg")
    # Without the json the (malicious) pickle is read by the restricted unpickler: refused.
    (folder / "gnd_fake.json").unlink()
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        load_revisitop(tmp_path, "fake")
    assert not marker.exists()
    (folder / "gnd_fake.pkl").unlink()
    with pytest.raises(FileNotFoundError, match="no ground truth"):
        load_revisitop(tmp_path, "fake")


def test_load_revisitop_missing_images(tmp_path):
    folder = _write_fake(tmp_path, "fake", _fake_gnd())
    (folder / "jpg" / "b.jpg").unlink()
    (folder / "jpg" / "d.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"2 of 4 database images .* e\.g\. .*b\.jpg"):
        load_revisitop(tmp_path, "fake")


@needs_rparis
def test_load_revisitop_rparis6k_mini():
    bench = load_revisitop(DATA, "rparis6k-mini")
    assert bench.name == "rparis6k-mini" and bench.protocol == "revisitop"
    assert bench.num_images == 397 and bench.num_queries == 19 and bench.groups is None
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in bench.images + bench.queries)
    assert len(bench.qboxes) == 19
    assert all(isinstance(b, tuple) and len(b) == 4 for b in bench.qboxes)
    assert all(b[2] > b[0] and b[3] > b[1] and min(b) >= 0 for b in bench.qboxes)
    for g in bench.gnd:
        assert set(g) == {"easy", "hard", "junk"}
        assert all(g[k].dtype == np.int64 for k in g)
        assert not set(g["easy"]) & set(g["hard"]) and not set(g["easy"]) & set(g["junk"])
    # Seven queries are stored already cropped: their box is the whole stored image.
    image = pytest.importorskip("PIL.Image")
    whole = 0
    for path, box in zip(bench.queries, bench.qboxes):
        with image.open(path) as im:
            w, h = im.size
        assert box[2] <= w and box[3] <= h
        whole += box == (0.0, 0.0, float(w), float(h))
    assert whole == 7
    # An oracle ranking (easy, hard, junk, rest) scores 1 everywhere; two queries have no
    # easy positives and are excluded from Easy.
    ranks = []
    for g in bench.gnd:
        head = list(g["easy"]) + list(g["hard"]) + list(g["junk"])
        ranks.append(head + [i for i in range(bench.num_images) if i not in set(head)])
    res = bench.evaluate(np.array(ranks, dtype=np.int64))
    for proto in ("easy", "medium", "hard"):
        assert res[proto]["map"] == pytest.approx(1.0)
        assert res[proto]["mp@10"] == pytest.approx(1.0)
    assert sum(math.isnan(a) for a in res["easy"]["aps"]) == 2
    assert load_benchmark("rparis6k-mini", DATA).images == bench.images


@needs_ukbench
def test_load_grouped_ukbench56():
    bench = load_grouped(UKBENCH)
    assert bench.name == "ukbench-56" and bench.protocol == "grouped"
    assert bench.num_images == 56 and bench.num_queries == 56
    assert bench.queries == bench.images
    assert [Path(p).name for p in bench.images[:2]] == ["ukbench00000.jpg", "ukbench00001.jpg"]
    assert len(np.unique(bench.groups)) == 14
    np.testing.assert_array_equal(bench.groups, np.arange(56) // 4)
    assert bench.qboxes == [None] * 56
    for i, g in enumerate(bench.gnd):
        assert i in g["easy"] and len(g["easy"]) == 4
        assert set(bench.groups[g["easy"]]) == {i // 4}
        assert g["hard"].size == 0 and g["junk"].size == 0
    # Perfect ranking: N-S = 4, mAP = 1; a ranking by image order scores less.
    perfect = np.array([list(g["easy"]) + [j for j in range(56) if j not in g["easy"]]
                        for g in bench.gnd])
    res = bench.evaluate(perfect)
    assert res["ns_score"] == 4.0 and res["map"] == pytest.approx(1.0)
    shifted = np.array([np.roll(np.arange(56), -i - 1) for i in range(56)])
    assert bench.evaluate(shifted)["ns_score"] < 4.0
    assert load_benchmark("ukbench-56", DATA).protocol == "grouped"


def test_load_grouped_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_grouped(tmp_path)
    (tmp_path / "jpg").mkdir()
    for i in range(5):
        (tmp_path / "jpg" / f"im{i:02d}.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="not a multiple"):
        load_grouped(tmp_path)
    bench = load_grouped(tmp_path, group_size=5, name="five")
    assert bench.name == "five" and bench.groups.tolist() == [0] * 5


def test_benchmark_validation():
    empty = np.empty(0, dtype=np.int64)
    g = {"easy": empty, "hard": empty, "junk": empty}
    with pytest.raises(ValueError, match="protocol"):
        Benchmark("x", ["a"], ["q"], [None], [g], None, "oxford")
    with pytest.raises(ValueError, match="qboxes"):
        Benchmark("x", ["a"], ["q"], [], [g])
    with pytest.raises(ValueError, match="groups"):
        Benchmark("x", ["a"], ["q"], [None], [g], np.array([0, 1]), "grouped")
