"""Entries of a cache directory: summaries for ``ls``, name resolution, removal for ``rm``."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import h5py

from embedcache.errors import CacheError, CorruptEntryError
from embedcache.fileio import is_plain_file, named_write_errors
from embedcache.store.hdf5 import attr_value, check_safe, open_h5, read_attrs, read_numbers
from embedcache.store.layout import REQUIRED_COLUMNS
from embedcache.store.locking import EntryLock
from embedcache.store.schema import (
    CORRUPT_SUFFIX,
    ENTRY_SUFFIXES,
    FORMAT_NAME,
    LOCK_SUFFIX,
    PARTIAL_SUFFIX,
    SHARD_NAME_PATTERN,
    SHARDS_SUFFIX,
    SUFFIX,
    entry_stem,
)

#: Entry files ``ls`` lists (lock files are not entries).
LISTED_SUFFIXES = (SUFFIX, PARTIAL_SUFFIX, CORRUPT_SUFFIX)


def _is_listed(path: Path) -> bool:
    return entry_stem(path) is not None and path.name.endswith(LISTED_SUFFIXES)


def entry_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Attributes of an entry without loading its features (for ``embedcache ls``); refuses files
    with external links or storage before reading any data."""
    path = Path(path)
    with open_h5(path) as handle:
        check_safe(handle, path)
        attrs = read_attrs(handle)
        missing = [name for name in REQUIRED_COLUMNS if name not in handle]
        if missing:
            raise CorruptEntryError(f"{str(path)!r} has no /{', /'.join(missing)}; the entry is damaged. "
                                    f"`embedcache rm` removes it.")
        done = int(read_numbers(handle["done"], path).sum())
        n_errors = len(handle["errors/index"]) if "errors/index" in handle else 0
    attrs["rows_done"] = done
    attrs["n_errors"] = n_errors
    attrs["file"] = str(path)
    attrs["bytes"] = path.stat().st_size + sum(f.stat().st_size for f in _shard_files(path))
    return attrs


def _shard_files(path: Path) -> list[Path]:
    """The files of the entry's own ``<key16>.shards/`` that embedcache wrote (shards, temporary
    shards of a killed worker, the fault-test marker); never what else someone put there."""
    stem = entry_stem(path)
    folder = path.with_name(f"{stem}{SHARDS_SUFFIX}") if stem else None
    if folder is None or folder.is_symlink() or not folder.is_dir():
        return []
    ours = re.compile(rf"{SHARD_NAME_PATTERN}|\.{SHARD_NAME_PATTERN}\..*\.tmp|\.fault-injected")
    return sorted(f for f in folder.iterdir() if ours.fullmatch(f.name) and not f.is_symlink() and f.is_file())


def _remove_shards(path: Path) -> list[Path]:
    """Delete the entry's shard files, then its shard directory when nothing else is in it."""
    removed = []
    for shard in _shard_files(path):
        with named_write_errors(shard):
            shard.unlink()
        removed.append(shard)
    folder = path.with_name(f"{entry_stem(path)}{SHARDS_SUFFIX}")
    if folder.is_symlink():
        with named_write_errors(folder):
            folder.unlink()  # a planted link: the name only, never what it points to
        removed.append(folder)
    elif folder.is_dir() and not any(folder.iterdir()):
        with named_write_errors(folder):
            folder.rmdir()
        removed.append(folder)
    return removed


def list_entries(cache_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Summaries of every entry (complete, partial, set aside as corrupt) in ``cache_dir``,
    newest first; an entry that cannot be read is listed as ``unreadable`` with the reason."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    out = []
    for path in sorted(cache_dir.iterdir()):
        if not _is_listed(path):
            continue
        try:
            if path.name.endswith(CORRUPT_SUFFIX):
                raise CorruptEntryError("set aside: it failed its checksums")
            out.append(entry_summary(path))
        except (CacheError, OSError, KeyError, ValueError) as exc:
            out.append({"file": str(path), "unreadable": str(exc), "bytes": path.lstat().st_size})
    out.sort(key=lambda e: str(e.get("updated", "")), reverse=True)
    return out


def resolve_entry(entry: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """An entry given as a path, a file name, or a cache-key prefix (>= 4 hex digits)."""
    candidate = Path(entry)
    if candidate.is_file():
        return candidate
    cache_dir = Path(cache_dir)
    in_dir = cache_dir / str(entry)
    if in_dir.is_file() or (os.path.lexists(in_dir) and entry_stem(in_dir)):
        return in_dir
    text = str(entry)
    matches: list[Path] = []
    if len(text) >= 4 and all(c in "0123456789abcdef" for c in text.lower()) and cache_dir.is_dir():
        matches = [p for p in sorted(cache_dir.iterdir()) if p.name.startswith(text.lower()) and _is_listed(p)]
        complete = [p for p in matches if p.name.endswith(SUFFIX)]
        if len(complete) == 1:
            return complete[0]
        if len(matches) == 1:
            return matches[0]
    if len(matches) > 1:
        raise CacheError(
            f"Entry {text!r} is ambiguous in {str(cache_dir)!r}: "
            f"{', '.join(p.name for p in matches)}. Give more of the key."
        )
    raise CacheError(
        f"No cache entry {text!r} (as a path, or a key prefix of at least 4 hex digits in "
        f"{str(cache_dir)!r}). See `embedcache ls`."
    )


def _foreign(path: Path) -> bool:
    """A readable HDF5 file that says it is not ours (a damaged or truncated file is ours by name)."""
    if not path.name.endswith(SUFFIX) or path.is_symlink():
        return False
    try:
        with h5py.File(path, "r", locking=False) as handle:
            return attr_value(handle.attrs, "format") != FORMAT_NAME
    except OSError:
        return False


def remove_entry(path: str | os.PathLike) -> list[Path]:
    """Delete an entry and every file it owns (partial, lock, set-aside copy). Returns the files
    removed.

    Only names of the form ``<16 hex digits>.h5[.partial|.lock|.corrupt]`` are ever deleted, and a
    readable ``.h5`` must carry the embedcache format attribute; a truncated or unreadable one is
    removable (it is ours by name). The entry's lock is taken first, so an entry another process
    is writing is refused, naming that process.

    Raises:
        CacheError: not an entry name, a foreign HDF5 file, or a write in progress.
    """
    path = Path(path)
    stem = entry_stem(path)
    if stem is None:
        raise CacheError(f"{str(path)!r} is not a cache entry (expected <16 hex digits>.h5, .h5.partial or "
                         f".h5.corrupt); not deleting it.")
    if _foreign(path):
        raise CacheError(f"{str(path)!r} is not an embedcache entry; not deleting it.")
    lock = EntryLock(path.with_name(stem + LOCK_SUFFIX))
    had_lock = os.path.lexists(lock.path)
    if had_lock and not is_plain_file(lock.path):  # a planted link: remove the name, never follow it
        with named_write_errors(lock.path):
            lock.path.unlink()
    lock.acquire(purpose="removing")
    removed = []
    try:
        for suffix in ENTRY_SUFFIXES:
            candidate = path.with_name(stem + suffix)
            if suffix != LOCK_SUFFIX and os.path.lexists(candidate):
                with named_write_errors(candidate):
                    candidate.unlink()
                removed.append(candidate)
        removed += _remove_shards(path)
    finally:
        lock.release(unlink=True)
    return removed + ([lock.path] if had_lock else [])
