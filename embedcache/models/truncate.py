"""Turn a full classification network into a frozen ``(N, 3, H, W) -> (N, D)`` feature extractor.

Two ways to cut: :func:`truncate_default` replaces the final ``nn.Linear`` (the classifier) with
an identity, so the features are the classifier's input; :func:`truncate_at_layer` reads any node
of the torch.fx graph instead and pools it (:mod:`embedcache.models.pooling`). :func:`freeze` fixes
BatchNorm/Dropout and disables gradients; :func:`probe_dim` measures ``D`` with one forward pass.

This module knows nothing of backbone names or the registry (:mod:`embedcache.models.catalog` calls it).
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from embedcache.errors import ConfigError
from embedcache.models.pooling import pool_features
from embedcache.models.preprocess import PreprocessSpec


def has_linear(model: nn.Module) -> bool:
    """Whether ``model`` holds any ``nn.Linear`` (a classifier :func:`truncate_default` can cut)."""
    return any(isinstance(m, nn.Linear) for m in model.modules())


def final_linear_name(model: nn.Module) -> str:
    """Qualified name of the last registered ``nn.Linear``: ``fc``, ``classifier.1``, ``heads.head``..."""
    last_name = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name = name
    if last_name is None:
        raise ConfigError("This model has no nn.Linear classifier to cut; pass --layer NODE.")
    return last_name


def final_linear(model: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """(parent, attribute, layer) of the last registered ``nn.Linear`` — the classifier."""
    parent_name, _, attr = final_linear_name(model).rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, attr, getattr(parent, attr)


class PooledNode(nn.Module):
    """Runs a torch.fx feature extractor and pools its single output node to ``(N, D)``."""

    def __init__(self, extractor: nn.Module, node: str, pool: str) -> None:
        super().__init__()
        self.extractor = extractor
        self.node = node
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.extractor(x)[self.node]
        return pool_features(out, self.pool)


def tracer_kwargs(leaf_modules: tuple[type, ...]) -> dict[str, Any] | None:
    """torch.fx tracer arguments keeping ``leaf_modules`` untraced."""
    return {"leaf_modules": list(leaf_modules)} if leaf_modules else None


def graph_node_names(model: nn.Module, *, leaf_modules: tuple[type, ...] = ()) -> list[str]:
    """Node names of ``model``'s eval-mode torch.fx graph, usable as ``layer=``.

    Args:
        model: the full network.
        leaf_modules: module classes that torch.fx must not trace into.
    """
    from torchvision.models.feature_extraction import get_graph_node_names

    return get_graph_node_names(model, tracer_kwargs=tracer_kwargs(leaf_modules))[1]


def truncate_at_layer(
    model: nn.Module, *, layer: str, pool: str, leaf_modules: tuple[type, ...] = ()
) -> nn.Module:
    """A module returning graph node ``layer`` of ``model``, pooled to ``(N, D)``.

    Args:
        model: the full network.
        layer: a graph node name, or a module name standing for its last node.
        pool: one of :data:`~embedcache.models.pooling.POOLS`.
        leaf_modules: module classes that torch.fx must not trace into.

    Raises:
        ConfigError: ``layer`` names no node; the message suggests close names.
    """
    from torchvision.models.feature_extraction import create_feature_extractor

    check_node(model, layer, graph_node_names(model, leaf_modules=leaf_modules))
    extractor = create_feature_extractor(
        model, return_nodes=[layer], tracer_kwargs=tracer_kwargs(leaf_modules)
    )
    return PooledNode(extractor, layer, pool)


def check_node(model: nn.Module, layer: str, eval_nodes: list[str]) -> None:
    """``layer`` names a node of ``eval_nodes`` (or a module standing for its last node).

    Raises:
        ConfigError: it does not; the message suggests close names.
    """
    # A module name ("layer3") stands for its last node, as in torchvision's feature extraction.
    if not any(node == layer or node.startswith(layer + ".") for node in eval_nodes):
        modules = [name for name, _ in model.named_modules() if name]
        close = difflib.get_close_matches(layer, modules + eval_nodes, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(
            f"The 'layer' parameter must name a node of the model graph. Got {layer!r}.{hint} "
            f"Nodes: {', '.join(eval_nodes[:8])} ... {', '.join(eval_nodes[-8:])} "
            f"(`embedcache backbones NAME --nodes` lists all)."
        )


def truncate_default(model: nn.Module) -> nn.Module:
    """Cut the classifier: the final ``nn.Linear`` becomes an identity (in place).

    Raises:
        ConfigError: the model has neither a final ``nn.Linear`` nor a SqueezeNet-style head.
    """
    if has_linear(model):
        parent, attr, _ = final_linear(model)
        setattr(parent, attr, nn.Identity())
        return model
    # SqueezeNet-style heads: a 1x1 conv classifier. Keep the conv trunk, average-pool it.
    if hasattr(model, "features") and hasattr(model, "classifier"):
        return nn.Sequential(model.features, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    raise ConfigError(
        "This model has no final nn.Linear to cut; pass --layer NODE (see `embedcache backbones NAME --nodes`)."
    )


def freeze(module: nn.Module) -> nn.Module:
    """Frozen means eval() (BatchNorm/Dropout fixed) and no gradients."""
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    return module


def probe_dim(module: nn.Module, preprocess: PreprocessSpec) -> int:
    """Feature dimension from one tiny forward pass (exact for every truncation)."""
    size = preprocess.crop_size
    with torch.inference_mode():
        out = module(torch.zeros(1, 3, size, size))
    if out.ndim != 2:
        raise ConfigError(
            f"The backbone returned features of shape {tuple(out.shape)}; expected (N, D). "
            f"Choose a layer with --layer and a pooling with --pool."
        )
    return int(out.shape[1])
