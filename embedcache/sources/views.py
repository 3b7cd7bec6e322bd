"""Augmented views of the training images (``extract --views K --augment NAME``).

A source with views holds every image of the base source once (its centre view, view 0, exactly
as without views) followed by ``K - 1`` augmented views of each TRAIN image. Val, test and
unsplit images keep the single centre view, so nothing augmented is ever scored.

A view is deterministic: its random parameters come from a hash of the image's path, the view
index and the augmentation's name, never from a global random state, so a resumed, sharded or
repeated extraction computes the same pixels. A view row's path is ``<path>//view<v>`` (a
normalised relative path never holds ``//``), so every row of an entry has its own key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from embedcache.errors import ConfigError
from embedcache.sources.augments import AUGMENTS, DEFAULT_AUGMENT, random_crop_box
from embedcache.sources.base import ImageSource, Sample
from embedcache.splits import Split

#: Separator between an image's path and its view index in a view row's path.
VIEW_MARK = "//view"
#: Bumped whenever a view's pixels change for the same (path, view, augment): it is in the key.
VIEWS_VERSION = 1
#: Most views per image (a guard against a typo multiplying the cache's size).
MAX_VIEWS = 64



def check_views(views: Any, augment: str | None) -> tuple[int, str | None]:
    """``(K, augment)`` validated: ``K = 1`` means no views (augment None); ``augment`` defaults to
    :data:`DEFAULT_AUGMENT` when ``K > 1``.

    Raises:
        ConfigError: naming ``views`` / ``augment`` and the accepted values.
    """
    if isinstance(views, bool) or not isinstance(views, (int, np.integer)) or not 1 <= int(views) <= MAX_VIEWS:
        raise ConfigError(f"The 'views' parameter (--views) must be an int from 1 (the centre view only) to "
                          f"{MAX_VIEWS}. Got {views!r}.")
    views = int(views)
    if augment is not None and augment not in AUGMENTS:
        raise ConfigError(f"The 'augment' parameter (--augment) must be one of {sorted(AUGMENTS)}. Got {augment!r}.")
    if views == 1:
        if augment is not None:
            raise ConfigError(f"--augment {augment} needs --views K with K >= 2 (the centre view plus K - 1 "
                              f"augmented ones); with one view nothing is augmented.")
        return 1, None
    augment = augment or DEFAULT_AUGMENT
    if augment == "flip" and views > 2:
        raise ConfigError(f"--augment flip has one augmented view (the mirror image), so --views must be 2; got "
                          f"{views}. Use --augment crop or standard for more views.")
    return views, augment


def view_seed(path: str, view: int, augment: str) -> int:
    """The seed of view ``view`` of the image at ``path`` (stable across processes and runs)."""
    digest = hashlib.sha256(f"{VIEWS_VERSION}|{augment}|{view}|{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def augment_image(image: Image.Image, augment: str, seed: int) -> Image.Image:
    """One augmented view of ``image`` (decoded, RGB or gray ``L``), drawn from ``seed``; the
    backbone's usual preprocessing (resize the shorter side, centre crop) is applied to it afterwards."""
    if augment == "flip":
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    rng = np.random.default_rng(seed)
    image = image.crop(random_crop_box(*image.size, rng))
    if augment == "standard" and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


class ViewSource(ImageSource):
    """``base``'s rows (the centre views, unchanged), then ``views - 1`` augmented views of each
    train row. :meth:`view_array` says which image and view every row is."""

    def __init__(self, base: ImageSource, views: int, augment: str) -> None:
        views, augment = check_views(views, augment)
        if views < 2:
            raise ConfigError("ViewSource needs views >= 2; without views use the source itself.")
        origins, indices, extra = [], [], []
        for row, sample in enumerate(base.samples):
            if sample.split != Split.TRAIN:
                continue
            for view in range(1, views):
                origins.append(row)
                indices.append(view)
                extra.append(Sample(f"{sample.path}{VIEW_MARK}{view}", sample.label, int(Split.TRAIN), sample.size,
                                    sample.mtime_ns, sample.target, sample.label_set))
        if not extra:
            raise ConfigError(f"--views {views} augments the train images, and {base.description} has none in "
                              f"train (its splits: {base.split_counts()}). Drop --views, or give train images.")
        super().__init__(root=base.root, samples=[*base.samples, *extra], class_names=base.class_names,
                         description=f"{base.description}, {views} views of each train image ({augment})",
                         target_names=base.target_names, multilabel=base.multilabel)
        self.kind = base.kind
        self.base, self.views, self.augment = base, views, augment
        self.n_images = len(base.samples)
        self._origin = np.concatenate([np.arange(self.n_images), np.asarray(origins, np.int64)])
        self._index = np.concatenate([np.zeros(self.n_images, np.int64), np.asarray(indices, np.int64)])

    def load_image(self, index: int) -> Image.Image:
        return self._view(index, self.base.load_image)

    def load_pixels(self, index: int) -> Image.Image:
        """As the base source gives its images to the model (gray ones in mode ``L``): the views'
        crops and flips work channel by channel, so their pixels are the RGB views' too."""
        return self._view(index, self.base.load_pixels)

    def _view(self, index: int, load: Callable[[int], Image.Image]) -> Image.Image:
        origin, view = int(self._origin[index]), int(self._index[index])
        image = load(origin)
        if view == 0:
            return image
        return augment_image(image, self.augment, view_seed(self.base.samples[origin].path, view, self.augment))

    def view_array(self) -> np.ndarray:
        """``(n, 2)`` int64: for every row, the row of its centre view and its view index (0 = centre)."""
        return np.stack([self._origin, self._index], axis=1)

    def manifest_sha256(self) -> str:
        """The base source's: the data is the same images (the views are in the config key)."""
        return self.base.manifest_sha256()

    def manifest_extra(self) -> dict[str, Any]:
        return self.base.manifest_extra()

    def to_dict(self) -> dict[str, Any]:
        return {**self.base.to_dict(), "views": self.views, "augment": self.augment,
                "n_view_rows": len(self.samples) - self.n_images}

    def split_counts(self) -> dict[str, int]:
        return self.base.split_counts()

    def assign_splits(self, splits: np.ndarray) -> None:
        raise ConfigError("Splits are assigned before the views are made (the views follow the train split).")

    def drop_labels(self) -> None:
        raise ConfigError("--views needs labelled train images (the views are of the train split).")


def view_array(source: ImageSource) -> np.ndarray | None:
    """The ``/view`` column of an entry of ``source``: :meth:`ViewSource.view_array`, or None
    for a source without views."""
    return source.view_array() if isinstance(source, ViewSource) else None
