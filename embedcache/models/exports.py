"""Exported backbones cached in the cache directory: what every compiled runtime shares.

A runtime other than torch (OpenVINO, ONNX Runtime) runs the backbone exported once per
configuration. The exported graph takes the DataLoader's uint8 batch as it is in memory,
``(N, H, W, 3)`` (channels-last), and does the normalisation itself (:class:`UInt8Input`), so
nothing is converted in Python per batch. BatchNorm is folded first (as for torch), and the
input size is fixed at export (only the batch dimension is dynamic), which turns shape-dependent
Python (TF "SAME" padding) into constants.

Exports live in ``<cache_dir>/exports/<key16><suffix>/`` (the model's files and ``export.json``
with the sha256 of each), keyed by the backbone's identity (weights hash, layer, pool,
preprocessing), the runtime's and torch's versions (:func:`export_identity`). A directory is
written under a temporary name and renamed into place (:func:`cached_export`); one whose files
are links or fail their sha256 is rebuilt, never trusted.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedcache.fileio import is_plain_file, named_write_errors, new_file_mode, sha256_file
from embedcache.models.backbone import Backbone
from embedcache.models.fuse import fold_batchnorms
from embedcache.models.runtimes import major_minor

#: The record written beside the model's files.
RECORD = "export.json"


class UInt8Input(torch.nn.Module):
    """uint8 ``(N, H, W, 3)`` -> normalised float ``(N, 3, H, W)`` -> the backbone."""

    def __init__(self, module: torch.nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.module = module
        self.register_buffer("scale", torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, 3, 1, 1))
        self.register_buffer("shift", torch.tensor([-m / s for m, s in zip(mean, std, strict=True)]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32)
        return self.module(x * self.scale + self.shift).float()


def exportable(bb: Backbone) -> tuple[torch.nn.Module, torch.Tensor]:
    """The module every runtime exports (BatchNorm folded, :class:`UInt8Input` around it) and an
    example uint8 batch of two (two, not one, so that no exporter specialises the batch to 1)."""
    size = bb.preprocess.crop_size
    folded = fold_batchnorms(bb.module, input_size=size).eval()
    wrapped = UInt8Input(folded, tuple(bb.preprocess.mean), tuple(bb.preprocess.std)).eval()
    return wrapped, torch.zeros((2, size, size, 3), dtype=torch.uint8)


def export_identity(bb: Backbone, runtime: str, *, export_version: int) -> dict[str, Any]:
    """Everything an export for ``runtime`` (a package name: ``openvino``, ``onnxruntime``)
    depends on; ``export_version`` is the runtime's own, bumped when its exported graph changes."""
    spec = bb.identity()
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
        for name in files:
            if not is_plain_file(directory / name) or sha256_file(directory / name) != meta["sha256"][name]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


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


def cached_export(bb: Backbone, exports_dir: Path, *, runtime: str, export_version: int, suffix: str,
                  files: Sequence[str], write: Callable[[Path], None]) -> tuple[Path, bool]:
    """The directory of ``bb``'s export for ``runtime``, made first unless a valid one is cached.

    Args:
        bb: the backbone.
        exports_dir: ``<cache_dir>/exports``.
        runtime: the runtime's package name (its major.minor is in the identity).
        export_version: the runtime's export version (see :func:`export_identity`).
        suffix: the directory's suffix (``.openvino``, ``.onnx``).
        files: the names ``write`` creates (each one's sha256 goes into ``export.json``).
        write: ``write(directory)`` exports ``bb`` into ``directory``.

    Returns:
        ``(directory, exported)``: ``exported`` is False when a cached export was reused.
    """
    identity = export_identity(bb, runtime, export_version=export_version)
    directory = Path(exports_dir) / f"{export_digest(identity)[:16]}{suffix}"
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

    def __init__(self, dim: int, *, exported: bool, directory: Path, threads: int) -> None:
        self.dim, self.exported, self.directory, self.threads = dim, exported, directory, threads

    @abc.abstractmethod
    def infer(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``(N, H, W, 3)`` C-contiguous -> float32 ``(N, D)``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the runtime's model now (not whenever the garbage collector gets to it)."""

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        hwc = images.permute(0, 2, 3, 1)  # the collated batch's own memory order: no copy
        return self.infer(np.ascontiguousarray(hwc.numpy()))
