"""Robust image decoding: every image becomes 8-bit RGB or a typed error.

Photo collections contain everything: CMYK scans, 16-bit PNGs, palette GIFs with transparency,
phone photos whose pixels are stored sideways with an EXIF orientation tag, zero-byte uploads,
half-copied files and decompression bombs. `load_image` turns all of that into an upright 8-bit
RGB `PIL.Image.Image` or raises `ImageDecodeError` with a short machine-friendly `reason`, which
the ingest stage records in the manifest's `status` column.

PIL globals (`Image.MAX_IMAGE_PIXELS`, `ImageFile.LOAD_TRUNCATED_IMAGES`) are never read for
policy nor mutated: the pixel cap is our own and is checked from the header before decoding.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageDecodeError",
    "ImageSource",
    "crop_box",
    "load_image",
    "probe_image",
    "resize_max",
    "to_rgb",
]

DEFAULT_MAX_PIXELS: int = 1 << 26  # 64 Mi pixels (~8192 x 8192); below PIL's own bomb limit

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview]

# Modes holding more than 8 bits per sample: rescaled to 8-bit 'L' by `_high_bit_to_l`.
_HIGH_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
# Modes with an alpha channel: composited on white.
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
# Modes that PIL converts to RGB directly and correctly.
_DIRECT_MODES = frozenset({"RGB", "1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"})


class ImageDecodeError(ValueError):
    """An image file (or byte string) that cannot be turned into an RGB image.

    Attributes:
        path: the file path, or '<bytes>' for in-memory input.
        reason: a short machine-friendly reason, e.g. 'empty file', 'missing file',
            'not an image', 'truncated', 'corrupt', 'too many pixels (W x H > cap)',
            'unsupported mode LAB'. Stored verbatim as a manifest status.
        detail: optional free text (the underlying exception), only in the message.
    """

    def __init__(self, path: str | os.PathLike, reason: str, detail: str | None = None):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        message = f"{self.path}: {reason}"
        if detail:
            message += f" ({detail})"
        super().__init__(message)

    def __reduce__(self):  # picklable across processes (Ray tasks) with all attributes
        return (type(self), (self.path, self.reason, self.detail))


def _source_name(src: ImageSource) -> str:
    return "<bytes>" if isinstance(src, (bytes, bytearray, memoryview)) else os.fspath(src)


def _open_stream(src: ImageSource, name: str) -> BinaryIO:
    """Open `src` as a binary stream, mapping unusable input to ImageDecodeError."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise ImageDecodeError(name, "empty file")
        return io.BytesIO(data)
    try:
        stream = open(src, "rb")  # noqa: SIM115 - closed by the caller
    except FileNotFoundError:
        raise ImageDecodeError(name, "missing file") from None
    except IsADirectoryError:
        raise ImageDecodeError(name, "not a file") from None
    except OSError as exc:
        raise ImageDecodeError(name, "unreadable file", f"{type(exc).__name__}: {exc}") from None
    try:
        if os.fstat(stream.fileno()).st_size == 0:
            raise ImageDecodeError(name, "empty file")
    except BaseException:
        stream.close()
        raise
    return stream


def _decode_reason(exc: BaseException) -> str:
    """Map an exception raised by PIL while opening or decoding to a short reason."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image"
    if isinstance(exc, EOFError):
        return "truncated"
    text = str(exc).lower()
    if "truncated" in text:
        return "truncated"
    return "corrupt"


def _high_bit_to_l(img: Image.Image) -> Image.Image:
    """Rescale a >8-bit single-channel image to 8-bit 'L' without clipping.

    - I;16 variants: the full 16-bit range maps to 0..255 (v / 257, rounded).
    - I (32-bit int): treated as 16-bit data when all values lie in 0..65535 (how PIL stores
      16-bit PNG/TIFF data), otherwise min-max normalised.
    - F (float32): treated as [0, 1] data when all values lie there, otherwise min-max
      normalised; NaN becomes 0.
    """
    arr = np.asarray(img)  # (H, W) uint16, int32 or float32
    if img.mode.startswith("I;16"):
        return Image.fromarray(_round_div_257(arr))
    if img.mode == "I":
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo >= 0 and hi <= 65535:
            return Image.fromarray(_round_div_257(arr))
        values = arr.astype(np.float64)  # int32 range needs more than float32's 24 bits
    else:  # F
        values = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if lo >= 0 and hi <= 1:
            return Image.fromarray(_to_uint8(values * np.float32(255)))
    if hi <= lo:
        return Image.new("L", img.size, 0)
    return Image.fromarray(_to_uint8((values - lo) * (255.0 / (hi - lo))))


def _round_div_257(arr: np.ndarray) -> np.ndarray:
    """round(v / 257) for integers v in 0..65535, exactly, in integer arithmetic.

    257 is odd, so v / 257 is never k + 0.5 and round(v / 257) == (v + 128) // 257.
    """
    return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def _composite_on_white(img: Image.Image) -> Image.Image:
    if img.mode == "La":  # premultiplied; PIL only converts it to LA
        img = img.convert("LA")
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image, name: str = "<image>") -> Image.Image:
    """Convert a decoded image of any supported mode to 8-bit RGB.

    16-bit/32-bit/float single-channel data is rescaled to 0..255 (see `_high_bit_to_l`),
    alpha and transparency keys are composited on white, everything else uses PIL's
    conversion (CMYK, LAB, YCbCr, palette, grayscale). No EXIF handling here.

    Args:
        img: a loaded image.
        name: what to call it in errors.

    Returns:
        An 'RGB' image (possibly `img` itself when it already is one).

    Raises:
        ImageDecodeError: 'unsupported mode M' for modes with no RGB meaning.
    """
    if img.mode in _HIGH_BIT_MODES:
        img = _high_bit_to_l(img)
    has_transparency = "transparency" in img.info and img.mode in {"1", "L", "P", "RGB"}
    if img.mode in _ALPHA_MODES or has_transparency:
        return _composite_on_white(img)
    if img.mode == "RGB":
        return img
    if img.mode in _DIRECT_MODES:
        return img.convert("RGB")
    raise ImageDecodeError(name, f"unsupported mode {img.mode}")


def _exif_upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; malformed EXIF leaves the pixels as stored."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - bad metadata must not reject good pixels
        return img


def load_image(src: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file or byte string into an upright 8-bit RGB image (see `decode_image`)."""
    return decode_image(src, max_pixels)[0]


def decode_image(src: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, str | None]:
    """Decode an image file or byte string into an upright 8-bit RGB image and its format name.

    The header's width x height is checked against `max_pixels` before any pixel is decoded;
    then the whole image is decoded (so truncated files fail here, not later), the EXIF
    orientation is applied, and the mode is converted: grayscale, palette, CMYK, LAB, 16-bit
    and float images become RGB (16-bit data scaled to the full 0..255 range), and images with
    alpha or a transparency key are composited on white. Multi-frame files give frame 0.

    Args:
        src: a file path, or the encoded bytes (e.g. an HTTP upload).
        max_pixels: the largest accepted width * height (decompression-bomb cap). PIL refuses
            to open images above 2 * `PIL.Image.MAX_IMAGE_PIXELS` before we see the size,
            so caps above that act as that limit (reason 'too many pixels').

    Returns:
        (a new, fully loaded `PIL.Image.Image` in mode 'RGB', independent of any file handle;
        PIL's name of the encoded format, 'JPEG', 'PNG', ..., or None).

    Raises:
        ImageDecodeError: with `reason` one of 'missing file', 'not a file', 'unreadable file',
            'empty file', 'not an image', 'truncated', 'corrupt', 'invalid size',
            'too many pixels (W x H > cap)', 'unsupported mode M'.
        ValueError: if `max_pixels` is not positive.
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    name = _source_name(src)
    stream = _open_stream(src, name)
    try:
        try:
            with warnings.catch_warnings():  # our cap decides; PIL's bomb warning is noise
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(stream)
        except Image.DecompressionBombError as exc:  # PIL's own cap, 2 * MAX_IMAGE_PIXELS
            raise ImageDecodeError(name, "too many pixels", str(exc)) from None
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
            raise ImageDecodeError(name, _decode_reason(exc), f"{type(exc).__name__}: {exc}") from None
        with img:
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ImageDecodeError(name, "invalid size", f"{width} x {height}")
            if width * height > max_pixels:
                raise ImageDecodeError(name, f"too many pixels ({width} x {height} > {max_pixels})")
            try:
                img.load()
                rgb = to_rgb(_exif_upright(img), name)
            except ImageDecodeError:
                raise
            except MemoryError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise ImageDecodeError(name, _decode_reason(exc), f"{type(exc).__name__}: {exc}") from None
            if rgb is img:  # never hand out the object that the `with` is about to close
                rgb = img.copy()
            return rgb, img.format
    finally:
        stream.close()


def probe_image(src: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Fully decode and validate an image, returning its upright size.

    Runs exactly the checks of `load_image` (so an image that probes fine also loads fine).

    Args:
        src: a file path or the encoded bytes.
        max_pixels: the largest accepted width * height.

    Returns:
        (width, height) after the EXIF orientation is applied.

    Raises:
        ImageDecodeError: as `load_image`.
    """
    img = load_image(src, max_pixels=max_pixels)
    return img.size


def resize_max(img: Image.Image, max_size: int) -> Image.Image:
    """Downscale so that the longer side is at most `max_size`, keeping the aspect ratio.

    Uses antialiased bilinear resampling (PIL widens the filter support when shrinking).
    Images that already fit are returned unchanged (never upscaled).

    Args:
        img: the image.
        max_size: the largest allowed width or height, in pixels (>= 1).

    Returns:
        The resized image, whose longer side equals `max_size`, or `img` itself if it fits.
    """
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    width, height = img.size
    longer = max(width, height)
    if longer <= max_size:
        return img
    scale = max_size / longer
    size = (
        max_size if width == longer else max(1, round(width * scale)),
        max_size if height == longer else max(1, round(height * scale)),
    )
    return img.resize(size, Image.Resampling.BILINEAR)


def crop_box(img: Image.Image, box: Sequence[float]) -> Image.Image:
    """Crop a box (x0, y0, x1, y1) in pixels, clamped to the image.

    Coordinates are rounded to the nearest integer (as `PIL.Image.crop` does, matching the
    Revisited Oxford/Paris query-cropping protocol) and then clamped to the image bounds.

    Args:
        img: the image.
        box: (x0, y0, x1, y1), x1/y1 exclusive; floats allowed.

    Returns:
        The cropped image.

    Raises:
        ValueError: if `box` does not have 4 finite numbers or the clamped box is empty.
    """
    if len(box) != 4:
        raise ValueError(f"box must be (x0, y0, x1, y1), got {box!r}")
    values = [float(v) for v in box]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"box must be finite, got {box!r}")
    width, height = img.size
    x0, y0, x1, y1 = (int(round(v)) for v in values)
    x0, x1 = max(0, x0), min(width, x1)
    y0, y1 = max(0, y0), min(height, y1)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {tuple(box)!r} is empty inside a {width} x {height} image")
    return img.crop((x0, y0, x1, y1))
