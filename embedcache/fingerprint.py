"""The cache key: one canonical-JSON sha256 over everything that changes the stored numbers.

IN the key (see :func:`cache_key_payload`):
    format_version, backbone name, weights tag, weights content sha256, layer, pool,
    preprocessing spec, resolved precision, store dtype, decoder version, manifest sha256
    (sorted relative path, size, mtime_ns, label, split), torch and torchvision major.minor.

NOT in the key (:data:`NOT_IN_KEY`): they change speed or location, never the numbers we promise.
Same key ⇒ reuse; any change ⇒ a new entry, never a stale hit.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from typing import Any

import torch

#: Bump when the HDF5 layout or the meaning of a stored value changes.
FORMAT_VERSION = 1

#: Things deliberately left out of the key, with the reason.
NOT_IN_KEY = {
    "batch_size": "rows are computed independently; batching changes speed, not features",
    "workers": "decoding parallelism only",
    "device": "cpu/cuda/mps run the same arithmetic at the resolved precision",
    "cache_dir": "where the entry lives is not what it holds",
    "dataset_root": "paths are stored relative to the root, so a moved dataset is the same entry",
}


def canonical_json(value: Any) -> str:
    """JSON with sorted keys, no whitespace and no NaN, so equal payloads hash equally."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def sha256_json(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def library_versions() -> dict[str, str]:
    """Major.minor of the libraries whose kernels produce the numbers."""
    # The installed distribution's version: same as torchvision.__version__, without paying
    # for importing torchvision (over a second) on commands that never need it.
    return {
        "torch": _major_minor(torch.__version__),
        "torchvision": _major_minor(metadata.version("torchvision")),
    }


def software_versions() -> dict[str, str]:
    """Full versions of the libraries behind stored numbers and artifacts (provenance only;
    the key uses :func:`library_versions`). Read from package metadata, nothing is imported."""
    versions = {}
    for name in ("embedcache", "torch", "torchvision", "Pillow", "scikit-learn", "h5py"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # e.g. running from a checkout that is not installed
            versions[name] = "unknown"
    return versions


def config_payload(
    *,
    backbone: dict[str, Any],
    preprocess: dict[str, Any],
    precision: str,
    store_dtype: str,
    decoder_version: str,
) -> dict[str, Any]:
    """Everything in the key except the data: two entries with equal config keys hold
    interchangeable rows for the same file, which is what incremental extraction relies on."""
    return {
        "format_version": FORMAT_VERSION,
        "backbone": backbone,
        "preprocess": preprocess,
        "precision": precision,
        "store_dtype": store_dtype,
        "decoder": decoder_version,
        "libraries": library_versions(),
    }


def config_key(**config: Any) -> str:
    """sha256 of :func:`config_payload` (keyword arguments as there)."""
    return sha256_json(config_payload(**config))


def cache_key(*, config: str, manifest_sha256: str) -> str:
    """The entry's key: the config key combined with the manifest hash."""
    return sha256_json({"config": config, "manifest": manifest_sha256})


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Content hash of weights: names, dtypes, shapes and raw bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
