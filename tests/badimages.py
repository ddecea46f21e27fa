"""A zoo of good, odd and broken image files, generated with PIL/numpy only.

    from badimages import make_bad_image_zoo, ZOO_OK_SIZES
    expected = make_bad_image_zoo(tmp_path)  # {filename: 'ok' or a reason substring}

Reason substrings match `raytrieval.retrieval.imageio.ImageDecodeError.reason` (and the manifest status).
`ZOO_OK_SIZES` gives the upright (width, height) of every file expected to be 'ok'.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

GOOD_SIZE = (48, 32)  # (width, height)
EXIF_STORED_SIZE = (64, 32)  # as stored; orientation 6 shows it as 32 x 64
BOMB_SIZE = (9000, 9000)  # 81 M pixels: above DEFAULT_MAX_PIXELS, below PIL's own warning level

ZOO_OK_SIZES: dict[str, tuple[int, int]] = {
    "good.jpg": GOOD_SIZE,
    "cmyk.jpg": GOOD_SIZE,
    "gray16.png": (64, 16),
    "gray.jpg": GOOD_SIZE,
    "rgba.png": GOOD_SIZE,
    "palette.png": GOOD_SIZE,
    "exif_rotated.jpg": (EXIF_STORED_SIZE[1], EXIF_STORED_SIZE[0]),
    "UPPER.JPEG": GOOD_SIZE,
}

ZOO_EXPECTED: dict[str, str] = {
    **{name: "ok" for name in ZOO_OK_SIZES},
    "corrupt.jpg": "not an image",
    "corrupt_data.png": "corrupt",
    "truncated.jpg": "truncated",
    "empty.jpg": "empty file",
    "text.png": "not an image",
    "bomb.png": "too many pixels",
}


def good_rgb_array(size: tuple[int, int] = GOOD_SIZE, seed: int = 0) -> np.ndarray:
    """A smooth RGB test pattern (compresses well, survives JPEG), shape (H, W, 3) uint8."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    channels = [127.5 + 127.5 * np.sin(x / 7.0 + y / 11.0 + p) for p in phase]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(size: tuple[int, int] = BOMB_SIZE) -> bytes:
    """A valid, all-black 1-bit PNG of `size` that is tiny on disk (a few kB)."""
    width, height = size
    row = b"\x00" + bytes((width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", data)
        + _png_chunk(b"IEND", b"")
    )


def make_bad_image_zoo(folder: Path) -> dict[str, str]:
    """Write the zoo into `folder` (created if needed).

    Files: a good RGB jpg, an upper-case `.JPEG`, random bytes named .jpg, a PNG whose
    compressed data is damaged, the first half of a jpg, a zero-byte jpg, a text file named
    .png, a CMYK jpg (pure red), a 16-bit grayscale PNG spanning 0..65535, a grayscale jpg, an
    RGBA png (alpha ramp), a palette png with a transparent index, a jpg stored 64 x 32 with
    EXIF orientation 6 (shown 32 x 64, left half red on top) and a 9000 x 9000 PNG bomb.

    Args:
        folder: destination folder.

    Returns:
        {filename: 'ok' or a substring of the expected rejection reason}.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    good = Image.fromarray(good_rgb_array())
    files: dict[str, bytes] = {}

    files["good.jpg"] = _encode(good, "JPEG", quality=95)
    files["UPPER.JPEG"] = _encode(Image.fromarray(good_rgb_array(seed=1)), "JPEG", quality=95)

    rng = np.random.default_rng(1234)
    files["corrupt.jpg"] = b"\x00\x13\x37" + rng.bytes(4093)  # no known magic number

    png = bytearray(_encode(good, "PNG"))
    start = png.index(b"IDAT") + 4
    for offset in range(20, 60):  # smash the deflate stream past its 2-byte header
        png[start + offset] ^= 0xA5
    files["corrupt_data.png"] = bytes(png)

    big = Image.fromarray(good_rgb_array((256, 192), seed=2))
    big_jpg = _encode(big, "JPEG", quality=95)
    files["truncated.jpg"] = big_jpg[: len(big_jpg) // 2]
    files["empty.jpg"] = b""
    files["text.png"] = b"this is not a picture\n" * 10

    files["cmyk.jpg"] = _encode(Image.new("CMYK", GOOD_SIZE, (0, 255, 255, 0)), "JPEG", quality=95)

    ramp = np.linspace(0, 65535, 64 * 16).round().astype(np.uint16).reshape(16, 64)
    gray16 = Image.fromarray(ramp)  # mode I;16
    assert gray16.mode == "I;16", gray16.mode
    files["gray16.png"] = _encode(gray16, "PNG")

    files["gray.jpg"] = _encode(good.convert("L"), "JPEG", quality=95)

    rgba = good_rgb_array()
    alpha = np.tile(np.linspace(0, 255, GOOD_SIZE[0]).round().astype(np.uint8), (GOOD_SIZE[1], 1))
    files["rgba.png"] = _encode(Image.fromarray(np.dstack([rgba, alpha])), "PNG")

    indices = (np.arange(GOOD_SIZE[0] * GOOD_SIZE[1]) % 4).astype(np.uint8).reshape(GOOD_SIZE[1], GOOD_SIZE[0])
    palette_img = Image.frombytes("P", GOOD_SIZE, indices.tobytes())
    palette_img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30])
    files["palette.png"] = _encode(palette_img, "PNG", transparency=3)  # index 3 transparent

    rotated = Image.new("RGB", EXIF_STORED_SIZE, (0, 0, 255))
    rotated.paste((255, 0, 0), (0, 0, EXIF_STORED_SIZE[0] // 2, EXIF_STORED_SIZE[1]))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    files["exif_rotated.jpg"] = _encode(rotated, "JPEG", quality=95, exif=exif)

    files["bomb.png"] = bomb_png()

    for name, data in files.items():
        (folder / name).write_bytes(data)
    assert set(files) == set(ZOO_EXPECTED), sorted(set(files) ^ set(ZOO_EXPECTED))
    return dict(ZOO_EXPECTED)
