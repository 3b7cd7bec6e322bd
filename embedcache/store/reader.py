"""Reading an entry: :class:`FeatureStore` loads an entry's valid rows into memory, and the
look-ups extraction needs (rows reusable from an older entry, row keys for leak checks).
Every file is checked by :func:`~embedcache.store.hdf5.check_safe` before it is read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from embedcache.errors import CacheError
from embedcache.splits import parse_split
from embedcache.store.hdf5 import check_safe, open_h5, read_attrs, read_errors
from embedcache.store.schema import FORMAT_NAME, FORMAT_VERSION, SUFFIX


@dataclass
class FeatureStore:
    """A readable cache entry; arrays hold only rows that were written and valid (``done``).

    Attributes:
        path: the HDF5 file.
        features: ``(M, D)`` float array (float16 or float32 as stored).
        labels: ``(M,)`` int64, -1 = unlabelled.
        paths: ``(M,)`` relative paths (str).
        splits: ``(M,)`` uint8 split codes, see :class:`~embedcache.splits.Split`.
        rows: ``(M,)`` row index of each returned row in the file.
        attrs: root attributes, JSON attributes decoded.
        errors: ``[(row, path, message)]`` for images that failed to decode.
        targets: ``(M, T)`` float32 numeric targets, or None (entries of other sources).
        target_names: the name of each target column.
        label_sets: ``(M, C)`` uint8 label sets (1 = the image carries class ``c`` of
            ``class_names``), or None.
    """

    path: Path
    features: np.ndarray
    labels: np.ndarray
    paths: np.ndarray
    splits: np.ndarray
    rows: np.ndarray
    attrs: dict[str, Any]
    errors: list[tuple[int, str, str]]
    targets: np.ndarray | None = None
    target_names: list[str] = field(default_factory=list)
    label_sets: np.ndarray | None = None

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
        with open_h5(path) as handle:
            check_safe(handle, path)
            attrs = read_attrs(handle)
            _check_header(attrs, path, allow_partial)
            done = handle["done"][...]
            rows = np.flatnonzero(done)
            # a complete entry is read as is (no gathering copy of the feature matrix)
            pick = slice(None) if len(rows) == len(done) else rows
            features = handle["features"][...][pick] if len(rows) else np.zeros((0, attrs["dim"]), np.float16)
            labels = handle["labels"][...][pick]
            paths = handle["paths"].asstr()[...][pick]
            splits = handle["split"][...][pick]
            errors = read_errors(handle)
            optional = {name: handle[name][...][pick] for name in ("targets", "label_sets") if name in handle}
            target_names = json.loads(handle["targets"].attrs["names"]) if "targets" in handle else []
        return cls(path, features, labels, paths, splits, rows, attrs, errors, target_names=target_names, **optional)

    @property
    def cache_key(self) -> str:
        return self.attrs["cache_key"]

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs.get("class_names", []))

    @property
    def task(self) -> str:
        """``regression`` (numeric targets), ``multilabel`` (label sets) or ``classes``."""
        return "regression" if self.targets is not None else "multilabel" if self.label_sets is not None else "classes"

    @property
    def backbone(self) -> dict[str, Any]:
        return self.attrs.get("backbone", {})

    def split_indices(self, split: str | int) -> np.ndarray:
        """Positions (into the arrays) of rows in ``split`` (``train``/``val``/``test`` or a code)."""
        return np.flatnonzero(self.splits == parse_split(split))

    def __len__(self) -> int:
        return len(self.rows)


def _check_header(attrs: dict[str, Any], path: Path, allow_partial: bool) -> None:
    if attrs.get("format") != FORMAT_NAME:
        raise CacheError(f"{str(path)!r} is not an embedcache entry (format attr missing).")
    if int(attrs.get("format_version", -1)) > FORMAT_VERSION:
        raise CacheError(
            f"{str(path)!r} has format_version {attrs['format_version']}; this embedcache "
            f"reads up to {FORMAT_VERSION}. Upgrade embedcache."
        )
    if not attrs.get("complete") and not allow_partial:
        raise CacheError(f"{str(path)!r} is not complete; rerun the extract command to resume it.")


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


def row_keys(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(paths, split codes)`` of an entry's done rows, without reading its features."""
    path = Path(path)
    with open_h5(path) as handle:
        check_safe(handle, path)
        done = handle["done"][...].astype(bool)
        return handle["paths"].asstr()[...][done], handle["split"][...][done]


def reusable_rows(source: Path) -> dict[tuple[str, int, int], int]:
    """``{(path, size, mtime_ns): row}`` for done rows of a complete entry."""
    with open_h5(source) as handle:
        check_safe(handle, source)
        done = handle["done"][...]
        paths = handle["paths"].asstr()[...]
        sizes = handle["file_size"][...]
        mtimes = handle["file_mtime_ns"][...]
    return {
        (str(paths[i]), int(sizes[i]), int(mtimes[i])): int(i)
        for i in np.flatnonzero(done)
        if sizes[i] > 0
    }
