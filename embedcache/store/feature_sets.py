"""Extra feature sets of an entry (``extract --layers``): their names, where they live, reading
them back through their checksums, and choosing features by name (docs/schema.md).

The default set, ``penultimate``, is ``/features`` as in every entry. Each extra set ``<node>:<pool>``
is ``/feature_sets/<node>:<pool>`` (N, D_set), chunked and checksummed exactly like ``/features``:
Fletcher-32 per chunk and a CRC-32 per block of 256 rows in ``/checksums/feature_sets/<node>:<pool>``.
The root attribute ``feature_sets`` lists them (JSON ``[{"name", "dim"}]``), in extraction order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from embedcache.errors import ConfigError, CorruptEntryError
from embedcache.store.hdf5 import read_numbers, verify_feature_blocks
from embedcache.store.schema import BLOCK_CRC32

#: Name of the default set (``/features``): the penultimate features, or ``--layer``'s node.
DEFAULT_SET = "penultimate"
#: Root attribute listing the extra sets.
FEATURE_SETS_ATTR = "feature_sets"
#: Group of the extra sets' datasets, and of their per-block checksums.
SETS_GROUP = "feature_sets"
SET_CRCS_GROUP = "checksums/feature_sets"
#: In-memory attribute (never written) naming the set a probe was trained on (its k-NN references).
SELECTED_SET = "selected_feature_set"
#: Joins set names into one concatenation (``layer3:avg+layer4:avg``).
CONCAT = "+"


def feature_set_attr(sets: Sequence[tuple[str, int]]) -> list[dict[str, Any]]:
    """The ``feature_sets`` root attribute of ``((name, dim), ...)``."""
    return [{"name": name, "dim": int(dim)} for name, dim in sets]


def recorded_sets(attrs: dict[str, Any]) -> list[tuple[str, int]]:
    """``[(name, dim)]`` of the extra sets an entry's attributes list (none for a plain entry)."""
    return [(str(s["name"]), int(s["dim"])) for s in attrs.get(FEATURE_SETS_ATTR, [])]


def feature_columns(attrs: dict[str, Any]) -> list[tuple[str, str, str, int]]:
    """``[(set name, dataset, checksum dataset, dim)]``: the default set first, then every extra one."""
    return [(DEFAULT_SET, "features", BLOCK_CRC32, int(attrs["dim"]))] + [
        (name, f"{SETS_GROUP}/{name}", f"{SET_CRCS_GROUP}/{name}", dim) for name, dim in recorded_sets(attrs)]


def read_sets(handle: h5py.File, path: Path, attrs: dict[str, Any], rows: np.ndarray) -> dict[str, np.ndarray]:
    """The extra sets' done ``rows``, each checked against its block checksums.

    Raises:
        CorruptEntryError: a set is missing, has the wrong shape, or fails a checksum.
    """
    n = handle["done"].shape[0]
    pick = slice(None) if len(rows) == n else rows
    sets = {}
    for name, dataset, checksums, dim in feature_columns(attrs)[1:]:
        if dataset not in handle or handle[dataset].shape != (n, dim):
            raise CorruptEntryError(f"{str(path)!r}: feature set /{dataset} is missing or not ({n}, {dim}); the "
                                    f"entry is damaged. `embedcache rm` removes it; extracting again recomputes it.")
        stored = read_numbers(handle[dataset], path)
        verify_feature_blocks(handle, path, stored, dataset=dataset, checksums=checksums)
        sets[name] = stored[pick]
    return sets


def select_features(default: np.ndarray, sets: dict[str, np.ndarray], features: str | None) -> np.ndarray:
    """The features named by ``features``: a set name, or names joined by ``+`` (concatenated in
    that order, formed now and never stored); None or ``penultimate``: the default set.

    Raises:
        ConfigError: a name the entry does not hold (the message lists those it holds).
    """
    if features is None or features == DEFAULT_SET:
        return default
    names = [part.strip() for part in str(features).split(CONCAT)]
    available = {DEFAULT_SET: default, **sets}
    for name in names:
        if name not in available:
            raise ConfigError(
                f"The 'features' parameter names a feature set this entry does not hold: {name!r}. Available: "
                f"{', '.join(available)}. Join sets with '+'; extract with --layers to store more sets.")
    if len(names) != len(set(names)):
        raise ConfigError(f"The 'features' parameter repeats a set: {features!r}. Name each set once.")
    parts = [available[name] for name in names]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
