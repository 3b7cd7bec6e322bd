"""Entries of a cache directory: summaries for ``ls``, name resolution, removal for ``rm``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py

from embedcache.errors import CacheError
from embedcache.store.hdf5 import read_attrs
from embedcache.store.schema import FORMAT_NAME, LOCK_SUFFIX, PARTIAL_SUFFIX, SUFFIX, entry_stem


def _is_entry_name(path: Path) -> bool:
    return path.name.endswith(SUFFIX) or path.name.endswith(PARTIAL_SUFFIX)


def entry_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Attributes of an entry without loading its arrays (for ``embedcache ls``)."""
    path = Path(path)
    with h5py.File(path, "r", locking=False) as handle:
        attrs = read_attrs(handle)
        done = int(handle["done"][...].sum()) if "done" in handle else 0
        n_errors = len(handle["errors/index"]) if "errors/index" in handle else 0
    attrs["rows_done"] = done
    attrs["n_errors"] = n_errors
    attrs["file"] = str(path)
    attrs["bytes"] = path.stat().st_size
    return attrs


def list_entries(cache_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Summaries of every entry (complete and partial) in ``cache_dir``, newest first."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    out = []
    for path in sorted(cache_dir.iterdir()):
        if not _is_entry_name(path):
            continue
        try:
            out.append(entry_summary(path))
        except (OSError, KeyError, ValueError) as exc:
            out.append({"file": str(path), "unreadable": str(exc), "bytes": path.stat().st_size})
    out.sort(key=lambda e: str(e.get("updated", "")), reverse=True)
    return out


def resolve_entry(entry: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """An entry given as a path, a file name, or a cache-key prefix (>= 4 hex digits)."""
    candidate = Path(entry)
    if candidate.is_file():
        return candidate
    cache_dir = Path(cache_dir)
    in_dir = cache_dir / str(entry)
    if in_dir.is_file():
        return in_dir
    text = str(entry)
    matches: list[Path] = []
    if len(text) >= 4 and all(c in "0123456789abcdef" for c in text.lower()) and cache_dir.is_dir():
        matches = [p for p in sorted(cache_dir.iterdir()) if p.name.startswith(text.lower()) and _is_entry_name(p)]
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


def remove_entry(path: str | os.PathLike) -> list[Path]:
    """Delete an entry (and its partial/lock siblings). Returns the files removed.

    Refuses anything that is not named like an entry or does not carry the embedcache format
    attribute (an unreadable ``.partial`` is still removable: it is ours by name).
    """
    path = Path(path)
    if not _is_entry_name(path):
        raise CacheError(f"{str(path)!r} is not a cache entry (expected a .h5 or .h5.partial file).")
    if path.name.endswith(SUFFIX):
        try:
            with h5py.File(path, "r", locking=False) as handle:
                is_ours = handle.attrs.get("format") == FORMAT_NAME
        except OSError:
            is_ours = False
        if not is_ours:
            raise CacheError(f"{str(path)!r} is not an embedcache entry; not deleting it.")
    stem = entry_stem(path)
    removed = []
    for suffix in (SUFFIX, PARTIAL_SUFFIX, LOCK_SUFFIX):
        candidate = path.with_name(f"{stem}{suffix}")
        if candidate.exists():
            candidate.unlink()
            removed.append(candidate)
    return removed
