"""FeatureStore: the HDF5 feature cache (schema in docs/schema.md).

Writing is crash-safe: an entry is built as ``<key16>.h5.partial``, progress is committed every
few batches (feature rows, then their ``done`` flags, then a flush), and on completion the file is
marked ``complete``, fsynced and atomically renamed to ``<key16>.h5``. A final name therefore
always holds a complete entry. A second writer on the same entry fails fast on a lock file.
Reading refuses external links, external storage and filters we did not write.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from embedcache.errors import CacheError, CacheLockedError, ConfigError
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


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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
            features = handle["features"][...][rows] if len(rows) else np.zeros((0, attrs["dim"]), np.float16)
            labels = handle["labels"][...][rows]
            paths = handle["paths"].asstr()[...][rows]
            splits = handle["split"][...][rows]
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
        f"No cache entry {text!r} (as a path, or a key prefix in {str(cache_dir)!r}). "
        f"See `embedcache ls`."
    )


# --------------------------------------------------------------------------- writing


class _Lock:
    """An exclusive, non-blocking advisory lock on ``<entry>.h5.lock``, released by the OS when
    the holding process dies (so a killed run never leaves a stale lock)."""

    #: Lock files held by this process: POSIX locks do not conflict within one process.
    _held: set[str] = set()

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.path)
        if key in _Lock._held:
            raise CacheLockedError(
                f"This process is already writing this cache entry ({str(self.path)!r})."
            )
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # A POSIX record lock, not flock(): DataLoader workers are forked and would inherit
            # an flock, keeping the entry locked after the main process is killed.
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = ""
                with contextlib.suppress(OSError):
                    holder = self.path.read_text().strip()
                raise CacheLockedError(
                    f"Another process{f' (pid {holder})' if holder else ''} is writing this cache "
                    f"entry ({str(self.path)!r}). Wait for it to finish, then rerun: the result "
                    f"will be a cache hit."
                ) from exc
            raise
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        _Lock._held.add(key)

    def release(self, *, unlink: bool = False) -> None:
        if self._fd is None:
            return
        _Lock._held.discard(os.path.realpath(self.path))
        if unlink:
            with contextlib.suppress(OSError):
                self.path.unlink()
        fcntl.lockf(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _json_attr(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


class StoreWriter:
    """Builds one entry crash-safely. Use as a context manager around the extraction loop.

    Attributes:
        resumed_rows: rows already done in a ``.partial`` found on open.
        warnings: human-readable notes (e.g. an unreadable partial was discarded).
    """

    def __init__(
        self,
        *,
        cache_dir: str | os.PathLike,
        cache_key: str,
        n: int,
        dim: int,
        store_dtype: str,
        attrs: dict[str, Any],
        paths: Sequence[str],
        labels: Sequence[int],
        splits: Sequence[int],
        file_sizes: Sequence[int],
        file_mtimes_ns: Sequence[int],
    ) -> None:
        if store_dtype not in STORE_DTYPES:
            raise ConfigError(
                f"The 'store_dtype' parameter must be one of {list(STORE_DTYPES)}. Got {store_dtype!r}."
            )
        self.final_path, self.partial_path, lock_path = entry_paths(cache_dir, cache_key)
        self.cache_key = cache_key
        self.n, self.dim, self.store_dtype = n, dim, store_dtype
        self._attrs = attrs
        self._static = {
            "paths": list(paths),
            "labels": np.asarray(labels, dtype=np.int64),
            "split": np.asarray(splits, dtype=np.uint8),
            "file_size": np.asarray(file_sizes, dtype=np.int64),
            "file_mtime_ns": np.asarray(file_mtimes_ns, dtype=np.int64),
        }
        self._lock = _Lock(lock_path)
        self._handle: h5py.File | None = None
        self._pending_done: list[np.ndarray] = []
        self._done = np.zeros(n, dtype=bool)
        self._failed = np.zeros(n, dtype=bool)
        self.resumed_rows = 0
        self.warnings: list[str] = []

    # -- lifecycle
    def __enter__(self) -> StoreWriter:
        self._lock.acquire()
        try:
            self._open_partial()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            with contextlib.suppress(Exception):
                self.commit()
            with contextlib.suppress(Exception):
                self._handle.close()
            self._handle = None
        self._lock.release(unlink=self.final_path.exists())

    def _open_partial(self) -> None:
        if self.partial_path.exists():
            try:
                handle = h5py.File(self.partial_path, "r+", locking=False)
                attrs = read_attrs(handle)
                if (
                    attrs.get("cache_key") != self.cache_key
                    or tuple(handle["features"].shape) != (self.n, self.dim)
                ):
                    handle.close()
                    raise ValueError("cache key or shape differs")
                self._done = handle["done"][...].astype(bool)
                # Belt and braces after a hard kill: a row vouched for by `done` must hold
                # finite numbers (unwritten rows are NaN-filled); otherwise recompute it.
                if self._done.any():
                    rows = np.flatnonzero(self._done)
                    finite = np.isfinite(handle["features"][...][rows]).all(axis=1)
                    self._done[rows[~finite]] = False
                for index, _path, _msg in read_errors(handle):
                    self._failed[index] = True
                self.resumed_rows = int(self._done.sum())
                self._handle = handle
                return
            except (OSError, KeyError, ValueError) as exc:
                self.warnings.append(
                    f"Discarded unreadable partial entry {str(self.partial_path)!r} ({exc}); starting over."
                )
                self.partial_path.unlink()
        self._create()

    def _create(self) -> None:
        self.partial_path.parent.mkdir(parents=True, exist_ok=True)
        handle = h5py.File(self.partial_path, "w", locking=False)
        chunk_rows = max(1, min(ROWS_PER_CHUNK, self.n))
        handle.create_dataset(
            "features",
            shape=(self.n, self.dim),
            dtype=self.store_dtype,
            chunks=(chunk_rows, self.dim) if self.n else None,
            fillvalue=np.nan,
        )
        handle.create_dataset("labels", data=self._static["labels"])
        handle.create_dataset(
            "paths", data=np.array(self._static["paths"], dtype=object), dtype=h5py.string_dtype("utf-8")
        )
        split = handle.create_dataset("split", data=self._static["split"])
        split.attrs["mapping"] = _json_attr(SPLIT_MAPPING)
        handle.create_dataset("file_size", data=self._static["file_size"])
        handle.create_dataset("file_mtime_ns", data=self._static["file_mtime_ns"])
        handle.create_dataset("done", data=np.zeros(self.n, dtype=bool))
        errors = handle.create_group("errors")
        errors.create_dataset("index", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(256,))
        for name in ("path", "message"):
            errors.create_dataset(
                name, shape=(0,), maxshape=(None,), dtype=h5py.string_dtype("utf-8"), chunks=(256,)
            )
        now = _now()
        root = {
            **self._attrs,
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "cache_key": self.cache_key,
            "complete": False,
            "n": self.n,
            "dim": self.dim,
            "store_dtype": self.store_dtype,
            "split_mapping": SPLIT_MAPPING,
            "created": now,
            "updated": now,
        }
        for key, value in root.items():
            handle.attrs[key] = _json_attr(value) if key in _JSON_ATTRS else value
        handle.flush()
        self._handle = handle

    # -- state
    @property
    def attempted(self) -> np.ndarray:
        """Rows done or recorded as failed: a resumed run skips them."""
        return self._done | self._failed

    @property
    def n_failed(self) -> int:
        return int(self._failed.sum())

    # -- writes
    def write_rows(self, rows: np.ndarray, features: np.ndarray) -> None:
        """Write feature rows (row indices ascending); their done flags land at the next commit."""
        assert self._handle is not None
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        if features.shape != (len(rows), self.dim):
            raise ValueError(f"features shape {features.shape} != ({len(rows)}, {self.dim})")
        if not np.isfinite(features).all():
            raise ValueError("non-finite features produced; refusing to cache them")
        data = features.astype(self.store_dtype, copy=False)
        dset = self._handle["features"]
        # Contiguous runs are written as slices (one HDF5 call each), scattered rows one by one.
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for run_rows, run_data in zip(np.split(rows, breaks), np.split(data, breaks), strict=False):
            dset[int(run_rows[0]) : int(run_rows[-1]) + 1] = run_data
        self._pending_done.append(rows)

    def record_errors(self, failures: Iterable[tuple[int, str]]) -> None:
        """Record ``(row, message)`` failures in the /errors table."""
        assert self._handle is not None
        failures = [(int(i), str(m)) for i, m in failures if not self._failed[int(i)]]
        if not failures:
            return
        group = self._handle["errors"]
        start = group["index"].shape[0]
        stop = start + len(failures)
        for name in ("index", "path", "message"):
            group[name].resize((stop,))
        group["index"][start:stop] = [i for i, _ in failures]
        group["path"][start:stop] = [self._static["paths"][i] for i, _ in failures]
        group["message"][start:stop] = [m for _, m in failures]
        for index, _ in failures:
            self._failed[index] = True

    def commit(self) -> None:
        """Make progress durable: data is flushed before the done flags that vouch for it."""
        assert self._handle is not None
        self._handle.flush()
        if self._pending_done:
            rows = np.concatenate(self._pending_done)
            self._done[rows] = True
            self._handle["done"][...] = self._done
            self._pending_done = []
        self._handle.attrs["updated"] = _now()
        self._handle.flush()

    def copy_rows_from(self, source: Path, mapping: dict[int, int]) -> int:
        """Copy feature rows from another complete entry: ``{our_row: their_row}``."""
        if not mapping:
            return 0
        ours = np.array(sorted(mapping), dtype=np.int64)
        theirs = np.array([mapping[i] for i in ours], dtype=np.int64)
        with h5py.File(source, "r", locking=False) as other:
            _check_safe(other, source)
            order = np.argsort(theirs)
            data = np.empty((len(ours), self.dim), dtype=other["features"].dtype)
            data[order] = other["features"][theirs[order]]
        self.write_rows(ours, data)
        self.commit()
        return len(ours)

    def finalize(self, extra_attrs: dict[str, Any] | None = None) -> Path:
        """Mark complete, fsync and atomically move to the final name."""
        assert self._handle is not None
        self.commit()
        for key, value in (extra_attrs or {}).items():
            self._handle.attrs[key] = _json_attr(value) if key in _JSON_ATTRS else value
        self._handle.attrs["complete"] = True
        self._handle.attrs["updated"] = _now()
        self._handle.flush()
        self._handle.close()
        self._handle = None
        with open(self.partial_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self.partial_path, self.final_path)
        with contextlib.suppress(OSError):
            dir_fd = os.open(self.final_path.parent, os.O_RDONLY)
            os.fsync(dir_fd)
            os.close(dir_fd)
        return self.final_path


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
    """Delete an entry (and its partial/lock siblings). Returns the files removed."""
    path = Path(path)
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
