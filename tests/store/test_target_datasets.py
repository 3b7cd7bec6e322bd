"""Numeric targets and label sets in a cache entry: written by StoreWriter, read by FeatureStore,
readable with plain h5py as docs/schema.md says."""

import json

import h5py
import numpy as np

from embedcache.store.reader import FeatureStore
from embedcache.store.writer import StoreWriter


def write(tmp_path, **extra):
    key = "ab" * 32
    attrs = {"backbone": {"name": "x"}, "preprocess": {}, "precision": "fp32", "versions": {},
             "source": {}, "class_names": extra.pop("class_names", [])}
    with StoreWriter(cache_dir=tmp_path, cache_key=key, n=4, dim=2, store_dtype="float16", attrs=attrs,
                     paths=[f"p{i}" for i in range(4)], labels=[-1] * 4, splits=[0, 0, 1, 2],
                     file_sizes=[1] * 4, file_mtimes_ns=[1] * 4, **extra) as writer:
        writer.write_rows(np.array([0, 1, 3]), np.ones((3, 2), np.float32))
        writer.record_errors([(2, "broken")])
        return writer.finalize()


def test_numeric_targets_round_trip(tmp_path):
    targets = np.array([[1.5, 2], [3, 4], [5, 6], [7, 8.25]], np.float32)
    path = write(tmp_path, targets=targets, target_names=["age", "x1"])
    store = FeatureStore.open(path)
    assert store.task == "regression" and store.target_names == ["age", "x1"] and store.label_sets is None
    np.testing.assert_array_equal(store.targets, targets[[0, 1, 3]])  # done rows only
    with h5py.File(path, "r") as f:
        assert f["targets"].dtype == np.float32 and f["targets"].chunks is not None
        assert json.loads(f["targets"].attrs["names"]) == ["age", "x1"]


def test_label_sets_round_trip(tmp_path):
    sets = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0], [1, 1, 1]], np.uint8)
    store = FeatureStore.open(write(tmp_path, label_sets=sets, class_names=["a", "b", "c"]))
    assert store.task == "multilabel" and store.targets is None
    np.testing.assert_array_equal(store.label_sets, sets[[0, 1, 3]])
    with h5py.File(store.path, "r") as f:
        assert f["label_sets"].dtype == np.uint8 and json.loads(f["label_sets"].attrs["names"]) == ["a", "b", "c"]


def test_entries_without_targets_have_no_target_datasets(tmp_path):
    store = FeatureStore.open(write(tmp_path))
    assert store.task == "classes" and store.targets is None and store.target_names == []
    with h5py.File(store.path, "r") as f:
        assert "targets" not in f and "label_sets" not in f


def test_targets_and_their_names_are_checksummed(tmp_path):
    import pytest

    from embedcache.errors import CorruptEntryError

    targets = np.array([[1.5], [3], [5], [7]], np.float32)
    path = write(tmp_path, targets=targets, target_names=["age"])
    with h5py.File(path, "r") as f:
        assert "targets" in json.loads(f.attrs["column_crc32"]) and f["targets"].fletcher32
    copy = tmp_path / "edited" / path.name
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    with h5py.File(copy, "r+") as f:  # a rewritten value passes HDF5's own chunk checksum
        f["targets"][0, 0] = 2.5
    with pytest.raises(CorruptEntryError, match="targets"):
        FeatureStore.open(copy)
    copy.write_bytes(path.read_bytes())
    with h5py.File(copy, "r+") as f:
        f["targets"].attrs["names"] = np.bytes_(b'["height"]')
    with pytest.raises(CorruptEntryError, match="attributes do not match"):
        FeatureStore.open(copy)
