"""raytrieval.retrieval.manifest: listing, decode-checking and the images.parquet schema."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from badimages import ZOO_EXPECTED, ZOO_OK_SIZES, make_bad_image_zoo
from raytrieval.retrieval.artifacts import sha1_file
from raytrieval.retrieval.manifest import (
    MANIFEST_SCHEMA,
    assign_image_ids,
    build_manifest,
    check_image,
    list_images,
    manifest_from_rows,
    ok_images,
    read_manifest,
    write_manifest,
)


def _jpg(path: Path, size=(16, 12), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG")
    return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("zoo")
    make_bad_image_zoo(folder)
    return folder


@pytest.fixture(scope="module")
def zoo_manifest(zoo) -> pa.Table:
    return build_manifest(zoo, progress=False)


def test_schema():
    assert MANIFEST_SCHEMA.names == ["image_id", "uri", "width", "height", "sha1", "status"]
    assert MANIFEST_SCHEMA.field("width").type == pa.int32()
    assert MANIFEST_SCHEMA.field("height").type == pa.int32()


def test_list_images_recursive_sorted_case_insensitive(tmp_path):
    for rel in ["b/z.JPG", "a.png", "b/a/y.jpeg", "c.webp", "d.TIFF", "e.gif", "f.bmp", "g.tif"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("no")
    (tmp_path / "raw.cr2").write_bytes(b"x")
    (tmp_path / ".jpg").write_bytes(b"a dotfile named like an extension")
    (tmp_path / "dir.jpg").mkdir()  # a directory is never an image
    got = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert got == [".jpg", "a.png", "b/a/y.jpeg", "b/z.JPG", "c.webp", "d.TIFF", "e.gif", "f.bmp", "g.tif"]
    assert all(p.is_absolute() == tmp_path.is_absolute() for p in list_images(tmp_path))
    only = [p.name for p in list_images(tmp_path, extensions=("JPG", ".jpeg"))]
    assert only == [".jpg", "y.jpeg", "z.JPG"]


def test_list_images_rejects_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        list_images(tmp_path / "nope")
    with pytest.raises(ValueError, match="extensions"):
        list_images(tmp_path, extensions=())


def test_build_manifest_on_zoo_records_every_file(zoo, zoo_manifest):
    table = zoo_manifest
    assert table.schema == MANIFEST_SCHEMA
    assert table.num_rows == len(ZOO_EXPECTED)
    rows = {row["image_id"]: row for row in table.to_pylist()}
    for name, expected in ZOO_EXPECTED.items():
        row = rows[Path(name).stem]
        path = zoo / name
        assert row["uri"] == os.path.abspath(path)
        assert row["sha1"] == sha1_file(path)
        if expected == "ok":
            assert row["status"] == "ok", (name, row)
            assert (row["width"], row["height"]) == ZOO_OK_SIZES[name]
        else:
            assert expected in row["status"], (name, row)
            assert row["width"] is None and row["height"] is None
    assert rows["exif_rotated"]["width"] == 32 and rows["exif_rotated"]["height"] == 64


def test_ok_images(zoo_manifest):
    ok = ok_images(zoo_manifest)
    assert ok.schema == MANIFEST_SCHEMA
    assert sorted(ok.column("image_id").to_pylist()) == sorted(Path(n).stem for n in ZOO_OK_SIZES)
    assert ok.column("width").null_count == 0


def test_check_image_is_a_pure_row_function(zoo, tmp_path):
    row = check_image(zoo / "good.jpg")
    assert row == {
        "uri": os.path.abspath(zoo / "good.jpg"),
        "width": 48,
        "height": 32,
        "sha1": sha1_file(zoo / "good.jpg"),
        "status": "ok",
    }
    assert check_image(zoo / "good.jpg", max_pixels=10)["status"].startswith("too many pixels")
    missing = check_image(tmp_path / "gone.jpg")
    assert missing["status"] == "missing file" and missing["sha1"] is None
    assert check_image(tmp_path)["status"] in {"not a file", "unreadable file"}


def test_ids_are_relative_paths_without_extension(tmp_path):
    _jpg(tmp_path / "x" / "y" / "img1.jpg")
    _jpg(tmp_path / "img2.JPEG")
    table = build_manifest(tmp_path, progress=False)
    assert table.column("image_id").to_pylist() == ["img2", "x/y/img1"]
    # the same folder listed from another working directory gives the same ids
    again = build_manifest(str(tmp_path), progress=False)
    assert again.column("image_id").to_pylist() == table.column("image_id").to_pylist()


def test_file_list_with_missing_file(tmp_path):
    good = _jpg(tmp_path / "good.jpg")
    table = build_manifest([good, tmp_path / "missing.jpg"], progress=False)
    rows = table.to_pylist()
    assert [r["image_id"] for r in rows] == ["good", "missing"]
    assert rows[0]["status"] == "ok" and (rows[0]["width"], rows[0]["height"]) == (16, 12)
    assert rows[1]["status"] == "missing file"
    assert rows[1]["sha1"] is None and rows[1]["width"] is None


def test_file_list_ids_with_root(tmp_path):
    a = _jpg(tmp_path / "a" / "img.jpg")
    b = _jpg(tmp_path / "b" / "img.jpg")
    with pytest.raises(ValueError, match="duplicate") as info:
        build_manifest([a, b], progress=False)
    assert str(a) in str(info.value) and str(b) in str(info.value)
    table = build_manifest([a, b], root=tmp_path, progress=False)
    assert table.column("image_id").to_pylist() == ["a/img", "b/img"]
    with pytest.raises(ValueError, match="not inside root"):
        build_manifest([a], root=tmp_path / "b", progress=False)


def test_duplicate_ids_in_folder(tmp_path):
    _jpg(tmp_path / "same.jpg")
    Image.new("RGB", (4, 4)).save(tmp_path / "same.png")
    with pytest.raises(ValueError, match="duplicate ids.*'same'"):
        build_manifest(tmp_path, progress=False)


def test_same_file_twice_is_a_duplicate(tmp_path):
    a = _jpg(tmp_path / "a.jpg")
    with pytest.raises(ValueError, match="duplicate"):
        build_manifest([a, a], progress=False)


def test_explicit_ids_from_a_mapping(tmp_path):
    a = _jpg(tmp_path / "one.jpg")
    table = build_manifest({"all_souls_000013": a, "q/other": tmp_path / "x.jpg"}, progress=False)
    assert table.column("image_id").to_pylist() == ["all_souls_000013", "q/other"]
    assert table.column("status").to_pylist() == ["ok", "missing file"]


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        build_manifest(tmp_path / "nope", progress=False)
    empty = build_manifest(tmp_path, progress=False)
    assert empty.num_rows == 0 and empty.schema == MANIFEST_SCHEMA


def test_progress_bar_does_not_break(tmp_path, capsys):
    _jpg(tmp_path / "a.jpg")
    assert build_manifest(tmp_path, progress=True).num_rows == 1


def test_write_read_roundtrip(tmp_path, zoo_manifest):
    path = tmp_path / "run" / "images.parquet"
    write_manifest(zoo_manifest, path)
    assert sorted(os.listdir(path.parent)) == ["images.parquet"]
    back = read_manifest(path)
    assert back.schema == MANIFEST_SCHEMA
    assert back.equals(zoo_manifest)


def test_read_manifest_validates_schema(tmp_path, zoo_manifest):
    path = tmp_path / "bad.parquet"
    pq.write_table(zoo_manifest.drop_columns(["sha1"]), path)
    with pytest.raises(ValueError, match="missing column 'sha1'"):
        read_manifest(path)
    wrong = zoo_manifest.set_column(2, "width", zoo_manifest.column("width").cast(pa.int64()))
    pq.write_table(wrong, path)
    with pytest.raises(ValueError, match="'width' has type int64"):
        read_manifest(path)
    reordered = zoo_manifest.select(["status", "image_id", "uri", "sha1", "height", "width"])
    pq.write_table(reordered.append_column("extra", pa.array([1] * reordered.num_rows)), path)
    assert read_manifest(path).equals(zoo_manifest)
    nulls = pa.table(
        {name: pa.array([None], field.type) for name, field in zip(MANIFEST_SCHEMA.names, MANIFEST_SCHEMA)}
    )
    pq.write_table(nulls, path)
    with pytest.raises(ValueError, match="nulls"):
        read_manifest(path)
    with pytest.raises(ValueError):
        write_manifest(nulls, tmp_path / "never.parquet")
    assert not (tmp_path / "never.parquet").exists()


def test_manifest_from_rows_matches_build(zoo, zoo_manifest):
    paths = list_images(zoo)
    ids = assign_image_ids(paths, root=zoo)
    rows = [check_image(p) for p in paths]
    assert manifest_from_rows(ids, rows).equals(zoo_manifest)
    with pytest.raises(ValueError, match="ids for"):
        manifest_from_rows(ids[:-1], rows)


def test_threads_check_in_listing_order(zoo, zoo_manifest):
    """The bad-image zoo (corrupt, truncated, empty, CMYK, 16-bit, non-image...) checked by 1 and
    by 4 threads: the same rows, reasons included, in the same order."""
    one = build_manifest(zoo, progress=False, threads=1)
    assert one.equals(build_manifest(zoo, progress=False, threads=4)) and one.equals(zoo_manifest)
    assert len(set(one.column("status").to_pylist())) > 2  # good files and several kinds of bad ones
    with pytest.raises(ValueError, match="threads"):
        build_manifest(zoo, progress=False, threads=0)


def test_manifest_images_load_like_the_check_says(zoo, zoo_manifest):
    from raytrieval.retrieval.imageio import load_image

    for row in ok_images(zoo_manifest).to_pylist():
        img = load_image(row["uri"])
        assert img.size == (row["width"], row["height"])
        assert np.asarray(img).dtype == np.uint8


def test_core_modules_do_not_import_ray():
    code = (
        "import sys, raytrieval.retrieval.imageio, raytrieval.retrieval.manifest, raytrieval.retrieval.artifacts; "
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stdout + result.stderr
