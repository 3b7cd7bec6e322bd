"""Tests for embedcache.store.entries: resolving, listing and removing entries (ls/info/rm)."""

import h5py
import numpy as np
import pytest

from embedcache.errors import CacheError
from embedcache.store.entries import list_entries, remove_entry, resolve_entry
from tests.store.test_writer import write_entry


def test_resolve_list_and_remove(tmp_path):
    write_entry(tmp_path, key="abcd1" + "0" * 59)
    write_entry(tmp_path, key="abcd2" + "0" * 59)
    assert resolve_entry("abcd1", tmp_path).name == "abcd100000000000.h5"
    with pytest.raises(CacheError, match="ambiguous"):
        resolve_entry("abcd", tmp_path)
    with pytest.raises(CacheError, match="embedcache ls"):
        resolve_entry("ffff", tmp_path)
    entries = list_entries(tmp_path)
    assert len(entries) == 2 and all(e["complete"] for e in entries)
    removed = remove_entry(resolve_entry("abcd2", tmp_path))
    assert [p.name for p in removed] == ["abcd200000000000.h5"]
    assert len(list_entries(tmp_path)) == 1


def test_rm_refuses_files_that_are_not_entries(tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("keep me")
    with pytest.raises(CacheError, match="not a cache entry"):
        remove_entry(other)
    foreign = tmp_path / "foreign.h5"  # an HDF5 file, but not named like an entry
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(2)
    with pytest.raises(CacheError, match="not a cache entry"):
        remove_entry(foreign)
    named_like_one = tmp_path / "0123456789abcdef.h5"  # named like an entry, readable, not ours
    with h5py.File(named_like_one, "w") as f:
        f["x"] = np.zeros(2)
    with pytest.raises(CacheError, match="not an embedcache entry"):
        remove_entry(named_like_one)
    assert other.exists() and foreign.exists() and named_like_one.exists()


def test_short_prefix_error_says_how_long_a_prefix_must_be(tmp_path):
    write_entry(tmp_path)
    with pytest.raises(CacheError, match="at least 4 hex digits"):
        resolve_entry("ab", tmp_path)
