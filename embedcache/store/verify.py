"""Verifying an entry end to end (``embedcache verify``): every checksum, every invariant.

:func:`verify_entry` reads every dataset of an entry (HDF5 verifies each chunk's Fletcher-32
checksum on the way), compares the values with the entry's own CRC-32s (per block of feature
rows, per column), and checks the layout: the header, the columns' lengths, the done rows
finite, the recorded failures in range and not done, the file name matching the key. It reports
every problem it finds instead of stopping at the first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from embedcache.errors import CacheError
from embedcache.store.feature_sets import feature_columns
from embedcache.store.hdf5 import (
    READ_FAILURES,
    block_crc32,
    check_safe,
    open_h5,
    read_attrs,
    read_errors,
    read_numbers,
    verify_columns,
)
from embedcache.store.schema import (
    BLOCK_CRC32,
    COLUMN_CRC32,
    FORMAT_NAME,
    FORMAT_VERSION,
    ROWS_PER_CHUNK,
    SHARDS_SUFFIX,
)

#: Bytes of features read at a time.
SCAN_BYTES = 1 << 24


def scan_features(features: h5py.Dataset, path: Path, done: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One pass over the stored features: per row, done and finite; per block of
    :data:`ROWS_PER_CHUNK` rows, its CRC-32 (HDF5's chunk checksums verified on the way)."""
    finite = np.zeros(len(done), dtype=bool)
    crcs = []
    row_bytes = max(1, features.shape[1] * features.dtype.itemsize)
    step = ROWS_PER_CHUNK * max(1, SCAN_BYTES // (ROWS_PER_CHUNK * row_bytes))
    for begin in range(0, len(done), step):
        rows = read_numbers(features, path, np.s_[begin:begin + step])
        finite[begin:begin + len(rows)] = np.isfinite(rows).all(axis=1)
        crcs.append(block_crc32(rows))
    return finite & done, np.concatenate(crcs) if crcs else np.zeros(0, np.uint32)


@dataclass
class VerifyReport:
    """What :func:`verify_entry` found: ``ok`` when ``problems`` is empty."""

    path: Path
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rows: int = 0
    rows_done: int = 0
    blocks: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_entry(path: str | os.PathLike) -> VerifyReport:
    """Check one entry file (``.h5`` or ``.h5.partial``) completely; never raises for a damaged
    file, reports it."""
    report = VerifyReport(Path(path))
    try:
        with open_h5(report.path) as handle:
            check_safe(handle, report.path)
            mapping = virtual_mapping(handle)
            if mapping:  # a sharded entry: each shard first, so a problem names its shard
                _verify_shards(report, mapping, str(read_attrs(handle).get("cache_key", "")))
                if not report.ok:
                    return report
            _verify_open(handle, report)
    except CacheError as exc:
        report.problems.append(str(exc))
    except READ_FAILURES as exc:
        report.problems.append(f"unreadable ({type(exc).__name__}: {exc})")
    return report


def virtual_mapping(handle: h5py.File) -> dict[str, dict[str, tuple[int, int]]]:
    """``{shard file (relative): {dataset: (first row, stop)}}`` of a sharded entry's virtual
    datasets (empty for a single-file entry)."""
    mapping: dict[str, dict[str, tuple[int, int]]] = {}

    def visit(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset) and obj.is_virtual:
            for source in obj.virtual_sources():
                low, high = source.vspace.get_select_bounds()
                mapping.setdefault(source.file_name, {})[name] = (int(low[0]), int(high[0]) + 1)

    handle.visititems(visit)
    return mapping


def _verify_shards(report: VerifyReport, mapping: dict[str, dict[str, tuple[int, int]]], key: str) -> None:
    """Every shard verifies on its own, is of this entry, and every column maps its row range."""
    for name, columns in sorted(mapping.items()):
        shard = verify_entry(report.path.parent / name)
        problems = list(shard.problems)
        if shard.ok:
            with open_h5(shard.path) as handle:
                attrs = read_attrs(handle)
            rows = (int(attrs.get("row_start", -1)), int(attrs.get("row_stop", -1)))
            if attrs.get("cache_key") != key:
                problems.append(f"its cache key {attrs.get('cache_key')!r} is not the entry's")
            problems += [f"/{column} maps rows {got[0]}-{got[1] - 1} onto it, but it holds rows {rows[0]}-{rows[1] - 1}"
                         for column, got in sorted(columns.items()) if got != rows]
            if len(columns) != len(next(iter(mapping.values()))):
                problems.append("not every column is mapped onto it")
        report.problems += [f"shard {name}: {problem}" for problem in problems]
    if report.ok:
        report.notes.append(f"sharded entry: {len(mapping)} shard files verified, each mapped onto its row range")


def _verify_open(handle: h5py.File, report: VerifyReport) -> None:
    path = report.path
    attrs = read_attrs(handle)
    if attrs.get("format") != FORMAT_NAME:
        report.problems.append("not an embedcache entry (no format attribute)")
        return
    version = int(attrs.get("format_version", -1))
    if version > FORMAT_VERSION:
        report.problems.append(f"format_version {version} is newer than this embedcache reads ({FORMAT_VERSION})")
        return
    key = str(attrs.get("cache_key", ""))
    # a shard file is named by its directory, <key16>.shards/
    named = path.name.lstrip(".").startswith(key[:16]) or path.parent.name == key[:16] + SHARDS_SUFFIX
    if not named or len(key) != 64:
        report.problems.append(f"the file name does not match its cache key {key!r}")
    n, dim = int(attrs["n"]), int(attrs["dim"])
    report.rows = n
    for name in ("labels", "paths", "split", "file_size", "file_mtime_ns", "done"):
        if handle[name].shape != (n,):
            report.problems.append(f"/{name} has shape {handle[name].shape}, expected ({n},)")
    if handle["features"].shape != (n, dim):
        report.problems.append(f"/features has shape {handle['features'].shape}, expected ({n}, {dim})")
    if attrs.get(COLUMN_CRC32) is None or BLOCK_CRC32 not in handle:
        report.notes.append("written without CRC-32 checksums (format_version < 2): only HDF5's own checks apply")
    else:
        try:
            verify_columns(handle, path, attrs)
        except CacheError as exc:
            report.problems.append(str(exc))
    done = read_numbers(handle["done"], path).astype(bool)
    report.rows_done = int(done.sum())
    finite, crcs = scan_features(handle["features"], path, done)
    report.blocks = len(crcs)
    if BLOCK_CRC32 in handle:
        recorded = read_numbers(handle[BLOCK_CRC32], path)
        bad = np.flatnonzero(recorded != crcs) if recorded.shape == crcs.shape else np.arange(len(crcs))
        for block in bad[:10].tolist():
            report.problems.append(f"/features rows {block * ROWS_PER_CHUNK}-"
                                   f"{min(n, (block + 1) * ROWS_PER_CHUNK) - 1} do not match their checksum")
        if len(bad) > 10:
            report.problems.append(f"... and {len(bad) - 10} more feature blocks")
    if int((done & ~finite).sum()):
        report.problems.append(f"{int((done & ~finite).sum())} rows marked done hold NaN or infinite values")
    _verify_sets(handle, report, attrs, done)
    failed = _verify_errors(handle, report, done)
    if attrs.get("complete") and report.rows_done + failed < n:
        report.problems.append("marked complete but not every row is done or recorded as failed")


def _verify_sets(handle: h5py.File, report: VerifyReport, attrs: dict, done: np.ndarray) -> None:
    """Check every extra feature set (``extract --layers``) like /features."""
    n = len(done)
    for _name, dataset, checksums, width in feature_columns(attrs)[1:]:
        if dataset not in handle or checksums not in handle or handle[dataset].shape != (n, width):
            report.problems.append(f"feature set /{dataset} or its checksums are missing or not ({n}, {width})")
            continue
        finite, crcs = scan_features(handle[dataset], report.path, done)
        report.blocks += len(crcs)
        recorded = read_numbers(handle[checksums], report.path)
        bad = np.flatnonzero(recorded != crcs) if recorded.shape == crcs.shape else np.arange(len(crcs))
        for block in bad[:10].tolist():
            report.problems.append(f"/{dataset} rows {block * ROWS_PER_CHUNK}-"
                                   f"{min(n, (block + 1) * ROWS_PER_CHUNK) - 1} do not match their checksum")
        if int((done & ~finite).sum()):
            report.problems.append(f"{int((done & ~finite).sum())} rows of /{dataset} marked done hold NaN or "
                                   f"infinite values")


def _verify_errors(handle: h5py.File, report: VerifyReport, done: np.ndarray) -> int:
    """Check the /errors table; returns how many rows it records."""
    errors = read_errors(handle)
    for row, _path, _message in errors:
        if not 0 <= row < len(done):
            report.problems.append(f"/errors names row {row}, outside the entry")
        elif done[row]:
            report.problems.append(f"row {row} is both done and recorded as failed")
    return len(errors)

