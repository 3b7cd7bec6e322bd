"""Several feature sets from one forward pass: the penultimate features plus pooled intermediate nodes.

``--layers a,b --pool avg,max`` asks for every (layer, pool) pair; :func:`multi_set_module` builds
one torch.fx feature extractor returning all the nodes at once, pools each, and concatenates the
results after the penultimate features, so the inference loop still sees one ``(N, D_total)``
tensor per batch and the model runs once per image. Each set is named ``<node>:<pool>``.

Presets stand for lists of nodes, resolved against the model's structure:
``stages`` (CNNs: the output of each stage) and ``last4`` (ViTs: the last four encoder blocks,
pooled ``cls`` and ``avg`` unless ``--pool`` says otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from embedcache.errors import ConfigError
from embedcache.models.pooling import PRESETS, VIT_POOLS, check_pools, pool_features_fast
from embedcache.models.truncate import check_node, graph_node_names, tracer_kwargs


def _stage_nodes(model: nn.Module, size: int) -> list[str]:
    """The output node of each stage of a CNN (see :data:`PRESETS`)."""
    names = [f"layer{i}" for i in range(1, 10) if hasattr(model, f"layer{i}")]
    if len(names) >= 2:
        return names
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        raise ConfigError("The 'stages' preset needs a ResNet-style model (layer1, layer2, ...) or one with an "
                          "nn.Sequential `features`; this one has neither. Name the nodes with --layers "
                          "(see `embedcache backbones NAME --nodes`).")
    shapes: list[tuple[str, tuple[int, ...]]] = []
    x = torch.zeros(1, 3, size, size)
    with torch.inference_mode():
        for name, child in features.named_children():
            x = child(x)
            shapes.append((f"features.{name}", tuple(x.shape)))
    # the last child of each run of children with the same output shape
    return [name for i, (name, shape) in enumerate(shapes) if i + 1 == len(shapes) or shapes[i + 1][1] != shape]


def _last_blocks(model: nn.Module, count: int = 4) -> list[str]:
    for parent in ("encoder.layers", "blocks"):
        try:
            blocks = model.get_submodule(parent)
        except AttributeError:
            continue
        names = [f"{parent}.{name}" for name, _ in blocks.named_children()]
        if len(names) >= count:
            return names[-count:]
    raise ConfigError(f"The 'last4' preset needs a ViT (torchvision `encoder.layers` or timm `blocks` with at least "
                      f"{count} blocks); this model has neither. Name the nodes with --layers.")


def resolve_sets(model: nn.Module, *, layers: Sequence[str], pools: Sequence[str], size: int,
                 leaf_modules: tuple[type, ...] = ()) -> list[tuple[str, str]]:
    """``[(node, pool)]`` of the asked sets, presets expanded, every node checked.

    Args:
        model: the full network (for node names and presets).
        layers: node names and presets.
        pools: the pools of every node (empty: ``avg``, ``last4``: cls and avg).
        size: input side used to find stage boundaries.
        leaf_modules: module classes that torch.fx must not trace into.
    """
    pools = check_pools(pools)
    pairs: list[tuple[str, str]] = []
    nodes = graph_node_names(model, leaf_modules=leaf_modules)
    for layer in layers:
        if layer == "stages":
            expanded, layer_pools = _stage_nodes(model, size), pools or ["avg"]
        elif layer == "last4":
            expanded, layer_pools = _last_blocks(model), pools or list(VIT_POOLS)
        else:
            check_node(model, layer, nodes)
            expanded, layer_pools = [layer], pools or ["avg"]
        pairs += [(node, pool) for node in expanded for pool in layer_pools]
    if not pairs:
        raise ConfigError("The 'layers' parameter names no node. Give node names or a preset "
                          f"({', '.join(PRESETS)}), comma-separated.")
    return list(dict.fromkeys(pairs))


class MultiSetModule(nn.Module):
    """One forward pass -> ``[penultimate | set 1 | set 2 ...]`` concatenated along dim 1."""

    def __init__(self, extractor: nn.Module, default_node: str, pairs: Sequence[tuple[str, str]]) -> None:
        super().__init__()
        self.extractor = extractor
        self.default_node = default_node
        self.pairs = list(pairs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.extractor(x)
        parts = [torch.flatten(out[self.default_node], 1)]
        parts += [pool_features_fast(out[node], pool) for node, pool in self.pairs]
        return torch.cat(parts, dim=1)


def multi_set_module(truncated: nn.Module, pairs: Sequence[tuple[str, str]], *,
                     leaf_modules: tuple[type, ...] = ()) -> MultiSetModule:
    """Every set of ``pairs`` plus the penultimate features of ``truncated`` (the network with
    its classifier cut, or a features-ready module), from one traced graph.

    Raises:
        ConfigError: the model cannot be traced by torch.fx.
    """
    from torchvision.models.feature_extraction import create_feature_extractor

    try:
        nodes = graph_node_names(truncated, leaf_modules=leaf_modules)
        default_node = nodes[-1]  # the node feeding the output: the penultimate features
        return_nodes = list(dict.fromkeys([default_node, *(node for node, _ in pairs)]))
        extractor = create_feature_extractor(truncated, return_nodes=return_nodes,
                                             tracer_kwargs=tracer_kwargs(leaf_modules))
    except (TypeError, RuntimeError, NotImplementedError, AttributeError) as exc:
        raise ConfigError(f"--layers needs a model that torch.fx can trace; this one cannot be "
                          f"({type(exc).__name__}: {exc}). Use --layer NODE for one set at a time.") from None
    return MultiSetModule(extractor, default_node, pairs)


def check_default_matches(module: MultiSetModule, truncated: nn.Module, *, size: int) -> None:
    """The first columns of ``module`` are exactly the penultimate features of ``truncated``.

    Raises:
        ConfigError: they differ (the traced graph's last node is not the model's output).
    """
    with torch.inference_mode(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        x = torch.randn(2, 3, size, size)
        expected = truncated(x)
        got = module(x)[:, : expected.shape[1]]
    if expected.ndim != 2 or not torch.allclose(expected, got, rtol=1e-5, atol=1e-6):
        raise ConfigError("--layers could not locate this model's penultimate features in its traced graph "
                          "(its last node is not the output). Use --layer NODE for one set at a time.")


def set_dims(module: MultiSetModule, *, size: int) -> tuple[int, list[int]]:
    """``(default dim, [dim of each set])`` from one forward pass on zeros."""
    with torch.inference_mode():
        out = module.extractor(torch.zeros(1, 3, size, size))
        default = torch.flatten(out[module.default_node], 1).shape[1]
        dims = [int(pool_features_fast(out[node], pool).shape[1]) for node, pool in module.pairs]
    return int(default), dims
