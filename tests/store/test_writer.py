"""Tests for embedcache.store.writer and embedcache.store.reader: building an entry crash-safely
and reading it back (done rows only, partials, non-finite rows, unsafe or foreign files)."""

import h5py
import numpy as np
import pytest

from embedcache.errors import CacheError
from embedcache.store.reader import FeatureStore
from embedcache.store.schema import entry_paths
from embedcache.store.writer import StoreWriter

KEY = "ab" * 32


def write_entry(cache_dir, key=KEY, n=5, dim=3, finalize=True):
    writer = StoreWriter(cache_dir=cache_dir, cache_key=key, n=n, dim=dim, store_dtype="float32",
                         attrs={"backbone": {"name": "t"}, "class_names": ["a", "b"], "source": {}},
                         paths=[f"p{i}.png" for i in range(n)], labels=[i % 2 for i in range(n)],
                         splits=[0] * (n - 1) + [2], file_sizes=[10] * n, file_mtimes_ns=[1] * n)
    with writer:
        writer.write_rows(np.arange(n - 1), np.ones((n - 1, dim), np.float32))
        writer.record_errors([(n - 1, "cannot identify image")])
        if finalize:
            return writer.finalize()
        writer.commit()
    return writer.partial_path


def test_round_trip_returns_only_done_rows(tmp_path):
    path = write_entry(tmp_path)
    store = FeatureStore.open(path)
    assert len(store) == 4 and store.features.shape == (4, 3)
    assert store.errors == [(4, "p4.png", "cannot identify image")]
    assert store.class_names == ["a", "b"] and store.backbone == {"name": "t"}
    assert list(store.split_indices("train")) == [0, 1, 2, 3]
    final, partial, lock = entry_paths(tmp_path, KEY)
    assert final.exists() and not partial.exists() and not lock.exists()


def test_partial_is_refused_unless_asked(tmp_path):
    partial = write_entry(tmp_path, finalize=False)
    with pytest.raises(CacheError, match="not complete"):
        FeatureStore.open(partial)
    assert len(FeatureStore.open(partial, allow_partial=True)) == 4


def test_non_finite_features_are_refused(tmp_path):
    writer = StoreWriter(cache_dir=tmp_path, cache_key=KEY, n=1, dim=2, store_dtype="float16",
                         attrs={}, paths=["x"], labels=[0], splits=[0], file_sizes=[1], file_mtimes_ns=[1])
    with writer, pytest.raises(CacheError, match="NaN or infinite features"):
        writer.write_rows(np.array([0]), np.array([[np.nan, 1.0]], np.float32))


def test_external_links_are_refused(tmp_path):
    path = write_entry(tmp_path)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    with h5py.File(path, "a") as f:
        f["sneaky"] = h5py.ExternalLink(str(other), "/x")
    with pytest.raises(CacheError, match="external link"):
        FeatureStore.open(path)


def test_not_an_embedcache_file(tmp_path):
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f["done"] = np.ones(1, bool)
    with pytest.raises(CacheError, match="not an embedcache entry"):
        FeatureStore.open(path)


@pytest.mark.parametrize("scale, warned", [(1e-14, True), (1e-3, False)])
def test_features_too_small_for_float16_are_noted_once(tmp_path, scale, warned):
    writer = StoreWriter(cache_dir=tmp_path, cache_key=KEY, n=4, dim=3, store_dtype="float16",
                         attrs={}, paths=list("abcd"), labels=[0] * 4, splits=[0] * 4, file_sizes=[1] * 4,
                         file_mtimes_ns=[1] * 4)
    features = np.full((2, 3), scale, np.float32)
    with writer:
        writer.write_rows(np.array([0, 1]), features)
        writer.write_rows(np.array([2, 3]), features)
        writer.commit()
    notes = [w for w in writer.warnings if "too small for float16" in w]
    assert len(notes) == (1 if warned else 0)
    if warned:
        assert "rows 0-1" in notes[0] and "--store-dtype float32" in notes[0]
