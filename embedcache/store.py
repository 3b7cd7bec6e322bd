"""FeatureStore: reading the HDF5 feature cache (schema in docs/schema.md).

This module holds the entry naming and constants, :class:`FeatureStore` (load an entry into
memory), entry listing/resolution/removal and the look-ups that find reusable rows. Reading refuses
external links, external storage and filters we did not write. Writing an entry crash-safely is
:mod:`embedcache.store_writer`'s job; :class:`StoreWriter` is re-exported here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from embedcache.errors import CacheError
from embedcache.fingerprint import FORMAT_VERSION

FORMAT_NAME = "embedcache"
SUFFIX = ".h5"
PARTIAL_SUFFIX = ".h5.partial"
LOCK_SUFFIX = ".h5.lock"
STORE_DTYPES = ("float16", "float32")
SPLIT_MAPPING = {0: "train", 1: "val", 2: "test", 3: "unsplit"}
#: Rows per HDF5 chunk of /features: reading a few rows touches little, scanning stays fast.
ROWS_PER_CHUNK = 256
_ALLOWED_FILTERS = {None, "gzip", "lzf"}


def default_cache_dir() -> Path:
    """``$EMBEDCACHE_DIR``, else ``./cache``."""
    return Path(os.environ.get("EMBEDCACHE_DIR") or "cache")


def entry_paths(cache_dir: str | os.PathLike, cache_key: str) -> tuple[Path, Path, Path]:
    """(final, partial, lock) paths of the entry for ``cache_key``."""
    base = Path(cache_dir) / cache_key[:16]
    return (
        base.with_name(base.name + SUFFIX),
        base.with_name(base.name + PARTIAL_SUFFIX),
        base.with_name(base.name + LOCK_SUFFIX),
    )


# --------------------------------------------------------------------------- reading


def _check_safe(handle: h5py.File, path: Path) -> None:
    """Refuse links and storage that point outside the file, and filters we never write."""

    problems: list[str] = []

    def visit(name: str, link: Any) -> None:
        if isinstance(link, h5py.ExternalLink):
            problems.append(f"external link /{name}")
            return
        if isinstance(link, h5py.SoftLink):
            problems.append(f"soft link /{name}")
            return
        obj = handle.get(name)
        if isinstance(obj, h5py.Dataset):
            if obj.external:
                problems.append(f"external storage in /{name}")
            if obj.is_virtual:
                problems.append(f"virtual dataset /{name}")
            if obj.compression not in _ALLOWED_FILTERS:
                problems.append(f"unknown filter {obj.compression!r} on /{name}")

    handle.visititems_links(visit)
    if problems:
        raise CacheError(f"Refusing to read {str(path)!r}: {', '.join(problems)}.")


@dataclass
class FeatureStore:
    """A readable cache entry; arrays hold only rows that were written and valid (``done``).

    Attributes:
        path: the HDF5 file.
        features: ``(M, D)`` float array (float16 or float32 as stored).
        labels: ``(M,)`` int64, -1 = unlabelled.
        paths: ``(M,)`` relative paths (str).
        splits: ``(M,)`` uint8 split codes, see :data:`SPLIT_MAPPING`.
        rows: ``(M,)`` row index of each returned row in the file.
        attrs: root attributes, JSON attributes decoded.
        errors: ``[(row, path, message)]`` for images that failed to decode.
        cache_hit: set by :func:`embedcache.extract` when no model ran.
        stats: extraction statistics set by :func:`embedcache.extract`.
    """

    path: Path
    features: np.ndarray
    labels: np.ndarray
    paths: np.ndarray
    splits: np.ndarray
    rows: np.ndarray
    attrs: dict[str, Any]
    errors: list[tuple[int, str, str]]
    cache_hit: bool = False
    stats: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | os.PathLike, *, allow_partial: bool = False) -> FeatureStore:
        """Read an entry into memory.

        Args:
            path: an ``.h5`` cache file (or ``.partial`` with ``allow_partial=True``).
            allow_partial: read a ``.partial`` entry (only its done rows).
        """
        path = Path(path)
        if not path.is_file():
            raise CacheError(f"No cache entry at {str(path)!r}. See `embedcache ls` for entries.")
        try:
            handle = h5py.File(path, "r", locking=False)
        except OSError as exc:
            raise CacheError(f"Cannot open {str(path)!r} as HDF5 ({exc}).") from exc
        with handle:
            _check_safe(handle, path)
            attrs = read_attrs(handle)
            if attrs.get("format") != FORMAT_NAME:
                raise CacheError(f"{str(path)!r} is not an embedcache entry (format attr missing).")
            if int(attrs.get("format_version", -1)) > FORMAT_VERSION:
                raise CacheError(
                    f"{str(path)!r} has format_version {attrs['format_version']}; this embedcache "
                    f"reads up to {FORMAT_VERSION}. Upgrade embedcache."
                )
            if not attrs.get("complete") and not allow_partial:
                raise CacheError(
                    f"{str(path)!r} is not complete; rerun the extract command to resume it."
                )
            done = handle["done"][...]
            rows = np.flatnonzero(done)
            # a complete entry is read as is (no gathering copy of the feature matrix)
            pick = slice(None) if len(rows) == len(done) else rows
            features = handle["features"][...][pick] if len(rows) else np.zeros((0, attrs["dim"]), np.float16)
            labels = handle["labels"][...][pick]
            paths = handle["paths"].asstr()[...][pick]
            splits = handle["split"][...][pick]
            errors = read_errors(handle)
        return cls(path, features, labels, paths, splits, rows, attrs, errors)

    @property
    def cache_key(self) -> str:
        return self.attrs["cache_key"]

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs.get("class_names", []))

    @property
    def backbone(self) -> dict[str, Any]:
        return self.attrs.get("backbone", {})

    def split_indices(self, split: str | int) -> np.ndarray:
        """Positions (into the arrays) of rows in ``split`` (``train``/``val``/``test`` or code)."""
        code = split if isinstance(split, int) else {v: k for k, v in SPLIT_MAPPING.items()}[split]
        return np.flatnonzero(self.splits == code)

    def __len__(self) -> int:
        return len(self.rows)


_JSON_ATTRS = ("class_names", "backbone", "preprocess", "versions", "source", "split_mapping")


def read_attrs(handle: h5py.File) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for key, value in handle.attrs.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        if isinstance(value, np.generic):
            value = value.item()
        if key in _JSON_ATTRS and isinstance(value, str):
            value = json.loads(value)
        attrs[key] = value
    return attrs


def read_errors(handle: h5py.File) -> list[tuple[int, str, str]]:
    if "errors" not in handle:
        return []
    group = handle["errors"]
    index = group["index"][...]
    paths = group["path"].asstr()[...]
    messages = group["message"].asstr()[...]
    return [(int(i), str(p), str(m)) for i, p, m in zip(index, paths, messages, strict=False)]


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
        if not (path.name.endswith(SUFFIX) or path.name.endswith(PARTIAL_SUFFIX)):
            continue
        try:
            out.append(entry_summary(path))
        except (OSError, KeyError, ValueError) as exc:
            out.append({"file": str(path), "unreadable": str(exc), "bytes": path.stat().st_size})
    out.sort(key=lambda e: str(e.get("updated", "")), reverse=True)
    return out


def resolve_entry(entry: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """An entry given as a path, a file name, or a cache-key prefix (≥ 4 hex digits)."""
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
        matches = [
            p
            for p in sorted(cache_dir.iterdir())
            if p.name.startswith(text.lower())
            and (p.name.endswith(SUFFIX) or p.name.endswith(PARTIAL_SUFFIX))
        ]
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


def find_reusable_entry(cache_dir: str | os.PathLike, config_key: str) -> Path | None:
    """Newest complete entry built with the same config (backbone, preprocessing, precision...)."""
    best: tuple[str, Path] | None = None
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return None
    for path in cache_dir.glob(f"*{SUFFIX}"):
        try:
            with h5py.File(path, "r", locking=False) as handle:
                attrs = handle.attrs
                if attrs.get("config_key") != config_key or not attrs.get("complete"):
                    continue
                updated = str(attrs.get("updated", ""))
        except OSError:
            continue
        if best is None or updated > best[0]:
            best = (updated, path)
    return None if best is None else best[1]


def row_keys(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(paths, split codes)`` of an entry's done rows, without reading its features."""
    with h5py.File(path, "r", locking=False) as handle:
        done = handle["done"][...].astype(bool)
        return handle["paths"].asstr()[...][done], handle["split"][...][done]


def reusable_rows(source: Path) -> dict[tuple[str, int, int], int]:
    """``{(path, size, mtime_ns): row}`` for done rows of a complete entry."""
    with h5py.File(source, "r", locking=False) as handle:
        done = handle["done"][...]
        paths = handle["paths"].asstr()[...]
        sizes = handle["file_size"][...]
        mtimes = handle["file_mtime_ns"][...]
    return {
        (str(paths[i]), int(sizes[i]), int(mtimes[i])): int(i)
        for i in np.flatnonzero(done)
        if sizes[i] > 0
    }


def remove_entry(path: str | os.PathLike) -> list[Path]:
    """Delete an entry (and its partial/lock siblings). Returns the files removed.

    Refuses anything that is not named like an entry or does not carry the embedcache format
    attribute (an unreadable ``.partial`` is still removable: it is ours by name).
    """
    path = Path(path)
    if not (path.name.endswith(SUFFIX) or path.name.endswith(PARTIAL_SUFFIX)):
        raise CacheError(f"{str(path)!r} is not a cache entry (expected a .h5 or .h5.partial file).")
    if path.name.endswith(SUFFIX):
        try:
            with h5py.File(path, "r", locking=False) as handle:
                is_ours = handle.attrs.get("format") == FORMAT_NAME
        except OSError:
            is_ours = False
        if not is_ours:
            raise CacheError(f"{str(path)!r} is not an embedcache entry; not deleting it.")
    name = path.name
    for suffix in (PARTIAL_SUFFIX, SUFFIX):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    removed = []
    for suffix in (SUFFIX, PARTIAL_SUFFIX, LOCK_SUFFIX):
        candidate = path.with_name(name + suffix)
        if candidate.exists():
            candidate.unlink()
            removed.append(candidate)
    return removed


# Re-exported so `from embedcache.store import StoreWriter` keeps working; imported last because
# the writer builds on the reading helpers and constants above.
from embedcache.store_writer import StoreWriter  # noqa: E402, F401
