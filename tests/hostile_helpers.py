"""Helpers shared by the hostile-input and fault tests (issue 14): planted files, flipped bytes,
interrupted runs, a lock held by another process, subprocesses of the CLI."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

import tests.tiny_backbone  # noqa: F401 - registers the tiny backbone
from embedcache.extraction import compute as compute_mod
from embedcache.extraction.extract import extract
from embedcache.store.schema import entry_paths
from tests.tiny_backbone import TINY

REPO = Path(__file__).resolve().parents[1]


def sha(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (read through a symlink: the target's)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run(data, cache, **kw):
    """The tiny backbone's extraction, in process, small batches."""
    kw.setdefault("backbone", TINY)
    kw.setdefault("workers", 0)
    kw.setdefault("batch_size", 4)
    return extract(data, cache_dir=cache, **kw)


def interrupted_partial(data, cache, *, after: int = 2, **kw) -> Path:
    """A genuine ``.partial`` of ``data``'s entry in ``cache``: an extraction stopped (Ctrl-C)
    after ``after`` committed batches. Returns the partial's path."""
    calls = []

    def interrupt(_progress):
        calls.append(1)
        if len(calls) == after:
            raise KeyboardInterrupt

    every = compute_mod.COMMIT_EVERY_SECONDS
    compute_mod.COMMIT_EVERY_SECONDS = 0.0  # a commit after every batch
    try:
        with pytest.raises(KeyboardInterrupt):
            run(data, cache, progress=interrupt, **kw)
    finally:
        compute_mod.COMMIT_EVERY_SECONDS = every
    partials = list(Path(cache).glob("*.h5.partial"))
    assert len(partials) == 1, partials
    return partials[0]


def flipped_copy(source: Path, target: Path, offset: int) -> Path:
    """A copy of ``source`` with the byte at ``offset`` inverted."""
    data = bytearray(source.read_bytes())
    data[offset] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


def chunk_offset(path: Path, dataset: str = "features") -> tuple[int, int]:
    """``(byte offset, size)`` in the file of the first stored chunk of ``dataset``."""
    with h5py.File(path, "r", locking=False) as f:
        info = f[dataset].id.get_chunk_info(0)
        return int(info.byte_offset), int(info.size)


def store_arrays(store) -> dict:
    """Everything a FeatureStore serves, for exact comparisons."""
    return {"features": np.asarray(store.features), "labels": np.asarray(store.labels),
            "paths": np.asarray(store.paths).astype(str), "splits": np.asarray(store.splits),
            "rows": np.asarray(store.rows)}


def same_data(a, b) -> bool:
    """Whether two FeatureStores serve identical rows (arrays bitwise) and failures."""
    left, right = store_arrays(a), store_arrays(b)
    return all(left[k].shape == right[k].shape and left[k].dtype == right[k].dtype
               and left[k].tobytes() == right[k].tobytes() for k in left) and a.errors == b.errors


def same_store(a, b) -> bool:
    """Whether two FeatureStores serve identical data: rows, failures and every attribute."""
    return same_data(a, b) and repr(sorted(a.attrs.items())) == repr(sorted(b.attrs.items()))


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}


def run_cli(args: list[str], *, file_size_limit: int | None = None, timeout: float = 180,
            python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``python -m embedcache ARGS`` in a subprocess (from the repository root), optionally
    under ``RLIMIT_FSIZE`` (Python ignores SIGXFSZ, so a write past it fails with EFBIG, as on a
    full disk)."""

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run([sys.executable, *python_flags, "-m", "embedcache", *map(str, args)], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit if file_size_limit is not None else None)


def error_lines(stderr: str) -> list[str]:
    """The non-empty lines of stderr."""
    return [line for line in stderr.splitlines() if line.strip()]


@contextlib.contextmanager
def lock_held_elsewhere(lock_path: Path) -> Iterator[subprocess.Popen]:
    """Another process holding ``lock_path`` (POSIX record lock, its pid written in the file),
    as a writer in another process would."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.lockf(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.write(fd, str(os.getpid()).encode()); "
         "print('locked', flush=True); time.sleep(120)", str(lock_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def entry_files(cache: Path, cache_key: str) -> tuple[Path, Path, Path]:
    """(final, partial, lock) of an entry."""
    return entry_paths(cache, cache_key)
