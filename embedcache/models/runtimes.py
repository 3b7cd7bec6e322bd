"""Which inference runtime runs the frozen backbone: torch, or OpenVINO or ONNX Runtime on CPU.

The runtime changes the numbers (OpenVINO and ONNX Runtime fuse and order operations their own
way), so a resolved runtime other than torch is part of the cache key (:func:`key_payload`: its
name and major.minor version). Resolving a runtime imports nothing heavy: a cache hit stays as
cheap with either runtime installed as without.

``auto`` (the default; ``EMBEDCACHE_RUNTIME`` overrides it) is a fixed, documented rule, not a
measurement. On the CPU, for a backbone with a network to run (not ``pixels``): OpenVINO when it
is installed; else ONNX Runtime when it is installed and the precision asked for is ``auto`` or
``fp32`` (its CPU path runs float32 only); else torch. On GPUs, torch. On the 2-core Xeon of
docs/benchmarks.md OpenVINO ran the same truncated backbones 2-4x faster than torch (both bf16),
whole process included.

Precision (:func:`resolve_runtime_precision`): torch and OpenVINO take the precision as asked
(``auto``: bf16 on CPUs with native bf16); ONNX Runtime resolves ``auto`` to fp32, and an
explicit bf16 or fp16 with it is an error rather than a silent fp32.
"""

from __future__ import annotations

import importlib.util
import os

from embedcache.errors import ConfigError
from embedcache.runtime import package_version, resolve_precision

RUNTIMES = ("auto", "torch", "openvino", "onnxruntime")
#: Environment variable giving the default runtime (``auto`` when unset).
RUNTIME_ENV = "EMBEDCACHE_RUNTIME"
INSTALL_OPENVINO = 'pip install "embedcache[openvino]"'
INSTALL_ONNX = 'pip install "embedcache[onnx]"'
#: How to get each optional runtime.
INSTALL = {"openvino": INSTALL_OPENVINO, "onnxruntime": INSTALL_ONNX}
#: The precisions each runtime can run, where not all of them (ONNX Runtime's CPU path: float32).
RUNTIME_PRECISIONS = {"onnxruntime": ("fp32",)}
#: Subdirectory of the cache directory holding exported models.
EXPORTS_DIR = "exports"


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def openvino_installed() -> bool:
    """Whether the ``openvino`` package can be imported (checked without importing it)."""
    return _importable("openvino")


def onnxruntime_installed() -> bool:
    """Whether the ``onnxruntime`` package can be imported (checked without importing it)."""
    return _importable("onnxruntime")


def runtime_installed(runtime: str) -> bool:
    """Whether a resolved runtime's package can be imported (torch always can)."""
    return {"openvino": openvino_installed, "onnxruntime": onnxruntime_installed}.get(runtime, lambda: True)()


def default_runtime() -> str:
    """``$EMBEDCACHE_RUNTIME`` (validated) or ``auto``."""
    value = os.environ.get(RUNTIME_ENV, "").strip().lower() or "auto"
    if value not in RUNTIMES:
        raise ConfigError(f"The {RUNTIME_ENV} environment variable must be one of {list(RUNTIMES)}. "
                          f"Got {os.environ[RUNTIME_ENV]!r}; unset it or pick one.")
    return value


def _auto(device_type: str, backbone_name: str, precision: str) -> str:
    """The ``auto`` rule of the module docstring."""
    if device_type != "cpu" or backbone_name == "pixels":
        return "torch"
    if openvino_installed():
        return "openvino"
    if precision in ("auto", *RUNTIME_PRECISIONS["onnxruntime"]) and onnxruntime_installed():
        return "onnxruntime"
    return "torch"


def resolve_runtime(runtime: str | None, device_type: str, *, backbone_name: str = "", precision: str = "auto") -> str:
    """``torch``, ``openvino`` or ``onnxruntime`` for ``runtime`` (None: :func:`default_runtime`)
    on ``device_type``; ``precision`` is the precision asked for (``auto`` never picks a runtime
    that cannot run it).

    Raises:
        ConfigError: an unknown runtime, or OpenVINO/ONNX Runtime asked for but not installed, or
            not on a CPU.
    """
    runtime = default_runtime() if runtime is None else str(runtime).strip().lower()
    if runtime not in RUNTIMES:
        raise ConfigError(f"The 'runtime' parameter must be one of {list(RUNTIMES)}. Got {runtime!r}.")
    if runtime == "auto":
        return _auto(device_type, backbone_name, precision)
    if runtime in INSTALL:
        if device_type != "cpu":
            raise ConfigError(f"runtime={runtime!r} runs on the CPU only; the device here is {device_type!r}. "
                              f"Pass --device cpu, or --runtime torch for the GPU.")
        if not runtime_installed(runtime):
            raise ConfigError(f"runtime={runtime!r} needs the {runtime} package: {INSTALL[runtime]}. "
                              f"Or pass --runtime torch.")
    return runtime


def resolve_runtime_precision(runtime: str, precision: str, device_type: str) -> str:
    """The precision a resolved ``runtime`` runs at when ``precision`` is asked for: as
    :func:`~embedcache.runtime.resolve_precision`, except that a runtime with fewer precisions
    (:data:`RUNTIME_PRECISIONS`) resolves ``auto`` to its own first one.

    Raises:
        ConfigError: a precision the runtime cannot run, naming ``--precision`` and the fix.
    """
    supported = RUNTIME_PRECISIONS.get(runtime)
    if supported is None or precision not in ("auto", "bf16", "fp16"):
        return resolve_precision(precision, device_type)  # validates it, too
    if precision == "auto":
        return supported[0]
    elsewhere = "--runtime torch or openvino" if precision == "bf16" else "--runtime torch on a GPU"
    raise ConfigError(f"runtime={runtime!r} runs {'/'.join(supported)} only; --precision {precision} cannot run "
                      f"with it. Pass --precision {supported[0]} (or auto), or {elsewhere} for {precision}.")


def major_minor(package: str) -> str:
    """An installed package's ``major.minor`` (from its metadata; nothing imported)."""
    return ".".join(package_version(package).split(".")[:2])


def key_payload(runtime: str) -> dict[str, str] | None:
    """What the cache key records about a resolved runtime: nothing for torch (its version is
    already in the key, and entries made before runtimes existed keep their keys); else its name
    and its package's major.minor."""
    if runtime == "torch":
        return None
    return {"name": runtime, "version": major_minor(runtime)}
