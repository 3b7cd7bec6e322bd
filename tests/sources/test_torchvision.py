"""Tests for embedcache.sources.torchvision (and the torchvision:NAME:ROOT form of open_source)."""

from __future__ import annotations

import os

import pytest

from embedcache.errors import DataSourceError
from embedcache.sources.open import open_source
from tests.sources.helpers import make_class_folder


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("torchvision:FashionMNIST:{tmp}", r"IDX files not found. Looked in .*expected train-images-idx3-ubyte\[.gz\]"),
        ("torchvision:CIFAR10:{tmp}", r"torchvision:CIFAR10: cannot load from .* download=False"),
        ("torchvision:NoSuchSet:{tmp}", r"Unknown torchvision dataset 'NoSuchSet'. Known: .*CIFAR10"),
        ("torchvision:MNIST", r"Expected torchvision:NAME:ROOT"),
    ],
)
def test_torchvision_errors(tmp_path, spec, message):
    with pytest.raises(DataSourceError, match=message):
        open_source(spec.format(tmp=tmp_path))


def test_generic_torchvision_dataset_is_wrapped_lazily(tmp_path):
    make_class_folder(tmp_path, {"cat": 5, "dog": 5})
    source = open_source(f"torchvision:ImageFolder:{tmp_path}", test_fraction=0.2)
    assert source.kind == "torchvision" and source.class_names == ["cat", "dog"]
    assert source.split_counts() == {"train": 8, "test": 2}
    assert source.samples[0].path == "unsplit/000000"
    assert source.load_image(0).size == (12, 10)
    before = source.manifest_sha256()
    os.utime(tmp_path / "cat" / "000.png", ns=(1, 1))
    assert open_source(f"torchvision:ImageFolder:{tmp_path}").manifest_sha256() != before
