"""Tests for embedcache.sources.materialize: writing a source out as an image folder."""

from __future__ import annotations

import numpy as np
import pytest

from embedcache.errors import ConfigError
from embedcache.sources.arrays import ArraySource
from embedcache.sources.materialize import write_image_folder
from embedcache.sources.open import open_source
from embedcache.splits import SPLIT_NAMES, Split
from tests.sources.helpers import save, solid, tiny_arrays


def test_write_image_folder_round_trip(tmp_path):
    images, labels, names = tiny_arrays(n_per_class=6)
    splits = np.array([Split.TRAIN, Split.TRAIN, Split.VAL, Split.TEST] * 4 + [Split.TRAIN, Split.TEST], np.uint8)
    source = ArraySource(images, labels, splits, names, "tiny")
    dest = tmp_path / "out"
    assert write_image_folder(source, dest) == len(source)
    back = open_source(dest)
    assert back.class_names == ["Bag", "T-shirt_top", "Trouser"]  # sorted, '/' made safe

    def summary(src):
        return sorted((SPLIT, src.class_names[s.label].replace("/", "_"), s.path.rsplit("/", 1)[-1][:6])
                      for s in src.samples for SPLIT in [SPLIT_NAMES[s.split]])

    assert summary(back) == summary(source)
    assert back.split_counts() == source.split_counts()
    first = next(i for i, s in enumerate(back.samples) if s.path == "train/T-shirt_top/000000.png")
    assert np.array_equal(np.asarray(back.load_image(first)), np.asarray(source.load_image(0)))


@pytest.mark.parametrize(
    ("limit", "stratified", "expected"),
    [
        (2, True, {"train": 2, "val": 2, "test": 2}),
        ({Split.TRAIN: 3, Split.TEST: 1}, True, {"train": 3, "test": 1}),
        (3, False, {"train": 3, "val": 3, "test": 3}),
    ],
)
def test_write_image_folder_limits(tmp_path, limit, stratified, expected):
    images, labels, names = tiny_arrays(n_per_class=6)
    splits = (np.arange(18) // 3 % 3).astype(np.uint8)  # each split holds every class twice
    source = ArraySource(images, labels, splits, names, "tiny")
    count = write_image_folder(source, tmp_path / "out", limit_per_split=limit, stratified=stratified)
    back = open_source(tmp_path / "out")
    assert count == len(back) == sum(expected.values())
    assert back.split_counts() == expected
    if stratified:
        train_classes = [s.label for s in back.samples if s.split == Split.TRAIN]
        assert len(set(train_classes)) == len(train_classes)  # one per class before repeating


def test_write_image_folder_refuses_non_empty_dest_and_skips_bad(tmp_path):
    save(solid(), tmp_path / "src" / "cat" / "a.png")
    (tmp_path / "src" / "cat" / "b.jpg").write_bytes(b"")
    save(solid(), tmp_path / "src" / "dog" / "c.png")
    source = open_source(tmp_path / "src", test_fraction=0.0)
    assert write_image_folder(source, tmp_path / "dest") == 2
    with pytest.raises(ConfigError, match=r"'dest' folder .* must be new or empty"):
        write_image_folder(source, tmp_path / "dest")


def test_gray_sources_are_written_as_gray_pngs(tmp_path):
    from PIL import Image

    images, labels, names = tiny_arrays(n_per_class=2)
    source = ArraySource(images, labels, np.full(len(labels), Split.TEST, np.uint8), names, "tiny")
    assert write_image_folder(source, tmp_path / "out") == len(source)
    back = open_source(tmp_path / "out")
    for row, sample in enumerate(back.samples):
        with Image.open(back.root + "/" + sample.path) as stored:
            assert stored.mode == "L"  # one channel on disk
        assert back.load_pixels(row).mode == "L" and back.load_image(row).mode == "RGB"
    first = next(i for i, s in enumerate(back.samples) if s.path == "test/T-shirt_top/000000.png")
    assert np.array_equal(np.asarray(back.load_image(first)), np.asarray(source.load_image(0)))
