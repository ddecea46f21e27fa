"""raytrieval.retrieval.imageio: every zoo file decodes to upright 8-bit RGB or fails with a typed reason."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from badimages import (
    BOMB_SIZE,
    ZOO_EXPECTED,
    ZOO_OK_SIZES,
    bomb_png,
    good_rgb_array,
    make_bad_image_zoo,
)
from raytrieval.retrieval.imageio import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    crop_box,
    load_image,
    probe_image,
    resize_max,
    to_rgb,
)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("zoo")
    make_bad_image_zoo(folder)
    return folder


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_zoo_is_the_documented_one(tmp_path):
    expected = make_bad_image_zoo(tmp_path)
    assert expected == ZOO_EXPECTED
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)
    assert BOMB_SIZE[0] * BOMB_SIZE[1] > DEFAULT_MAX_PIXELS
    assert (tmp_path / "bomb.png").stat().st_size < 64 * 1024  # small on disk


@pytest.mark.parametrize("name", sorted(ZOO_EXPECTED))
def test_zoo_file_outcome_from_path(zoo, name):
    path = zoo / name
    expected = ZOO_EXPECTED[name]
    if expected == "ok":
        img = load_image(path)
        assert img.mode == "RGB"
        assert img.size == ZOO_OK_SIZES[name]
        assert np.asarray(img).dtype == np.uint8
        assert probe_image(path) == ZOO_OK_SIZES[name]
    else:
        with pytest.raises(ImageDecodeError) as info:
            load_image(path)
        assert expected in info.value.reason
        assert info.value.path == str(path)
        assert str(path) in str(info.value)
        with pytest.raises(ImageDecodeError):
            probe_image(path)


@pytest.mark.parametrize("name", sorted(ZOO_EXPECTED))
@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_zoo_file_outcome_from_bytes(zoo, name, wrap):
    data = wrap((zoo / name).read_bytes())
    expected = ZOO_EXPECTED[name]
    if expected == "ok":
        img = load_image(data)
        assert img.mode == "RGB"
        assert img.size == ZOO_OK_SIZES[name]
        assert np.array_equal(np.asarray(img), np.asarray(load_image(zoo / name)))
    else:
        with pytest.raises(ImageDecodeError) as info:
            load_image(data)
        assert expected in info.value.reason
        assert info.value.path == "<bytes>"


def test_decode_error_is_a_picklable_value_error():
    err = ImageDecodeError("/x/y.jpg", "truncated", "OSError: boom")
    assert isinstance(err, ValueError)
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.reason, back.detail) == ("/x/y.jpg", "truncated", "OSError: boom")
    assert str(back) == str(err) == "/x/y.jpg: truncated (OSError: boom)"


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageDecodeError) as info:
        load_image(tmp_path / "nope.jpg")
    assert info.value.reason == "missing file"
    with pytest.raises(ImageDecodeError) as info:
        load_image(tmp_path)
    assert info.value.reason in {"not a file", "unreadable file"}


def test_empty_bytes():
    with pytest.raises(ImageDecodeError) as info:
        load_image(b"")
    assert info.value.reason == "empty file"


def test_pixel_cap_is_checked_before_decoding(zoo):
    with pytest.raises(ImageDecodeError) as info:
        load_image(zoo / "good.jpg", max_pixels=48 * 32 - 1)
    assert info.value.reason == f"too many pixels (48 x 32 > {48 * 32 - 1})"
    assert load_image(zoo / "good.jpg", max_pixels=48 * 32).size == (48, 32)
    # the bomb's pixels are never decoded: a truncated body still reports the cap
    with pytest.raises(ImageDecodeError) as info:
        load_image(bomb_png()[:200])
    assert info.value.reason.startswith("too many pixels (9000 x 9000")
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(zoo / "good.jpg", max_pixels=0)


def test_bomb_png_is_a_valid_image():
    img = load_image(bomb_png((100, 50)))
    assert img.size == (100, 50)
    assert np.asarray(img).max() == 0


def test_pil_globals_untouched(zoo):
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    for name in ZOO_EXPECTED:
        try:
            load_image(zoo / name)
        except ImageDecodeError:
            pass
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before == (
        before[0],
        False,
    )


def test_result_is_independent_of_the_file(tmp_path, zoo):
    path = tmp_path / "copy.jpg"
    path.write_bytes((zoo / "good.jpg").read_bytes())
    img = load_image(path)
    path.unlink()
    assert np.asarray(img).shape == (32, 48, 3)


def test_good_jpg_matches_pil_reference(zoo):
    img = load_image(zoo / "good.jpg")
    with Image.open(zoo / "good.jpg") as ref:
        assert np.array_equal(np.asarray(img), np.asarray(ref.convert("RGB")))
    # and JPEG kept it close to the pattern it was made from
    assert np.abs(np.asarray(img).astype(int) - good_rgb_array()).mean() < 4


def test_gray16_maps_full_range_like_naive_reference(zoo):
    arr = np.asarray(load_image(zoo / "gray16.png")).astype(int)  # (H, W, 3)
    with Image.open(zoo / "gray16.png") as raw:
        raw16 = np.asarray(raw).astype(np.int64)  # (H, W) in 0..65535
    assert raw16.min() == 0 and raw16.max() == 65535
    expected = np.empty_like(raw16)
    for i in range(raw16.shape[0]):
        for j in range(raw16.shape[1]):
            expected[i, j] = int(round(raw16[i, j] / 257.0))
    for c in range(3):
        assert np.array_equal(arr[..., c], expected)
    assert arr.min() == 0 and arr.max() == 255
    assert len(np.unique(arr)) > 200  # scaled, not clipped to a few values


@pytest.mark.parametrize("mode", ["I;16B", "I"])
def test_16bit_tiff_modes(mode):
    ramp = np.linspace(0, 65535, 32 * 8).round().astype(np.uint16).reshape(8, 32)
    if mode == "I;16B":
        img = Image.frombytes("I;16B", (32, 8), ramp.astype(">u2").tobytes())
    else:
        img = Image.fromarray(ramp.astype(np.int32))
    assert img.mode == mode
    data = _encode(img, "TIFF")
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == mode
    out = np.asarray(load_image(data))[..., 0].astype(int)
    assert np.array_equal(out, np.rint(ramp / 257.0).astype(int))


def test_float_images_are_scaled():
    unit = np.linspace(0, 1, 64, dtype=np.float32).reshape(4, 16)
    out = np.asarray(load_image(_encode(Image.fromarray(unit), "TIFF")))[..., 0]
    assert out.min() == 0 and out.max() == 255
    assert np.array_equal(out, np.rint(unit.astype(np.float64) * 255).astype(np.uint8))
    wide = (unit * 1000 - 300).astype(np.float32)  # outside [0, 1]: min-max
    out = np.asarray(load_image(_encode(Image.fromarray(wide), "TIFF")))[..., 0]
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out.ravel().astype(int)) >= 0)


def test_cmyk_gives_rgb(zoo):
    with Image.open(zoo / "cmyk.jpg") as raw:
        assert raw.mode == "CMYK"
    arr = np.asarray(load_image(zoo / "cmyk.jpg")).astype(int)
    assert np.all(np.abs(arr - [255, 0, 0]) <= 3)


def test_grayscale_gives_equal_channels(zoo):
    arr = np.asarray(load_image(zoo / "gray.jpg"))
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])


def test_rgba_is_composited_on_white_like_naive_reference(zoo):
    out = np.asarray(load_image(zoo / "rgba.png")).astype(int)
    with Image.open(zoo / "rgba.png") as raw:
        rgba = np.asarray(raw).astype(float)
    h, w, _ = rgba.shape
    for i in range(h):
        for j in range(w):
            a = rgba[i, j, 3] / 255.0
            for c in range(3):
                expected = a * rgba[i, j, c] + (1 - a) * 255.0
                assert abs(out[i, j, c] - expected) <= 1.0
    assert np.all(out[:, 0] == 255)  # alpha 0 column is pure white


def test_palette_transparency_becomes_white(zoo):
    out = np.asarray(load_image(zoo / "palette.png"))
    with Image.open(zoo / "palette.png") as raw:
        assert raw.mode == "P"
        idx = np.asarray(raw)
    colours = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255), 3: (255, 255, 255)}
    for k, colour in colours.items():
        assert np.all(out[idx == k] == colour)


@pytest.mark.parametrize(
    "mode", ["1", "L", "LA", "P", "PA", "RGBX", "RGBa", "La", "YCbCr", "LAB", "HSV", "CMYK", "I", "F"]
)
def test_to_rgb_modes(mode):
    src = Image.new("RGB", (6, 4), (10, 200, 30))
    img = src.convert("LA").convert("La") if mode == "La" else src.convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (6, 4)
    pixel = np.asarray(out)[0, 0].astype(int)
    if mode in {"RGBX", "RGBa", "YCbCr", "LAB", "HSV", "CMYK"}:
        assert np.abs(pixel - [10, 200, 30]).max() <= 12, pixel
    elif mode in {"P", "PA"}:  # PIL quantises to its web palette (steps of 51)
        assert np.abs(pixel - [10, 200, 30]).max() <= 26, pixel
    elif mode in {"L", "LA", "La"}:
        gray = round(0.299 * 10 + 0.587 * 200 + 0.114 * 30)
        assert np.abs(pixel - gray).max() <= 2, pixel


def test_to_rgb_returns_rgb_unchanged_and_rejects_unknown_modes():
    img = Image.new("RGB", (2, 2))
    assert to_rgb(img) is img
    with pytest.raises(ImageDecodeError, match="unsupported mode"):
        to_rgb(_OddModeImage())


class _OddModeImage:
    """Stands in for an image in a mode PIL can hold but that has no RGB meaning."""

    mode = "BGR;24"
    info: dict = {}


def test_exif_orientation_applied(zoo):
    with Image.open(zoo / "exif_rotated.jpg") as raw:
        assert raw.size == (64, 32)
    img = load_image(zoo / "exif_rotated.jpg")
    assert img.size == (32, 64)
    arr = np.asarray(img).astype(int)
    # stored left half red -> after a 90 degree clockwise turn it is the top half
    assert np.all(np.abs(arr[4:28, 4:28] - [255, 0, 0]).max(axis=-1) < 30)
    assert np.all(np.abs(arr[36:60, 4:28] - [0, 0, 255]).max(axis=-1) < 30)
    assert probe_image(zoo / "exif_rotated.jpg") == (32, 64)


def test_resize_max():
    img = Image.fromarray(good_rgb_array((200, 100)))
    out = resize_max(img, 50)
    assert out.size == (50, 25)
    portrait = resize_max(img.transpose(Image.Transpose.ROTATE_90), 64)
    assert portrait.size == (32, 64)
    assert resize_max(img, 200) is img  # fits: unchanged
    assert resize_max(img, 1000) is img  # never upscaled
    assert resize_max(Image.new("RGB", (1000, 1)), 10).size == (10, 1)
    with pytest.raises(ValueError, match="max_size"):
        resize_max(img, 0)


def test_resize_max_is_antialiased():
    # a 1-pixel checkerboard averages to mid gray when shrunk with a wide filter
    checker = ((np.indices((128, 128)).sum(axis=0) % 2) * 255).astype(np.uint8)
    out = np.asarray(resize_max(Image.fromarray(checker), 16)).astype(float)
    assert np.all(np.abs(out - 127.5) < 20)


def test_crop_box_matches_numpy_slicing():
    arr = good_rgb_array((40, 30))
    img = Image.fromarray(arr)
    out = np.asarray(crop_box(img, (5, 7, 20, 25)))
    assert np.array_equal(out, arr[7:25, 5:20])
    # floats are rounded, out-of-bounds parts are clamped
    out = np.asarray(crop_box(img, (-10.2, 2.6, 100.0, 29.4)))
    assert np.array_equal(out, arr[3:29, 0:40])


@pytest.mark.parametrize(
    "box", [(5, 5, 5, 10), (10, 5, 5, 10), (50, 0, 60, 10), (0, -20, 10, -1), (0, 0, 1)]
)
def test_crop_box_rejects_empty_or_malformed(box):
    img = Image.new("RGB", (40, 30))
    with pytest.raises(ValueError):
        crop_box(img, box)


def test_crop_box_rejects_nan():
    with pytest.raises(ValueError, match="finite"):
        crop_box(Image.new("RGB", (4, 4)), (0, 0, float("nan"), 2))


def test_int32_outside_16bit_range_is_min_max_scaled():
    values = np.array([[-70000, 0, 70000, 140000]], dtype=np.int32)
    out = np.asarray(to_rgb(Image.fromarray(values)))[0, :, 0]
    assert out.tolist() == [0, round(70000 * 255 / 210000), round(140000 * 255 / 210000), 255]
    flat = np.asarray(to_rgb(Image.fromarray(np.full((2, 2), -5, np.int32))))
    assert flat.max() == 0
