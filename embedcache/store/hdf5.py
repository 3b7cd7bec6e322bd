"""HDF5 access that every reader and writer of entries shares: opening, safety checks, attributes.

Readers refuse external links, external storage, virtual datasets and filters that embedcache
never writes, so a planted file cannot make us read (or write) elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from embedcache.errors import CacheError
from embedcache.splits import SPLIT_NAMES
from embedcache.store.schema import ALLOWED_FILTERS, JSON_ATTRS

#: ``{code: name}`` of ``/split``, written as the ``split_mapping`` attribute.
SPLIT_MAPPING = SPLIT_NAMES


def open_h5(path: Path) -> h5py.File:
    """``path`` opened read-only (no HDF5 file locking: our own lock files serialise writers)."""
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise CacheError(f"Cannot open {str(path)!r} as HDF5 ({exc}).") from exc


def check_safe(handle: h5py.File, path: Path) -> None:
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
            if obj.compression not in ALLOWED_FILTERS:
                problems.append(f"unknown filter {obj.compression!r} on /{name}")

    handle.visititems_links(visit)
    if problems:
        raise CacheError(f"Refusing to read {str(path)!r}: {', '.join(problems)}.")


def json_attr(value: Any) -> str:
    """A JSON attribute value (sorted keys)."""
    return json.dumps(value, sort_keys=True)


def read_attrs(handle: h5py.File) -> dict[str, Any]:
    """Root attributes with bytes decoded, numpy scalars unwrapped and JSON attributes parsed."""
    attrs: dict[str, Any] = {}
    for key, value in handle.attrs.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        if isinstance(value, np.generic):
            value = value.item()
        if key in JSON_ATTRS and isinstance(value, str):
            value = json.loads(value)
        attrs[key] = value
    return attrs


def read_errors(handle: h5py.File) -> list[tuple[int, str, str]]:
    """``[(row, path, message)]`` of the images that failed to decode."""
    if "errors" not in handle:
        return []
    group = handle["errors"]
    index = group["index"][...]
    paths = group["path"].asstr()[...]
    messages = group["message"].asstr()[...]
    return [(int(i), str(p), str(m)) for i, p, m in zip(index, paths, messages, strict=False)]
