"""Safe decoding of one image file into a standalone RGB image (or, asked to, a gray one).

:func:`decode_image` is the only place that opens encoded images: it refuses decompression bombs
(our own pixel limit, whatever Pillow's global setting), applies EXIF orientation, and converts
every Pillow mode to RGB with its value range kept (``keep_gray``: single-channel modes to ``L``
with the values their RGB form would repeat). Every failure becomes a :class:`DecodeError`
with a short reason, so one bad file never stops an extraction.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from embedcache.errors import DecodeError

# Part of the cache key: bump whenever decode_image can return different pixels for the same file.
DECODER_VERSION = "1"

# Same as Pillow's default; images above it are refused instead of merely warned about.
MAX_IMAGE_PIXELS = 89_478_485


def decode_image(path_or_file: str | os.PathLike | bytes | io.IOBase, *, keep_gray: bool = False) -> Image.Image:
    """Decode one image safely into a standalone RGB image (or mode ``L``, see ``keep_gray``).

    EXIF orientation is applied; animated images give frame 0. Modes are converted with their value
    range kept: 16-bit (``I;16*`` and ``I``) maps 0..65535 to 0..255, ``F`` in [0, 1] is scaled
    by 255 (otherwise clipped to 0..255), CMYK uses Pillow's conversion (no ICC profile). Images
    with an alpha channel or palette transparency are composited onto **white**, the usual
    background of product and document photos, so transparent pixels never turn black.

    Args:
        path_or_file: a path, the encoded bytes, or a binary file object.
        keep_gray: return a single-channel image (modes ``L``, ``1``, 16-bit, ``F``) as mode
            ``L`` holding the value its RGB form repeats in every channel. Resizing and cropping
            work channel by channel, so expanding to RGB after them gives the same pixels as
            before them, for a third of the resampling (:func:`~embedcache.models.preprocess.to_uint8_array`).

    Raises:
        DecodeError: with a short reason (``empty file``, ``truncated image``, ``not an image
            (cannot identify format)``, ``decompression bomb ...``, ``cannot read file ...``).
    """
    if isinstance(path_or_file, (bytes, bytearray, memoryview)):
        path_or_file = io.BytesIO(bytes(path_or_file))
    is_path = isinstance(path_or_file, (str, os.PathLike))
    try:
        if not is_path and _stream_is_empty(path_or_file):  # a path is checked only when Pillow fails
            raise DecodeError("empty file")
        # Our limit, checked before any pixel is decoded, whatever Pillow's: between 1x and 2x its
        # own limit Pillow only warns (and that warning is left alone: catching it would change the
        # process's warning filters, which no thread can do safely while others decode).
        with Image.open(path_or_file) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise DecodeError(
                    f"decompression bomb: {width}x{height} pixels exceeds the limit of "
                    f"{MAX_IMAGE_PIXELS}"
                )
            image.seek(0)
            image.load()
            if _may_be_oriented(image):
                ImageOps.exif_transpose(image, in_place=True)
            return to_rgb(image, keep_gray=keep_gray)  # a new image: closing the file keeps it
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        if is_path and _empty_path(path_or_file):
            raise DecodeError("empty file") from None
        raise DecodeError("not an image (cannot identify format)") from None
    except OSError as exc:
        text = str(exc)
        if "truncated" in text.lower() or "broken data stream" in text:
            raise DecodeError("truncated image") from None
        if exc.strerror:
            raise DecodeError(f"cannot read file ({exc.strerror})") from None
        raise DecodeError(f"corrupt image ({text})") from None
    except (ValueError, SyntaxError, EOFError, IndexError, TypeError, MemoryError) as exc:
        raise DecodeError(f"corrupt image ({type(exc).__name__}: {exc})") from None


#: Pillow reads the orientation of images of these formats only from these ``info`` keys (EXIF,
#: a raw EXIF profile, XMP) once they are loaded: without any of them there is nothing to transpose.
_ORIENTATION_KEYS = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")
_INFO_ORIENTED = frozenset({"PNG", "JPEG", "WEBP"})


def _may_be_oriented(image: Image.Image) -> bool:
    """Whether :func:`PIL.ImageOps.exif_transpose` could change ``image`` (a loaded image). The
    call costs ~6 µs for a small PNG, 4 % of its decoding, and finds nothing in almost every one."""
    if image.format not in _INFO_ORIENTED:
        return True
    return any(key in image.info for key in _ORIENTATION_KEYS)


def _empty_path(path: str | os.PathLike) -> bool:
    """Whether the file at ``path`` is empty (False when it cannot be read: the error says so)."""
    try:
        return os.stat(path).st_size == 0
    except OSError:
        return False


def _stream_is_empty(stream) -> bool:
    """Whether a file object has nothing left from its position (checked before Pillow reads it)."""
    if hasattr(stream, "seek") and hasattr(stream, "tell"):
        start = stream.tell()
        end = stream.seek(0, os.SEEK_END)
        stream.seek(start)
        return end == start
    return False


def to_rgb(image: Image.Image, *, keep_gray: bool = False) -> Image.Image:
    """Convert any Pillow mode to RGB (or, with ``keep_gray``, single-channel ones to ``L``), keeping
    the value range and compositing alpha on white.

    Args:
        image: a loaded image in any mode (the modes :func:`decode_image` documents).
        keep_gray: single-channel modes (``L``, ``1``, 16-bit, ``F``) become mode ``L`` with
            the value every channel of their RGB form holds (see :func:`decode_image`).

    Returns:
        A new RGB (or, with ``keep_gray``, ``L``) image; the input is left unchanged.
    """
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    gray = _gray_image if keep_gray else _gray_to_rgb
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I (32-bit, treated as 16-bit range)
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        return gray(((values * 255 + 32767) // 65535).astype(np.uint8))
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
        return gray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    if keep_gray and mode in ("L", "1"):
        return image.convert("L")  # a copy for L; 1 becomes 0/255, as its RGB form
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        mode == "P" and "transparency" in image.info
    )
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _gray_image(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(gray), "L")


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2)), "RGB")

