"""Tests for the embedded demo collection (raytrieval.evaluation.demo)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raytrieval.evaluation import demo
from raytrieval.evaluation.datasets import load_benchmark

SMALL = {"n_scenes": 3, "views_per_scene": 10, "n_distractors": 4}  # default views
TINY = {"n_scenes": 2, "views_per_scene": 2, "n_distractors": 1}


def _hashes(folder: Path) -> dict[str, str]:
    """Relative path -> sha1 of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _read(folder: Path) -> tuple[dict, dict]:
    gnd = json.loads((folder / "gnd_demo.json").read_text(encoding="utf-8"))
    meta = json.loads((folder / "demo.json").read_text(encoding="utf-8"))
    return gnd, meta


@pytest.fixture(scope="module")
def default_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default collection, generated once for the module."""
    return demo.generate_demo(tmp_path_factory.mktemp("default"), seed=0)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.generate_demo(tmp_path_factory.mktemp("small"), seed=0, **SMALL)


# ------------------------------------------------------------------------------------------
# determinism


def test_same_seed_gives_identical_files(small_demo: Path, tmp_path: Path) -> None:
    again = demo.generate_demo(tmp_path, seed=0, **SMALL)
    assert again == tmp_path / "demo"
    first, second = _hashes(small_demo), _hashes(again)
    n_images = SMALL["n_scenes"] * (SMALL["views_per_scene"] + 1) + SMALL["n_distractors"]
    assert sum(k.startswith("jpg/") for k in first) == n_images
    assert first == second


def test_other_seed_gives_other_images(small_demo: Path, tmp_path: Path) -> None:
    other = demo.generate_demo(tmp_path, seed=1, **SMALL)
    a, b = _hashes(small_demo), _hashes(other)
    assert a.keys() == b.keys()
    assert sum(a[k] != b[k] for k in a if k.startswith("jpg/")) == len(
        [k for k in a if k.startswith("jpg/")])


def test_scene_images_do_not_depend_on_scene_count(small_demo: Path,
                                                   default_demo: Path) -> None:
    # a scene's views are drawn from its own generators: the small collection's pictures of
    # its scenes reappear byte for byte (under other, shuffled names) in the full one
    _, small_meta = _read(small_demo)
    small = {hashlib.sha1((small_demo / "jpg" / f"{n}.jpg").read_bytes()).hexdigest()
             for s in small_meta["scenes"] for n in s["views"] + s["queries"]}
    full = {h for k, h in _hashes(default_demo).items() if k.startswith("jpg/")}
    assert len(small) == SMALL["n_scenes"] * (SMALL["views_per_scene"] + 1)
    assert small <= full


# ------------------------------------------------------------------------------------------
# structure of the default collection


def test_default_structure(default_demo: Path) -> None:
    gnd, meta = _read(default_demo)
    imlist, qimlist = gnd["imlist"], gnd["qimlist"]
    assert meta["version"] == demo.DEMO_VERSION and meta["seed"] == 0
    assert len(meta["scenes"]) >= 20
    assert len(set(imlist)) == len(imlist) and not set(imlist) & set(qimlist)
    assert len(imlist) + len(qimlist) <= 400

    scene_of = {n: r.get("scene") for n, r in meta["images"].items()}
    for s in meta["scenes"]:
        assert len(s["views"]) >= 8, s["name"]
        assert len(s["queries"]) >= 1, s["name"]
        assert all(scene_of[n] == s["name"] for n in s["views"] + s["queries"])
    distractors = meta["distractors"]
    assert len(distractors) >= 40
    assert all(meta["images"][n]["kind"] == "distractor" and "scene" not in meta["images"][n]
               for n in distractors)
    views = {n for s in meta["scenes"] for n in s["views"]}
    assert views | set(distractors) == set(imlist) and not views & set(distractors)

    for name in imlist + qimlist:
        path = default_demo / "jpg" / f"{name}.jpg"
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert 400 <= max(im.size) <= 640, name
            rec = meta["images"][name]
            assert im.size == (rec["width"], rec["height"])


def test_gnd_is_valid(default_demo: Path) -> None:
    gnd, meta = _read(default_demo)
    imlist, qimlist = gnd["imlist"], gnd["qimlist"]
    assert len(gnd["gnd"]) == len(qimlist)
    index = {n: i for i, n in enumerate(imlist)}
    for qname, g in zip(qimlist, gnd["gnd"]):
        easy, hard, junk = set(g["easy"]), set(g["hard"]), set(g["junk"])
        assert all(isinstance(i, int) and 0 <= i < len(imlist) for i in easy | hard | junk)
        assert len(easy) == len(g["easy"]) and len(hard) == len(g["hard"])
        assert not (easy & hard) and not (easy & junk) and not (hard & junk)
        assert easy and hard, qname  # positives under every protocol
        # naive reference: the labelled views are exactly the views of the query's scene
        scene = meta["images"][qname]["scene"]
        expected = {index[n] for n, r in meta["images"].items()
                    if r["kind"] == "view" and r["scene"] == scene}
        assert easy | hard | junk == expected

        with Image.open(default_demo / "jpg" / f"{qname}.jpg") as im:
            w, h = im.size
        x0, y0, x1, y1 = g["bbx"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert (x1 - x0) * (y1 - y0) >= 0.05 * w * h  # the object is no speck


def test_labels_follow_recorded_parameters(default_demo: Path) -> None:
    gnd, meta = _read(default_demo)
    t = meta["thresholds"]
    counts = {"easy": 0, "hard": 0, "junk": 0}
    for rec in meta["images"].values():
        if rec["kind"] != "view":
            continue
        # hand-written reference of the documented rule
        if rec["visible"] < t["junk_visible"] or rec["area"] < t["junk_area"]:
            want = "junk"
        elif (rec["visible"] < t["hard_visible"] or rec["occluded"] >= t["hard_occluded"]
              or abs(rec["yaw"]) >= t["hard_tilt"] or abs(rec["pitch"]) >= t["hard_tilt"]
              or abs(rec["roll"]) >= t["hard_roll"] or rec["scale"] < t["hard_scale"]
              or rec["light"]["strong_light"]):
            want = "hard"
        else:
            want = "easy"
        assert rec["category"] == want
        assert 0.0 <= rec["visible"] <= rec["in_frame"] <= 1.0
        counts[want] += 1
    # a mix like revisitop's: plenty of easy and hard positives, a few junk views
    assert counts["easy"] >= 60 and counts["hard"] >= 60 and counts["junk"] >= 5


def test_load_benchmark_reads_the_collection(default_demo: Path) -> None:
    bench = load_benchmark("demo", default_demo.parent)
    gnd, _ = _read(default_demo)
    assert bench.num_images == len(gnd["imlist"])
    assert bench.num_queries == len(gnd["qimlist"]) >= 20
    assert all(b is not None for b in bench.qboxes)


def test_motorcycle_uses_the_real_second_view(default_demo: Path) -> None:
    _, meta = _read(default_demo)
    moto = [r for r in meta["images"].values() if r.get("scene") == "motorcycle"]
    assert sum(r.get("source") == "stereo_right" for r in moto) == 1


# ------------------------------------------------------------------------------------------
# skipping, atomic writes, arguments


def test_current_collection_is_not_regenerated(small_demo: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in small_demo.rglob("*")}
    start = time.perf_counter()
    again = demo.generate_demo(small_demo.parent, seed=0, **SMALL)
    assert time.perf_counter() - start < 2.0
    assert again == small_demo
    assert {p: p.stat().st_mtime_ns for p in small_demo.rglob("*")} == before


def test_training_validation_reads_the_demo_that_is_there(small_demo: Path) -> None:
    """A pipeline's images live in the demo folder: scoring on it must not rewrite it (it once
    regenerated the default demo over a smaller one, under the collection being trained on)."""
    from types import SimpleNamespace

    from raytrieval.trainers.loop import load_validation

    before = _hashes(small_demo)
    cfg = SimpleNamespace(val_dataset="demo", val_data_root=str(small_demo.parent), val_max_queries=None)
    bench = load_validation(cfg)  # the fields of TrainConfig it reads
    assert _hashes(small_demo) == before
    assert len(bench.images) == SMALL["n_scenes"] * SMALL["views_per_scene"] + SMALL["n_distractors"]


def test_stale_collection_is_replaced(tmp_path: Path) -> None:
    folder = demo.generate_demo(tmp_path, seed=0, **TINY)
    meta_path = folder / "demo.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["version"] = demo.DEMO_VERSION - 1
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    (folder / "jpg" / "stray.jpg").write_bytes(b"not from this version")

    again = demo.generate_demo(tmp_path, seed=0, **TINY)
    assert json.loads(meta_path.read_text(encoding="utf-8"))["version"] == demo.DEMO_VERSION
    assert not (again / "jpg" / "stray.jpg").exists()
    # another seed or configuration is not current either
    demo.generate_demo(tmp_path, seed=3, **TINY)
    assert json.loads(meta_path.read_text(encoding="utf-8"))["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temp folders left


def test_missing_image_makes_collection_stale(tmp_path: Path) -> None:
    folder = demo.generate_demo(tmp_path, seed=0, **TINY)
    victim = next((folder / "jpg").glob("*.jpg"))
    victim.unlink()
    demo.generate_demo(tmp_path, seed=0, **TINY)
    assert victim.is_file()


def test_failed_generation_keeps_previous_collection(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    folder = demo.generate_demo(tmp_path, seed=0, **TINY)
    before = _hashes(folder)

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo, "_write_collection", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        demo.generate_demo(tmp_path, seed=0, force=True, **TINY)
    assert _hashes(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


@pytest.mark.parametrize("kwargs, field", [
    ({"n_scenes": 0}, "n_scenes"),
    ({"n_scenes": len(demo.SCENES) + 1}, "n_scenes"),
    ({"views_per_scene": 1}, "views_per_scene"),
    ({"queries_per_scene": 0}, "queries_per_scene"),
    ({"n_distractors": -1}, "n_distractors"),
    ({"seed": -1}, "seed"),
])
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        demo.generate_demo(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_main_smoke_test(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--out", str(tmp_path), "--smoke-test"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "demo") in out
    gnd, meta = _read(tmp_path / "demo")
    assert len(meta["scenes"]) == 4 and len(gnd["qimlist"]) == 4


# ------------------------------------------------------------------------------------------
# geometry and sources


def test_plane_quad_matches_pinhole_projection() -> None:
    # unrotated: the rectangle itself, longer side 1
    quad = demo.plane_quad(4, 2, 0, 0, 0)
    np.testing.assert_allclose(quad, [[-0.5, -0.25], [0.5, -0.25], [0.5, 0.25], [-0.5, 0.25]])
    # yaw only, by hand: x' = x cos b, z' = -x sin b, projected f x' / (z' + f)
    f, b = 1.6, np.deg2rad(40)
    for (x, y), got in zip([(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)],
                           demo.plane_quad(1, 1, 40, 0, 0, focal=f)):
        z = -x * np.sin(b) + f
        np.testing.assert_allclose(got, [f * x * np.cos(b) / z, f * y / z], atol=1e-12)
    # roll only is a rotation: side lengths are kept
    rolled = demo.plane_quad(3, 1, 0, 0, 30)
    np.testing.assert_allclose(np.linalg.norm(rolled[1] - rolled[0]), 1.0)
    np.testing.assert_allclose(np.linalg.norm(rolled[2] - rolled[1]), 1 / 3)


def test_regions_lie_inside_sources_and_do_not_overlap() -> None:
    sources = demo.load_sources()
    regions = list(demo.SCENES) + list(demo.DISTRACTOR_REGIONS)
    assert len({name for name, _, _ in regions}) == len(regions)
    for name, source, (x0, y0, x1, y1) in regions:
        h, w = sources[source].shape[:2]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, name
    for i, (na, sa, a) in enumerate(regions):
        for nb, sb, b in regions[i + 1:]:
            if sa == sb:
                overlap = min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])
                assert not overlap, (na, nb)


# ------------------------------------------------------------------------------------------
# nothing shared between scenes


def test_no_two_pictures_share_a_background_or_occluder(default_demo: Path) -> None:
    # from the generator's own record of what it pasted into every picture
    _, meta = _read(default_demo)
    scene_regions = {(s["source"], tuple(s["region"])): s["name"] for s in meta["scenes"]}
    texture_owner: dict[str, str] = {}
    tiles: list[tuple[str, tuple[int, ...], str]] = []
    for name, rec in meta["images"].items():
        pasted = rec["pasted"]
        assert pasted[0]["role"] == "background", name
        n_objects = sum(p["role"] == "object" for p in pasted)
        assert n_objects == 1 or (rec["kind"] == "distractor" and n_objects == 0), name
        for p in pasted:
            if p["role"] == "object":
                region = (p["source"], tuple(p["region"]))
                if rec["kind"] == "distractor":
                    tiles.append((region[0], region[1], name))
                elif p["source"] == "stereo_right":
                    assert rec["scene"] == "motorcycle"
                else:
                    assert scene_regions[region] == rec["scene"], name
            else:  # background, clutter, occluder: a texture of this picture alone
                assert p["source"] == "texture", (name, p)
                assert texture_owner.setdefault(p["key"], name) == name, (p["key"], name)
    assert sum(rec["kind"] == "view" for rec in meta["images"].values()) > 0
    assert any(p["role"] == "occluder" for rec in meta["images"].values() for p in rec["pasted"])
    # distractor objects: disjoint photo regions, none overlapping a scene's region
    regions = [(src, box, f"tile of {owner}") for src, box, owner in tiles]
    regions += [(src, box, scene) for (src, box), scene in scene_regions.items()]
    assert len(tiles) >= 40
    for i, (sa, a, na) in enumerate(regions):
        for sb, b, nb in regions[i + 1:]:
            if sa == sb:
                overlap = min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])
                assert not overlap, (na, nb)


def test_pictures_of_different_scenes_do_not_verify(small_demo: Path, tmp_path: Path) -> None:
    # the point of the above, measured: RootSIFT + homography (the cleaning stage's verifier,
    # default settings) finds no geometric match between pictures of different scenes, and
    # does between the easy views of one scene
    from raytrieval.mining.cleaning import match_arrays, read_matches
    from raytrieval.mining.verify import VerifyConfig, verify_pairs

    _, meta = _read(small_demo)
    names = sorted(meta["images"])
    scene = {n: meta["images"][n].get("scene", f"distractor {n}") for n in names}
    easy = {n for n in names if meta["images"][n].get("category") == "easy"}
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
             if scene[a] != scene[b] or (a in easy and b in easy)]
    paths = {n: str(small_demo / "jpg" / f"{n}.jpg") for n in names}
    verify_pairs(pairs, paths, tmp_path / "m.parquet", VerifyConfig(), workers=0, progress=False)
    m = match_arrays(read_matches(tmp_path / "m.parquet"), names)
    same = np.array([scene[names[a]] == scene[names[b]] for a, b in zip(m.a, m.b)])
    assert len(m) == len(pairs) and same.any() and (~same).any()
    assert m.inliers[~same].max() < 15  # the cleaning stage's default threshold
    assert np.mean(m.inliers[same] >= 15) >= 0.8
