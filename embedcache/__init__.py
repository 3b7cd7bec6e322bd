"""embedcache: extract image features once with a frozen pretrained backbone, cache them in
HDF5, and train linear heads on the cached features in seconds.

Public API::

    import embedcache
    store = embedcache.extract("data/flowers", backbone="efficientnet_lite0")
    store.features, store.labels, store.splits      # numpy arrays
    result = embedcache.probe(store, out="probes/flowers")   # penalty sweep, refit, test
    embedcache.predict("probes/flowers", ["new_photo.jpg"])
    embedcache.finetune("probes/flowers", "data/flowers")   # LP->FT, checkpointed, resumable
"""

from embedcache.backbones import (
    Backbone,
    BackboneParts,
    get_backbone,
    list_backbones,
    register_backbone,
)
from embedcache.errors import (
    CacheError,
    CacheLockedError,
    ConfigError,
    DataSourceError,
    DecodeError,
    EmbedcacheError,
    TooManyErrorsError,
    UnknownBackboneError,
    WeightsError,
)
from embedcache.preprocess import PreprocessSpec
from embedcache.store import FeatureStore

__version__ = "0.1.0"

# Imported after __version__ (extract records it). Binding the function name here, after the
# submodule import, makes `embedcache.extract` the function, as the public API promises.
from embedcache.artifacts import LoadedProbe, load_probe, predict  # noqa: E402
from embedcache.bench import bench, fewshot  # noqa: E402
from embedcache.data import open_source  # noqa: E402
from embedcache.extract import extract  # noqa: E402
from embedcache.finetune import FinetuneResult, finetune  # noqa: E402
from embedcache.probe import ProbeResult, SklearnProbe, TorchLinearProbe, probe  # noqa: E402

__all__ = [
    "Backbone",
    "BackboneParts",
    "CacheError",
    "CacheLockedError",
    "ConfigError",
    "DataSourceError",
    "DecodeError",
    "EmbedcacheError",
    "FeatureStore",
    "FinetuneResult",
    "LoadedProbe",
    "ProbeResult",
    "SklearnProbe",
    "TorchLinearProbe",
    "PreprocessSpec",
    "TooManyErrorsError",
    "UnknownBackboneError",
    "WeightsError",
    "__version__",
    "bench",
    "extract",
    "fewshot",
    "finetune",
    "get_backbone",
    "list_backbones",
    "load_probe",
    "open_source",
    "predict",
    "probe",
    "register_backbone",
]
