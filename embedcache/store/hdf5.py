"""HDF5 access that every reader and writer of entries shares: opening, safety checks,
checksums, attributes.

Readers refuse external links, external storage, virtual datasets and filters that embedcache
never writes, so a planted file cannot make us read (or write) elsewhere. Every dataset is
written chunked with HDF5's Fletcher-32 checksum, which HDF5 verifies on every read; strings
(datasets and attributes) are fixed-width, so nothing lives in HDF5's unchecksummed global heap;
object headers (and the attributes inside them) are checksummed by the 1.8 file format, and the
root attributes also carry a sha256 of their own.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from embedcache.errors import CacheError, CorruptEntryError
from embedcache.splits import SPLIT_NAMES
from embedcache.store.schema import (
    ALLOWED_FILTERS,
    BLOCK_CRC32,
    COLUMN_CRC32,
    JSON_ATTRS,
    ROWS_PER_CHUNK,
)
from embedcache.store.virtual import missing_shards, virtual_source_problem

#: File-format version written: 1.8's, whose superblock and object headers carry checksums (1.10's
#: would also mark files open for writing, so a killed writer's partial could not be resumed).
LIBVER = ("v108", "v108")
#: Rows per chunk of 1-D datasets.
CHUNK_1D = 4096
#: Root attribute holding the sha256 of every other root attribute (their string values live
#: outside the checksummed object headers) and of ``/split``'s mapping.
ATTRS_SHA256 = "attrs_sha256"
#: What a damaged file's reader can raise besides our own errors (h5py and HDF5 are not uniform).
READ_FAILURES = (OSError, RuntimeError, KeyError, ValueError, TypeError, UnicodeDecodeError)

#: ``{code: name}`` of ``/split``, written as the ``split_mapping`` attribute.
SPLIT_MAPPING = SPLIT_NAMES


def open_h5(path: Path) -> h5py.File:
    """``path`` opened read-only (no HDF5 file locking: our own lock files serialise writers)."""
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise CorruptEntryError(f"Cannot open {str(path)!r} as HDF5 ({exc}): the file is truncated, damaged or "
                                f"not an HDF5 file. `embedcache rm` removes it; extracting again recomputes it.") from exc


def fixed_utf8(values: Iterable[str], *, length: int | None = None) -> np.ndarray:
    """Strings as a fixed-width UTF-8 byte array (``length`` bytes each: the longest by default,
    longer values cut at a character boundary)."""
    encoded = [str(v).encode("utf-8") for v in values]
    width = max(1, length or max((len(e) for e in encoded), default=1))
    fitted = [e if len(e) <= width else e[:width].decode("utf-8", "ignore").encode("utf-8") for e in encoded]
    return np.array(fitted, dtype=utf8_dtype(width))


def utf8_dtype(width: int) -> Any:
    """The HDF5 type of fixed-width UTF-8 strings of ``width`` bytes."""
    return h5py.string_dtype("utf-8", max(1, int(width)))


def create_checked(parent: h5py.Group, name: str, *, data: Any = None, shape: tuple[int, ...] | None = None,
                   dtype: Any = None, maxshape: tuple[int | None, ...] | None = None, fillvalue: Any = None,
                   chunks: tuple[int, ...] | None = None) -> h5py.Dataset:
    """A dataset as every entry stores it: chunked, with a Fletcher-32 checksum per chunk that
    HDF5 verifies on every read. Strings are stored fixed-width (:func:`fixed_utf8`,
    :func:`utf8_dtype`), never variable-length: those live in a heap without checksums, where a
    flipped byte can even make HDF5 loop forever."""
    if data is not None:
        data = np.asarray(data)
        shape = data.shape
        dtype = dtype if dtype is not None else data.dtype
    if chunks is None:
        chunks = (max(1, min(CHUNK_1D, shape[0] or 1)), *shape[1:])
    dataset = parent.create_dataset(name, shape=shape, dtype=dtype, maxshape=maxshape, chunks=chunks,
                                    fillvalue=fillvalue, fletcher32=True)
    if data is not None and len(data):
        dataset[...] = data
    return dataset


def read_strings(dataset: h5py.Dataset, path: Path) -> np.ndarray:
    """A string dataset's values as ``str`` (checksums verified for fixed-width strings)."""
    try:
        return dataset.asstr()[...]
    except OSError as exc:
        raise CorruptEntryError(f"{str(path)!r}: cannot read {dataset.name} ({exc}): a checksum failed or the "
                                f"file is damaged. `embedcache rm` removes it; extracting again recomputes "
                                f"it.") from exc


def read_numbers(dataset: h5py.Dataset, path: Path, selection: Any = Ellipsis) -> np.ndarray:
    """A numeric dataset's values; HDF5 verifies each chunk's Fletcher-32 checksum while reading."""
    try:
        return dataset[selection]
    except OSError as exc:
        raise CorruptEntryError(f"{str(path)!r}: cannot read {dataset.name} ({exc}): a checksum failed or the "
                                f"file is damaged. `embedcache rm` removes it; extracting again recomputes "
                                f"it.") from exc


def check_safe(handle: h5py.File, path: Path) -> None:
    """Refuse links and storage that point outside the file, and filters we never write.

    The one exception: a sharded entry's virtual datasets, whose sources must be the entry's own
    shard files (:mod:`~embedcache.store.virtual`); each of those files is checked in turn.

    Raises:
        CacheError: something points outside; CorruptEntryError: a shard file is missing.
    """
    problems: list[str] = []
    shard_files: set[str] = set()

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
                for source in obj.virtual_sources():
                    problem = virtual_source_problem(path, name, source.file_name, source.dset_name)
                    if problem:
                        problems.append(problem)
                    shard_files.add(source.file_name)
            if obj.compression not in ALLOWED_FILTERS:
                problems.append(f"unknown filter {obj.compression!r} on /{name}")

    handle.visititems_links(visit)
    if problems:
        raise CacheError(f"Refusing to read {str(path)!r}: {', '.join(sorted(set(problems)))}.")
    _check_shard_files(path, shard_files)


def _check_shard_files(path: Path, shard_files: set[str]) -> None:
    """The shards a sharded entry reads exist and are safe themselves (no virtual sources)."""
    missing = missing_shards(path, shard_files)
    if missing:
        raise CorruptEntryError(f"{str(path)!r}: shard file(s) {', '.join(missing)} are missing. Run the same "
                                f"`embedcache extract ... --engine ray` again to recompute them.")
    for name in sorted(shard_files):
        shard = path.parent / name
        with open_h5(shard) as handle:
            check_safe(handle, shard)  # a shard's name owns no shards: virtual datasets are refused


def json_attr(value: Any) -> str:
    """A JSON attribute value (sorted keys)."""
    return json.dumps(value, sort_keys=True)


def _decoded_attrs(attributes: h5py.AttributeManager) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for key, value in attributes.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        if isinstance(value, np.generic):
            value = value.item()
        if key in JSON_ATTRS and isinstance(value, str):
            value = json.loads(value)
        attrs[key] = value
    return attrs


def attr_value(attributes: h5py.AttributeManager, key: str, default: Any = None) -> Any:
    """One attribute decoded (bytes to str, numpy scalars to Python), without checks."""
    value = attributes.get(key, default)
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    return value.item() if isinstance(value, np.generic) else value


def attrs_digest(handle: h5py.File) -> str:
    """sha256 of the root attributes (but the digest itself), of ``/split``'s mapping and of the
    column names of ``/targets``, ``/label_sets`` and ``/view`` when the entry has them."""
    from embedcache.store.fingerprint import sha256_json

    root = {k: v for k, v in _decoded_attrs(handle.attrs).items() if k != ATTRS_SHA256}
    mapping = column_attr(handle, "split", "mapping")
    digested: dict[str, Any] = {"root": root, "split_mapping": mapping}
    names = {name: column_attr(handle, name, "names") for name in ("targets", "label_sets", "view") if name in handle}
    if names:  # only entries with targets: the digest of every other entry is unchanged
        digested["column_names"] = names
    return sha256_json(digested)


def column_attr(handle: h5py.File, column: str, key: str) -> str | None:
    """A string attribute of a dataset (None when the dataset or attribute is missing)."""
    return attr_value(handle[column].attrs, key) if column in handle else None


def set_attr(attributes: h5py.AttributeManager, key: str, value: Any) -> None:
    """One attribute; strings (and JSON) as fixed-width UTF-8, inside the checksummed header."""
    if key in JSON_ATTRS:
        value = json_attr(value)
    if isinstance(value, str):
        raw = value.encode("utf-8")
        attributes.create(key, data=np.array(raw, dtype=utf8_dtype(len(raw))), dtype=utf8_dtype(len(raw)))
    else:
        attributes[key] = value


def write_root_attrs(handle: h5py.File, values: dict[str, Any]) -> None:
    """Set root attributes (JSON ones encoded) and refresh :data:`ATTRS_SHA256`."""
    for key, value in values.items():
        set_attr(handle.attrs, key, value)
    set_attr(handle.attrs, ATTRS_SHA256, attrs_digest(handle))


def read_attrs(handle: h5py.File) -> dict[str, Any]:
    """Root attributes with bytes decoded, numpy scalars unwrapped and JSON attributes parsed;
    checked against :data:`ATTRS_SHA256` when the file has it."""
    attrs = _decoded_attrs(handle.attrs)
    recorded = attrs.pop(ATTRS_SHA256, None)
    if recorded is not None and recorded != attrs_digest(handle):
        raise CorruptEntryError(f"{handle.filename!r}: its attributes do not match their checksum: the file is "
                                f"corrupt. `embedcache rm` removes it; extracting again recomputes it.")
    return attrs


def read_errors(handle: h5py.File) -> list[tuple[int, str, str]]:
    """``[(row, path, message)]`` of the images that failed to decode (checksums verified)."""
    if "errors" not in handle:
        return []
    group, path = handle["errors"], Path(handle.filename)
    index = read_numbers(group["index"], path)
    paths = read_strings(group["path"], path)
    messages = read_strings(group["message"], path)
    return [(int(i), str(p), str(m)) for i, p, m in zip(index, paths, messages, strict=False)]


# --------------------------------------------------------------------------- our own checksums
# HDF5's chunk indexes in the 1.8 format carry no checksum: a flipped byte there can make a chunk
# read as "never written" (its fill value) without any error. So the values themselves are
# checksummed too: a CRC-32 per block of feature rows, and one per column.

#: Columns checksummed whole (/errors/* included).
CHECKED_COLUMNS = ("labels", "paths", "split", "file_size", "file_mtime_ns", "done", "errors/index",
                   "errors/path", "errors/message")


def crc32(values: np.ndarray) -> int:
    """CRC-32 of an array's bytes as stored."""
    return zlib.crc32(np.ascontiguousarray(values).view(np.uint8)) & 0xFFFFFFFF


def block_crc32(features: np.ndarray) -> np.ndarray:
    """One CRC-32 per block of :data:`ROWS_PER_CHUNK` rows of ``features`` (blocks start at row 0)."""
    return np.array([crc32(features[b:b + ROWS_PER_CHUNK]) for b in range(0, len(features), ROWS_PER_CHUNK)],
                    dtype=np.uint32)


def _corrupt(path: Path, what: str) -> CorruptEntryError:
    return CorruptEntryError(f"{str(path)!r}: {what} does not match its checksum: the file is corrupt. "
                             f"`embedcache rm` removes it; extracting again recomputes it.")


def verify_columns(handle: h5py.File, path: Path, attrs: dict[str, Any]) -> None:
    """Every whole-column checksum recorded in ``attrs`` (entries written before checksums have none)."""
    recorded = attrs.get(COLUMN_CRC32)
    if not recorded:
        return
    for name, value in recorded.items():
        if name not in handle or crc32(read_numbers(handle[name], path)) != int(value):
            raise _corrupt(path, f"/{name}")


def verify_feature_blocks(handle: h5py.File, path: Path, features: np.ndarray, *, dataset: str = "features",
                          checksums: str = BLOCK_CRC32) -> None:
    """``features`` (all rows of ``dataset``, as read) against the per-block checksums in
    ``checksums``, when the entry has them (an extra feature set always has them)."""
    if checksums not in handle:
        if dataset != "features":
            raise _corrupt(path, f"/{dataset} (its checksums /{checksums} are missing)")
        return
    recorded = read_numbers(handle[checksums], path)
    computed = block_crc32(features)
    if len(recorded) != len(computed) or not np.array_equal(recorded, computed):
        bad = np.flatnonzero(recorded != computed) if len(recorded) == len(computed) else []
        rows = f"rows {int(bad[0]) * ROWS_PER_CHUNK}-{int(bad[0]) * ROWS_PER_CHUNK + ROWS_PER_CHUNK - 1}" if len(bad) else "all rows"
        raise _corrupt(path, f"/{dataset} ({rows})")
