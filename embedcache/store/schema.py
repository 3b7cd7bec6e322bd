"""The entry layout's names and constants (docs/schema.md).

An entry is ``<cache_dir>/<key16>.h5``; while it is being written, ``<key16>.h5.partial`` with a
``<key16>.h5.lock`` beside it. Plain constants only (no h5py, no numpy), so the CLI can offer
its choices without importing them.
"""

from __future__ import annotations

import os
from pathlib import Path

FORMAT_NAME = "embedcache"
#: Bump when the HDF5 layout or the meaning of a stored value changes (it is part of the key).
FORMAT_VERSION = 2
SUFFIX = ".h5"
PARTIAL_SUFFIX = ".h5.partial"
LOCK_SUFFIX = ".h5.lock"
#: An entry that failed its checksums, set aside by ``extract`` before it recomputes the entry.
CORRUPT_SUFFIX = ".h5.corrupt"
#: On-disk dtypes of ``/features`` (the one definition; ``--store-dtype`` offers these).
STORE_DTYPES = ("float16", "float32")
#: Rows per HDF5 chunk of /features: reading a few rows touches little, scanning stays fast.
ROWS_PER_CHUNK = 256
#: Root attributes stored as JSON strings.
JSON_ATTRS = ("class_names", "backbone", "preprocess", "versions", "source", "split_mapping", "column_crc32",
              "feature_sets", "composed_from")
#: Root attribute with the CRC-32 of each whole column (and of the /errors table).
COLUMN_CRC32 = "column_crc32"
#: Dataset of one CRC-32 per block of :data:`ROWS_PER_CHUNK` feature rows.
BLOCK_CRC32 = "checksums/features"
ALLOWED_FILTERS = (None, "gzip", "lzf")
#: A sharded entry's shards live in ``<key16>.shards/`` beside ``<key16>.h5`` (docs/schema.md).
SHARDS_SUFFIX = ".shards"
#: Shard ``s`` (rows ``[s*S, (s+1)*S)``) is ``shard-<s, 5+ digits>.h5`` in that directory.
SHARD_NAME_PATTERN = r"shard-[0-9]{5,}\.h5"
#: Rows per shard by default (``--engine ray``): a multiple of the usual batch sizes and of
#: :data:`ROWS_PER_CHUNK`.
DEFAULT_SHARD_SIZE = 4096
#: Environment variable naming the default cache directory.
CACHE_DIR_ENV = "EMBEDCACHE_DIR"


def default_cache_dir() -> Path:
    """``$EMBEDCACHE_DIR``, else ``./cache``."""
    return Path(os.environ.get(CACHE_DIR_ENV) or "cache")


def entry_paths(cache_dir: str | os.PathLike, cache_key: str) -> tuple[Path, Path, Path]:
    """(final, partial, lock) paths of the entry for ``cache_key``."""
    base = Path(cache_dir) / cache_key[:16]
    return (
        base.with_name(base.name + SUFFIX),
        base.with_name(base.name + PARTIAL_SUFFIX),
        base.with_name(base.name + LOCK_SUFFIX),
    )


#: Every file name an entry owns: ``<key16>`` followed by one of these.
ENTRY_SUFFIXES = (SUFFIX, PARTIAL_SUFFIX, LOCK_SUFFIX, CORRUPT_SUFFIX)
#: Characters of ``<key16>``.
KEY_PREFIX_LENGTH = 16


def entry_stem(path: Path) -> str | None:
    """The ``<key16>`` of an entry's file name (16 lowercase hex digits + an entry suffix);
    None for any other name, which embedcache never deletes."""
    for suffix in sorted(ENTRY_SUFFIXES, key=len, reverse=True):
        if path.name.endswith(suffix):
            stem = path.name[: -len(suffix)]
            if len(stem) == KEY_PREFIX_LENGTH and all(c in "0123456789abcdef" for c in stem):
                return stem
            return None
    return None
