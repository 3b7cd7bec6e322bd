"""Sharded entries (docs/schema.md, "Sharded entries"): shard files and the entry over them.

Shard ``s`` of an entry of ``n`` rows holds rows ``[s*S, min(n, (s+1)*S))`` in
``<key16>.shards/shard-<s>.h5``, a complete entry file of its own (same layout, checksums and
header; its root also records ``shard_index``, ``row_start``, ``row_stop``). :func:`write_shard`
writes one crash-safely (temporary name, read back, fsync, rename), so a shard file that exists
and verifies (:func:`shard_problems`) is never recomputed. :func:`publish_sharded` then writes
``<key16>.h5``, whose columns are HDF5 virtual datasets over the shards with relative paths, and
whose feature-block and column checksums are computed from what the mapping reads back.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from embedcache.errors import CacheError
from embedcache.fileio import fsync_dir, named_write_errors, new_temporary_path
from embedcache.store.hdf5 import (
    CHECKED_COLUMNS,
    LIBVER,
    SPLIT_MAPPING,
    block_crc32,
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
    write_root_attrs,
)
from embedcache.store.layout import (
    ERROR_CHUNK_ROWS,
    ERROR_MESSAGE_BYTES,
    OPTIONAL_COLUMNS,
    verify_written,
    write_layout,
)
from embedcache.store.schema import (
    BLOCK_CRC32,
    COLUMN_CRC32,
    FORMAT_NAME,
    FORMAT_VERSION,
    SHARDS_SUFFIX,
)
from embedcache.store.verify import verify_entry

#: Per-row columns mapped onto the shards (the optional ones only when the entry has them).
VIRTUAL_COLUMNS = ("features", "labels", "paths", "split", "file_size", "file_mtime_ns", "done", "targets",
                   "label_sets", "view")
#: A virtual dataset needs the 1.10 file format (the published file is written once, never resumed).
VDS_LIBVER = ("v110", "v110")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def shards_dir(cache_dir: str | os.PathLike, cache_key: str) -> Path:
    """``<cache_dir>/<key16>.shards``."""
    return Path(cache_dir) / f"{cache_key[:16]}{SHARDS_SUFFIX}"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(start, stop)]`` of every shard: shard ``s`` holds rows ``[s*S, min(n, (s+1)*S))``."""
    return [(start, min(n, start + shard_size)) for start in range(0, n, shard_size)]


def write_shard(*, folder: Path, index: int, rows: tuple[int, int], cache_key: str, dim: int, store_dtype: str,
                static: dict[str, Any], attrs: dict[str, Any], features: np.ndarray, done: np.ndarray,
                failures: Sequence[tuple[int, str]]) -> Path:
    """Write shard ``index`` (rows ``[start, stop)`` of the entry) in one go and publish it.

    Args:
        static: the shard's slice of the per-row columns (as for :func:`write_layout`).
        features: ``(stop - start, dim)``; rows not ``done`` are ignored (stored as NaN).
        failures: ``(row within the shard, message)`` of the images that failed to decode.
    """
    start, stop = rows
    n = stop - start
    final = folder / shard_name(index)
    with named_write_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
    tmp = new_temporary_path(folder, prefix=f".{final.name}.", suffix=".tmp")
    shard_attrs = {**attrs, "shard_index": index, "row_start": start, "row_stop": stop}
    try:
        with named_write_errors(tmp, hdf5=True), h5py.File(tmp, "w", locking=False, libver=LIBVER) as handle:
            column_crc = write_layout(handle, n=n, dim=dim, store_dtype=store_dtype, static=static,
                                      attrs=shard_attrs, cache_key=cache_key, created=_now())
            stored = np.where(done[:, None], features, np.nan).astype(store_dtype)
            if n:
                handle["features"][...] = stored
            handle[BLOCK_CRC32][...] = block_crc32(handle["features"][...])
            handle["done"][...] = done
            column_crc["done"] = crc32(done)
            _write_errors(handle, failures, static["paths"], column_crc)
            write_root_attrs(handle, {COLUMN_CRC32: column_crc, "complete": True})
        verify_written(tmp, done)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)
    return final


def _write_errors(handle: h5py.File, failures: Sequence[tuple[int, str]], paths: Sequence[str],
                  column_crc: dict[str, int]) -> None:
    group = handle["errors"]
    count = len(failures)
    for name in ("index", "path", "message"):
        group[name].resize((count,))
    if count:
        group["index"][...] = [int(i) for i, _ in failures]
        group["path"][...] = fixed_utf8([paths[int(i)] for i, _ in failures], length=group["path"].dtype.itemsize)
        group["message"][...] = fixed_utf8([m for _, m in failures], length=ERROR_MESSAGE_BYTES)
    for name in ("index", "path", "message"):
        column_crc[f"errors/{name}"] = crc32(group[name][...])


def shard_problems(path: Path, *, cache_key: str, index: int, rows: tuple[int, int], dim: int) -> list[str]:
    """Everything wrong with shard file ``path`` (empty: it verifies and is the shard asked for)."""
    if not os.path.lexists(path):
        return ["missing"]
    if path.is_symlink() or not path.is_file():
        return ["a symlink or not a regular file"]
    report = verify_entry(path)
    if not report.ok:
        return report.problems
    with open_h5(path) as handle:
        attrs = read_attrs(handle)
    expected = {"cache_key": cache_key, "shard_index": index, "row_start": rows[0], "row_stop": rows[1],
                "n": rows[1] - rows[0], "dim": dim, "complete": True}
    return [f"its {k} is {attrs.get(k)!r}, expected {v!r}" for k, v in expected.items() if attrs.get(k) != v]


def _layout_for(shards: list[tuple[Path, int, int]], name: str, shape: tuple[int, ...], dtype: Any,
                entry_dir: Path) -> h5py.VirtualLayout:
    layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
    for path, start, stop in shards:
        relative = f"{path.parent.name}/{path.name}"  # relative to the entry: a moved cache still opens
        if path.parent.parent != entry_dir:
            raise CacheError(f"Shard {str(path)!r} is not in the entry's own shard directory.")
        layout[start:stop] = h5py.VirtualSource(relative, name, shape=(stop - start, *shape[1:]))
    return layout


def publish_sharded(*, final_path: Path, shards: list[tuple[Path, int, int]], cache_key: str, dim: int,
                    store_dtype: str, attrs: dict[str, Any], shard_size: int) -> Path:
    """Write ``<key16>.h5`` over verified ``shards`` (``[(file, start, stop)]``, in row order),
    read it back through the mapping, fsync and rename it into place."""
    n = shards[-1][2] if shards else 0
    entry_dir = final_path.parent
    tmp = new_temporary_path(entry_dir, prefix=f".{final_path.name}.", suffix=".tmp")
    try:
        with named_write_errors(tmp, hdf5=True):
            _write_virtual_entry(tmp, shards=shards, n=n, dim=dim, store_dtype=store_dtype, attrs=attrs,
                                 cache_key=cache_key, shard_size=shard_size)
        report = verify_entry(tmp)
        if not report.ok:
            raise CacheError(f"The sharded entry {str(final_path)!r} did not read back as written "
                             f"({'; '.join(report.problems[:3])}); it was not published. Rerun the same command.")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final_path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(entry_dir)
    return final_path


def _write_virtual_entry(tmp: Path, *, shards: list[tuple[Path, int, int]], n: int, dim: int, store_dtype: str,
                         attrs: dict[str, Any], cache_key: str, shard_size: int) -> None:
    with h5py.File(shards[0][0], "r", locking=False) as first:
        columns = {name: (first[name].shape[1:], first[name].dtype) for name in VIRTUAL_COLUMNS if name in first}
        names_attrs = {name: first[name].attrs.get("names") for name in OPTIONAL_COLUMNS if name in first}
    widths = _string_widths(shards)
    errors = _gather_errors(shards)
    with h5py.File(tmp, "w", locking=False, libver=VDS_LIBVER) as handle:
        for name, (tail, dtype) in columns.items():
            if name in widths:
                dtype = utf8_dtype(widths[name])
            fill = np.nan if name == "features" else None
            handle.create_virtual_dataset(name, _layout_for(shards, name, (n, *tail), dtype, tmp.parent),
                                          fillvalue=fill)
        set_attr(handle["split"].attrs, "mapping", json_attr(SPLIT_MAPPING))
        for name, value in names_attrs.items():
            if value is not None:
                handle[name].attrs.create("names", data=value)
        _write_entry_errors(handle, errors, widths["paths"])
        stored = read_numbers(handle["features"], tmp)
        create_checked(handle, BLOCK_CRC32, data=block_crc32(stored))
        column_crc = {name: crc32(read_numbers(handle[name], tmp)) for name in CHECKED_COLUMNS}
        for name in OPTIONAL_COLUMNS:
            if name in handle:
                column_crc[name] = crc32(read_numbers(handle[name], tmp))
        root = {**attrs, "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "cache_key": cache_key,
                "complete": True, "n": n, "dim": dim, "store_dtype": store_dtype, "split_mapping": SPLIT_MAPPING,
                COLUMN_CRC32: column_crc, "created": _now(), "updated": _now(), "shard_size": shard_size,
                "n_shards": len(shards), "shard_dir": f"{cache_key[:16]}{SHARDS_SUFFIX}"}
        write_root_attrs(handle, root)


def _string_widths(shards: list[tuple[Path, int, int]]) -> dict[str, int]:
    """The widest fixed-width ``/paths`` of all shards (the virtual column holds every row)."""
    width = 1
    for path, _, _ in shards:
        with h5py.File(path, "r", locking=False) as handle:
            width = max(width, handle["paths"].dtype.itemsize)
    return {"paths": width}


def _gather_errors(shards: list[tuple[Path, int, int]]) -> list[tuple[int, str, str]]:
    """Every shard's failures with entry row numbers (a shard records its own row numbers)."""
    out = []
    for path, start, _ in shards:
        with open_h5(path) as handle:
            out.extend((start + row, p, m) for row, p, m in read_errors(handle))
    return out


def _write_entry_errors(handle: h5py.File, errors: list[tuple[int, str, str]], path_width: int) -> None:
    group = handle.create_group("errors")
    create_checked(group, "index", data=np.array([e[0] for e in errors], dtype=np.int64), maxshape=(None,),
                   chunks=(ERROR_CHUNK_ROWS,))
    create_checked(group, "path", data=fixed_utf8([e[1] for e in errors], length=path_width),
                   dtype=utf8_dtype(path_width), maxshape=(None,), chunks=(ERROR_CHUNK_ROWS,))
    create_checked(group, "message", data=fixed_utf8([e[2] for e in errors], length=ERROR_MESSAGE_BYTES),
                   dtype=utf8_dtype(ERROR_MESSAGE_BYTES), maxshape=(None,), chunks=(ERROR_CHUNK_ROWS,))
