"""Building a backbone: the factory's network, a local weights file, truncation, freezing.

Truncation (default: the input of the final ``nn.Linear``; or ``layer`` + ``pool``), a local
weights file and freezing are applied here, uniformly, to whatever a factory returns.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from embedcache.errors import ConfigError
from embedcache.models.backbone import Backbone, BackboneParts
from embedcache.models.catalog import resolve
from embedcache.models.feature_sets import (
    check_default_matches,
    multi_set_module,
    resolve_sets,
    set_dims,
)
from embedcache.models.pooling import (
    POOLS,
    PRESETS,
    check_pools,
    parse_layers,
    set_name,
    split_list,
)
from embedcache.models.truncate import (
    final_linear_name,
    freeze,
    graph_node_names,
    has_linear,
    probe_dim,
    truncate_at_layer,
    truncate_default,
)
from embedcache.models.weights import load_weights_file, state_dict_sha256


def graph_nodes(name: str) -> list[str]:
    """Node names usable as ``layer=`` for a backbone (random init: structure only)."""
    parts = resolve(name).factory(weights="none", weights_path=None)
    return graph_node_names(parts.model, leaf_modules=parts.leaf_modules)


def preset_nodes(name: str) -> dict[str, str]:
    """``{preset: the nodes it stands for on this backbone, or why it does not apply}``."""
    parts = resolve(name).factory(weights="none", weights_path=None)
    freeze(parts.model)
    meanings = {}
    for preset in PRESETS:
        try:
            pairs = resolve_sets(parts.model, layers=[preset], pools=[], size=parts.preprocess.crop_size,
                                 leaf_modules=parts.leaf_modules)
            meanings[preset] = ", ".join(set_name(node, pool) for node, pool in pairs)
        except ConfigError as exc:
            meanings[preset] = f"not available ({exc})"
    return meanings


def get_backbone(
    name: str,
    *,
    weights: str | None = None,
    weights_path: str | os.PathLike | None = None,
    layer: str | None = None,
    pool: str = "avg",
    image_size: int | None = None,
    layers: Sequence[str] | str | None = None,
    pools: Sequence[str] | str | None = None,
) -> Backbone:
    """Build a frozen, truncated backbone.

    Args:
        name: a registered name, a torchvision model name, ``module.path:factory`` or ``timm:<name>``.
        weights: weights tag (``DEFAULT``, ``IMAGENET1K_V2``, ``none`` ...); backbone-specific.
        weights_path: a local ``.safetensors`` / ``.pt`` state dict loaded into the architecture.
        layer: an intermediate graph node to read instead of the penultimate features.
        pool: how to pool ``layer``'s output: ``avg``, ``max``, ``avgmax`` or ``cls``.
        image_size: model input size in pixels (crop); the resize keeps the backbone's ratio.
        layers: extra feature sets from the same forward pass: graph nodes and presets
            (``stages``, ``last4``), each pooled by every one of ``pools`` (default ``avg``);
            the module then returns the default features followed by every set.
        pools: the pools of ``layers`` (``avg``, ``max``, ``avgmax``, ``cls``).

    Returns:
        A :class:`Backbone` whose module is in eval mode with gradients disabled.
    """
    layers, pools = parse_layers(layers), check_pools(split_list(pools))
    if layers and layer is not None:
        raise ConfigError("The 'layers' parameter cannot be combined with 'layer': --layers keeps the penultimate "
                          "features as the default set and adds the others. Pass the node in --layers instead.")
    if pools and not layers:
        raise ConfigError("The 'pools' parameter (several --pool values) applies to --layers only. Pass "
                          "--layers NODES, or one --pool with --layer.")
    if layer is None and pool != "avg":
        raise ConfigError(
            f"The 'pool' parameter ({pool!r}) only applies with 'layer'; the default features are "
            f"already pooled by the model. Pass --layer NODE (or --layers NODES) too, or drop --pool."
        )
    if pool not in POOLS:
        raise ConfigError(f"The 'pool' parameter must be one of {list(POOLS)}. Got {pool!r} instead.")
    parts = resolve(name).factory(weights=weights, weights_path=None if weights_path is None else str(weights_path))
    if not isinstance(parts, BackboneParts):
        raise ConfigError(
            f"Backbone factory for {name!r} returned {type(parts).__name__}; it must return "
            f"embedcache.BackboneParts."
        )
    weights_tag = parts.weights_tag
    if weights_path is not None:
        head_name = final_linear_name(parts.model) if not parts.features_ready and has_linear(parts.model) else None
        load_weights_file(parts.model, str(weights_path), head_name)
        weights_tag = f"file:{Path(weights_path).name}"
    weights_sha256 = state_dict_sha256(parts.model.state_dict())
    preprocess = parts.preprocess.with_image_size(image_size)
    if layers:
        module, dim, sets = _multi_set(parts, layers, pools, preprocess.crop_size)
        return Backbone(name=name, module=module, preprocess=preprocess, dim=dim, weights_tag=weights_tag,
                        weights_sha256=weights_sha256, feature_sets=sets, network=parts.model)
    if layer is not None:
        module = truncate_at_layer(parts.model, layer=layer, pool=pool, leaf_modules=parts.leaf_modules)
    elif parts.features_ready:
        module = parts.model
    else:
        module = truncate_default(parts.model)
    module = freeze(module)
    try:
        dim = probe_dim(module, preprocess)
    except (AssertionError, RuntimeError, ValueError) as exc:  # e.g. a ViT asserting its own input size
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(
            f"Backbone {name!r} does not accept {preprocess.crop_size}x{preprocess.crop_size} inputs "
            f"({type(exc).__name__}: {str(exc) or 'no message'}). Use its own input size (omit --image-size, "
            f"default {parts.preprocess.crop_size}) or a size it supports."
        ) from None
    return Backbone(name=name, module=module, preprocess=preprocess, dim=dim,
                    weights_tag=weights_tag, weights_sha256=weights_sha256, layer=layer, pool=pool,
                    network=parts.model)


def _multi_set(parts: BackboneParts, layers: list[str], pools: list[str],
               size: int) -> tuple[nn.Module, int, tuple[tuple[str, int], ...]]:
    """(module, default dim, sets) for ``layers`` x ``pools`` read in one forward pass."""
    if not parts.features_ready and not has_linear(parts.model):
        raise ConfigError("--layers needs a model whose classifier is a final nn.Linear (or a features-ready "
                          "module); use --layer NODE for this one.")
    freeze(parts.model)
    pairs = resolve_sets(parts.model, layers=layers, pools=pools, size=size, leaf_modules=parts.leaf_modules)
    truncated = parts.model if parts.features_ready else truncate_default(parts.model)
    module = freeze(multi_set_module(truncated, pairs, leaf_modules=parts.leaf_modules))
    try:
        check_default_matches(module, truncated, size=size)
        dim, dims = set_dims(module, size=size)
    except (AssertionError, RuntimeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"The backbone does not accept {size}x{size} inputs with --layers "
                          f"({type(exc).__name__}: {exc}).") from None
    return module, dim, tuple((set_name(node, pool), d) for (node, pool), d in zip(pairs, dims, strict=True))
