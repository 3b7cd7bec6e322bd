"""Augmented views (``extract --views``) in a probe: which views may train, and adding those
of the training images, and only those, to the rows a head is fitted on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from embedcache.errors import ConfigError

if TYPE_CHECKING:
    from embedcache.store.reader import FeatureStore


@dataclass(frozen=True)
class TrainViews:
    """Augmented views of some images (``extract --views``) offered to a probe's training rows:
    ``features`` ``(V, D)``, ``origin`` ``(V,)`` the position of the image each view is of, and
    ``usable`` ``(V,)`` which views may train (all of them unless ``probe --views N``). Every view
    keeps its place (view ``j`` is row ``N + j`` after :func:`add_train_views`, as in
    ``store.views``), so a k-NN probe's reference positions name the same rows when it is saved."""

    features: np.ndarray
    origin: np.ndarray
    usable: np.ndarray | None = None

    @classmethod
    def of_store(cls, store: FeatureStore, features: str | None = None, views: int | None = None
                 ) -> TrainViews | None:
        """The entry's views of the set(s) named by ``features``, or None when it has none (or
        ``views`` is 1). ``views``: use the centre view and views ``1..views-1`` only (a view
        does not depend on K, so view ``v`` of a ``--views 8`` entry is view ``v`` of ``--views 4``)."""
        held = int(store.attrs.get("views", 1)) if store.views is not None else 1
        if views is not None and (isinstance(views, bool) or not isinstance(views, (int, np.integer))
                                  or not 1 <= views <= held):
            raise ConfigError(f"The 'views' parameter (--views) must be an int from 1 (centre views only) to "
                              f"{held} (the views this entry holds per train image). Got {views!r}.")
        if store.views is None or len(store.views) == 0 or views == 1:
            return None
        usable = None if views is None else store.views.index < views
        return cls(store.views.select_features(features), store.views.origin, usable)


def add_train_views(train: np.ndarray, held: np.ndarray, views: TrainViews | None, features: np.ndarray,
                    *columns: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, list[np.ndarray | None], int]:
    """Append every view as a row after the ``N`` image rows and add the views of the ``train``
    images (only those) to the training positions; ``columns`` (labels, targets, ...) are copied
    from each view's image. Returns ``(train positions, features, columns, views used)``;
    unchanged without views.

    A view of a ``held`` image (val, test) is never a training row: checked explicitly (``python
    -O`` keeps the check), so a selection or a test score never sees an augmented copy of itself.
    """
    if views is None:
        return train, features, list(columns), 0
    n = len(features)
    if views.features.shape[1:] != features.shape[1:] or len(views.origin) != len(views.features):
        raise ConfigError(f"The views' features {views.features.shape} do not match the images' {features.shape}; "
                          f"the entry is damaged. `embedcache verify` checks it.")
    wanted = np.isin(views.origin, train)
    used = np.flatnonzero(wanted if views.usable is None else wanted & views.usable)
    if np.isin(views.origin[used], held).any():
        raise ConfigError("Internal error: a view of a val or test image was about to become a training row; "
                          "nothing was fitted.")
    merged = [None if c is None else np.concatenate([c, c[views.origin]]) for c in columns]
    features = np.concatenate([features, views.features.astype(features.dtype, copy=False)])
    return np.concatenate([train, n + used]), features, merged, len(used)
