"""Hostile files and faults in a cache directory (issue 14): planted links and external storage,
planted lock links, flipped bytes, damaged headers, rm racing a writer, a full disk, read-only
and file cache directories. Nothing outside the cache is ever written, nothing damaged is served,
older entries survive."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import tests.tiny_backbone  # noqa: F401 - registers the tiny backbone
from embedcache.cli import main
from embedcache.errors import CacheError, CacheLockedError
from embedcache.extraction.plan import plan_extraction
from embedcache.store.entries import list_entries, remove_entry
from embedcache.store.reader import FeatureStore
from embedcache.store.schema import entry_paths
from tests.hostile_helpers import (
    REPO,
    chunk_offset,
    error_lines,
    flipped_copy,
    interrupted_partial,
    lock_held_elsewhere,
    run,
    run_cli,
    same_data,
    same_store,
    sha,
    subprocess_env,
)
from tests.store.test_conformance import FEATURES, KEY, write_single_file
from tests.tiny_backbone import TINY, make_image_folder


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "data", per_class=5, split_dirs=True)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _discard_warning(store, partial: Path) -> str:
    found = [w for w in store.stats.warnings if "Discarded partial entry" in w and str(partial) in w]
    assert found, store.stats.warnings
    return found[0]


# ------------------------------------------------------------------ 1. planted .partial links
@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_a_planted_partial_link_is_discarded_never_written_through(folder, tmp_path, kind):
    reference = run(folder, tmp_path / "ref")
    # the most tempting bait: a genuine, resumable partial of this very entry, kept outside the cache
    outside = tmp_path / "outside.h5"
    os.replace(interrupted_partial(folder, tmp_path / "elsewhere"), outside)
    before = sha(outside)
    cache = tmp_path / "c"
    cache.mkdir()
    final, partial, _ = entry_paths(cache, reference.cache_key)
    if kind == "symlink":
        partial.symlink_to(outside)
    else:
        os.link(outside, partial)
        assert os.stat(outside).st_nlink == 2

    store = run(folder, cache)

    assert sha(outside) == before, "features were written into a file outside the cache"
    assert "a symlink, a hard link" in _discard_warning(store, partial)
    assert store.stats.resumed_rows == 0 and not store.cache_hit
    np.testing.assert_array_equal(store.features, reference.features)
    assert store.path == final and not final.is_symlink() and os.stat(final).st_nlink == 1
    assert not os.path.lexists(partial)
    assert os.stat(outside).st_nlink == 1


# ------------------------------------------------------------------ 2. external storage / links
@pytest.mark.parametrize("kind, reason", [("external_storage", "external storage in /features"),
                                          ("external_link", "external link /features")])
def test_a_planted_partial_with_external_data_is_discarded_never_resumed(folder, tmp_path, kind, reason):
    reference = run(folder, tmp_path / "ref")
    cache = tmp_path / "c"
    partial = interrupted_partial(folder, cache)
    outside = tmp_path / "outside.bin"
    with h5py.File(partial, "r+", locking=False) as f:  # the genuine partial, its features pointing away
        data = f["features"][...]
        del f["features"]
        if kind == "external_storage":
            outside.write_bytes(data.tobytes())
            f.create_dataset("features", shape=data.shape, dtype=data.dtype,
                             external=[(str(outside), 0, h5py.h5f.UNLIMITED)])
        else:
            with h5py.File(outside, "w") as other:
                other.create_dataset("features", data=data)
            f["features"] = h5py.ExternalLink(str(outside), "/features")
    before = sha(outside)

    store = run(folder, cache)

    assert sha(outside) == before, "the partial was written through to a file outside the cache"
    assert reason in _discard_warning(store, partial)
    assert store.stats.resumed_rows == 0
    np.testing.assert_array_equal(store.features, reference.features)
    with h5py.File(store.path, "r") as f:
        assert not f["features"].external
    assert not os.path.lexists(partial)


# ------------------------------------------------------------------ 3. planted .lock symlink
def test_a_planted_lock_symlink_is_refused_and_rm_removes_the_link_only(folder, tmp_path):
    cache = tmp_path / "c"
    target = tmp_path / "precious.txt"
    target.write_bytes(b"not a lock file\n")
    plan = plan_extraction(folder, backbone=TINY, cache_dir=cache)
    final, partial, lock = entry_paths(cache, plan.cache_key)
    cache.mkdir(exist_ok=True)
    lock.symlink_to(target)

    with pytest.raises(CacheError, match=re.escape(repr(str(lock))) + r" is a symlink.*Remove it"):
        run(folder, cache)
    assert target.read_bytes() == b"not a lock file\n"
    assert not final.exists() and not os.path.lexists(partial)

    removed = remove_entry(final)
    assert lock in removed and not os.path.lexists(lock)
    assert target.read_bytes() == b"not a lock file\n"

    # a complete entry with a planted lock link: `embedcache rm` takes the entry and the link only
    assert not run(folder, cache).cache_hit
    lock.symlink_to(target)
    out = invoke("rm", plan.cache_key[:8], "--cache-dir", cache, "--yes")
    assert out.exit_code == 0, out.output
    assert not final.exists() and not os.path.lexists(lock)
    assert target.read_bytes() == b"not a lock file\n"


# ------------------------------------------------------------------ 4. bit flips
def test_every_kth_flipped_byte_is_refused_or_changes_nothing_served(tmp_path):
    entry = write_single_file(tmp_path / "cache", failed=(3,))
    original = FeatureStore.open(entry)
    size = entry.stat().st_size
    copies = tmp_path / "copies"
    copies.mkdir()
    silent, refused = [], 0
    for offset in range(0, size, 97):
        copy = flipped_copy(entry, copies / entry.name, offset)
        try:
            store = FeatureStore.open(copy)
        except CacheError:
            refused += 1
            continue
        except Exception as exc:  # noqa: BLE001 - any other type is the failure this test looks for
            pytest.fail(f"byte {offset}: {type(exc).__name__} instead of CacheError: {exc}")
        if not same_store(store, original):
            silent.append(offset)
    assert not silent, f"flipped bytes at offsets {silent} were served as different data without an error"
    assert refused > 0


def test_verify_reports_a_flipped_byte_inside_the_feature_rows(tmp_path):
    from embedcache.store.verify import verify_entry

    entry = write_single_file(tmp_path / "cache")
    raw = entry.read_bytes()
    pattern = FEATURES.tobytes()  # the recognisable rows, stored as one chunk
    at = raw.find(pattern)
    assert at >= 0 and raw.count(pattern) == 1
    assert verify_entry(entry).ok
    bad = flipped_copy(entry, tmp_path / entry.name, at + len(pattern) // 2)

    report = verify_entry(bad)
    assert not report.ok
    assert any("/features" in p for p in report.problems), report.problems
    with pytest.raises(CacheError, match=re.escape(str(bad))):
        FeatureStore.open(bad)


def test_a_corrupt_cache_hit_is_set_aside_and_recomputed(folder, tmp_path):
    cache = tmp_path / "c"
    first = run(folder, cache, store_dtype="float32", precision="fp32")
    offset, length = chunk_offset(first.path)
    flipped_copy(first.path, first.path, offset + length // 3)
    corrupted = sha(first.path)
    aside = first.path.with_name(first.cache_key[:16] + ".h5.corrupt")

    again = run(folder, cache, store_dtype="float32", precision="fp32")

    assert not again.cache_hit and again.path == first.path
    assert any(str(aside) in w for w in again.stats.warnings), again.stats.warnings
    assert aside.is_file() and sha(aside) == corrupted
    assert same_data(again, first)
    assert run(folder, cache, store_dtype="float32", precision="fp32").cache_hit


# ------------------------------------------------------------------ 5. damaged headers
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _overwrite_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:512] = bytes(range(256)) * 2
    path.write_bytes(bytes(data))


def _delete_done(path: Path) -> None:
    with h5py.File(path, "r+", locking=False) as f:
        del f["done"]


@pytest.mark.parametrize("damage", [_truncate, _overwrite_header, _delete_done], ids=["truncated", "header", "no-done"])
def test_a_damaged_entry_is_a_named_error_listed_unreadable_and_removable(tmp_path, damage):
    cache = tmp_path / "cache"
    entry = write_single_file(cache)
    damage(entry)
    notes = cache / "notes.txt"
    notes.write_text("my notes\n")
    foo = cache / "foo.h5"
    foreign = cache / "0123456789abcdef.h5"  # named like an entry, but someone else's HDF5 file
    for path in (foo, foreign):
        with h5py.File(path, "w") as f:
            f["theirs"] = np.arange(5)
    untouched = {p: sha(p) for p in (notes, foo, foreign)}

    with pytest.raises(CacheError, match=re.escape(str(entry))):
        FeatureStore.open(entry)

    [listed] = [e for e in list_entries(cache) if e["file"] == str(entry)]
    assert "unreadable" in listed, listed
    ls = invoke("ls", "--cache-dir", cache)
    assert ls.exit_code == 0 and "unreadable" in ls.output and entry.name in ls.output, ls.output

    with pytest.raises(CacheError, match="not an embedcache entry; not deleting it"):
        remove_entry(foreign)
    for other in (notes, foo):
        with pytest.raises(CacheError, match="is not a cache entry"):
            remove_entry(other)
    out = invoke("rm", entry, "--cache-dir", cache, "--yes")
    assert out.exit_code == 0, out.output
    assert not entry.exists()
    assert {p: sha(p) for p in untouched} == untouched


# ------------------------------------------------------------------ 6. rm racing a writer
def test_rm_refuses_an_entry_another_process_is_writing(tmp_path):
    cache = tmp_path / "cache"
    partial = write_single_file(cache, finish=False)
    final, _, lock = entry_paths(cache, KEY)
    before = sha(partial)
    with lock_held_elsewhere(lock) as holder:
        with pytest.raises(CacheLockedError, match=f"pid {holder.pid}"):
            remove_entry(partial)
        assert partial.is_file() and lock.is_file() and sha(partial) == before
        out = invoke("rm", partial, "--cache-dir", cache, "--yes")
        assert out.exit_code == 1 and f"pid {holder.pid}" in out.output
        assert partial.is_file() and lock.is_file()
    assert partial in remove_entry(partial)  # once the writer is gone
    assert not partial.exists()


# ------------------------------------------------------------------ 7. disk full
def test_a_full_disk_is_one_named_error_and_older_entries_survive(folder, tmp_path):
    cache = tmp_path / "c"
    older = run(folder, cache)
    older_sha = sha(older.path)
    new_data = make_image_folder(tmp_path / "new", per_class=5, split_dirs=True, seed=7)

    result = run_cli(["extract", new_data, "-b", "tests.tiny_backbone:tiny_factory", "--workers", "0",
                      "--cache-dir", cache], file_size_limit=4096)

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, lines
    assert "No room to write" in lines[0] and str(cache) in lines[0], lines[0]
    names = sorted(p.name for p in cache.iterdir())
    assert [n for n in names if n.endswith(".h5")] == [older.path.name], names
    assert not [n for n in names if n.endswith(".tmp")], names
    assert sha(older.path) == older_sha
    hit = run(folder, cache)
    assert hit.cache_hit and same_store(hit, older)


@pytest.mark.parametrize("limit", [300, 1000, 4000], ids=["nothing-fits", "weights-fit", "all-but-the-png-fit"])
def test_probe_out_on_a_full_disk_keeps_the_previous_probe(folder, tmp_path, limit):
    from embedcache.experiments.artifacts import load_probe
    from embedcache.experiments.protocol import probe

    store = run(folder, tmp_path / "c", store_dtype="float32", precision="fp32")
    out = tmp_path / "p"
    first = probe(store, penalty=1e-3, out=out)
    before = {p.name: sha(p) for p in out.iterdir()}

    result = run_cli(["probe", store.path, "--penalty", "0.5", "--out", out], file_size_limit=limit)

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "No room to write" in lines[0] and str(out) in lines[0], lines
    assert {p.name: sha(p) for p in out.iterdir()} == before
    loaded = load_probe(out)
    np.testing.assert_array_equal(loaded.estimator.coef_, first.estimator.coef_)


# ------------------------------------------------------------------ 8. read-only / file cache dir
_READ_ONLY_SCRIPT = """
import json, sys
import tests.tiny_backbone
from embedcache.errors import CacheError
from embedcache.extraction.extract import extract
hit = extract(sys.argv[1], backbone="tiny-test", workers=0, batch_size=4, cache_dir=sys.argv[3])
out = {"hit": hit.cache_hit, "features": hit.features.astype(float).tolist()}
try:
    extract(sys.argv[2], backbone="tiny-test", workers=0, batch_size=4, cache_dir=sys.argv[3])
    out["miss"] = None
except Exception as exc:
    out["miss"] = [type(exc).__name__, isinstance(exc, CacheError), str(exc)]
print(json.dumps(out))
"""


def _run_read_only(cache: Path, args: list[str]) -> subprocess.CompletedProcess:
    """The script with ``cache`` read-only: chmod where that binds us, else (as root) a read-only
    bind mount in a private mount namespace."""
    command = [sys.executable, "-c", _READ_ONLY_SCRIPT, *args]
    if os.geteuid() != 0:
        cache.chmod(0o555)
        try:
            if os.access(cache, os.W_OK):
                pytest.skip("chmod does not make the directory read-only here")
            return subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                                  timeout=180)
        finally:
            cache.chmod(0o755)
    if shutil.which("unshare") is None:
        pytest.skip("running as root without unshare: cannot make a read-only directory")
    shell = ('mount --bind "$1" "$1" || exit 98; mount -o remount,bind,ro "$1" "$1" || exit 98; '
             'if touch "$1/x" 2>/dev/null; then exit 99; fi; shift; exec "$@"')
    result = subprocess.run(["unshare", "-m", "sh", "-c", shell, "sh", str(cache), *command], cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=180)
    if result.returncode in (98, 99) or "unshare:" in result.stderr:
        pytest.skip(f"cannot make a read-only bind mount here: {result.stderr.strip()[:200]}")
    return result


def test_a_read_only_cache_dir_serves_hits_and_names_itself_on_a_miss(folder, tmp_path):
    import json

    cache = tmp_path / "c"
    first = run(folder, cache)
    before = sorted(p.name for p in cache.iterdir())
    other = make_image_folder(tmp_path / "other", per_class=5, split_dirs=True, seed=3)

    result = _run_read_only(cache, [str(folder), str(other), str(cache)])

    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["hit"] is True
    np.testing.assert_array_equal(np.array(out["features"]), first.features.astype(float))
    name, is_cache_error, message = out["miss"]
    assert is_cache_error, (name, message)
    assert str(cache) in message and "read-only" in message, message
    assert sorted(p.name for p in cache.iterdir()) == before


def test_a_cache_dir_that_is_a_file_is_a_named_error(folder, tmp_path):
    not_a_dir = tmp_path / "cachefile"
    not_a_dir.write_text("I am a file\n")
    with pytest.raises(CacheError, match=re.escape(repr(str(not_a_dir))) + " is a file"):
        run(folder, not_a_dir)
    assert not_a_dir.read_text() == "I am a file\n"
