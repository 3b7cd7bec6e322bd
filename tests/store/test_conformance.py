"""One conformance suite for cache entries: every kind of entry (single files now; sharded entries
later subclass :class:`EntryConformance` with their own ``make_entry``) must read, list, resolve
and remove the same way, and be readable with plain h5py as docs/schema.md says."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from embedcache.errors import CacheError
from embedcache.splits import Split
from embedcache.store.entries import list_entries, remove_entry, resolve_entry
from embedcache.store.reader import FeatureStore, reusable_rows, row_keys
from embedcache.store.schema import entry_paths
from embedcache.store.writer import StoreWriter

N, DIM = 12, 3
KEY = "beef" + "0" * 60
PATHS = [f"{'train' if i < 8 else 'test'}/c{i % 2}/img{i:02d}.png" for i in range(N)]
LABELS = [i % 2 for i in range(N)]
SPLITS = [Split.TRAIN] * 8 + [Split.TEST] * 4
FEATURES = np.arange(N * DIM, dtype=np.float32).reshape(N, DIM) / 10


def write_single_file(cache: Path, *, failed: tuple[int, ...] = (), finish: bool = True) -> Path:
    attrs = {"backbone": {"name": "test", "weights": "w"}, "preprocess": {"crop_size": 8}, "precision": "fp32",
             "versions": {}, "source": {"description": "conformance rows"}, "class_names": ["c0", "c1"],
             "config_key": "cfg"}
    with StoreWriter(cache_dir=cache, cache_key=KEY, n=N, dim=DIM, store_dtype="float32", attrs=attrs, paths=PATHS,
                     labels=LABELS, splits=[int(s) for s in SPLITS], file_sizes=[10 + i for i in range(N)],
                     file_mtimes_ns=[1000 + i for i in range(N)]) as writer:
        good = np.array([i for i in range(N) if i not in failed])
        writer.write_rows(good, FEATURES[good])
        writer.record_errors([(i, "truncated image") for i in failed])
        if not finish:
            writer.commit()
            return entry_paths(cache, KEY)[1]
        return writer.finalize()


class EntryConformance:
    """What every entry kind must do; subclasses provide :meth:`make_entry`."""

    def make_entry(self, cache: Path, **kwargs) -> Path:  # pragma: no cover - overridden
        raise NotImplementedError

    @pytest.fixture
    def entry(self, tmp_path):
        return self.make_entry(tmp_path / "cache", failed=(3,))

    def test_open_returns_only_done_rows_in_row_order(self, entry):
        store = FeatureStore.open(entry)
        keep = [i for i in range(N) if i != 3]
        np.testing.assert_array_equal(store.rows, keep)
        np.testing.assert_allclose(store.features, FEATURES[keep])
        np.testing.assert_array_equal(store.labels, np.array(LABELS)[keep])
        assert list(store.paths) == [PATHS[i] for i in keep]
        assert store.errors == [(3, PATHS[3], "truncated image")]
        assert store.cache_key == KEY and store.class_names == ["c0", "c1"]

    def test_split_indices_by_name_code_and_enum(self, entry):
        store = FeatureStore.open(entry)
        for split in ("test", 2, Split.TEST):
            np.testing.assert_array_equal(store.paths[store.split_indices(split)], PATHS[8:])

    def test_plain_h5py_reads_it_as_documented(self, entry):
        with h5py.File(entry, "r") as f:
            assert f.attrs["format"].decode() == "embedcache" and f.attrs["complete"]
            done = f["done"][...]
            assert done.sum() == N - 1
            X = f["features"][...][done]
            assert X.shape == (N - 1, DIM)
            assert json.loads(f.attrs["class_names"]) == ["c0", "c1"]
            assert json.loads(f["split"].attrs["mapping"]) == {"0": "train", "1": "val", "2": "test", "3": "unsplit"}

    def test_listed_resolved_by_prefix_and_removed(self, entry):
        cache = entry.parent
        [summary] = list_entries(cache)
        assert summary["cache_key"] == KEY and summary["rows_done"] == N - 1 and summary["n_errors"] == 1
        assert resolve_entry("beef", cache) == entry == resolve_entry(str(entry), cache)
        with pytest.raises(CacheError, match="No cache entry"):
            resolve_entry("dead", cache)
        assert remove_entry(entry) == [entry]
        assert list_entries(cache) == []

    def test_row_keys_and_reusable_rows_read_no_features(self, entry):
        paths, splits = row_keys(entry)
        assert len(paths) == N - 1 and int(splits[-1]) == Split.TEST
        reuse = reusable_rows(entry)
        assert reuse[(PATHS[0], 10, 1000)] == 0 and (PATHS[3], 13, 1003) not in reuse

    def test_an_unfinished_entry_is_refused_unless_asked_for(self, tmp_path):
        partial = self.make_entry(tmp_path / "p", finish=False)
        with pytest.raises(CacheError, match="not complete"):
            FeatureStore.open(partial)
        assert len(FeatureStore.open(partial, allow_partial=True)) == N

    def test_external_links_are_refused(self, entry, tmp_path):
        outside = tmp_path / "outside.h5"
        with h5py.File(outside, "w") as f:
            f["secret"] = np.zeros(3)
        with h5py.File(entry, "r+") as f:
            f["planted"] = h5py.ExternalLink(str(outside), "secret")
        with pytest.raises(CacheError, match="external link"):
            FeatureStore.open(entry)


class TestSingleFileEntries(EntryConformance):
    def make_entry(self, cache: Path, **kwargs) -> Path:
        return write_single_file(cache, **kwargs)
