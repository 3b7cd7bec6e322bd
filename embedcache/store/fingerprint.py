"""The cache key: one canonical-JSON sha256 over everything that changes the stored numbers.

IN the key (see :func:`config_payload`):
    format_version, backbone name, weights tag, weights content sha256, layer, pool,
    preprocessing spec, resolved precision, store dtype, decoder version, manifest sha256
    (sorted relative path, size, mtime_ns, label, split), torch, torchvision and Pillow
    major.minor.

NOT in the key (:data:`NOT_IN_KEY`): they change speed or location, never the numbers we promise.
Same key => reuse; any change => a new entry, never a stale hit.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from embedcache.runtime import package_version
from embedcache.store.schema import FORMAT_VERSION

#: Things deliberately left out of the key, with the reason.
NOT_IN_KEY = {
    "batch_size": "rows are computed independently; batching changes speed, not features",
    "workers": "decoding parallelism only",
    "device": "cpu/cuda/mps run the same arithmetic at the resolved precision",
    "cache_dir": "where the entry lives is not what it holds",
    "dataset_root": "paths are stored relative to the root, so a moved dataset is the same entry",
}
#: Libraries whose major.minor is in the key: the model kernels (torch, torchvision) and the
#: decoder and resizer of every image (Pillow).
KEY_PACKAGES = ("torch", "torchvision", "Pillow")
#: Libraries whose full versions are recorded with stored numbers and artifacts (provenance).
RECORDED_PACKAGES = ("embedcache", "torch", "torchvision", "Pillow", "scikit-learn", "h5py")


def canonical_json(value: Any) -> str:
    """JSON with sorted keys, no whitespace and no NaN, so equal payloads hash equally."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def sha256_json(value: Any) -> str:
    """sha256 hex digest of :func:`canonical_json`."""
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def library_versions() -> dict[str, str]:
    """Major.minor of the libraries whose kernels produce the numbers (read from package
    metadata: nothing is imported)."""
    return {name: _major_minor(package_version(name)) for name in KEY_PACKAGES}


def software_versions() -> dict[str, str]:
    """Full versions of the libraries behind stored numbers and artifacts (provenance only;
    the key uses :func:`library_versions`)."""
    return {name: package_version(name) for name in RECORDED_PACKAGES}


def config_payload(
    *,
    backbone: dict[str, Any],
    preprocess: dict[str, Any],
    precision: str,
    store_dtype: str,
    decoder_version: str,
    runtime: dict[str, str] | None = None,
    views: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything in the key except the data: two entries with equal config keys hold
    interchangeable rows for the same file, which is what incremental extraction relies on.
    ``runtime`` is the inference runtime when it is not torch (absent for torch, so entries
    made before runtimes existed keep their keys); ``views`` the augmented views of the train
    images (``extract --views``; absent without them, for the same reason)."""
    payload = {
        "format_version": FORMAT_VERSION,
        "backbone": backbone,
        "preprocess": preprocess,
        "precision": precision,
        "store_dtype": store_dtype,
        "decoder": decoder_version,
        "libraries": library_versions(),
    }
    if runtime is not None:
        payload["runtime"] = runtime
    if views is not None:
        payload["views"] = views
    return payload


def config_key(**config: Any) -> str:
    """sha256 of :func:`config_payload` (keyword arguments as there)."""
    return sha256_json(config_payload(**config))


def cache_key(*, config: str, manifest_sha256: str) -> str:
    """The entry's key: the config key combined with the manifest hash."""
    return sha256_json({"config": config, "manifest": manifest_sha256})
