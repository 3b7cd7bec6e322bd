"""Sharded entries without Ray: shard files written by ``write_shard``, the entry published over
them with virtual datasets; readers, verify, ls and rm on it; hostile virtual sources refused."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from embedcache.cli import main
from embedcache.errors import CacheError, CorruptEntryError
from embedcache.store.entries import list_entries, remove_entry
from embedcache.store.reader import FeatureStore
from embedcache.store.shards import (
    publish_sharded,
    shard_name,
    shard_problems,
    shard_ranges,
    write_shard,
)
from embedcache.store.verify import verify_entry
from tests.hostile_helpers import chunk_offset, flipped_copy

KEY = "0123456789abcdef" + "0" * 48
N, DIM, SIZE = 10, 3, 4


def _build(cache: Path) -> tuple[Path, np.ndarray]:
    """A 10-row entry in three shards (4, 4, 2 rows); row 5 failed to decode."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(N, DIM)).astype(np.float32)
    paths = [f"c{i % 2}/img{i:02d}-{'x' * i}.png" for i in range(N)]  # widths differ between shards
    folder = cache / f"{KEY[:16]}.shards"
    shards = []
    for index, (start, stop) in enumerate(shard_ranges(N, SIZE)):
        done = np.array([row != 5 for row in range(start, stop)])
        failures = [(5 - start, "not an image")] if start <= 5 < stop else []
        static = {"paths": paths[start:stop], "labels": np.arange(start, stop) % 2,
                  "split": np.zeros(stop - start, np.uint8), "file_size": np.full(stop - start, 7),
                  "file_mtime_ns": np.full(stop - start, 9)}
        path = write_shard(folder=folder, index=index, rows=(start, stop), cache_key=KEY, dim=DIM,
                           store_dtype="float32", static=static, attrs={"class_names": ["c0", "c1"]},
                           features=features[start:stop], done=done, failures=failures)
        assert shard_problems(path, cache_key=KEY, index=index, rows=(start, stop), dim=DIM) == []
        shards.append((path, start, stop))
    final = publish_sharded(final_path=cache / f"{KEY[:16]}.h5", shards=shards, cache_key=KEY, dim=DIM,
                            store_dtype="float32", attrs={"class_names": ["c0", "c1"]}, shard_size=SIZE)
    return final, features


@pytest.fixture
def entry(tmp_path):
    return _build(tmp_path / "cache")


def test_a_sharded_entry_reads_as_one_entry_and_verifies(entry, tmp_path):
    final, features = entry
    store = FeatureStore.open(final)
    keep = np.arange(N) != 5
    assert np.array_equal(store.features, features[keep]) and list(store.rows) == list(np.flatnonzero(keep))
    assert store.errors == [(5, "c1/img05-xxxxx.png", "not an image")]
    assert store.paths[-1] == "c1/img09-xxxxxxxxx.png"
    with h5py.File(final, "r") as handle:
        assert handle["features"].is_virtual and not os.path.isabs(handle["features"].virtual_sources()[0].file_name)
    report = verify_entry(final)
    assert report.ok, report.problems
    assert any("3 shard files verified" in note for note in report.notes)
    (summary,) = list_entries(final.parent)
    assert summary["rows_done"] == N - 1 and summary["bytes"] > final.stat().st_size


def test_a_moved_cache_directory_still_opens(entry, tmp_path):
    final, features = entry
    moved = shutil.move(str(final.parent), str(tmp_path / "elsewhere"))
    store = FeatureStore.open(Path(moved) / final.name)
    assert np.array_equal(store.features, features[np.arange(N) != 5])


def test_a_deleted_shard_is_named_by_verify_and_reads_as_damage(entry, tmp_path):
    final, _ = entry
    (final.parent / f"{KEY[:16]}.shards" / shard_name(1)).unlink()
    result = CliRunner().invoke(main, ["verify", str(final)])
    assert result.exit_code == 1 and "shard-00001.h5" in result.output
    with pytest.raises(CorruptEntryError, match="shard-00001.h5 are missing"):
        FeatureStore.open(final)


def test_a_flipped_byte_in_a_shard_is_named_by_verify(entry, tmp_path):
    final, _ = entry
    shard = final.parent / f"{KEY[:16]}.shards" / shard_name(2)
    offset, _size = chunk_offset(shard)
    flipped = flipped_copy(shard, tmp_path / "flipped.h5", offset + 1)
    os.replace(flipped, shard)
    result = CliRunner().invoke(main, ["verify", str(final)])
    assert result.exit_code == 1 and ".shards/shard-00002.h5: " in result.output
    with pytest.raises(CacheError):
        FeatureStore.open(final)


def test_a_shard_of_the_wrong_row_range_is_named_by_verify(entry, tmp_path):
    final, _ = entry
    folder = final.parent / f"{KEY[:16]}.shards"
    os.replace(folder / shard_name(0), folder / "spare.h5")
    os.replace(folder / shard_name(1), folder / shard_name(0))
    os.replace(folder / "spare.h5", folder / shard_name(1))
    report = verify_entry(final)
    assert any("shard-00000.h5" in p and "holds rows 4-7" in p for p in report.problems), report.problems


def _retarget(final: Path, file_name: str) -> None:
    """Rewrite /labels of ``final`` as a virtual dataset reading ``file_name``."""
    with h5py.File(final, "r+", libver=("v110", "v110")) as handle:
        del handle["labels"]
        layout = h5py.VirtualLayout(shape=(N,), dtype="i8")
        layout[0:SIZE] = h5py.VirtualSource(file_name, "labels", shape=(SIZE,))
        handle.create_virtual_dataset("labels", layout)


@pytest.mark.parametrize("target, reason", [
    ("/etc/passwd", "absolute path"),
    ("../other.shards/shard-00000.h5", "outside its own"),
    ("fedcba9876543210.shards/shard-00000.h5", "outside its own"),
])
def test_virtual_sources_outside_the_entrys_own_shards_are_refused(entry, target, reason):
    final, _ = entry
    _retarget(final, target)
    with pytest.raises(CacheError, match=reason):
        FeatureStore.open(final)
    assert not verify_entry(final).ok


def test_a_symlinked_shard_is_refused(entry, tmp_path):
    final, _ = entry
    shard = final.parent / f"{KEY[:16]}.shards" / shard_name(0)
    os.replace(shard, tmp_path / "real.h5")
    shard.symlink_to(tmp_path / "real.h5")
    with pytest.raises(CacheError, match="symlink"):
        FeatureStore.open(final)


def test_a_virtual_dataset_in_a_file_not_named_like_an_entry_is_refused(entry, tmp_path):
    final, _ = entry
    renamed = final.with_name("features.h5")
    shutil.copy(final, renamed)
    with pytest.raises(CacheError, match="virtual dataset"):
        FeatureStore.open(renamed)


def test_rm_removes_the_shard_directory_and_leaves_foreign_files(entry, tmp_path):
    final, _ = entry
    folder = final.parent / f"{KEY[:16]}.shards"
    removed = remove_entry(final)
    assert folder in removed and not folder.exists() and not final.exists()
    final, _ = _build(tmp_path / "again")
    folder = final.parent / f"{KEY[:16]}.shards"
    (folder / "notes.txt").write_text("mine")
    remove_entry(final)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
