"""embedcache: extract image features once with a frozen pretrained backbone, cache them in
HDF5, and train linear heads on the cached features in seconds.

Public API::

    import embedcache
    store = embedcache.extract("data/flowers", backbone="efficientnet_lite0")
    store.features, store.labels, store.splits      # numpy arrays
    result = embedcache.probe(store, out="probes/flowers")   # penalty sweep, refit, test
    embedcache.predict("probes/flowers", ["new_photo.jpg"])
    embedcache.finetune("probes/flowers", "data/flowers")   # LP->FT, checkpointed, resumable

Every name is imported on first use (PEP 562), so ``import embedcache`` loads neither torch nor
scikit-learn. Where each name lives: :data:`_API`; the layers: docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import Any

from embedcache.runtime import package_version

__version__ = package_version("embedcache")

#: public name -> defining module
_API = {
    "Backbone": "embedcache.models.backbone",
    "BackboneParts": "embedcache.models.backbone",
    "BackboneSpec": "embedcache.models.backbone",
    "get_backbone": "embedcache.models.build",
    "list_backbones": "embedcache.models.catalog",
    "register_backbone": "embedcache.models.registry",
    "PreprocessSpec": "embedcache.models.preprocess",
    "CacheError": "embedcache.errors",
    "CacheLockedError": "embedcache.errors",
    "CorruptEntryError": "embedcache.errors",
    "StorageError": "embedcache.errors",
    "ConfigError": "embedcache.errors",
    "DataSourceError": "embedcache.errors",
    "DecodeError": "embedcache.errors",
    "EmbedcacheError": "embedcache.errors",
    "TooManyErrorsError": "embedcache.errors",
    "UnknownBackboneError": "embedcache.errors",
    "WeightsError": "embedcache.errors",
    "Split": "embedcache.splits",
    "ImageSource": "embedcache.sources.base",
    "open_source": "embedcache.sources.open",
    "write_image_folder": "embedcache.sources.materialize",
    "FeatureStore": "embedcache.store.reader",
    "extract": "embedcache.extraction.extract",
    "ExtractResult": "embedcache.extraction.extract",
    "ExtractStats": "embedcache.extraction.extract",
    "TorchLinearProbe": "embedcache.heads.torch_probe",
    "SklearnProbe": "embedcache.heads.sklearn_probe",
    "KNNProbe": "embedcache.heads.knn",
    "RidgeClassifierProbe": "embedcache.heads.ridge_probe",
    "RidgeRegressor": "embedcache.heads.ridge_probe",
    "SigmoidProbe": "embedcache.heads.multilabel",
    "probe": "embedcache.experiments.protocol",
    "probe_all_sets": "embedcache.experiments.feature_sweep",
    "ProbeResult": "embedcache.experiments.protocol",
    "load_probe": "embedcache.experiments.artifacts",
    "LoadedProbe": "embedcache.experiments.artifacts",
    "predict": "embedcache.experiments.predict",
    "PredictResult": "embedcache.experiments.predict",
    "bench": "embedcache.experiments.bench",
    "BenchResult": "embedcache.experiments.bench",
    "fewshot": "embedcache.experiments.fewshot",
    "FewshotResult": "embedcache.experiments.fewshot",
    "finetune": "embedcache.experiments.finetune.run",
    "FinetuneResult": "embedcache.experiments.finetune.run",
    "FinetuneConfig": "embedcache.experiments.finetune.config",
}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'embedcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
