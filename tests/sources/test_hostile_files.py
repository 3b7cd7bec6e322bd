"""Hostile image folders (issue 14): dangling and looping symlinks, symlinks out of the root and
names that are not UTF-8 are recorded as failures and skipped, never crash a scan; --max-errors
counts the failures an entry already recorded (a rerun, a resumed partial, a cache hit)."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import pytest

import tests.tiny_backbone  # noqa: F401 - registers the tiny backbone
from embedcache.errors import TooManyErrorsError
from embedcache.sources.files import scan_folder
from embedcache.store.reader import FeatureStore
from tests.hostile_helpers import interrupted_partial, run, sha
from tests.tiny_backbone import make_image_folder

#: file -> the reason its failure must give
BAD = {
    "a/gone.png": "dangling symlink",
    "a/loop.png": "symlink loop",
    "a/loop2.png": "symlink loop",
    "a/escape.png": "outside the data root",
    "a/bad\\xff.png": "not valid UTF-8",  # shown escaped
}


@pytest.fixture
def hostile(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=4)
    a = root / "a"
    good = (a / "img000.png").read_bytes()
    (a / "gone.png").symlink_to("missing.png")
    (a / "loop.png").symlink_to("loop2.png")
    (a / "loop2.png").symlink_to("loop.png")
    outside = tmp_path / "outside" / "secret.png"
    outside.parent.mkdir()
    outside.write_bytes(good)
    (a / "escape.png").symlink_to(outside)
    with open(os.path.join(os.fsencode(a), b"bad\xff.png"), "wb") as fh:
        fh.write(good)
    return root, outside


def test_a_hostile_folder_scans_and_its_bad_files_are_recorded_and_skipped(hostile, tmp_path):
    root, outside = hostile
    before = sha(outside)
    source = scan_folder(root)
    assert len(source) == 8 + len(BAD)
    assert source.manifest_sha256() == scan_folder(root).manifest_sha256()

    store = run(root, tmp_path / "c")

    recorded = {path: message for _row, path, message in store.errors}
    assert set(recorded) == set(BAD), recorded
    for path, reason in BAD.items():
        assert reason in recorded[path], (path, recorded[path])
    assert len(store) == 8
    assert set(store.paths) == {f"{c}/img{i:03d}.png" for c in "ab" for i in range(4)}
    assert sha(outside) == before
    reread = FeatureStore.open(store.path)  # the escaped name round-trips through the entry
    assert {p for _r, p, _m in reread.errors} == set(BAD)

    with pytest.raises(TooManyErrorsError, match="more than max_errors=0"):
        run(root, tmp_path / "strict", max_errors=0)


def _with_two_bad_files(tmp_path: Path) -> Path:
    root = make_image_folder(tmp_path / "data", per_class=6)
    (root / "a" / "000_empty.png").write_bytes(b"")  # sorted first: rows 0 and 1, the first batch
    (root / "a" / "001_page.png").write_text("<html>not an image</html>")
    return root


def test_max_errors_counts_the_failures_of_a_cache_hit(tmp_path):
    root = _with_two_bad_files(tmp_path)
    cache = tmp_path / "c"
    first = run(root, cache)
    assert len(first.errors) == 2
    before = sha(first.path)
    with pytest.raises(TooManyErrorsError, match="2 images failed to decode, more than max_errors=1"):
        run(root, cache, max_errors=1)
    assert sha(first.path) == before  # the entry is kept as it is
    assert run(root, cache, max_errors=2).cache_hit


def test_max_errors_counts_the_failures_a_resumed_partial_recorded(tmp_path):
    root = _with_two_bad_files(tmp_path)
    cache = tmp_path / "c"
    # stopped after its last batch, before publishing: every row is attempted, both failures recorded
    partial = interrupted_partial(root, cache, after=4)  # 14 rows in batches of 4
    with h5py.File(partial, "r", locking=False) as f:
        assert len(f["errors/index"]) == 2 and f["done"][...].sum() == 12
    with pytest.raises(TooManyErrorsError, match="2 images failed to decode, more than max_errors=1"):
        run(root, cache, max_errors=1)
    assert partial.is_file()  # progress is kept
    assert not list(cache.glob("*.h5"))
    done = run(root, cache, max_errors=2)
    assert done.stats.resumed_rows == 12 and done.stats.computed_rows == 0 and len(done.errors) == 2
