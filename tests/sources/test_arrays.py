"""Tests for embedcache.sources.arrays: in-memory arrays, .npz files, the demo, IDX files."""

from __future__ import annotations

import importlib.resources
import os
import struct

import numpy as np
import pytest

from embedcache.errors import DataSourceError
from embedcache.sources.arrays import DEMO_FILE, ArraySource
from embedcache.sources.base import Sample
from embedcache.sources.open import open_source
from embedcache.splits import Split
from tests.sources.helpers import tiny_arrays

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def test_array_source_paths_images_and_hash(tmp_path):
    images, labels, names = tiny_arrays()
    splits = np.array([Split.TRAIN] * 12 + [Split.TEST] * 6, np.uint8)
    source = ArraySource(images, labels, splits, names, "tiny")
    assert [s.path for s in source.samples[:2]] == ["train/000000", "train/000001"]
    assert source.samples[12] == Sample("test/000000", 0, Split.TEST, 0, 0)
    assert np.array_equal(np.asarray(source.load_image(3))[:, :, 1], images[3])
    changed = images.copy()
    changed[5, 0, 0] ^= 1
    assert ArraySource(images, labels, splits, names, "x").manifest_sha256() == source.manifest_sha256()
    assert ArraySource(changed, labels, splits, names, "x").manifest_sha256() != source.manifest_sha256()


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (np.zeros((2, 4, 4), np.float32), [0, 0], r"must be uint8 of shape .* Got float32"),
        (np.zeros((2, 4, 4), np.uint8), [0], r"2 images, 1 labels"),
        (np.zeros((2, 4, 4), np.uint8), [0, 5], r"labels must be in \[-1, 2\]"),
    ],
)
def test_array_source_validation(images, labels, message):
    with pytest.raises(DataSourceError, match=message):
        ArraySource(images, labels, None, ["a", "b", "c"], "bad")


def test_npz_arrays_like_the_demo(tmp_path):
    images, labels, names = tiny_arrays()
    path = tmp_path / "demo.npz"
    np.savez(path, train_images=images[:12], train_labels=labels[:12], test_images=images[12:],
             test_labels=labels[12:], class_names=np.array(names))
    source = open_source(path)
    assert source.kind == "arrays" and source.class_names == names
    assert source.split_counts() == {"train": 12, "test": 6}
    assert source.load_image(0).size == (8, 8)


def test_demo_source():
    if not importlib.resources.files("embedcache").joinpath("demo_data", DEMO_FILE).is_file():
        with pytest.raises(DataSourceError, match="demo data .* is not installed"):
            open_source("demo")
        pytest.skip("demo npz not present yet; ArraySource.from_npz covered by a tmp npz")
    source = open_source("demo")
    assert source.class_names[0] == "T-shirt/top" and len(source) > 0
    assert set(source.split_counts()) == {"train", "test"}


def test_fashion_mnist_from_debian_idx_files():
    if not os.path.isdir(FASHION_MNIST):
        pytest.skip(f"{FASHION_MNIST} not installed")
    source = open_source(f"torchvision:FashionMNIST:{FASHION_MNIST}")
    assert source.kind == "torchvision" and source.root == FASHION_MNIST
    assert source.split_counts() == {"train": 60000, "test": 10000}
    assert source.class_names[0] == "T-shirt/top" and source.class_names[9] == "Ankle boot"
    assert source.samples[0] == Sample("train/000000", 9, Split.TRAIN, 0, 0)
    assert source.samples[60000].path == "test/000000"
    image = source.load_image(0)
    assert image.size == (28, 28) and image.mode == "RGB"
    assert len(source.manifest_sha256()) == 64


def write_idx(path, array: np.ndarray, gz: bool):
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        import gzip

        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)


@pytest.mark.parametrize(("subdir", "gz", "name"), [("raw", False, "MNIST"), ("KMNIST/raw", True, "kmnist")])
def test_idx_files_in_torchvision_layouts(tmp_path, subdir, gz, name):
    images, labels, _ = tiny_arrays(classes=tuple("abc"))
    folder = tmp_path / subdir
    write_idx(folder / "train-images-idx3-ubyte", images[:10], gz)
    write_idx(folder / "train-labels-idx1-ubyte", labels[:10], gz)
    write_idx(folder / "t10k-images-idx3-ubyte", images[10:], gz)
    write_idx(folder / "t10k-labels-idx1-ubyte", labels[10:], gz)
    source = open_source(f"torchvision:{name}:{tmp_path}")
    assert source.split_counts() == {"train": 10, "test": 8}
    assert len(source.class_names) == 10
    assert np.array_equal(np.asarray(source.load_image(11))[:, :, 0], images[11])


def test_load_pixels_keeps_gray_arrays_one_channel():
    gray = ArraySource(np.full((2, 4, 4), 9, np.uint8), np.array([0, 1]), np.array([0, 0], np.uint8), ["a", "b"], "g")
    assert gray.load_pixels(0).mode == "L" and gray.load_image(0).mode == "RGB"
    assert np.array_equal(np.asarray(gray.load_pixels(1).convert("RGB")), np.asarray(gray.load_image(1)))
    rgb = ArraySource(np.full((2, 4, 4, 3), 9, np.uint8), np.array([0, 1]), np.array([0, 0], np.uint8), ["a", "b"], "c")
    assert rgb.load_pixels(0).mode == "RGB"
