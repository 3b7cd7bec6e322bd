"""Tests for embedcache.sources.open: one string to a source, and the seeded hold-out it assigns."""

from __future__ import annotations

import pytest

from embedcache.errors import ConfigError, DataSourceError
from embedcache.sources.open import open_source
from embedcache.splits import Split
from tests.sources.helpers import make_class_folder, save, solid


def test_class_folder_gets_stratified_holdout(tmp_path):
    make_class_folder(tmp_path, {"cat": 10, "dog": 5, "emu": 1})
    (tmp_path / "notes.txt").write_text("ignored")
    save(solid(), tmp_path / ".hidden" / "x.png")
    save(solid(), tmp_path / "cat" / ".x.png")
    source = open_source(tmp_path, test_fraction=0.2, val_fraction=0.2)
    assert source.kind == "folder" and source.root == str(tmp_path)
    assert source.class_names == ["cat", "dog", "emu"]
    assert len(source) == 16
    assert [s.path for s in source.samples] == sorted(s.path for s in source.samples)
    per_class = {}
    for s in source.samples:
        per_class.setdefault(source.class_names[s.label], []).append(s.split)
    assert sorted(per_class["cat"]) == [Split.TRAIN] * 6 + [Split.VAL] * 2 + [Split.TEST] * 2
    assert sorted(per_class["dog"]) == [Split.TRAIN] * 3 + [Split.VAL] + [Split.TEST]
    assert per_class["emu"] == [Split.TRAIN]
    assert source.description == f"folder {tmp_path} (3 classes, 16 images)"
    assert source.to_dict() == {
        "kind": "folder", "root": str(tmp_path), "description": source.description, "n": 16,
        "class_names": ["cat", "dog", "emu"], "splits": {"train": 10, "val": 3, "test": 3},
    }
    sample = source.samples[0]
    stat = (tmp_path / sample.path).stat()
    assert (sample.size, sample.mtime_ns) == (stat.st_size, stat.st_mtime_ns)


def test_holdout_is_deterministic_disjoint_and_seeded(tmp_path):
    make_class_folder(tmp_path, {"a": 20, "b": 7, "c": 2})
    first = open_source(tmp_path, test_fraction=0.3, val_fraction=0.2, split_seed=1)
    again = open_source(tmp_path, test_fraction=0.3, val_fraction=0.2, split_seed=1)
    other = open_source(tmp_path, test_fraction=0.3, val_fraction=0.2, split_seed=2)
    assert first.samples == again.samples
    assert [s.split for s in first.samples] != [s.split for s in other.samples]
    groups = [{s.path for s in first.samples if s.split == code} for code in (Split.TRAIN, Split.VAL, Split.TEST)]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert set().union(*groups) == {s.path for s in first.samples}
    for label in range(3):  # every class with >= 2 images keeps a train image
        assert any(s.split == Split.TRAIN and s.label == label for s in first.samples)


@pytest.mark.parametrize("split_dir", ["val", "valid", "validation", "Val"])
def test_split_folders_set_splits_and_ignore_fractions(tmp_path, split_dir):
    make_class_folder(tmp_path, {"cat": 3, "dog": 2}, split="train")
    make_class_folder(tmp_path, {"cat": 1, "dog": 1}, split=split_dir)
    make_class_folder(tmp_path, {"cat": 1, "eel": 1}, split="test")
    source = open_source(tmp_path, test_fraction=0.5)
    assert source.class_names == ["cat", "dog", "eel"]
    assert source.split_counts() == {"train": 5, "val": 2, "test": 2}
    eel = [s for s in source.samples if s.label == 2]
    assert [(s.path, s.split) for s in eel] == [("test/eel/000.png", Split.TEST)]


def test_missing_source_path(tmp_path):
    with pytest.raises(DataSourceError, match=r"expected an image folder.*no such file"):
        open_source(tmp_path / "nope")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"test_fraction": -0.1}, r"'test_fraction' parameter must be a float in the range \[0, 1\). Got -0.1"),
        ({"test_fraction": 1.0}, r"'test_fraction' .* Got 1.0"),
        ({"val_fraction": "0.1"}, r"'val_fraction' .* Got '0.1'"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, r"val_fraction \+ test_fraction must be < 1"),
    ],
)
def test_fraction_validation(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        open_source(tmp_path, **kwargs)


def test_open_source_expands_the_home_directory(tmp_path, monkeypatch):
    from tests.tiny_backbone import make_image_folder

    make_image_folder(tmp_path / "imgs", per_class=2)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert len(open_source("~/imgs")) == 4
