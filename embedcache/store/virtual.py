"""Which virtual-dataset sources a sharded entry may read (docs/schema.md, "Sharded entries").

A sharded entry ``<key16>.h5`` maps its columns onto the shard files of its own directory
``<key16>.shards/``. Everything else a virtual dataset could point at (an absolute path, a
``..`` escape, another entry's shards, a symlink, a missing file that HDF5 would then look for
relative to the current directory) is refused before any data is read.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from embedcache.store.schema import KEY_PREFIX_LENGTH, SHARD_NAME_PATTERN, SHARDS_SUFFIX, SUFFIX

_HEX = re.compile(r"[0-9a-f]{16}")


def owning_stem(path: Path) -> str | None:
    """The ``<key16>`` whose shard directory the file at ``path`` may read: its name is
    ``<key16>.h5`` or, while being published, ``.<key16>.h5.<anything>``."""
    name = path.name.lstrip(".")
    stem = name[:KEY_PREFIX_LENGTH]
    if _HEX.fullmatch(stem) and name[KEY_PREFIX_LENGTH:].startswith(SUFFIX):
        return stem
    return None


def shards_dir_of(path: Path) -> Path | None:
    """``<cache_dir>/<key16>.shards`` of the entry file ``path`` (None for other names)."""
    stem = owning_stem(path)
    return None if stem is None else path.parent / f"{stem}{SHARDS_SUFFIX}"


def virtual_source_problem(entry: Path, dataset: str, file_name: str, source_dataset: str) -> str | None:
    """Why the virtual dataset ``/dataset`` of ``entry`` may not read ``source_dataset`` of
    ``file_name``; None when the source is one of the entry's own shard files."""
    stem = owning_stem(entry)
    if stem is None:
        return f"virtual dataset /{dataset} in a file not named like a sharded entry"
    if os.path.isabs(file_name) or "\\" in file_name:
        return f"virtual dataset /{dataset} reads an absolute path {file_name!r}"
    parts = file_name.split("/")
    if len(parts) != 2 or parts[0] != f"{stem}{SHARDS_SUFFIX}" or not re.fullmatch(SHARD_NAME_PATTERN, parts[1]):
        return f"virtual dataset /{dataset} reads {file_name!r}, outside its own {stem}{SHARDS_SUFFIX}/"
    if source_dataset.lstrip("/") != dataset:
        return f"virtual dataset /{dataset} reads another dataset ({source_dataset!r}) of {file_name!r}"
    folder = entry.parent / parts[0]
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return f"virtual dataset /{dataset}: {parts[0]} is a symlink or not a directory"
        if not stat.S_ISREG(os.lstat(folder / parts[1]).st_mode):
            return f"virtual dataset /{dataset}: {file_name!r} is a symlink or not a regular file"
    except FileNotFoundError:
        return None  # missing: reported as damage by missing_shards (not a security refusal)
    return None


def missing_shards(entry: Path, file_names: set[str]) -> list[str]:
    """The shard files of ``file_names`` (relative to the entry's directory) that do not exist."""
    return sorted(name for name in file_names if not os.path.lexists(entry.parent / name))
