"""Where and how the arithmetic runs: device, precision, autocast, decoding workers, threads.

The choices below (:data:`DEVICES`, :data:`PRECISIONS`) are the one definition the CLI and the
library share. torch is imported inside the functions that need it, so that the CLI can offer
these choices without loading torch.

Threads: the intra-op thread count is sized from the cores this process may really use (its CPU
affinity and a cgroup CPU quota, :func:`available_cores`; :func:`resolve_threads`);
``threads=`` or ``$EMBEDCACHE_THREADS`` override it. Extraction and predict do not subtract
their decoding workers: with passive waiting, model threads and workers share the cores (on 2
cores, 1.5-1.7x faster idle than one model thread, and as fast with one core busy).
:func:`prefer_passive_waiting` makes idle OpenMP threads sleep instead of spinning, which is what
keeps a shared machine usable: a spinning thread burns the core that the thread it waits for
(descheduled by another process) needs.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import sys
from collections.abc import Iterator
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
#: Environment variable overriding the intra-op thread count (``--threads`` overrides it).
THREADS_ENV = "EMBEDCACHE_THREADS"
#: cgroup v2 CPU limit (``"<quota> <period>"`` or ``"max <period>"``) of this container.
CGROUP_V2_CPU_MAX = "/sys/fs/cgroup/cpu.max"
#: cgroup v1 CPU quota and period files (quota -1 = no limit), in the two usual mount points.
CGROUP_V1_CPU_DIRS = ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct")
#: OpenMP settings that make waiting threads sleep instead of spinning: GNU libgomp (torch's
#: Linux wheels) reads OMP_WAIT_POLICY, Intel's libiomp (conda builds) KMP_BLOCKTIME. Both are
#: read once, when torch loads the OpenMP runtime: they must be in the environment before.
PASSIVE_WAIT_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
#: glibc ``mallopt`` parameters (malloc.h) and their documented defaults.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, GLIBC_MALLOC_DEFAULT = -1, -3, 128 * 1024
#: While a CPU inference loop runs, blocks up to this size come from the heap and stay there
#: when freed (see :func:`reuse_freed_memory`).
REUSED_BLOCK_BYTES = 1 << 30


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


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def cgroup_cpu_limit() -> float | None:
    """The CPUs this container's cgroup quota allows (``1.5`` for 150 ms per 100 ms), or None
    when there is no quota (or no cgroup files): cgroup v2 ``cpu.max``, else v1 ``cfs_quota_us``."""
    text = _read_text(CGROUP_V2_CPU_MAX)
    if text is not None:
        quota, _, period = text.partition(" ")
        return _quota_cpus(quota, period or "100000")
    for folder in CGROUP_V1_CPU_DIRS:
        quota = _read_text(os.path.join(folder, "cpu.cfs_quota_us"))
        period = _read_text(os.path.join(folder, "cpu.cfs_period_us"))
        if quota is not None and period is not None:
            return _quota_cpus(quota, period)
    return None


def _quota_cpus(quota: str, period: str) -> float | None:
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:  # "max" (no limit), or a file we do not understand: no limit known
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def available_cores() -> int:
    """Cores this process may use: its CPU affinity (``taskset``, ``docker --cpuset-cpus``), capped
    by a cgroup CPU quota (``docker --cpus``, Kubernetes limits) rounded down; at least 1.

    ``os.cpu_count()`` counts the machine's cores, which overstates both.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, math.floor(limit))
    return max(1, cores)


def default_workers() -> int:
    """One decoding worker per spare core, at least one, at most :data:`MAX_DEFAULT_WORKERS`."""
    return max(1, min(MAX_DEFAULT_WORKERS, available_cores() - 1))


def check_threads(threads: int | str | None, *, what: str = "The 'threads' parameter") -> int | None:
    """``threads`` (an int, or digits) as a positive int; None stays None. ``what`` names the
    setting in the message (the CLI says ``--threads``, the environment variable its name)."""
    if threads is None:
        return None
    value: int | None = None
    if isinstance(threads, str):
        value = int(threads.strip()) if threads.strip().isdigit() else None
    elif isinstance(threads, int) and not isinstance(threads, bool):
        value = threads
    if value is None or value < 1:
        raise ConfigError(f"{what} must be a whole number of threads >= 1 (e.g. {available_cores()}, the "
                          f"cores available here). Got {threads!r}.")
    return value


def resolve_threads(threads: int | None = None) -> int:
    """The intra-op thread count to run with: ``threads`` when given, else ``$EMBEDCACHE_THREADS``,
    else :func:`available_cores` (decoding workers share those cores: see the module docstring).

    Raises:
        ConfigError: ``threads`` or the environment variable is not a whole number >= 1.
    """
    explicit = check_threads(threads)
    if explicit is not None:
        return explicit
    from_env = check_threads(os.environ.get(THREADS_ENV) or None, what=f"The {THREADS_ENV} environment variable")
    if from_env is not None:
        return from_env
    return max(1, available_cores())


def prefer_passive_waiting() -> bool:
    """Put :data:`PASSIVE_WAIT_ENV` in the environment where the user has not set those variables,
    so that OpenMP threads sleep while they wait. Effective only before torch is imported.

    Returns:
        True when torch was not imported yet (the settings will apply), False otherwise.
    """
    if "torch" in sys.modules:
        return False
    for key, value in PASSIVE_WAIT_ENV.items():
        os.environ.setdefault(key, value)
    return True


def check_workers(workers: int | None) -> int:
    """``workers`` validated, None meaning :func:`default_workers`."""
    workers = default_workers() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"The 'workers' parameter must be an int >= 0. Got {workers!r}.")
    return workers


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads (None: leave the setting alone). The
    commands use :func:`run_threads`, which also chooses the count."""
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


@contextlib.contextmanager
def run_threads(threads: int | None = None) -> Iterator[int]:
    """Run a command's work with :func:`resolve_threads` intra-op threads; yields the count (the
    reports record it)."""
    count = resolve_threads(threads)
    with torch_threads(count):
        yield count


@functools.cache
def _glibc() -> Any:
    """glibc's ``libc.so.6`` through ctypes, or None (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[bool]:
    """Let glibc keep and reuse large freed blocks while the block runs (yields whether it did).

    A frozen backbone's activations at batch 64, 224 px are 50-150 MB each; glibc serves blocks
    above its mmap threshold (at most 32 MiB unless set) with a fresh ``mmap`` and returns them
    with ``munmap``, so every layer of every batch faulted in pages the kernel had to zero again:
    several seconds of system CPU per 750 images. Raised thresholds keep those blocks in the heap
    to be reused by the next batch; on exit the thresholds go back to glibc's defaults and the
    free memory is returned (``malloc_trim``). Nothing is changed when the user tuned malloc
    (``MALLOC_*_`` variables, ``GLIBC_TUNABLES``) or the C library is not glibc.
    """
    libc = _glibc()
    tuned = "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ)
    if libc is None or tuned:
        yield False
        return
    libc.mallopt(M_MMAP_THRESHOLD, REUSED_BLOCK_BYTES)
    libc.mallopt(M_TRIM_THRESHOLD, 2 * REUSED_BLOCK_BYTES)
    try:
        yield True
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, GLIBC_MALLOC_DEFAULT)
        libc.mallopt(M_TRIM_THRESHOLD, GLIBC_MALLOC_DEFAULT)
        libc.malloc_trim(0)


@functools.cache
def package_version(name: str) -> str:
    """The installed version of distribution ``name`` (nothing of it is imported), or ``unknown``
    (e.g. running from a checkout that is not installed).

    Read from the ``<name>-<version>.dist-info`` directory names on ``sys.path`` (the names
    installers write, PyPA's "Recording installed projects"; the first on the path wins, as for
    imports), else from :mod:`importlib.metadata`, whose import alone took 25 ms of every
    command's start-up (the dist-info scan: 0.4 ms)."""
    version = _dist_info_versions().get(_normalized(name))
    if version:
        return version
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


@functools.cache
def _dist_info_versions() -> dict[str, str]:
    """``{normalized name: version}`` of the ``.dist-info`` directories on ``sys.path``."""
    found: dict[str, str] = {}
    for entry in sys.path:
        try:
            listing = os.scandir(entry or ".")
        except OSError:
            continue
        with listing:
            for item in listing:
                if item.name.endswith(".dist-info"):
                    name, _, version = item.name[: -len(".dist-info")].partition("-")
                    if version:
                        found.setdefault(_normalized(name), version)
    return found
