"""StoreWriter: building one HDF5 cache entry crash-safely (schema in docs/schema.md).

An entry is built as ``<key16>.h5.partial`` (created under a fresh ``mkstemp`` name, then renamed),
progress is committed every few batches (feature rows, then their ``done`` flags, then a flush),
and on completion the file is marked ``complete``, read back in full (checksums, finite rows),
fsynced and atomically renamed to ``<key16>.h5``. A final name therefore always holds a complete
entry that read back as written. A second writer on the same entry fails fast on a lock file
(:mod:`~embedcache.store.locking`); a planted ``.partial`` (symlink, hard link, external
storage) is removed, never written through. Write failures (a full disk, read-only media) are
one :class:`~embedcache.errors.CacheError` naming the file and the free space.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from embedcache.errors import CacheError, ConfigError
from embedcache.fileio import (
    free_bytes,
    fsync_dir,
    is_plain_file,
    named_write_errors,
    new_temporary_path,
)
from embedcache.store.failed_hdf5 import keep_unclosable, quiet_failed_hdf5_objects
from embedcache.store.feature_sets import feature_columns
from embedcache.store.hdf5 import (
    LIBVER,
    check_safe,
    crc32,
    fixed_utf8,
    open_h5,
    read_errors,
    read_numbers,
    verify_feature_blocks,
    write_root_attrs,
)
from embedcache.store.layout import (
    ERROR_MESSAGE_BYTES,
    resumable_state,
    verify_written,
    write_layout,
)
from embedcache.store.locking import EntryLock
from embedcache.store.schema import (
    COLUMN_CRC32,
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
        views: np.ndarray | None = None,
    ) -> None:
        if store_dtype not in STORE_DTYPES:
            raise ConfigError(
                f"The 'store_dtype' parameter must be one of {list(STORE_DTYPES)}. Got {store_dtype!r}."
            )
        self.final_path, self.partial_path, lock_path = entry_paths(cache_dir, cache_key)
        self.cache_key = cache_key
        self.n, self.dim, self.store_dtype = n, dim, store_dtype
        self._attrs = attrs
        # (set, dataset, checksums, width) of /features and of each extra feature set (attrs["feature_sets"])
        self._columns = feature_columns({**attrs, "dim": dim})
        self.total_dim = sum(width for *_, width in self._columns)
        self._fixed_bytes: int | None = None  # the entry's size besides its features (_bytes_needed)
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
            self._static["target_names"] = list(target_names)
        if label_sets is not None:
            self._static["label_sets"] = np.asarray(label_sets, dtype=np.uint8).reshape(n, -1)
        if views is not None:  # (n, 2): centre-view row and view index of each row (extract --views)
            self._static["view"] = np.asarray(views, dtype=np.int64).reshape(n, 2)
        self._lock = EntryLock(lock_path)
        self._handle: h5py.File | None = None
        self._pending_done: list[np.ndarray] = []
        self._done = np.zeros(n, dtype=bool)
        self._failed = np.zeros(n, dtype=bool)
        self.resumed_rows = 0
        self.warnings: list[str] = []
        self._broken = False
        self._underflow_noted = False

    # -- lifecycle
    def __enter__(self) -> StoreWriter:
        quiet_failed_hdf5_objects()
        self._lock.acquire()
        try:
            self._open_partial()
        except BaseException:
            if self._broken and self._handle is not None:  # see __exit__
                keep_unclosable(self._handle)
                self._handle = None
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._broken and self._handle is not None:
            # HDF5 cannot flush or close a file whose write failed (it errors, and can crash the
            # interpreter when the objects are freed): keep it referenced, write nothing more.
            keep_unclosable(self._handle)
            self._handle = None
        if self._handle is not None:
            with contextlib.suppress(Exception):
                self.commit()
            with contextlib.suppress(Exception):
                self._handle.close()
            self._handle = None
        self._lock.release(unlink=self.final_path.exists())

    def _open_partial(self) -> None:
        """Resume a ``.partial`` that is ours and safe, else start a new one. A partial that is a
        symlink, a hard link, unreadable, foreign or unsafe (external links or storage) is removed
        (the name only: nothing it points to is touched) and never written."""
        if os.path.lexists(self.partial_path):
            reason = self._resume_problem()
            if reason is None:
                return
            self.warnings.append(f"Discarded partial entry {str(self.partial_path)!r} ({reason}); starting over.")
            with named_write_errors(self.partial_path):
                self.partial_path.unlink()
        self._create()

    def _resume_problem(self) -> str | None:
        """Open the partial for resuming; None when done, else why it cannot be resumed."""
        if not is_plain_file(self.partial_path):
            return "a symlink, a hard link or not a regular file"
        try:
            handle = h5py.File(self.partial_path, "r+", locking=False)
        except OSError as exc:
            return f"unreadable: {exc}"
        try:
            self._done, self._failed, self._column_crc = resumable_state(
                handle, self.partial_path, cache_key=self.cache_key, n=self.n, dim=self.dim)
        except (CacheError, OSError, KeyError, ValueError, TypeError) as exc:
            handle.close()
            return str(exc)
        self.resumed_rows = int(self._done.sum())
        self._handle = handle
        return None

    def _create(self) -> None:
        """A new partial: built under a fresh ``mkstemp`` name in the cache dir (nothing planted
        can be opened), then renamed to ``<key16>.h5.partial``."""
        with named_write_errors(self.partial_path.parent):
            self.partial_path.parent.mkdir(parents=True, exist_ok=True)
        self._check_room()
        tmp = new_temporary_path(self.partial_path.parent, prefix=f".{self.partial_path.name}.", suffix=".tmp")
        try:
            with self._writing(needed=self._bytes_needed()):
                handle = h5py.File(tmp, "w", locking=False, libver=LIBVER)
                self._handle = handle
                self._column_crc = write_layout(handle, n=self.n, dim=self.dim, store_dtype=self.store_dtype,
                                                static=self._static, attrs=self._attrs, cache_key=self.cache_key,
                                                created=_now())
                handle.flush()
                os.replace(tmp, self.partial_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._handle = handle

    def _bytes_needed(self) -> int:
        """About what the rows not yet done will take on disk (features, plus the fixed columns)."""
        itemsize = np.dtype(self.store_dtype).itemsize
        todo = int(self.n - self._done.sum())
        if self._fixed_bytes is None:  # asked before every write: the paths are summed once
            self._fixed_bytes = 40 * self.n + sum(len(p) for p in self._static["paths"]) + (1 << 20)
        return todo * self.total_dim * itemsize + self._fixed_bytes

    def _check_room(self) -> None:
        """Fail before any work when the cache's file system cannot hold the entry."""
        free, needed = free_bytes(self.partial_path.parent), self._bytes_needed()
        if free is not None and free < needed:
            raise CacheError(
                f"Not enough room for cache entry {str(self.partial_path)!r}: about {needed / 1e6:.1f} MB needed, "
                f"{free / 1e6:.1f} MB free. Free some space or pass --cache-dir on a larger disk."
            )

    @contextlib.contextmanager
    def _writing(self, *, needed: int | None = None, kept: str = "") -> Iterator[None]:
        """HDF5 writes: a failure becomes a named :class:`~embedcache.errors.StorageError` and
        leaves the writer broken (nothing more is written; see :meth:`__exit__`)."""
        try:
            with named_write_errors(self.partial_path, needed=needed, kept=kept, hdf5=True):
                yield
        except CacheError:
            self._broken = True
            raise

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

    def recorded_failures(self) -> list[tuple[int, str]]:
        """``(row, message)`` of every failure recorded so far (this run's and earlier runs')."""
        self._require_open()
        return [(row, message) for row, _path, message in read_errors(self._handle)]

    # -- writes
    def _kept(self) -> str:
        return f"Committed progress is kept in {str(self.partial_path)!r}; rerun the same command to resume."

    def write_rows(self, rows: np.ndarray, features: np.ndarray) -> None:
        """Write feature rows (row indices ascending); their done flags land at the next commit.

        ``features`` holds the default features, then the columns of each extra feature set in
        the order of the ``feature_sets`` attribute (``total_dim`` columns in all)."""
        self._require_open()
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        if features.shape != (len(rows), self.total_dim):
            raise ValueError(f"features shape {features.shape} != ({len(rows)}, {self.total_dim})")
        if not np.isfinite(features).all():
            raise CacheError(f"The backbone produced NaN or infinite features for rows {rows[:5].tolist()}...; "
                             f"refusing to cache them. Try --precision fp32.")
        data = features.astype(self.store_dtype, copy=False)
        if data.dtype != features.dtype and not self._underflow_noted:
            self._note_underflow(rows, features, data)
        # Contiguous runs are written as slices (one HDF5 call each), scattered rows one by one.
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        with self._writing(needed=self._bytes_needed(), kept=self._kept()):
            begin = 0
            for _name, dataset, _checksums, width in self._columns:
                dset, part = self._handle[dataset], data[:, begin:begin + width]
                begin += width
                for run_rows, run_data in zip(np.split(rows, breaks), np.split(part, breaks), strict=False):
                    dset[int(run_rows[0]) : int(run_rows[-1]) + 1] = run_data
        self._pending_done.append(rows)

    def _note_underflow(self, rows: np.ndarray, features: np.ndarray, data: np.ndarray) -> None:
        """Warn (once) when most nonzero values of a batch became 0 in the stored dtype: features
        that small (|x| < 3e-8 for float16) are lost, usually those of an untrained model."""
        zeros = int(np.count_nonzero(features == 0))
        lost = int(np.count_nonzero(data == 0)) - zeros  # a zero stays zero: the rest became zero
        if lost and lost * 2 > features.size - zeros:
            self._underflow_noted = True
            self.warnings.append(
                f"Most feature values of rows {int(rows[0])}-{int(rows[-1])} are too small for {self.store_dtype} "
                f"(largest magnitude {float(np.abs(features).max()):.2g}) and are stored as 0. Such features are "
                f"usually an untrained model's (e.g. --weights-tag none); to keep them, extract with "
                f"--store-dtype float32.")

    def record_errors(self, failures: Iterable[tuple[int, str]]) -> None:
        """Record ``(row, message)`` failures in the /errors table."""
        self._require_open()
        failures = [(int(i), str(m)) for i, m in failures if not self._failed[int(i)]]
        if not failures:
            return
        group = self._handle["errors"]
        start = group["index"].shape[0]
        stop = start + len(failures)
        with self._writing(kept=self._kept()):
            for name in ("index", "path", "message"):
                group[name].resize((stop,))
            group["index"][start:stop] = [i for i, _ in failures]
            group["path"][start:stop] = fixed_utf8([self._static["paths"][i] for i, _ in failures],
                                                   length=group["path"].dtype.itemsize)
            group["message"][start:stop] = fixed_utf8([m for _, m in failures], length=ERROR_MESSAGE_BYTES)
            for name in ("index", "path", "message"):
                self._column_crc[f"errors/{name}"] = crc32(group[name][...])
        for index, _ in failures:
            self._failed[index] = True

    def commit(self) -> None:
        """Make progress durable: data is flushed before the done flags that vouch for it."""
        self._require_open()
        with self._writing(needed=self._bytes_needed(), kept=self._kept()):
            self._handle.flush()
            if self._pending_done:
                rows = np.concatenate(self._pending_done)
                # the touched blocks, ascending (np.unique would import numpy.ma on its first call in
                # numpy 2.4: ~20 ms of CPU in the writer thread, while the model runs)
                self._update_block_crcs(np.flatnonzero(np.bincount(rows // ROWS_PER_CHUNK)))
                self._done[rows] = True
                self._handle["done"][...] = self._done
                self._column_crc["done"] = crc32(self._done)
                self._pending_done = []
            write_root_attrs(self._handle, {"updated": _now(), COLUMN_CRC32: self._column_crc})
            self._handle.flush()

    def _update_block_crcs(self, blocks: np.ndarray) -> None:
        """Checksum the touched feature blocks (of every set) as they now read back from the file."""
        for _name, dataset, checksums_name, _width in self._columns:
            features, checksums = self._handle[dataset], self._handle[checksums_name]
            for block in blocks.tolist():
                begin = block * ROWS_PER_CHUNK
                checksums[block] = crc32(features[begin:begin + ROWS_PER_CHUNK])

    def copy_rows_from(self, source: Path, mapping: dict[int, int]) -> int:
        """Copy feature rows from another complete entry: ``{our_row: their_row}`` (their
        checksums are verified while reading)."""
        if not mapping:
            return 0
        ours = np.array(sorted(mapping), dtype=np.int64)
        theirs = np.array([mapping[i] for i in ours], dtype=np.int64)
        parts = []
        with open_h5(source) as other:  # same config key, hence the same feature sets
            check_safe(other, source)
            for _name, dataset, checksums, _width in self._columns:
                stored = read_numbers(other[dataset], source)
                verify_feature_blocks(other, source, stored, dataset=dataset, checksums=checksums)
                parts.append(stored[theirs])
        self.write_rows(ours, np.concatenate(parts, axis=1))
        self.commit()
        return len(ours)

    def finalize(self, extra_attrs: dict[str, Any] | None = None) -> Path:
        """Mark complete, read everything back (checksums, finite rows), fsync and atomically
        move to the final name. Nothing is published that does not read back as written.

        Raises:
            CacheError: a write failed or the data did not read back; the partial stays (its
                unreadable or non-finite rows are recomputed on the next run).
        """
        self._require_open()
        self.commit()
        with self._writing(kept=self._kept()):
            write_root_attrs(self._handle, {**(extra_attrs or {}), "complete": True, "updated": _now()})
            self._handle.flush()
            self._handle.close()
            self._handle = None
            try:
                verify_written(self.partial_path, self._done)
            except CacheError as exc:
                raise CacheError(f"The new entry {str(self.partial_path)!r} did not read back as written ({exc}); "
                                 f"it was not published. {self._kept()}") from exc
            with open(self.partial_path, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(self.partial_path, self.final_path)
        fsync_dir(self.final_path.parent)
        return self.final_path
