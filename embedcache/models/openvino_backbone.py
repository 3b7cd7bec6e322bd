"""The frozen backbone as an OpenVINO model: exported once per configuration, then compiled.

The exported graph takes the DataLoader's uint8 batch as it is in memory, ``(N, H, W, 3)``
(channels-last), and does the normalisation itself, so nothing is converted in Python per batch.
BatchNorm is folded first (as for torch), and the input size is fixed at export, which turns
shape-dependent Python (TF "SAME" padding) into constants.

Exports are cached in ``<cache_dir>/exports/<key16>.openvino/`` (``model.xml``, ``model.bin``,
``export.json`` with the sha256 of both), keyed by the backbone's identity (weights hash, layer,
pool, preprocessing), the OpenVINO and torch versions. A directory is written under a temporary
name and renamed into place; one whose files are links or fail their sha256 is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedcache.errors import ConfigError
from embedcache.fileio import is_plain_file, named_write_errors, new_file_mode, sha256_file
from embedcache.models.backbone import Backbone
from embedcache.models.fuse import fold_batchnorms
from embedcache.models.runtimes import INSTALL_OPENVINO, openvino_version
from embedcache.runtime import package_version

#: Bump when the exported graph changes (old exports are then ignored, not reused).
EXPORT_VERSION = 1
#: OpenVINO's names for the resolved precisions.
PRECISION_HINTS = {"bf16": "bf16", "fp32": "f32", "fp16": "f16"}


class _UInt8Input(torch.nn.Module):
    """uint8 ``(N, H, W, 3)`` -> normalised float ``(N, 3, H, W)`` -> the backbone."""

    def __init__(self, module: torch.nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.module = module
        self.register_buffer("scale", torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, 3, 1, 1))
        self.register_buffer("shift", torch.tensor([-m / s for m, s in zip(mean, std, strict=True)]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32)
        return self.module(x * self.scale + self.shift).float()


def export_identity(bb: Backbone) -> dict[str, Any]:
    """Everything the exported graph depends on."""
    spec = bb.identity()
    identity = {"export_version": EXPORT_VERSION, "backbone": spec.to_dict(), "preprocess": spec.preprocess.to_dict(),
            "openvino": openvino_version(), "torch": ".".join(package_version("torch").split(".")[:2])}
    return json.loads(json.dumps(identity))  # as export.json reads it back (tuples become lists)


def _digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _valid_export(directory: Path, identity: dict[str, Any]) -> bool:
    """A cached export that is ours, complete, plain files, and unchanged since it was written."""
    record = directory / "export.json"
    if directory.is_symlink() or not directory.is_dir() or not is_plain_file(record):
        return False
    try:
        meta = json.loads(record.read_text())
        if meta.get("identity") != identity:
            return False
        for name in ("model.xml", "model.bin"):
            if not is_plain_file(directory / name) or sha256_file(directory / name) != meta["sha256"][name]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _export(bb: Backbone, target: Path, identity: dict[str, Any]) -> None:
    """Convert the folded backbone and write it to ``target`` (a directory, renamed into place)."""
    import openvino as ov

    size = bb.preprocess.crop_size
    folded = fold_batchnorms(bb.module, input_size=size).eval()
    wrapped = _UInt8Input(folded, tuple(bb.preprocess.mean), tuple(bb.preprocess.std)).eval()
    example = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shape arithmetic, fixed by the static input
        model = ov.convert_model(wrapped, example_input=example, input=[ov.PartialShape([-1, size, size, 3])])
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        mode = new_file_mode()
        os.chmod(staging, mode | (mode & 0o444) >> 2)  # mkdtemp's 0o700 would hide it from the cache's other users
        ov.save_model(model, str(staging / "model.xml"), compress_to_fp16=False)
        meta = {"identity": identity,
                "sha256": {name: sha256_file(staging / name) for name in ("model.xml", "model.bin")}}
        (staging / "export.json").write_text(json.dumps(meta, indent=2))
        for name in ("model.xml", "model.bin", "export.json"):
            with open(staging / name, "rb") as handle:
                os.fsync(handle.fileno())
        if os.path.lexists(target):  # a stale or damaged export: replaced, never trusted
            if target.is_symlink() or not target.is_dir():
                target.unlink()
            else:
                shutil.rmtree(target)
        os.rename(staging, target)
    except OSError:
        if os.path.lexists(target) and _valid_export(target, identity):
            return  # another process published the same export first
        raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


class OpenVINOBackbone:
    """A compiled OpenVINO backbone: ``backbone(images uint8 (N,3,H,W) channels-last) -> float32
    (N, D)`` numpy, the interface :func:`~embedcache.extraction.loop.run_batches` calls."""

    takes_uint8 = True

    def __init__(self, compiled: Any, dim: int, *, exported: bool, directory: Path, threads: int) -> None:
        self.compiled, self.dim, self.exported, self.directory, self.threads = compiled, dim, exported, directory, threads
        self._request = compiled.create_infer_request()

    def close(self) -> None:
        """Release the compiled model now (not whenever the garbage collector gets to it)."""
        self._request = self.compiled = None

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        hwc = images.permute(0, 2, 3, 1)  # the collated batch's own memory order: no copy
        array = np.ascontiguousarray(hwc.numpy())
        self._request.infer([array])
        return np.array(self._request.get_output_tensor(0).data, dtype=np.float32, copy=True)


def openvino_backbone(bb: Backbone, *, precision: str, exports_dir: Path, threads: int | None = None
                      ) -> OpenVINOBackbone:
    """The backbone compiled for the CPU at ``precision``, exporting it first unless a valid
    export is cached in ``exports_dir``."""
    try:
        import openvino as ov
    except ImportError as exc:
        raise ConfigError(f"runtime='openvino' needs the openvino package: {INSTALL_OPENVINO}.") from exc
    if precision not in PRECISION_HINTS:
        raise ConfigError(f"runtime='openvino' supports precisions {list(PRECISION_HINTS)}. Got {precision!r}.")
    identity = export_identity(bb)
    directory = Path(exports_dir) / f"{_digest(identity)[:16]}.openvino"
    exported = False
    if not _valid_export(directory, identity):
        with named_write_errors(directory):
            _export(bb, directory, identity)
        exported = True
    threads = threads or torch.get_num_threads()
    config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision], "INFERENCE_NUM_THREADS": threads,
              "PERFORMANCE_HINT": "LATENCY"}
    compiled = ov.Core().compile_model(str(directory / "model.xml"), "CPU", config)
    return OpenVINOBackbone(compiled, bb.dim, exported=exported, directory=directory, threads=threads)
