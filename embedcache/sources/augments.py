"""Random crops and the ``--augment`` choices of ``extract --views``, shared with fine-tuning's
train-time augmentation (no heavy imports: the CLI's help reads this module)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

#: ``--augment`` choices: what one augmented view of an image is.
AUGMENTS = {
    "flip": "the mirror image (left-right); at most 2 views",
    "crop": "a random box of 35-100% of the area, aspect 3/4-4/3, then the usual resize and centre crop",
    "standard": "crop, then a left-right flip with probability 1/2",
}
#: The augmentation when ``--views`` is given without ``--augment``.
DEFAULT_AUGMENT = "standard"

#: Fraction of the image area a random crop keeps (milder than ImageNet training's 0.08: the
#: network is already trained, and a probe's views should still show the object).
CROP_SCALE = (0.35, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def random_crop_box(width: int, height: int, rng: np.random.Generator, *,
                    scale: tuple[float, float] = CROP_SCALE,
                    ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """A ``(left, top, right, bottom)`` box with a random area fraction and aspect ratio
    (log-uniform); the centred square when ten draws do not fit."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    side = min(width, height)  # fall back to the centred square
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side
