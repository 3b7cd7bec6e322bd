"""Planning an extraction: everything that defines a cache entry, resolved before any model runs.

:func:`plan_extraction` opens the source, resolves the backbone's identity (remembered in the
cache directory, so a cache hit neither builds the model nor hashes its weights), the device and
precision, and from them the cache key and the entry's paths, as a frozen
:class:`ExtractionPlan`. :func:`build_backbone` builds the model when rows must be computed.

Planning a registered backbone (EfficientNet-Lite, ``pixels``, your own) imports no torch: on a
CPU-only machine a cache hit then costs the scan, the manifest hash and reading the entry.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedcache.errors import CacheError, ConfigError
from embedcache.models.backbone import Backbone, BackboneSpec
from embedcache.models.catalog import backbone_identity, files_unchanged, plugin_names
from embedcache.models.pooling import parse_layers, split_list
from embedcache.models.registry import registration
from embedcache.models.runtimes import key_payload, resolve_runtime, resolve_runtime_precision
from embedcache.runtime import package_version, resolve_device_type
from embedcache.sources.base import ImageSource
from embedcache.sources.decode import DECODER_VERSION
from embedcache.sources.open import open_source
from embedcache.sources.views import VIEWS_VERSION, ViewSource, check_views
from embedcache.store.feature_sets import FEATURE_SETS_ATTR, feature_set_attr
from embedcache.store.fingerprint import (
    cache_key,
    config_key,
    library_versions,
    sha256_json,
    software_versions,
)
from embedcache.store.memo import MEMO_NAME, JsonMemo
from embedcache.store.schema import STORE_DTYPES, default_cache_dir, entry_paths


@dataclass(frozen=True)
class BackboneRequest:
    """The backbone as asked for (the arguments of :func:`~embedcache.models.catalog.get_backbone`)."""

    name: str
    weights: str | None = None
    weights_path: str | None = None
    layer: str | None = None
    pool: str = "avg"
    image_size: int | None = None
    layers: tuple[str, ...] = ()
    pools: tuple[str, ...] = ()

    def build(self) -> Backbone:
        from embedcache.models.build import get_backbone  # torch: only when a model is needed

        return get_backbone(self.name, weights=self.weights, weights_path=self.weights_path, layer=self.layer,
                            pool=self.pool, image_size=self.image_size, layers=self.layers, pools=self.pools)

    def identity(self) -> dict[str, Any] | None:
        """What determines the build, when known without building (the memo's key)."""
        return backbone_identity(self.name, weights=self.weights, weights_path=self.weights_path,
                                 layer=self.layer, pool=self.pool, image_size=self.image_size,
                                 layers=self.layers, pools=self.pools)


@dataclass(frozen=True)
class ExtractionPlan:
    """What one extraction will produce and where (no model has run).

    Attributes:
        source: the image source, splits assigned.
        backbone: the backbone's identity (from memory, or from building it once).
        request: how to build the backbone, or None when a built one was given (``built``).
        device, precision: where and how the model runs (resolved: ``cpu``/``cuda``/``mps``).
        runtime: what runs the model (resolved: ``torch``, ``openvino`` or ``onnxruntime``; in the
            key unless torch).
        store_dtype: the on-disk dtype of the features.
        config_key: the key without the data (entries sharing it hold interchangeable rows).
        manifest_sha256: the data's identity.
        cache_key: the entry's key; ``final_path``/``partial_path`` its files.
    """

    source: ImageSource
    backbone: BackboneSpec
    request: BackboneRequest | None
    built: Backbone | None
    device: str
    precision: str
    store_dtype: str
    config_key: str
    manifest_sha256: str
    cache_key: str
    cache_dir: Path
    final_path: Path
    partial_path: Path
    runtime: str = "torch"

    def entry_attrs(self) -> dict[str, Any]:
        """Root attributes written to the entry (besides the writer's own)."""
        source = self.source
        return {
            "name": f"{self.backbone.name}-{Path(source.root).name or source.kind}",
            "config_key": self.config_key,
            "backbone": self.backbone.to_dict(),
            "preprocess": self.backbone.preprocess.to_dict(),
            "precision": self.precision,
            "runtime": self.runtime,
            "decoder_version": DECODER_VERSION,
            "versions": {**software_versions(), "key_libraries": library_versions()},
            "manifest_sha256": self.manifest_sha256,
            "source": source.to_dict(),
            "class_names": list(source.class_names),
            **({FEATURE_SETS_ATTR: feature_set_attr(self.backbone.feature_sets)} if self.backbone.feature_sets else {}),
            **({"views": source.views, "augment": source.augment, "n_images": source.n_images}
               if isinstance(source, ViewSource) else {}),
        }


def _memo(cache_dir: Path) -> JsonMemo:
    return JsonMemo(cache_dir / MEMO_NAME)


#: Environment variables that move torch's hub directory (where torchvision weights files live).
HUB_VARIABLES = ("TORCH_HOME", "XDG_CACHE_HOME")


def _request_identity(request: BackboneRequest, cache_dir: Path) -> dict[str, Any] | None:
    """``request.identity()``, remembered in the memo for torchvision names: telling that a name is
    torchvision's, and where its weights file lives, imports torchvision and torch (seconds), which
    a cache hit or a run of a cached export does not otherwise need. The remembered identity is
    keyed by the request, the library versions, the hub variables and the plugins' names (a
    plugin may shadow a torchvision name), and used only while its weights files are unchanged."""
    if registration(request.name) is not None or ":" in request.name:
        return request.identity()  # registered: cheap already; plugin/timm/module: never known
    key = "request:" + sha256_json({
        "request": dataclasses.asdict(request), "plugins": plugin_names(),
        "versions": {p: package_version(p) for p in ("embedcache", "torch", "torchvision")},
        "hub": {v: os.environ.get(v) for v in HUB_VARIABLES}})
    remembered = _memo(cache_dir).get(key)
    if isinstance(remembered, dict) and files_unchanged(remembered):
        return remembered
    identity = request.identity()
    if identity is not None:
        _memo(cache_dir).put(key, identity)
    return identity


def _backbone_spec(request: BackboneRequest, cache_dir: Path) -> tuple[BackboneSpec, Backbone | None]:
    """The identity of the requested backbone: remembered, or learnt by building it (then kept)."""
    identity = _request_identity(request, cache_dir)
    memo_key = None if identity is None else sha256_json(identity)
    if memo_key is not None:
        remembered = _memo(cache_dir).get(memo_key)
        if isinstance(remembered, dict):
            try:
                return BackboneSpec.from_memo(remembered), None
            except (KeyError, TypeError, ValueError, ConfigError):
                pass  # a foreign or damaged memo entry: rebuild and overwrite it
    built = request.build()
    if memo_key is not None:
        _memo(cache_dir).put(memo_key, built.identity().to_memo())
    return built.identity(), built


def plan_extraction(
    data: str | os.PathLike | ImageSource,
    *,
    backbone: str | Backbone = "efficientnet_lite0",
    weights: str | None = None,
    weights_path: str | os.PathLike | None = None,
    layer: str | None = None,
    pool: str = "avg",
    image_size: int | None = None,
    layers: str | list[str] | tuple[str, ...] | None = None,
    pools: str | list[str] | tuple[str, ...] | None = None,
    device: str = "auto",
    precision: str = "auto",
    store_dtype: str = "float16",
    cache_dir: str | os.PathLike | None = None,
    unlabelled: bool | None = None,
    val_fraction: float = 0.0,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    targets: list[str] | None = None,
    worker_device: str | None = None,
    runtime: str | None = None,
    views: int = 1,
    augment: str | None = None,
) -> ExtractionPlan:
    """Resolve everything that defines an entry (no model run); arguments as for
    :func:`~embedcache.extraction.extract.extract`, and ``worker_device``: the device type the
    backbone runs on when that is not this process's (``cuda`` for the ray engine's GPU actors,
    with a driver that may have no GPU); ``device`` is then not resolved here."""
    if store_dtype not in STORE_DTYPES:
        raise ConfigError(f"The 'store_dtype' parameter must be one of {list(STORE_DTYPES)}. Got {store_dtype!r}.")
    views, augment = check_views(views, augment)
    if views > 1 and isinstance(data, ViewSource):
        raise ConfigError("The source already holds views; pass its base source, or views=1.")
    source = data if isinstance(data, ImageSource) else open_source(
        data, unlabelled=unlabelled, val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed,
        targets=targets)
    if len(source) == 0:
        raise ConfigError(f"The data source {source.description!r} holds no images.")
    if views > 1:
        source = ViewSource(source, views, augment)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if cache_dir.exists() and not cache_dir.is_dir():
        raise CacheError(f"The cache directory {str(cache_dir)!r} is a file, not a directory. Pass --cache-dir DIR "
                         f"(or set EMBEDCACHE_DIR) to a directory.")
    if isinstance(backbone, Backbone) and (layers or pools):
        raise ConfigError("The 'layers' and 'pools' parameters apply to a backbone given by name; a built "
                          "Backbone already has its feature sets (get_backbone(..., layers=...)).")
    if isinstance(backbone, Backbone):
        request, built, spec = None, backbone, backbone.identity()
    else:
        request = BackboneRequest(backbone, weights, None if weights_path is None else str(weights_path),
                                  layer, pool, image_size, tuple(parse_layers(layers)), tuple(split_list(pools)))
        spec, built = _backbone_spec(request, cache_dir)
    dev = worker_device or resolve_device_type(device)
    resolved = resolve_runtime(runtime, dev, backbone_name=spec.name, precision=precision)
    return _keyed_plan(source, spec, request, built, dev, resolve_runtime_precision(resolved, precision, dev),
                       store_dtype, cache_dir, resolved)


def _config_key(source: ImageSource, spec: BackboneSpec, precision: str, store_dtype: str, runtime: str) -> str:
    return config_key(backbone={k: v for k, v in spec.to_dict().items() if k != "dim"},
                      preprocess=spec.preprocess.to_dict(), precision=precision, store_dtype=store_dtype,
                      decoder_version=DECODER_VERSION, runtime=key_payload(runtime),
                      views=({"k": source.views, "augment": source.augment, "version": VIEWS_VERSION}
                             if isinstance(source, ViewSource) else None))


def config_key_with_sets(plan: ExtractionPlan, feature_sets: tuple[tuple[str, int], ...]) -> str:
    """The config key ``plan`` would have with these extra feature sets instead of its own: an
    entry of the same images whose ``config_key`` attribute equals it holds the same default
    features, and each of its sets is the same node, pool and preprocessing as ours of that name."""
    spec = dataclasses.replace(plan.backbone, feature_sets=tuple(feature_sets))
    return _config_key(plan.source, spec, plan.precision, plan.store_dtype, plan.runtime)


def _keyed_plan(source: ImageSource, spec: BackboneSpec, request: BackboneRequest | None, built: Backbone | None,
                device: str, precision: str, store_dtype: str, cache_dir: Path, runtime: str) -> ExtractionPlan:
    cfg_key = _config_key(source, spec, precision, store_dtype, runtime)
    manifest = source.manifest_sha256()
    key = cache_key(config=cfg_key, manifest_sha256=manifest)
    final, partial, _ = entry_paths(cache_dir, key)
    return ExtractionPlan(source, spec, request, built, device, precision, store_dtype, cfg_key, manifest, key,
                          cache_dir, final, partial, runtime)


def build_backbone(plan: ExtractionPlan) -> tuple[Backbone, ExtractionPlan]:
    """The plan's backbone, built; and the plan, re-keyed in the rare case that the remembered
    identity no longer matches the built model (the memo is then corrected)."""
    if plan.built is not None:
        return plan.built, plan
    bb = plan.request.build()
    if bb.identity() == plan.backbone:
        return bb, dataclasses.replace(plan, built=bb)
    memo_identity = plan.request.identity()
    if memo_identity is not None:
        _memo(plan.cache_dir).put(sha256_json(memo_identity), bb.identity().to_memo())
    return bb, _keyed_plan(plan.source, bb.identity(), plan.request, bb, plan.device, plan.precision,
                           plan.store_dtype, plan.cache_dir, plan.runtime)
