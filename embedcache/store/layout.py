"""The datasets of an entry under construction: laying them out, reading them back to resume, and
checking a finished partial before it is published (schema in docs/schema.md).

Pure functions on open HDF5 handles; :class:`~embedcache.store.writer.StoreWriter` owns the
files, the lock and the order of events.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from embedcache.errors import CorruptEntryError
from embedcache.store.feature_sets import feature_columns
from embedcache.store.hdf5 import (
    CHECKED_COLUMNS,
    SPLIT_MAPPING,
    check_safe,
    crc32,
    create_checked,
    fixed_utf8,
    json_attr,
    open_h5,
    read_attrs,
    read_errors,
    read_numbers,
    set_attr,
    utf8_dtype,
    verify_columns,
    write_root_attrs,
)
from embedcache.store.schema import (
    COLUMN_CRC32,
    FORMAT_NAME,
    FORMAT_VERSION,
    ROWS_PER_CHUNK,
)
from embedcache.store.verify import scan_features

#: Bytes kept of each decode error message (longer ones are cut).
ERROR_MESSAGE_BYTES = 512
#: Rows per chunk of the /errors table (few failures are the common case).
ERROR_CHUNK_ROWS = 16
#: Datasets every entry has (a file named like an entry without one of them is damaged).
REQUIRED_COLUMNS = ("features", "labels", "paths", "split", "done")
#: Per-row datasets an entry has only when its source carries them (numeric targets, label sets,
#: augmented views: ``/view`` holds each row's centre-view row and view index).
OPTIONAL_COLUMNS = ("targets", "label_sets", "view")
#: The column names of ``/view``.
VIEW_COLUMNS = ["origin", "view"]


def unwritten_block_crcs(n: int, dim: int, store_dtype: str) -> np.ndarray:
    """The block checksums of a features matrix nothing was written to (NaN fill)."""
    n_blocks = -(-n // ROWS_PER_CHUNK)
    full = crc32(np.full((min(ROWS_PER_CHUNK, n), dim), np.nan, store_dtype))
    crcs = np.full(n_blocks, full, dtype=np.uint32)
    if n % ROWS_PER_CHUNK:
        crcs[-1] = crc32(np.full((n % ROWS_PER_CHUNK, dim), np.nan, store_dtype))
    return crcs


def write_layout(handle: h5py.File, *, n: int, dim: int, store_dtype: str, static: dict[str, Any],
                 attrs: dict[str, Any], cache_key: str, created: str) -> dict[str, int]:
    """Create every dataset of a new entry (features NaN-filled, nothing done) and its root
    attributes; returns the per-column checksums recorded in ``column_crc32``."""
    for _name, dataset, checksums, width in feature_columns({**attrs, "dim": dim}):  # /features, then each set
        create_checked(handle, dataset, shape=(n, width), dtype=store_dtype, fillvalue=np.nan,
                       chunks=(max(1, min(ROWS_PER_CHUNK, n)), width))
        create_checked(handle, checksums, data=unwritten_block_crcs(n, width, store_dtype))
    create_checked(handle, "labels", data=static["labels"])
    paths = fixed_utf8(static["paths"])
    create_checked(handle, "paths", data=paths, dtype=utf8_dtype(paths.dtype.itemsize))
    split = create_checked(handle, "split", data=static["split"])
    set_attr(split.attrs, "mapping", json_attr(SPLIT_MAPPING))
    create_checked(handle, "file_size", data=static["file_size"])
    create_checked(handle, "file_mtime_ns", data=static["file_mtime_ns"])
    optional = [name for name in OPTIONAL_COLUMNS if name in static]
    for name in optional:  # per-row targets, chunked like /features
        values = static[name]
        column = create_checked(handle, name, data=values,
                                chunks=(max(1, min(ROWS_PER_CHUNK, n)), max(1, values.shape[1])) if values.size else None)
        names = (static.get("target_names", []) if name == "targets" else VIEW_COLUMNS if name == "view"
                 else attrs.get("class_names", []))
        set_attr(column.attrs, "names", json_attr(list(names)))
    create_checked(handle, "done", data=np.zeros(n, dtype=bool))
    errors = handle.create_group("errors")
    create_checked(errors, "index", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(ERROR_CHUNK_ROWS,))
    create_checked(errors, "path", shape=(0,), maxshape=(None,), dtype=utf8_dtype(paths.dtype.itemsize),
                   chunks=(ERROR_CHUNK_ROWS,))
    create_checked(errors, "message", shape=(0,), maxshape=(None,), dtype=utf8_dtype(ERROR_MESSAGE_BYTES),
                   chunks=(ERROR_CHUNK_ROWS,))
    column_crc = {name: crc32(handle[name][...]) for name in (*CHECKED_COLUMNS, *optional)}
    root = {**attrs, "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "cache_key": cache_key,
            "complete": False, "n": n, "dim": dim, "store_dtype": store_dtype, "split_mapping": SPLIT_MAPPING,
            COLUMN_CRC32: column_crc, "created": created, "updated": created}
    write_root_attrs(handle, root)
    return column_crc


def resumable_state(handle: h5py.File, path: Path, *, cache_key: str, n: int,
                    dim: int) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """What a partial vouches for: ``(done, failed, column_crc)``.

    A row counts as done only if its flag is set, it holds finite numbers (unwritten rows are
    NaN-filled) and its block matches its checksum; anything else is recomputed after a hard kill.

    Raises:
        CacheError, KeyError, ValueError, OSError: the partial is not ours, unsafe, or damaged.
    """
    check_safe(handle, path)
    attrs = read_attrs(handle)
    if attrs.get("cache_key") != cache_key or tuple(handle["features"].shape) != (n, dim):
        raise ValueError("cache key or shape differs")
    if not handle["features"].fletcher32:
        raise ValueError("written without checksums (an older format)")
    column_crc = dict(attrs[COLUMN_CRC32])
    verify_columns(handle, path, {COLUMN_CRC32: {k: v for k, v in column_crc.items() if k != "done"}})
    done = read_numbers(handle["done"], path).astype(bool)
    for _name, dataset, checksums, width in feature_columns(attrs):  # a row is done only if done in every set
        if tuple(handle[dataset].shape) != (n, width):
            raise ValueError(f"/{dataset} has another shape")
        finite, crcs = scan_features(handle[dataset], path, done)
        stale = np.repeat(crcs != read_numbers(handle[checksums], path), ROWS_PER_CHUNK)[:n]
        done &= finite & ~stale
    failed = np.zeros(n, dtype=bool)
    for index, _path, _msg in read_errors(handle):
        failed[index] = True
    return done, failed, column_crc


def verify_written(path: Path, done: np.ndarray) -> None:
    """Every done row of the closed partial reads back finite through its checksum, and so do the
    other columns.

    Raises:
        CacheError: what did not read back as written.
    """
    with open_h5(path) as handle:
        verify_columns(handle, path, read_attrs(handle))
        stored_done = read_numbers(handle["done"], path).astype(bool)
        if not np.array_equal(stored_done, done):
            raise CorruptEntryError("the done flags did not read back as written")
        for _name, dataset, checksums, _width in feature_columns(read_attrs(handle)):
            finite, crcs = scan_features(handle[dataset], path, stored_done)
            bad = int((stored_done & ~finite).sum())
            if bad:
                raise CorruptEntryError(f"{bad} finished rows of /{dataset} read back as NaN or infinite")
            if not np.array_equal(crcs, read_numbers(handle[checksums], path)):
                raise CorruptEntryError(f"blocks of /{dataset} did not read back as written")
        read_errors(handle)
