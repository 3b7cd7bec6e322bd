"""Resampling only the centre crop (embedcache/models/crop_resize.py) gives bitwise the pixels of
resizing the whole image and cropping after, with this machine's Pillow."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from embedcache.models import crop_resize
from embedcache.models.crop_resize import exact_crop_box
from embedcache.models.preprocess import (
    PIL_INTERPOLATION,
    PreprocessSpec,
    rgb_array,
    to_uint8_array,
)


def whole_then_crop(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """The reference: resize the whole image (shorter side to resize_size), then crop the centre."""
    w, h = image.size
    long = int(spec.resize_size * max(w, h) / min(w, h))
    size = (spec.resize_size, long) if w <= h else (long, spec.resize_size)
    if size != image.size:
        image = image.resize(size, PIL_INTERPOLATION[spec.interpolation])
    c = spec.crop_size
    left, top = int(round((image.width - c) / 2.0)), int(round((image.height - c) / 2.0))
    return rgb_array(image, None, box=(left, top, left + c, top + c))


def boxed(size, spec):
    w, h = size
    long = int(spec.resize_size * max(w, h) / min(w, h))
    new = (spec.resize_size, long) if w <= h else (long, spec.resize_size)
    c = spec.crop_size
    left, top = int(round((new[0] - c) / 2.0)), int(round((new[1] - c) / 2.0))
    return None if new == size else exact_crop_box(size, new, (left, top, left + c, top + c), spec.interpolation)


def test_random_sizes_modes_and_filters_give_the_same_pixels_as_resizing_the_whole_image():
    rng = np.random.default_rng(15)
    through_box = compared = 0
    for _ in range(1500):
        resize = int(rng.choice([64, 128, 256, 512, 232, 160, 96, 36]))  # powers of two, and not
        crop = int(rng.integers(max(1, resize // 2), resize + 1))
        if rng.random() < 0.5:  # small, nearly square images (the box covers both axes)
            w = int(rng.integers(1, 80))
            h = max(1, w + int(rng.integers(-8, 9)))
        else:
            w, h = (int(v) for v in rng.integers(1, 400, 2))
        mode = str(rng.choice(["L", "RGB"]))
        spec = PreprocessSpec(resize_size=resize, crop_size=crop, interpolation=str(rng.choice(["bilinear", "bicubic"])))
        pixels = rng.integers(0, 256, (h, w) if mode == "L" else (h, w, 3), dtype=np.uint8)
        if rng.random() < 0.5:
            pixels = np.sort(pixels, axis=0)  # smooth ramps as well as noise
        image = Image.fromarray(pixels, mode)
        want = whole_then_crop(image, spec)
        got = to_uint8_array(image, spec)
        assert got.dtype == np.uint8 and np.array_equal(got, want), (w, h, mode, spec)
        compared += 1
        through_box += boxed((w, h), spec) is not None
    assert compared == 1500 and through_box > 500  # the box path was exercised, not skipped


@pytest.mark.parametrize(("size", "resize", "crop", "whole_axes"), [
    ((28, 28), 128, 112, (False, False)),  # Fashion-MNIST at 112 px: both axes boxed
    ((32, 32), 256, 224, (False, False)),  # CIFAR at 224 px
    ((500, 375), 256, 224, (True, False)),  # a photo: its long side's scale is not exact, kept whole
    ((600, 400), 256, 224, (False, False)),  # 600 -> 384 and 400 -> 256: both scales exact
])
def test_common_shapes_take_the_box(size, resize, crop, whole_axes):
    spec = PreprocessSpec(resize_size=resize, crop_size=crop, interpolation="bicubic")
    plan = boxed(size, spec)
    assert plan is not None
    out_size, source, _after = plan
    assert (out_size[0] != crop, out_size[1] != crop) == whole_axes
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    assert np.array_equal(to_uint8_array(image, spec), whole_then_crop(image, spec))


def test_a_scale_that_is_not_exact_or_nearest_resizes_the_whole_image():
    assert boxed((33, 33), PreprocessSpec(resize_size=232, crop_size=224, interpolation="bicubic")) is None
    assert boxed((28, 28), PreprocessSpec(resize_size=128, crop_size=112, interpolation="nearest")) is None


def test_an_unknown_pillow_major_version_resizes_the_whole_image(monkeypatch):
    spec = PreprocessSpec(resize_size=128, crop_size=112, interpolation="bicubic")
    exact_crop_box.cache_clear()
    monkeypatch.setattr(crop_resize, "PILLOW_MAJOR", 14)  # its pass order is not known here
    try:
        assert boxed((28, 28), spec) is None
    finally:
        exact_crop_box.cache_clear()
