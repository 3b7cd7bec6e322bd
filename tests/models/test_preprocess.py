"""Tests for embedcache.models.preprocess: a gray (mode L) image gives the pixels of its RGB form."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from embedcache.models.preprocess import (
    PIL_INTERPOLATION,
    PreprocessSpec,
    to_uint8_array,
    to_uint8_tensor,
)


@pytest.mark.parametrize("interpolation", sorted(PIL_INTERPOLATION))
def test_gray_images_resize_like_their_rgb_form(interpolation):
    rng = np.random.default_rng(7)
    for _ in range(40):
        height, width = (int(v) for v in rng.integers(5, 300, 2))
        resize = int(rng.integers(8, 260))
        crop = int(rng.integers(4, resize + 1))
        spec = PreprocessSpec(resize_size=resize, crop_size=crop, interpolation=interpolation)
        gray = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
        expected = to_uint8_array(gray.convert("RGB"), spec)
        got = to_uint8_array(gray, spec)
        assert got.shape == expected.shape == (crop, crop, 3)
        assert got.dtype == np.uint8 and got.flags.writeable and got.flags.c_contiguous
        assert np.array_equal(got, expected), (height, width, resize, crop)


def test_other_modes_are_converted_to_rgb_first():
    spec = PreprocessSpec(resize_size=12, crop_size=10, interpolation="bilinear")
    rgba = Image.new("RGBA", (16, 20), (10, 20, 30, 255))
    assert np.array_equal(to_uint8_array(rgba, spec), to_uint8_array(rgba.convert("RGB"), spec))


def test_gray_tensor_is_three_equal_channels():
    spec = PreprocessSpec(resize_size=16, crop_size=16)
    gray = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "L")
    tensor = to_uint8_tensor(gray, spec)
    assert tuple(tensor.shape) == (3, 16, 16)
    assert bool((tensor[0] == tensor[1]).all() and (tensor[1] == tensor[2]).all())
    assert np.array_equal(tensor[0].numpy(), np.asarray(gray))


def test_to_uint8_array_writes_into_a_given_row_the_same_pixels():
    from embedcache.models.preprocess import PreprocessSpec, to_uint8_array

    spec = PreprocessSpec(resize_size=24, crop_size=20, interpolation="bicubic")
    rng = np.random.default_rng(5)
    for mode, shape in (("L", (31, 17)), ("RGB", (17, 31, 3))):
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        batch = np.zeros((2, 20, 20, 3), np.uint8)
        assert np.shares_memory(to_uint8_array(image, spec, batch[1]), batch)
        np.testing.assert_array_equal(batch[1], to_uint8_array(image, spec))
        assert not batch[0].any()
    with pytest.raises(ValueError, match=r"\(20, 20, 3\) uint8"):
        to_uint8_array(image, spec, np.zeros((20, 20, 3), np.float32))
