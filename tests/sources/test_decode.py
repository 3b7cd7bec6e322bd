"""Tests for embedcache.sources.decode: mode conversion, EXIF, animation, short errors, pixel limit."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from embedcache.errors import DecodeError
from embedcache.sources import decode
from embedcache.sources.decode import decode_image
from tests.sources.helpers import save, solid, truncated_jpeg


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (pixel data is a 1x1 image's, so never decodable)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    raw = bytearray(buffer.getvalue())
    ihdr = raw[12:29]  # type + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", width, height)
    raw[12:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(raw)


def _cmyk_tiff(p):
    save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), p, format="TIFF")


def _uint16_png(value):
    def make(p):
        save(Image.fromarray(np.full((8, 8), value, np.uint16)), p, format="PNG")
    return make


def _uint16_be_tiff(p):
    save(Image.fromarray(np.full((8, 8), 65535, ">u2")), p, format="TIFF")


def _int32_tiff(p):
    save(Image.fromarray(np.full((8, 8), 32768, np.int32)), p, format="TIFF")


def _float_tiff(p):
    save(Image.fromarray(np.full((8, 8), 0.5, np.float32)), p, format="TIFF")


def _bilevel_png(p):
    save(Image.new("1", (8, 8), 1), p, format="PNG")


def _gray_png(p):
    save(Image.new("L", (8, 8), 100), p, format="PNG")


def _la_transparent(p):
    save(Image.new("LA", (8, 8), (0, 0)), p, format="PNG")


def _la_opaque(p):
    save(Image.new("LA", (8, 8), (0, 255)), p, format="PNG")


def _palette_transparent(p):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 1)
    save(image, p, format="PNG", transparency=0)


def _rgba_half(p):
    save(Image.new("RGBA", (8, 8), (255, 0, 0, 128)), p, format="PNG")


@pytest.mark.parametrize(
    ("name", "make", "pixel", "expected"),
    [
        ("cmyk.tif", _cmyk_tiff, (0, 0), (255, 0, 0)),
        ("max16.png", _uint16_png(65535), (0, 0), (255, 255, 255)),
        ("half16.png", _uint16_png(32768), (0, 0), (128, 128, 128)),
        ("low16.png", _uint16_png(257), (0, 0), (1, 1, 1)),
        ("be16.tif", _uint16_be_tiff, (0, 0), (255, 255, 255)),
        ("int32.tif", _int32_tiff, (0, 0), (128, 128, 128)),
        ("float.tif", _float_tiff, (0, 0), (128, 128, 128)),
        ("bilevel.png", _bilevel_png, (0, 0), (255, 255, 255)),
        ("gray.png", _gray_png, (0, 0), (100, 100, 100)),
        ("la_clear.png", _la_transparent, (0, 0), (255, 255, 255)),
        ("la_opaque.png", _la_opaque, (0, 0), (0, 0, 0)),
        ("palette.png", _palette_transparent, (0, 0), (255, 0, 0)),
        ("palette.png", _palette_transparent, (3, 3), (255, 255, 255)),
        ("rgba.png", _rgba_half, (0, 0), (255, 127, 127)),
    ],
)
def test_decode_modes_keep_value_range(tmp_path, name, make, pixel, expected):
    path = tmp_path / name
    make(path)
    image = decode_image(path)
    assert image.mode == "RGB"
    assert image.size == (8, 8)
    assert image.getpixel(pixel) == expected


def test_decode_cmyk_jpeg_close_to_red(tmp_path):
    path = save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    r, g, b = decode_image(path).getpixel((4, 4))
    assert r > 240 and g < 15 and b < 15


@pytest.mark.parametrize("form", ["png-exif", "png-xmp", "png-raw", "webp-exif", "jpeg-xmp", "gif-plain"])
def test_every_way_a_format_records_orientation_is_applied_as_pillow_does(tmp_path, form):
    """decode_image skips Pillow's exif_transpose for PNG, JPEG and WebP images that carry no
    EXIF, raw EXIF profile or XMP; every image that does is transposed exactly as Pillow would."""
    from PIL import ImageOps, PngImagePlugin

    pixels = np.random.default_rng(3).integers(0, 256, (8, 16, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    xmp = '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="8"/></x:xmpmeta>'
    kind, how = form.split("-")
    path = tmp_path / f"image.{kind}"
    if how == "exif":
        image.save(path, exif=exif, **({"lossless": True} if kind == "webp" else {}))
    elif how == "xmp" and kind == "png":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", xmp)
        image.save(path, pnginfo=info)
    elif how == "xmp":
        image.save(path, xmp=xmp.encode(), quality=95)
    elif how == "raw":
        info = PngImagePlugin.PngInfo()
        data = exif.tobytes()
        info.add_text("Raw profile type exif", f"\nexif\n{len(data):8}\n{data.hex()}\n")
        image.save(path, pnginfo=info)
    else:
        image.save(path)
    with Image.open(path) as reference:
        reference.load()
        expected = ImageOps.exif_transpose(reference).convert("RGB")
    if how != "plain":
        assert expected.size == (8, 16)  # the reference itself is rotated: the case is real
    decoded = decode_image(path)
    assert decoded.size == expected.size
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(expected))


def test_decode_applies_exif_orientation(tmp_path):
    image = Image.new("RGB", (16, 8), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 8, 8))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save(image, tmp_path / "rotated.jpg", exif=exif, quality=95)
    decoded = decode_image(path)
    assert decoded.size == (8, 16)
    top, bottom = decoded.getpixel((4, 2)), decoded.getpixel((4, 13))
    assert top[0] > 200 and top[2] < 60  # the stored left half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_decode_animated_uses_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    path = tmp_path / f"anim.{fmt.lower()}"
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=100,
                   **kwargs)
    assert Image.open(path).n_frames == 2
    r, g, b = decode_image(path).getpixel((4, 4))
    assert r > 240 and b < 15


def _truncated_png(p):
    rng = np.random.default_rng(0)
    save(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), p, format="PNG")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@pytest.mark.parametrize(
    ("name", "write", "message"),
    [
        ("empty.jpg", lambda p: p.write_bytes(b""), r"^empty file$"),
        ("page.jpg", lambda p: p.write_text("<html><body>404</body></html>"),
         r"^not an image \(cannot identify format\)$"),
        ("cut.jpg", truncated_jpeg, r"^truncated image$"),
        ("cut.png", _truncated_png, r"^truncated image$"),
        ("missing.jpg", lambda p: None, r"^cannot read file \(No such file or directory\)$"),
        ("adir.jpg", lambda p: p.mkdir(), r"^cannot read file \(Is a directory\)$"),
        # 10000x10000 lies between Pillow's warning and error thresholds: must still fail.
        ("warn_bomb.png", lambda p: p.write_bytes(png_with_size(10_000, 10_000)),
         r"^decompression bomb"),
        ("error_bomb.png", lambda p: p.write_bytes(png_with_size(20_000, 20_000)),
         r"^decompression bomb"),
    ],
)
def test_decode_errors_are_short(tmp_path, name, write, message):
    path = tmp_path / name
    write(path)
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Pillow's, for warn_bomb.png
        with pytest.raises(DecodeError, match=message):
            decode_image(path)
    assert before == Image.MAX_IMAGE_PIXELS  # global state untouched


def test_decode_bomb_limit_is_ours_even_when_pillow_limit_disabled(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", 100)
    path = save(solid(size=(11, 10)), tmp_path / "big.png")
    with pytest.raises(DecodeError, match=r"decompression bomb: 11x10 pixels exceeds the limit"):
        decode_image(path)


def test_decode_accepts_bytes_and_file_objects(tmp_path):
    path = save(solid(), tmp_path / "a.png")
    assert decode_image(path.read_bytes()).getpixel((0, 0)) == (200, 30, 30)
    with open(path, "rb") as handle:
        assert decode_image(handle).size == (12, 10)
    with pytest.raises(DecodeError, match="^empty file$"):
        decode_image(io.BytesIO())


def test_sources_and_the_cache_key_use_the_one_decoder():
    from embedcache.extraction import plan
    from embedcache.sources import base

    assert base.decode_image is decode_image  # what file sources decode with
    assert plan.DECODER_VERSION is decode.DECODER_VERSION  # what the cache key records


def _gray_rotated_jpeg(p):
    image = Image.new("L", (16, 8), 40)
    image.paste(220, (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    save(image, p, exif=exif, quality=95)


@pytest.mark.parametrize(
    ("name", "make", "gray"),
    [
        ("gray.png", _gray_png, True),
        ("bilevel.png", _bilevel_png, True),
        ("half16.png", _uint16_png(32768), True),
        ("be16.tif", _uint16_be_tiff, True),
        ("int32.tif", _int32_tiff, True),
        ("float.tif", _float_tiff, True),
        ("rotated.jpg", _gray_rotated_jpeg, True),
        ("la_opaque.png", _la_opaque, False),
        ("palette.png", _palette_transparent, False),
        ("rgba.png", _rgba_half, False),
        ("cmyk.tif", _cmyk_tiff, False),
    ],
)
def test_keep_gray_gives_one_channel_holding_the_rgb_value(tmp_path, name, make, gray):
    path = tmp_path / name
    make(path)
    rgb = decode_image(path)
    kept = decode_image(path, keep_gray=True)
    assert kept.mode == ("L" if gray else "RGB")
    assert kept.size == rgb.size  # EXIF orientation applied to both
    assert np.array_equal(np.asarray(kept.convert("RGB")), np.asarray(rgb))


def test_keep_gray_image_outlives_its_file(tmp_path):
    path = tmp_path / "gray.png"
    _gray_png(path)
    kept = decode_image(path, keep_gray=True)
    path.unlink()
    assert kept.getpixel((3, 3)) == 100 and kept.copy().size == (8, 8)


def test_decoding_never_touches_the_warning_filters(tmp_path):
    """warnings.catch_warnings is not thread-safe (two decoding threads could leave its filter
    installed for the whole process): decoding, even of a bomb Pillow only warns about, leaves
    the filters as they were."""
    import threading

    bomb = tmp_path / "warn_bomb.png"
    bomb.write_bytes(png_with_size(10_000, 10_000))
    good = save(solid(), tmp_path / "a.png")
    before = list(warnings.filters)
    failures = []

    def work():
        for _ in range(20):
            decode_image(good)
            try:
                decode_image(bomb)
            except DecodeError as exc:
                failures.append(str(exc))

    with warnings.catch_warnings(record=True):  # Pillow's own warning, shown to the user as usual
        warnings.simplefilter("always")
        inside = list(warnings.filters)
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert list(warnings.filters) == inside
    assert list(warnings.filters) == before
    assert len(failures) == 80 and all(f.startswith("decompression bomb") for f in failures)
