"""Train-time augmentation on top of a backbone's own preprocessing, for fine-tuning.

A training image gets a random resized crop (area and aspect ratio drawn per image) resampled to
the backbone's input size with the backbone's interpolation, and a horizontal flip half of the
time; mean/std normalisation is the backbone's, applied next to the model as during extraction.
Evaluation images get exactly the extraction preprocessing (:func:`to_uint8_tensor`).

The random draws depend only on ``(seed, epoch, row)``, never on worker processes or on where a
run was interrupted, so a resumed epoch sees the same crops as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from embedcache.extraction.loop import ImageDataset
from embedcache.models.preprocess import (
    PIL_INTERPOLATION,
    PreprocessSpec,
    rgb_array,
    to_uint8_tensor,
)
from embedcache.sources.augments import random_crop_box
from embedcache.sources.base import ImageSource


def augment_image(image: Image.Image, spec: PreprocessSpec, rng: np.random.Generator) -> torch.Tensor:
    """Random resized crop + horizontal flip → ``(3, crop, crop)`` uint8 (channels-last view).
    A gray ``L`` image is cropped, resized and flipped on its one channel and made RGB last: the
    same pixels as converting first (PIL resamples channel by channel)."""
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    box = random_crop_box(image.width, image.height, rng)
    size = spec.crop_size
    image = image.resize((size, size), PIL_INTERPOLATION[spec.interpolation], box=box)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(rgb_array(image)).permute(2, 0, 1)


class TrainImages(ImageDataset):
    """Selected rows of a source: item ``position`` is row ``rows[position]``, returned as
    ``(position, uint8 tensor | None, error)`` with the errors handled as in extraction.

    Set :attr:`epoch` before each epoch's DataLoader is created (workers get a fresh copy).
    """

    def __init__(self, source: ImageSource, spec: PreprocessSpec, rows: np.ndarray, *,
                 augment: bool, seed: int) -> None:
        super().__init__(source, spec)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    def tensor(self, position: int) -> torch.Tensor:
        row = int(self.rows[position])
        image = self.source.load_pixels(row)
        if not self.augment:
            return to_uint8_tensor(image, self.spec)
        return augment_image(image, self.spec, np.random.default_rng([self.seed, self.epoch, row]))
