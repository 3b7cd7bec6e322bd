"""The backbone registry: a dict of names to factories, filled by :func:`register_backbone`.

A factory is called as ``factory(weights=TAG_OR_NONE, weights_path=PATH_OR_NONE)`` and returns
:class:`~embedcache.models.backbone.BackboneParts`. Built-ins register here like any plugin
(:mod:`embedcache.models.builtins`); names are resolved by :mod:`embedcache.models.catalog`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from embedcache.errors import ConfigError
from embedcache.models.backbone import BackboneParts
from embedcache.models.preprocess import PreprocessSpec

Factory = Callable[..., BackboneParts]
#: ``(weights, weights_path) -> files``: the files whose (path, size, mtime) identify the weights
#: a factory loads besides ``weights_path`` itself ([] = none: deterministic), so that a cache
#: hit need not build the model.
WeightsFiles = Callable[[str | None, str | None], list[Path]]


@dataclass(frozen=True)
class Registration:
    """One registered backbone name."""

    factory: Factory
    description: str
    dim: int | None
    input_size: int | None
    offline_ready: Callable[[], bool]
    preprocess: PreprocessSpec | None
    weights_files: WeightsFiles | None


_REGISTRY: dict[str, Registration] = {}


def register_backbone(
    name: str,
    *,
    description: str = "",
    dim: int | None = None,
    input_size: int | None = None,
    offline_ready: Callable[[], bool] | bool = False,
    preprocess: PreprocessSpec | None = None,
    weights_files: WeightsFiles | None = None,
    override: bool = False,
) -> Callable[[Factory], Factory]:
    """Decorator registering ``factory(weights=..., weights_path=...) -> BackboneParts``.

    Args:
        name: the name users pass to ``--backbone``.
        description: one line for ``embedcache backbones``.
        dim: feature dimension of the default truncation, when known without building.
        input_size: default input size in pixels, when known.
        offline_ready: whether the default weights are available with no download (or a
            callable answering that).
        preprocess: the default preprocessing, shown by ``embedcache backbones``.
        weights_files: ``f(weights, weights_path) -> [paths]`` naming the files the factory
            loads for those arguments, besides ``weights_path`` ([] when the result is otherwise
            deterministic, e.g. a seeded random init). With it, a cache hit reuses the remembered
            weights hash instead of building the model; without it the model is built every time.
        override: replace an existing registration of ``name`` (otherwise that is an error).

    Raises:
        ConfigError: ``name`` is registered already and ``override`` is False.
    """
    if name in _REGISTRY and not override:
        raise ConfigError(
            f"A backbone named {name!r} is registered already. Pick another name, or pass "
            f"override=True to replace it."
        )

    def decorator(factory: Factory) -> Factory:
        check = offline_ready if callable(offline_ready) else (lambda: bool(offline_ready))
        _REGISTRY[name] = Registration(factory, description, dim, input_size, check, preprocess,
                                       weights_files)
        return factory

    return decorator


def unregister_backbone(name: str) -> None:
    """Remove a registration (mainly for tests)."""
    _REGISTRY.pop(name, None)


def registration(name: str) -> Registration | None:
    """The registration of ``name``, or None."""
    return _REGISTRY.get(name)


def registered() -> dict[str, Registration]:
    """A copy of every registration, by name."""
    return dict(_REGISTRY)
