"""Backbone preprocessing as plain data, and the two halves that apply it.

The spec travels with every backbone and is stored in the cache (it is part of the cache key).
Applying it is split in two so that DataLoader workers ship compact uint8 tensors:

* :func:`to_uint8_tensor` runs in the worker: resize the shorter side, centre-crop, HWC→CHW uint8
  (:func:`to_uint8_array`: the same as a numpy HWC array, for the loop that needs no torch).
* :func:`normalize_batch` runs next to the model (on its device): uint8 → float, ``(x/255-mean)/std``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from embedcache.errors import ConfigError
from embedcache.models.crop_resize import exact_crop_box

if TYPE_CHECKING:
    import torch

PIL_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}

#: Largest model input side accepted (pixels): a batch of 64 such images is 3 GB as float32
#: before the model's own activations; beyond this ask for a smaller batch, not a larger image.
MAX_IMAGE_SIZE = 2048
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessSpec:
    """How an RGB image becomes a backbone input.

    Attributes:
        resize_size: the shorter side is resized to this many pixels (aspect ratio kept).
        crop_size: then a centred square of this size is cut out; this is the model's input size.
        interpolation: ``nearest``, ``bilinear`` or ``bicubic``.
        antialias: low-pass before downsampling (PIL always does; recorded for the cache key).
        mean: per-channel mean subtracted after scaling pixels to [0, 1].
        std: per-channel standard deviation divided by after subtracting the mean.
        color_mode: colour mode of the decoded image fed to the model (always ``RGB`` today).
    """

    resize_size: int = 256
    crop_size: int = 224
    interpolation: str = "bilinear"
    antialias: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    color_mode: str = "RGB"

    def __post_init__(self) -> None:
        if self.interpolation not in PIL_INTERPOLATION:
            raise ConfigError(
                f"The 'interpolation' of a preprocessing spec must be one of "
                f"{sorted(PIL_INTERPOLATION)}. Got {self.interpolation!r} instead."
            )
        for name in ("resize_size", "crop_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"The '{name}' of a preprocessing spec must be a positive int. Got {value!r}."
                )
        if self.crop_size > self.resize_size:
            raise ConfigError(
                f"crop_size ({self.crop_size}) must not exceed resize_size ({self.resize_size})."
            )
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def with_image_size(self, image_size: int | None) -> PreprocessSpec:
        """Return a copy whose crop is ``image_size``, keeping the resize/crop ratio.

        Args:
            image_size: the new model input size in pixels, or None to keep this spec.
        """
        if image_size is None or image_size == self.crop_size:
            return self
        if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= MAX_IMAGE_SIZE:
            raise ConfigError(
                f"The 'image_size' parameter must be an int from 8 to {MAX_IMAGE_SIZE} (pixels). Got {image_size!r}."
            )
        ratio = self.resize_size / self.crop_size
        return dataclasses.replace(
            self, crop_size=image_size, resize_size=max(image_size, round(image_size * ratio))
        )

    def to_dict(self) -> dict:
        """Plain-data form (JSON-serialisable) used in the cache key and HDF5 attrs."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessSpec:
        return cls(**{**data, "mean": tuple(data["mean"]), "std": tuple(data["std"])})


def to_uint8_array(image: Image.Image, spec: PreprocessSpec, out: np.ndarray | None = None) -> np.ndarray:
    """Resize the shorter side, centre-crop and return a ``(crop, crop, 3)`` uint8 array (HWC).

    Args:
        image: a decoded RGB PIL image, or a gray one in mode ``L``
            (:func:`~embedcache.sources.decode.decode_image` with ``keep_gray``): it is resized
            and cropped on its one channel and repeated into three after, the same pixels as
            converting it to RGB first (PIL resamples channel by channel) for a third of the work.
        spec: the backbone's preprocessing spec.
        out: a writable ``(crop, crop, 3)`` uint8 array to write the pixels into (a batch's row:
            the images of a batch then need no stacking); it is returned.
    """
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short = spec.resize_size
    new_long = int(spec.resize_size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    crop = spec.crop_size
    left = int(round((new_size[0] - crop) / 2.0))
    top = int(round((new_size[1] - crop) / 2.0))
    box = (left, top, left + crop, top + crop)
    if new_size == image.size:
        return rgb_array(image, out, box=box)
    boxed = exact_crop_box(image.size, new_size, box, spec.interpolation)
    if boxed is not None:  # only (about) the crop is resampled, to the same pixels (crop_resize.py)
        size, source, after = boxed
        return rgb_array(image.resize(size, PIL_INTERPOLATION[spec.interpolation], box=source), out, box=after)
    return rgb_array(image.resize(new_size, PIL_INTERPOLATION[spec.interpolation]), out, box=box)


def rgb_array(image: Image.Image, out: np.ndarray | None = None,
              box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """A writable ``(H, W, 3)`` uint8 copy of an RGB or gray ``L`` image (of its ``box``, PIL's
    ``(left, upper, right, lower)``, inside the image): the last step of preprocessing, where a
    gray image, resized on its one channel, becomes RGB. The crop is a slice of the pixels and a
    gray channel is copied three times: 16 µs per 112 px image where PIL's crop and conversion
    took 24. ``out``: an ``(H, W, 3)`` uint8 array to copy into instead (returned)."""
    pixels = np.asarray(image)
    if box is not None and box != (0, 0, image.width, image.height):
        left, top, right, lower = box
        pixels = pixels[top:lower, left:right]
    height, width = pixels.shape[:2]
    if out is None:
        out = np.empty((height, width, 3), dtype=np.uint8)
    elif out.shape != (height, width, 3) or out.dtype != np.uint8:
        raise ValueError(f"out must be a ({height}, {width}, 3) uint8 array, not {out.shape} {out.dtype}")
    if pixels.ndim == 2:  # gray: one copy per channel (numpy's broadcast to 3 was 3x slower)
        for channel in range(3):
            out[..., channel] = pixels
    else:
        out[...] = pixels
    return out


def to_uint8_tensor(image: Image.Image, spec: PreprocessSpec) -> torch.Tensor:
    """:func:`to_uint8_array` as a ``(3, crop, crop)`` uint8 tensor, a channels-last view of the
    HWC memory (what the model consumes, kept through collation: no copy)."""
    import torch  # here, not at the top: a cache hit plans with this module and needs no torch

    return torch.from_numpy(to_uint8_array(image, spec)).permute(2, 0, 1)


def normalize_batch(batch: torch.Tensor, spec: PreprocessSpec, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` → float32 normalised, on the batch's device.

    Computed as one fused multiply-add per element: ``x * (1/(255*std)) - mean/std``. ``out``: a
    float32 tensor of the batch's shape to write into (the same values as a fresh one).
    """
    import torch

    scale = torch.tensor([1.0 / (255.0 * s) for s in spec.std], device=batch.device)
    shift = torch.tensor([-m / s for m, s in zip(spec.mean, spec.std, strict=False)], device=batch.device)
    out = batch.to(torch.float32) if out is None else out.copy_(batch)
    return out.mul_(scale.view(1, 3, 1, 1)).add_(shift.view(1, 3, 1, 1))


def describe_preprocess(spec: PreprocessSpec | None) -> str:
    """One line such as ``256->224 bicubic, ImageNet mean/std``."""
    if spec is None:
        return ""
    if all(abs(m - i) < 1e-3 for m, i in zip(spec.mean, IMAGENET_MEAN, strict=True)):
        norm = "ImageNet mean/std"
    elif all(abs(m - 127 / 255) < 1e-3 for m in spec.mean) and all(abs(v - 128 / 255) < 1e-3 for v in spec.std):
        norm = "(x-127)/128"
    else:
        norm = f"mean {tuple(round(m, 3) for m in spec.mean)} std {tuple(round(v, 3) for v in spec.std)}"
    return f"{spec.resize_size}->{spec.crop_size} {spec.interpolation}, {norm}"
