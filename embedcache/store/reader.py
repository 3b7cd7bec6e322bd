"""Reading an entry: :class:`FeatureStore` loads an entry's valid rows into memory, and the
look-ups extraction needs (rows reusable from an older entry, row keys for leak checks).
Every file is checked by :func:`~embedcache.store.hdf5.check_safe` before it is read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from embedcache.errors import CacheError, CorruptEntryError
from embedcache.splits import parse_split
from embedcache.store.feature_sets import DEFAULT_SET, read_sets, select_features
from embedcache.store.hdf5 import (
    READ_FAILURES,
    check_safe,
    column_attr,
    open_h5,
    read_attrs,
    read_errors,
    read_numbers,
    read_strings,
    verify_columns,
    verify_feature_blocks,
)
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
        feature_sets: the extra feature sets (``extract --layers``), ``{name: (M, D_set)}``;
            ``features`` is the default set, ``penultimate``. See :meth:`select_features`.
        views: the augmented views of the train images (``extract --views``), or None. Every
            other array holds one row per image (its centre view); the views are kept apart so
            that only a probe's training rows can use them.
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
    feature_sets: dict[str, np.ndarray] = field(default_factory=dict)
    views: ViewRows | None = None

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
            try:
                check_safe(handle, path)
                attrs = read_attrs(handle)
                _check_header(attrs, path, allow_partial)
                verify_columns(handle, path, attrs)
                arrays = _read_rows(handle, path, int(attrs["dim"]))
                errors = read_errors(handle)
                optional, target_names = _read_targets(handle, path, arrays[-1])
                optional["feature_sets"] = read_sets(handle, path, attrs, arrays[-1])
                view_column = read_numbers(handle["view"], path)[arrays[-1]] if "view" in handle else None
            except READ_FAILURES as exc:  # a missing dataset or attribute, bad JSON, a damaged B-tree
                raise CorruptEntryError(f"{str(path)!r} is a damaged cache entry ({type(exc).__name__}: {exc}). "
                                        f"`embedcache rm` removes it; extracting again recomputes it.") from exc
        store = cls(path, *arrays, attrs, errors, target_names=target_names, **optional)
        return store if view_column is None else _split_views(store, view_column)

    @property
    def feature_set_names(self) -> list[str]:
        """Names of every feature set held: ``penultimate`` (the default), then the extra ones."""
        return [DEFAULT_SET, *self.feature_sets]

    def select_features(self, features: str | None = None) -> np.ndarray:
        """The features named by ``features``: a set name (``layer3:avg``), several joined by
        ``+`` (concatenated now, never stored), or None / ``penultimate`` for the default set.

        Raises:
            ConfigError: a set this entry does not hold (the message lists those it holds).
        """
        return select_features(self.features, self.feature_sets, features)

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


@dataclass
class ViewRows:
    """The augmented views of an entry's train images (``extract --views K``).

    Attributes:
        features: ``(V, D)`` the default features of each view.
        feature_sets: ``{name: (V, D_set)}`` the entry's extra feature sets, for each view.
        origin: ``(V,)`` position (into the store's arrays) of the image each view is of.
        index: ``(V,)`` the view number, 1 to K - 1 (view 0 is the image's own row).
        rows: ``(V,)`` row index of each view in the file.
    """

    features: np.ndarray
    feature_sets: dict[str, np.ndarray]
    origin: np.ndarray
    index: np.ndarray
    rows: np.ndarray

    def select_features(self, features: str | None = None) -> np.ndarray:
        """The views' features of the set(s) named by ``features`` (as :meth:`FeatureStore.select_features`)."""
        return select_features(self.features, self.feature_sets, features)

    def of(self, positions: np.ndarray) -> np.ndarray:
        """Indices (into these arrays) of the views of the images at ``positions``, in order."""
        return np.flatnonzero(np.isin(self.origin, positions))

    def __len__(self) -> int:
        return len(self.rows)


def _split_views(store: FeatureStore, view_column: np.ndarray) -> FeatureStore:
    """``store`` with one row per image, its augmented views moved to ``store.views``. A view
    whose image has no row (it failed to decode) is dropped."""
    origin_rows, index = view_column[:, 0], view_column[:, 1]
    centre = index == 0
    centre_rows = store.rows[centre]
    view_mask = ~centre & np.isin(origin_rows, centre_rows)
    origin = np.searchsorted(centre_rows, origin_rows[view_mask])
    views = ViewRows(store.features[view_mask], {k: v[view_mask] for k, v in store.feature_sets.items()},
                     origin.astype(np.int64), index[view_mask].astype(np.int64), store.rows[view_mask])

    def pick(array: np.ndarray | None) -> np.ndarray | None:
        return None if array is None else array[centre]

    return dataclasses.replace(
        store, features=store.features[centre], labels=store.labels[centre], paths=store.paths[centre],
        splits=store.splits[centre], rows=centre_rows, targets=pick(store.targets), label_sets=pick(store.label_sets),
        feature_sets={k: v[centre] for k, v in store.feature_sets.items()}, views=views)


def _read_rows(handle: h5py.File, path: Path, dim: int) -> tuple[np.ndarray, ...]:
    """(features, labels, paths, splits, rows) of the done rows, every checksum verified."""
    n = handle["done"].shape[0]
    if any(handle[name].shape[0] != n for name in ("features", "labels", "paths", "split")):
        raise CorruptEntryError(f"{str(path)!r}: its columns have different lengths; the entry is damaged.")
    done = read_numbers(handle["done"], path).astype(bool)
    rows = np.flatnonzero(done)
    # a complete entry is read as is (no gathering copy of the feature matrix)
    pick = slice(None) if len(rows) == len(done) else rows
    stored = read_numbers(handle["features"], path)
    verify_feature_blocks(handle, path, stored)
    features = stored[pick] if len(rows) else np.zeros((0, dim), stored.dtype)
    labels = read_numbers(handle["labels"], path)[pick]
    paths = read_strings(handle["paths"], path)[pick]
    splits = read_numbers(handle["split"], path)[pick]
    return features, labels, paths, splits, rows


def _read_targets(handle: h5py.File, path: Path, rows: np.ndarray) -> tuple[dict[str, np.ndarray], list[str]]:
    """The optional per-row targets of the done ``rows`` (checksums verified) and the target names."""
    n = handle["done"].shape[0]
    pick = slice(None) if len(rows) == n else rows
    optional = {}
    for name in ("targets", "label_sets"):
        if name in handle:
            if handle[name].shape[0] != n:
                raise CorruptEntryError(f"{str(path)!r}: /{name} has {handle[name].shape[0]} rows, not {n}; "
                                        f"the entry is damaged.")
            optional[name] = read_numbers(handle[name], path)[pick]
    names = column_attr(handle, "targets", "names")
    return optional, (json.loads(names) if names else [])


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


def complete_entries(cache_dir: str | os.PathLike) -> Iterator[tuple[Path, dict[str, Any]]]:
    """``(path, root attributes)`` of every complete entry in ``cache_dir`` whose header reads
    (unreadable files are skipped: ``embedcache verify`` reports them), in name order."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return
    for path in sorted(cache_dir.glob(f"*{SUFFIX}")):
        if path.is_symlink() or not path.is_file():
            continue
        try:
            with h5py.File(path, "r", locking=False) as handle:
                attrs = read_attrs(handle)
        except (OSError, ValueError, KeyError, TypeError, CorruptEntryError):
            continue
        if attrs.get("complete"):
            yield path, attrs


def find_reusable_entry(cache_dir: str | os.PathLike, config_key: str) -> Path | None:
    """Newest complete entry built with the same config (backbone, preprocessing, precision...)."""
    best: tuple[str, Path] | None = None
    for path, attrs in complete_entries(cache_dir):
        if attrs.get("config_key") != config_key:
            continue
        updated = str(attrs.get("updated", ""))
        if best is None or updated > best[0]:
            best = (updated, path)
    return None if best is None else best[1]


def row_keys(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(paths, split codes)`` of an entry's done rows, without reading its features."""
    path = Path(path)
    with open_h5(path) as handle:
        check_safe(handle, path)
        verify_columns(handle, path, read_attrs(handle))
        done = read_numbers(handle["done"], path).astype(bool)
        return read_strings(handle["paths"], path)[done], read_numbers(handle["split"], path)[done]


def reusable_rows(source: Path) -> dict[tuple[str, int, int], int]:
    """``{(path, size, mtime_ns): row}`` for done rows of a complete entry."""
    with open_h5(source) as handle:
        check_safe(handle, source)
        verify_columns(handle, source, read_attrs(handle))
        done = read_numbers(handle["done"], source)
        paths = read_strings(handle["paths"], source)
        sizes = read_numbers(handle["file_size"], source)
        mtimes = read_numbers(handle["file_mtime_ns"], source)
    return {
        (str(paths[i]), int(sizes[i]), int(mtimes[i])): int(i)
        for i in np.flatnonzero(done)
        if sizes[i] > 0
    }
