"""The cache of exported backbones, and the runtimes' common interface: nothing here imports torch.

A runtime other than torch (OpenVINO, ONNX Runtime) runs the backbone exported once per
configuration (the export itself is :mod:`embedcache.models.exports`, which needs torch).
Exports live in ``<cache_dir>/exports/<key16><suffix>/`` (the model's files and ``export.json``
with the sha256 of each), keyed by the backbone's identity (weights hash, layer, pool,
preprocessing), the runtime's and torch's versions (:func:`export_identity`). A directory is
written under a temporary name and renamed into place (:func:`cached_export`); one whose files
are links or fail their sha256 is rebuilt, never trusted. A check that hashed every file is
remembered in ``.verified.json`` (each file's size, mtime, ctime, inode and device): while none of
them changes, later runs skip the hashing (resnet50's 94 MB of weights: ~0.1 s of every start-up). Because the key is the backbone's
identity, not the built model, a later extraction finds a valid export without building (or
importing) torch at all (:func:`find_export`).
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedcache.fileio import is_plain_file, named_write_errors, new_file_mode, sha256_file
from embedcache.models.backbone import BackboneSpec
from embedcache.models.runtimes import major_minor

#: The record written beside the model's files.
RECORD = "export.json"
#: What a check that hashed every file remembers (:func:`valid_export`).
VERIFIED = ".verified.json"
#: A check is remembered only for files last changed at least this long before it: a file
#: written within a timestamp's granularity (1-2 s on some file systems) could change again
#: without its times showing it.
VERIFIED_MARGIN_SECONDS = 2.0


def export_identity(spec: BackboneSpec, runtime: str, *, export_version: int) -> dict[str, Any]:
    """Everything an export for ``runtime`` (a package name: ``openvino``, ``onnxruntime``) of
    the backbone ``spec`` (``Backbone.identity()``) depends on; ``export_version`` is the
    runtime's own, bumped when its exported graph changes."""
    identity = {"export_version": export_version, "backbone": spec.to_dict(), "preprocess": spec.preprocess.to_dict(),
                runtime: major_minor(runtime), "torch": major_minor("torch")}
    return json.loads(json.dumps(identity))  # as export.json reads it back (tuples become lists)


def export_digest(identity: dict[str, Any]) -> str:
    """The sha256 of an identity (its first 16 hex digits name the export's directory)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def valid_export(directory: Path, identity: dict[str, Any], files: Sequence[str]) -> bool:
    """A cached export that is ours, complete, plain files, and unchanged since it was written."""
    record = directory / RECORD
    if directory.is_symlink() or not directory.is_dir() or not is_plain_file(record):
        return False
    try:
        meta = json.loads(record.read_text())
        if meta.get("identity") != identity:
            return False
        stamps = _stamps(directory, files)
        if stamps is None:
            return False
        if _remembered(directory) == stamps:  # hashed before, and nothing changed since
            return True
        for name in files:
            if sha256_file(directory / name) != meta["sha256"][name]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    _remember(directory, stamps)
    return True


def _stamps(directory: Path, files: Sequence[str]) -> dict[str, list[int]] | None:
    """``{name: [size, mtime_ns, ctime_ns, inode, device]}`` of the record and ``files``, or None
    when one is not a plain file. A write, a rename over it or ``utime`` changes the ctime."""
    stamps = {}
    for name in (RECORD, *files):
        if not is_plain_file(directory / name):
            return None
        info = os.lstat(directory / name)
        stamps[name] = [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev]
    return stamps


def _remembered(directory: Path) -> dict[str, list[int]] | None:
    path = directory / VERIFIED
    if not is_plain_file(path):
        return None
    try:
        remembered = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return remembered if isinstance(remembered, dict) else None


def _remember(directory: Path, stamps: dict[str, list[int]]) -> None:
    """Record a check that hashed every file (best effort: a read-only cache is hashed each time)."""
    newest = max(max(stamp[1], stamp[2]) for stamp in stamps.values())
    if time.time_ns() - newest < VERIFIED_MARGIN_SECONDS * 1e9:
        return
    tmp = None
    try:
        handle, tmp = tempfile.mkstemp(prefix=".verified.", dir=directory)
        with os.fdopen(handle, "w") as out:
            json.dump(stamps, out)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, directory / VERIFIED)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def publish_export(target: Path, identity: dict[str, Any], files: Sequence[str],
                   write: Callable[[Path], None]) -> None:
    """Write an export to ``target`` as a unit: ``write(staging)`` puts ``files`` into a new
    temporary directory beside it, which gets ``export.json`` and is renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        mode = new_file_mode()
        os.chmod(staging, mode | (mode & 0o444) >> 2)  # mkdtemp's 0o700 would hide it from the cache's other users
        write(staging)
        meta = {"identity": identity, "sha256": {name: sha256_file(staging / name) for name in files}}
        (staging / RECORD).write_text(json.dumps(meta, indent=2))
        for name in (*files, RECORD):
            with open(staging / name, "rb") as handle:
                os.fsync(handle.fileno())
        if os.path.lexists(target):  # a stale or damaged export: replaced, never trusted
            if target.is_symlink() or not target.is_dir():
                target.unlink()
            else:
                shutil.rmtree(target)
        os.rename(staging, target)
    except OSError:
        if os.path.lexists(target) and valid_export(target, identity, files):
            return  # another process published the same export first
        raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def export_directory(spec: BackboneSpec, exports_dir: Path, *, runtime: str, export_version: int,
                     suffix: str) -> tuple[Path, dict[str, Any]]:
    """Where ``spec``'s export for ``runtime`` lives, and its identity."""
    identity = export_identity(spec, runtime, export_version=export_version)
    return Path(exports_dir) / f"{export_digest(identity)[:16]}{suffix}", identity


def find_export(spec: BackboneSpec, exports_dir: Path, *, runtime: str, export_version: int, suffix: str,
                files: Sequence[str]) -> Path | None:
    """The directory of a valid cached export of ``spec`` for ``runtime``, or None."""
    directory, identity = export_directory(spec, exports_dir, runtime=runtime, export_version=export_version,
                                           suffix=suffix)
    return directory if valid_export(directory, identity, files) else None


def cached_export(spec: BackboneSpec, exports_dir: Path, *, runtime: str, export_version: int, suffix: str,
                  files: Sequence[str], write: Callable[[Path], None]) -> tuple[Path, bool]:
    """The directory of ``bb``'s export for ``runtime``, made first unless a valid one is cached.

    Args:
        spec: the backbone's identity (``Backbone.identity()``).
        exports_dir: ``<cache_dir>/exports``.
        runtime: the runtime's package name (its major.minor is in the identity).
        export_version: the runtime's export version (see :func:`export_identity`).
        suffix: the directory's suffix (``.openvino``, ``.onnx``).
        files: the names ``write`` creates (each one's sha256 goes into ``export.json``).
        write: ``write(directory)`` exports ``bb`` into ``directory``.

    Returns:
        ``(directory, exported)``: ``exported`` is False when a cached export was reused.
    """
    directory, identity = export_directory(spec, exports_dir, runtime=runtime, export_version=export_version,
                                           suffix=suffix)
    if valid_export(directory, identity, files):
        return directory, False
    with named_write_errors(directory):
        publish_export(directory, identity, files, write)
    return directory, True


class ExportedBackbone(abc.ABC):
    """A backbone run by a runtime from its export: ``backbone(images uint8 (N,3,H,W)
    channels-last) -> float32 (N, D)`` numpy, the interface
    :func:`~embedcache.extraction.loop.run_batches` calls (``takes_uint8``). Subclasses
    implement :meth:`infer` and :meth:`close`."""

    takes_uint8 = True
    #: Batches that may be in flight at once between :meth:`start` and :meth:`wait` (1: none
    #: overlap; a runtime with several infer requests runs that many batches side by side).
    pipeline_depth = 1

    def __init__(self, dim: int, *, exported: bool, directory: Path, threads: int) -> None:
        self.dim, self.exported, self.directory, self.threads = dim, exported, directory, threads

    @abc.abstractmethod
    def infer(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``(N, H, W, 3)`` C-contiguous -> float32 ``(N, D)``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the runtime's model now (not whenever the garbage collector gets to it)."""

    def start(self, images: np.ndarray) -> Any:
        """Begin :meth:`infer` on ``images``; :meth:`wait` on the returned handle gives its
        features. At most :attr:`pipeline_depth` batches may be started and not yet waited for,
        and they are waited for in the order they were started. This default runs the batch now."""
        return self.infer(images)

    def wait(self, handle: Any) -> np.ndarray:
        """The features of the batch :meth:`start` returned ``handle`` for."""
        return handle

    def __call__(self, images: Any) -> np.ndarray:
        """A torch uint8 ``(N, 3, H, W)`` channels-last batch (the DataLoader's) -> float32 ``(N, D)``."""
        hwc = images.permute(0, 2, 3, 1)  # the collated batch's own memory order: no copy
        return self.infer(np.ascontiguousarray(hwc.numpy()))
