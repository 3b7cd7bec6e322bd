"""Which inference runtime runs the frozen backbone: torch, or OpenVINO on CPU.

The runtime changes the numbers (OpenVINO fuses and orders operations its own way), so a
resolved runtime other than torch is part of the cache key (:func:`key_payload`). Resolving a
runtime imports nothing heavy: a cache hit stays as cheap with OpenVINO installed as without.

``auto`` (the default; ``EMBEDCACHE_RUNTIME`` overrides it) is a fixed, documented rule, not a
measurement: OpenVINO when it is installed, the device is the CPU and the backbone has a network
to run (not ``pixels``); torch otherwise. On the 2-core Xeon of docs/benchmarks.md OpenVINO ran
the same truncated backbones 2-4x faster than torch (both bf16), whole process included.
"""

from __future__ import annotations

import importlib.util
import os

from embedcache.errors import ConfigError
from embedcache.runtime import package_version

RUNTIMES = ("auto", "torch", "openvino")
#: Environment variable giving the default runtime (``auto`` when unset).
RUNTIME_ENV = "EMBEDCACHE_RUNTIME"
INSTALL_OPENVINO = 'pip install "embedcache[openvino]"'
#: Subdirectory of the cache directory holding exported models.
EXPORTS_DIR = "exports"


def openvino_installed() -> bool:
    """Whether the ``openvino`` package can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):
        return False


def default_runtime() -> str:
    """``$EMBEDCACHE_RUNTIME`` (validated) or ``auto``."""
    value = os.environ.get(RUNTIME_ENV, "").strip().lower() or "auto"
    if value not in RUNTIMES:
        raise ConfigError(f"The {RUNTIME_ENV} environment variable must be one of {list(RUNTIMES)}. "
                          f"Got {os.environ[RUNTIME_ENV]!r}; unset it or pick one.")
    return value


def resolve_runtime(runtime: str | None, device_type: str, *, backbone_name: str = "") -> str:
    """``torch`` or ``openvino`` for ``runtime`` (None: :func:`default_runtime`) on ``device_type``.

    Raises:
        ConfigError: an unknown runtime, OpenVINO asked for but not installed, or not on a CPU.
    """
    runtime = default_runtime() if runtime is None else str(runtime).strip().lower()
    if runtime not in RUNTIMES:
        raise ConfigError(f"The 'runtime' parameter must be one of {list(RUNTIMES)}. Got {runtime!r}.")
    if runtime == "auto":
        wanted = device_type == "cpu" and backbone_name != "pixels" and openvino_installed()
        return "openvino" if wanted else "torch"
    if runtime == "openvino":
        if device_type != "cpu":
            raise ConfigError(f"runtime='openvino' runs on the CPU only; the device here is {device_type!r}. "
                              f"Pass --device cpu, or --runtime torch for the GPU.")
        if not openvino_installed():
            raise ConfigError(f"runtime='openvino' needs the openvino package: {INSTALL_OPENVINO}. "
                              f"Or pass --runtime torch.")
    return runtime


def major_minor(package: str) -> str:
    """An installed package's ``major.minor`` (from its metadata; nothing imported)."""
    return ".".join(package_version(package).split(".")[:2])


def key_payload(runtime: str) -> dict[str, str] | None:
    """What the cache key records about a resolved runtime: nothing for torch (its version is
    already in the key, and entries made before runtimes existed keep their keys)."""
    if runtime == "torch":
        return None
    return {"name": runtime, "version": major_minor(runtime)}
