"""Where and how the arithmetic runs: device, precision, autocast, decoding workers, threads.

The choices below (:data:`DEVICES`, :data:`PRECISIONS`) are the one definition the CLI and the
library share. torch is imported inside the functions that need it, so that the CLI can offer
these choices without loading torch.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator
from importlib import metadata
from typing import TYPE_CHECKING, Any

from embedcache.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: Precisions that run under ``torch.autocast`` (fp32 runs without it).
AUTOCAST_PRECISIONS = ("bf16", "fp16")
#: Most decoding workers chosen by default, whatever the core count.
MAX_DEFAULT_WORKERS = 8


#: Device files whose absence proves that no GPU driver is loaded (NVIDIA, AMD ROCm).
GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd", "/proc/driver/nvidia")


def _mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def _surely_cpu_only() -> bool:
    """True when no GPU can be present: Linux without any GPU driver's device files. Then
    ``auto`` resolves to the CPU without importing torch (about 1.7 s here), which keeps cache
    hits fast; anywhere else torch is asked."""
    return sys.platform.startswith("linux") and not any(os.path.exists(p) for p in GPU_DEVICE_FILES)


def resolve_device_type(device: str) -> str:
    """``auto`` -> cuda, else mps, else cpu; an unavailable explicit device is an error.

    Args:
        device: one of :data:`DEVICES`.

    Returns:
        ``cpu``, ``cuda`` or ``mps``.
    """
    if device not in DEVICES:
        raise ConfigError(f"The 'device' parameter must be one of {list(DEVICES)}. Got {device!r}.")
    if device in ("auto", "cpu") and (device == "cpu" or _surely_cpu_only()):
        return "cpu"
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _mps_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' was asked for but torch sees no CUDA GPU. Use --device cpu.")
    if device == "mps" and not _mps_available():
        raise ConfigError("device='mps' was asked for but MPS is not available. Use --device cpu.")
    return device


def check_torch_device(device: str) -> str:
    """A device string for heads (``cpu``, ``cuda``, ``cuda:1``, ``mps``) that exists here."""
    kind = str(device).split(":", 1)[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"The 'device' parameter must be cpu, cuda, cuda:N or mps. Got {device!r}.")
    if kind != "cpu":
        resolve_device_type(kind)  # raises when that kind of device is not available
        if kind == "cuda" and ":" in str(device):
            import torch

            index = str(device).split(":", 1)[1]
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise ConfigError(f"device={device!r}: torch sees {torch.cuda.device_count()} CUDA devices.")
    return str(device)


def resolve_device(device: str) -> torch.device:
    """:func:`resolve_device_type` as a ``torch.device``."""
    import torch

    return torch.device(resolve_device_type(device))


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX512_BF16 or AMX), where bf16 autocast pays off."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> bf16 on CPUs with native bf16, fp16 on CUDA/MPS, else fp32.

    Args:
        precision: one of :data:`PRECISIONS`.
        device: the resolved device (or its type, ``cpu``/``cuda``/``mps``).
    """
    device_type = getattr(device, "type", device)
    if precision not in PRECISIONS:
        raise ConfigError(
            f"The 'precision' parameter must be one of {list(PRECISIONS)}. Got {precision!r}."
        )
    if precision != "auto":
        if precision == "fp16" and device_type == "cpu":
            raise ConfigError("precision='fp16' is not supported on CPU; use bf16 or fp32.")
        return precision
    if device_type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp16"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None for fp32)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` at a resolved precision, or a no-op context for fp32."""
    import torch

    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def default_workers() -> int:
    """One decoding worker per spare core, at least one, at most :data:`MAX_DEFAULT_WORKERS`."""
    return max(1, min(MAX_DEFAULT_WORKERS, (os.cpu_count() or 2) - 1))


def check_workers(workers: int | None) -> int:
    """``workers`` validated, None meaning :func:`default_workers`."""
    workers = default_workers() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"The 'workers' parameter must be an int >= 0. Got {workers!r}.")
    return workers


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads (None: leave the setting alone)."""
    import torch

    if count is None or count == torch.get_num_threads():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def package_version(name: str) -> str:
    """The installed version of distribution ``name`` from its metadata (nothing is imported),
    or ``unknown`` (e.g. running from a checkout that is not installed)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"
