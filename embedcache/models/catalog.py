"""Names to factories: resolution, what identifies a build (for the cache-hit memo), listings.

A name is looked up in this order: the registry (built-ins and :func:`register_backbone`), the
entry-point group ``embedcache.backbones``, ``timm:<name>``, ``module.path:factory``, then every
torchvision classification model. Building is :mod:`embedcache.models.build`'s job; nothing here
imports torch for registered names.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedcache.errors import UnknownBackboneError
from embedcache.models import builtins
from embedcache.models.backbone import BackboneInfo
from embedcache.models.preprocess import describe_preprocess
from embedcache.models.registry import Factory, WeightsFiles, registered, registration
from embedcache.runtime import package_version

ENTRY_POINT_GROUP = "embedcache.backbones"


@dataclass(frozen=True)
class Resolved:
    """A name resolved to its factory (and, when known, the files its weights come from)."""

    factory: Factory
    weights_files: WeightsFiles | None


def _entry_point_factories() -> dict[str, Any]:
    from importlib import metadata  # here: its import is 20 ms of a command that never asks

    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def plugin_names() -> list[str]:
    """The names backbone plugins register (entry points; nothing is imported)."""
    return sorted(_entry_point_factories())


def files_unchanged(identity: dict[str, Any]) -> bool:
    """Whether every weights file an identity (:func:`backbone_identity`) lists still has its
    recorded (path, size, mtime)."""
    files = identity.get("files")
    return isinstance(files, list) and all(
        isinstance(f, list) and len(f) == 3 and _file_identity(f[0]) == f for f in files)


def _import_factory(spec: str) -> Factory:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise UnknownBackboneError(
            f"Could not import backbone factory {spec!r} ({exc}). A 'module.path:factory' backbone "
            f"needs an importable module and a callable named after the colon."
        ) from exc


def resolve(name: str) -> Resolved:
    """The factory behind ``name``; unknown names are answered with close matches."""
    reg = registration(name)
    if reg is not None:
        return Resolved(reg.factory, reg.weights_files)
    plugins = _entry_point_factories()
    if name in plugins:
        return Resolved(plugins[name].load(), None)
    if name.startswith("timm:"):
        return Resolved(functools.partial(builtins.timm_factory, name[len("timm:"):]), None)
    if ":" in name:
        return Resolved(_import_factory(name), None)
    if name in builtins.torchvision_names():
        return Resolved(functools.partial(builtins.torchvision_factory, name),
                        functools.partial(builtins.torchvision_weights_files, name))
    close = difflib.get_close_matches(name, known_names(), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownBackboneError(
        f"Unknown backbone {name!r}.{hint} See `embedcache backbones` for the list "
        f"(any torchvision classification model, the offline 'efficientnet_lite0', "
        f"'module.path:factory', or 'timm:<name>' with timm installed)."
    )


def known_names() -> list[str]:
    """Every registered, plugin and torchvision name."""
    return sorted(set(registered()) | set(_entry_point_factories()) | set(builtins.torchvision_names()))


def _file_identity(path: str | os.PathLike) -> list[Any] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [os.path.realpath(path), stat.st_size, stat.st_mtime_ns]


def backbone_identity(name: str, *, weights: str | None = None, weights_path: str | os.PathLike | None = None,
                      layer: str | None = None, pool: str = "avg", image_size: int | None = None,
                      layers: list[str] | tuple[str, ...] = (), pools: list[str] | tuple[str, ...] = (),
                      ) -> dict[str, Any] | None:
    """What determines :func:`get_backbone`'s result, as plain data, when that is known without
    building it: the arguments, the (path, size, mtime) of every weights file it reads, and the
    library versions. None when it cannot be known (plugins, timm, ``module:factory``, a missing
    file): then the model must be built to learn its weights hash."""
    resolved = resolve(name)
    if resolved.weights_files is None:
        return None
    files = [*resolved.weights_files(weights, None if weights_path is None else str(weights_path))]
    if weights_path is not None:
        files.append(Path(weights_path))
    identities = [_file_identity(f) for f in files]
    if any(i is None for i in identities):
        return None
    identity = {"name": name, "weights": weights, "layer": layer, "pool": pool, "image_size": image_size,
                "files": identities,
                "versions": {p: package_version(p) for p in ("embedcache", "torch", "torchvision")}}
    if layers:  # only then: a plain extraction keeps the memo key it always had
        identity["layers"], identity["pools"] = list(layers), list(pools)
    return identity


def list_backbones(*, with_torchvision_dims: bool = True) -> list[BackboneInfo]:
    """Every backbone name that :func:`get_backbone` accepts (plus ``timm:<name>`` if installed).

    Args:
        with_torchvision_dims: compute each torchvision model's feature dim (builds it on the
            meta device; a few seconds for all of them).
    """
    from torchvision.models import get_model_weights

    rows = [BackboneInfo(name=name, source="builtin", description=reg.description, dim=reg.dim,
                         input_size=reg.input_size, offline_ready=reg.offline_ready(),
                         preprocess=describe_preprocess(reg.preprocess))
            for name, reg in sorted(registered().items())]
    rows += [BackboneInfo(name, "plugin", "entry point", None, None, False) for name in sorted(_entry_point_factories())]
    for name in builtins.torchvision_names():
        enum = get_model_weights(name)
        transforms = enum.DEFAULT.transforms()
        rows.append(BackboneInfo(
            name=name, source="torchvision", description=f"torchvision {name}",
            dim=builtins.torchvision_dim(name) if with_torchvision_dims else None,
            input_size=int(transforms.crop_size[0]),
            offline_ready=builtins.tv_checkpoint_path(enum.DEFAULT).exists(),
            weights=tuple(w.name for w in enum),
            preprocess=describe_preprocess(builtins.preprocess_from_tv_transforms(transforms))))
    return rows
