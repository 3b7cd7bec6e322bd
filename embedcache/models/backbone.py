"""What a backbone factory returns, what extraction consumes, and a backbone's identity, as
plain dataclasses (importing them loads no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from embedcache.models.preprocess import PreprocessSpec

if TYPE_CHECKING:  # the types need no torch at run time: a cache hit never builds a model
    from torch import nn

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


@dataclass(frozen=True)
class BackboneSpec:
    """A built backbone's identity as plain data: what the cache key and probe artifacts record.

    Known without building the model when remembered (see ``catalog.backbone_identity``).
    """

    name: str
    weights_tag: str
    weights_sha256: str
    layer: str | None
    pool: str
    dim: int
    preprocess: PreprocessSpec
    #: Extra feature sets computed in the same pass, ``((name, dim), ...)`` (see
    #: :mod:`embedcache.models.feature_sets`); empty for a plain extraction.
    feature_sets: tuple[tuple[str, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The ``backbone`` attribute of cache entries: name, weights, weights_sha256, layer,
        pool (None without layer), dim, and ``feature_sets`` (their names) only when there are any,
        so a plain extraction's attribute, hence its cache key, is what it always was."""
        spec = {"name": self.name, "weights": self.weights_tag, "weights_sha256": self.weights_sha256,
                "layer": self.layer, "pool": self.pool if self.layer else None, "dim": self.dim}
        if self.feature_sets:
            spec["feature_sets"] = [name for name, _ in self.feature_sets]
        return spec

    @property
    def total_dim(self) -> int:
        """Columns of the module's output: the default features then every extra set."""
        return self.dim + sum(dim for _, dim in self.feature_sets)

    def to_memo(self) -> dict[str, Any]:
        """Everything, as JSON-able data (see :meth:`from_memo`)."""
        return {**self.to_dict(), "pool": self.pool, "preprocess": self.preprocess.to_dict(),
                "feature_set_dims": [[name, dim] for name, dim in self.feature_sets]}

    @classmethod
    def from_memo(cls, data: dict[str, Any]) -> BackboneSpec:
        """The inverse of :meth:`to_memo`."""
        return cls(name=data["name"], weights_tag=data["weights"], weights_sha256=data["weights_sha256"],
                   layer=data["layer"], pool=data["pool"], dim=int(data["dim"]),
                   preprocess=PreprocessSpec.from_dict(data["preprocess"]),
                   feature_sets=tuple((str(n), int(d)) for n, d in data.get("feature_set_dims", [])))


@dataclass
class Backbone:
    """A frozen, truncated feature extractor ready for extraction."""

    name: str
    module: nn.Module
    preprocess: PreprocessSpec
    dim: int
    weights_tag: str
    weights_sha256: str
    layer: str | None = None
    pool: str = "avg"
    #: Extra feature sets ``((name, dim), ...)`` whose columns follow the default ``dim`` ones
    #: in the module's output.
    feature_sets: tuple[tuple[str, int], ...] = ()
    #: The whole network the module was cut from (parameters shared with ``module``): what
    #: fine-tuning exports, so the weights file loads back into the architecture by name.
    network: nn.Module | None = field(default=None, repr=False)

    def identity(self) -> BackboneSpec:
        """This backbone's :class:`BackboneSpec`."""
        return BackboneSpec(self.name, self.weights_tag, self.weights_sha256, self.layer, self.pool,
                            self.dim, self.preprocess, self.feature_sets)

    def spec(self) -> dict[str, Any]:
        """The identity stored in the cache and in probe artifacts (plain data)."""
        return self.identity().to_dict()


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
