"""StoreWriter: building one HDF5 cache entry crash-safely (schema in docs/schema.md).

An entry is built as ``<key16>.h5.partial``, progress is committed every few batches (feature
rows, then their ``done`` flags, then a flush), and on completion the file is marked ``complete``,
fsynced and atomically renamed to ``<key16>.h5``. A final name therefore always holds a complete
entry. A second writer on the same entry fails fast on a lock file
(:mod:`~embedcache.store.locking`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from embedcache.errors import CacheError, ConfigError
from embedcache.store.hdf5 import SPLIT_MAPPING, check_safe, json_attr, read_attrs, read_errors
from embedcache.store.locking import EntryLock
from embedcache.store.schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    JSON_ATTRS,
    ROWS_PER_CHUNK,
    STORE_DTYPES,
    entry_paths,
)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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
        targets: np.ndarray | None = None,
        target_names: Sequence[str] = (),
        label_sets: np.ndarray | None = None,
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
        # optional per-row targets (docs/schema.md): numeric targets and label sets
        if targets is not None:
            self._static["targets"] = np.asarray(targets, dtype=np.float32).reshape(n, -1)
            self._target_names = list(target_names)
        if label_sets is not None:
            self._static["label_sets"] = np.asarray(label_sets, dtype=np.uint8).reshape(n, -1)
        self._lock = EntryLock(lock_path)
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
        split.attrs["mapping"] = json_attr(SPLIT_MAPPING)
        handle.create_dataset("file_size", data=self._static["file_size"])
        handle.create_dataset("file_mtime_ns", data=self._static["file_mtime_ns"])
        for name in ("targets", "label_sets"):  # optional per-row targets, chunked like /features
            if name in self._static:
                values = self._static[name]
                dset = handle.create_dataset(name, data=values,
                                             chunks=(chunk_rows, max(1, values.shape[1])) if values.size else None)
                names = self._target_names if name == "targets" else self._attrs.get("class_names", [])
                dset.attrs["names"] = json_attr(list(names))
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
            handle.attrs[key] = json_attr(value) if key in JSON_ATTRS else value
        handle.flush()
        self._handle = handle

    def _require_open(self) -> None:
        if self._handle is None:
            raise CacheError("This StoreWriter is not open; use it as a context manager (with StoreWriter(...)).")

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
        self._require_open()
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
        self._require_open()
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
        self._require_open()
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
            check_safe(other, source)
            order = np.argsort(theirs)
            data = np.empty((len(ours), self.dim), dtype=other["features"].dtype)
            data[order] = other["features"][theirs[order]]
        self.write_rows(ours, data)
        self.commit()
        return len(ours)

    def finalize(self, extra_attrs: dict[str, Any] | None = None) -> Path:
        """Mark complete, fsync and atomically move to the final name."""
        self._require_open()
        self.commit()
        for key, value in (extra_attrs or {}).items():
            self._handle.attrs[key] = json_attr(value) if key in JSON_ATTRS else value
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
