"""Split codes (the one definition) and the stratified, seeded hold-out.

Every row of a source and of a cache entry carries a :class:`Split` code, stored as ``uint8``:
0 train, 1 val, 2 test, 3 unsplit. :func:`holdout_splits` assigns val/test to sources without
splits of their own, and the probe protocol uses it to hold validation rows out of train.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Sequence

import numpy as np

from embedcache.errors import ConfigError


class Split(enum.IntEnum):
    """Split codes as stored in sources and cache entries."""

    TRAIN = 0
    VAL = 1
    TEST = 2
    UNSPLIT = 3

    @property
    def label(self) -> str:
        """``train``, ``val``, ``test`` or ``unsplit``."""
        return self.name.lower()


#: ``{code: name}``, as written to the cache's ``split_mapping`` attribute.
SPLIT_NAMES = {int(s): s.label for s in Split}
#: Folder names and CSV values accepted for each split (compared lower-cased).
SPLIT_ALIASES = {"train": Split.TRAIN, "val": Split.VAL, "valid": Split.VAL,
                 "validation": Split.VAL, "test": Split.TEST}


def parse_split(split: str | int) -> Split:
    """A split given as a code, ``Split``, name or alias."""
    if isinstance(split, str):
        key = split.strip().lower()
        if key == "unsplit":
            return Split.UNSPLIT
        if key not in SPLIT_ALIASES:
            raise ConfigError(f"Unknown split {split!r}; expected one of {sorted(SPLIT_ALIASES)} or 'unsplit'.")
        return SPLIT_ALIASES[key]
    return Split(int(split))


def check_fraction(name: str, value: float) -> None:
    """A hold-out fraction must be a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(
            f"The '{name}' parameter must be a float in the range [0, 1). Got {value!r} instead."
        )


def holdout_splits(keys: Sequence[str], labels: np.ndarray, *, val_fraction: float,
                   test_fraction: float, seed: int) -> np.ndarray:
    """Stratified, seeded hold-out: per class, ``round(n*test_fraction)`` to TEST and
    ``round(n*val_fraction)`` to VAL, the rest TRAIN; a class with >= 2 images keeps one in train.

    Members of a class are ordered by ``sha256(seed:key)`` so that the choice depends only on the
    seed and each sample's stable key (adding one file moves few others).

    Args:
        keys: one stable key per row (a relative path, or the row number for arrays).
        labels: one label per row.
        val_fraction: share of each class sent to VAL.
        test_fraction: share of each class sent to TEST.
        seed: seed of the ordering.

    Returns:
        ``uint8`` split codes, one per row.
    """
    labels = np.asarray(labels)
    splits = np.full(len(keys), Split.TRAIN, np.uint8)
    # fixed-width bytes compare like Python bytes (unsigned, lexicographic): the same order as
    # sorting the members by their digests, vectorised
    digests = np.array([hashlib.sha256(f"{seed}:{key}".encode()).digest() for key in keys], dtype="S32")
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[np.argsort(digests[members], kind="stable")]
        n_test, n_val = _holdout_counts(len(members), val_fraction, test_fraction)
        splits[members[:n_test]] = Split.TEST
        splits[members[n_test:n_test + n_val]] = Split.VAL
    return splits


def _holdout_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(test, val) counts of a class of ``n`` rows; one row always stays in train when n >= 2."""
    n_test, n_val = math.floor(n * test_fraction + 0.5), math.floor(n * val_fraction + 0.5)
    if n >= 2:
        excess = n_test + n_val - (n - 1)
        if excess > 0:
            cut = min(excess, n_val)
            n_val, n_test = n_val - cut, n_test - (excess - cut)
    elif n_test + n_val >= n:
        n_test = n_val = 0
    return n_test, n_val
