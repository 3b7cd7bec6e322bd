"""The frozen backbone as an OpenVINO model: exported once per configuration, then compiled.

The export and its cache are shared with the other compiled runtimes (:mod:`embedcache.models.exports`,
:mod:`embedcache.models.export_cache`:
uint8 channels-last input normalised inside the graph, BatchNorm folded, a fixed input size).
OpenVINO's exports live in ``<cache_dir>/exports/<key16>.openvino/`` (``model.xml``,
``model.bin``, ``export.json``), keyed by the backbone's identity and the OpenVINO and torch
versions.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedcache.errors import ConfigError
from embedcache.models.backbone import BackboneSpec
from embedcache.models.export_cache import ExportedBackbone, cached_export, find_export
from embedcache.models.runtimes import INSTALL_OPENVINO

if TYPE_CHECKING:
    from embedcache.models.backbone import Backbone

#: Bump when the exported graph changes (old exports are then ignored, not reused).
EXPORT_VERSION = 1
#: OpenVINO's names for the resolved precisions.
PRECISION_HINTS = {"bf16": "bf16", "fp32": "f32", "fp16": "f16"}
#: The files of an OpenVINO export (besides export.json).
FILES = ("model.xml", "model.bin")
#: At most this many batches in flight when compiled for throughput (each holds its input and
#: activations).
MAX_REQUESTS = 8


def _export(bb: Backbone, directory: Path) -> None:
    """Convert the folded backbone and save it into ``directory``."""
    import torch

    from embedcache.models.exports import exportable

    ov = _import_ov()
    # the converter (and the telemetry its import sends, as OpenVINO's settings say): exporting only
    from openvino.tools.ovc import convert_model

    wrapped, example = exportable(bb)
    size = bb.preprocess.crop_size
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shape arithmetic, fixed by the static input
        model = convert_model(wrapped, example_input=example, input=[ov.PartialShape([-1, size, size, 3])])
    ov.save_model(model, str(directory / "model.xml"), compress_to_fp16=False)


class OpenVINOBackbone(ExportedBackbone):
    """A compiled OpenVINO backbone (see :class:`~embedcache.models.export_cache.ExportedBackbone`).

    With ``requests`` > 1 (a model compiled for throughput: that many streams, each on its own
    threads), up to ``requests`` batches run side by side, and :meth:`start` splits each batch
    into ``requests`` parts, one per stream: every batch then keeps every stream busy. Whole
    batches, one per stream, left one stream alone on the last large batch of a run (200
    resnet50 images in batches of 64 took 1.3x as long as one stream on both cores). OpenVINO's
    features of a row do not depend on the rows beside it (a test compares)."""

    def __init__(self, compiled: Any, dim: int, *, exported: bool, directory: Path, threads: int,
                 requests: int = 1) -> None:
        super().__init__(dim, exported=exported, directory=directory, threads=threads)
        self.compiled = compiled
        self.pipeline_depth = max(1, requests)
        # pipeline_depth batches in flight, each in pipeline_depth parts
        self._requests = [compiled.create_infer_request() for _ in range(self.pipeline_depth ** 2)]
        self._request, self._next = self._requests[0], 0

    def close(self) -> None:
        """Release the compiled model now (not whenever the garbage collector gets to it)."""
        for request in self._requests:
            request.wait()  # nothing may still run on a buffer about to be freed
        self._requests, self._request, self.compiled = [], None, None

    def infer(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``(N, H, W, 3)`` -> float32 ``(N, D)`` (a copy: the request reuses its output)."""
        self._request.infer([np.ascontiguousarray(images)], share_inputs=True)  # read in place
        return _output(self._request)

    def start(self, images: np.ndarray) -> Any:
        """Start ``images`` in up to ``pipeline_depth`` parts on the next infer requests. The
        requests read ``images`` in place (no copy), so the caller must not change it before
        :meth:`wait` (the handle keeps it alive). A request is used again ``pipeline_depth``
        batches later, so the caller waits for a batch before it starts that many more."""
        images = np.ascontiguousarray(images)
        requests = []
        for part in np.array_split(images, min(self.pipeline_depth, len(images))):  # contiguous views
            request = self._requests[self._next]
            self._next = (self._next + 1) % len(self._requests)
            request.start_async([part], share_inputs=True)
            requests.append(request)
        self._next = (self._next + self.pipeline_depth - len(requests)) % len(self._requests)  # the batch's slots
        return requests, images

    def wait(self, handle: Any) -> np.ndarray:
        requests, _images = handle
        for request in requests:
            request.wait()
        if len(requests) == 1:
            return _output(requests[0])
        return np.concatenate([np.asarray(r.get_output_tensor(0).data) for r in requests]).astype(np.float32, copy=False)


def _output(request: Any) -> np.ndarray:
    return np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)


#: The model converter that ``import openvino`` loads last (it tolerates its absence): held back
#: by :func:`_import_ov`.
_CONVERTER = "openvino.tools.ovc"


def _import_ov(*, hold_back: bool = True) -> Any:
    """``import openvino``, without its model converter unless something imported that already.

    The package's ``__init__`` ends by importing ``openvino.tools.ovc`` for ``convert_model``, and
    that import scans the installed distributions and sends a usage event (OpenVINO's telemetry:
    on unless opted out; a forked process posting to the network, from a background thread the
    interpreter joins at exit). Running a compiled export needs none of it: held back, the import
    takes ~45 ms less of every start-up, and nothing leaves the machine. ``openvino.convert_model``
    still works: the package gets a module ``__getattr__`` that imports the converter on first use
    (:func:`_export` imports it directly).
    """
    held_back = hold_back and _CONVERTER not in sys.modules and "openvino" not in sys.modules
    if held_back:
        sys.modules[_CONVERTER] = None  # type: ignore[assignment]  # its import fails; openvino catches that
    try:
        import openvino as ov
    except ImportError as exc:
        if held_back:  # an openvino that cannot do without it (or none installed): the plain import
            _release_converter()
            return _import_ov(hold_back=False)
        raise ConfigError(f"runtime='openvino' needs the openvino package: {INSTALL_OPENVINO}.") from exc
    finally:
        if held_back:
            _release_converter()
    if held_back and not hasattr(ov, "convert_model") and not hasattr(ov, "__getattr__"):
        ov.__getattr__ = _lazy_converter
    return ov


def _release_converter() -> None:
    if _CONVERTER in sys.modules and sys.modules[_CONVERTER] is None:
        del sys.modules[_CONVERTER]


def _lazy_converter(name: str) -> Any:
    """``openvino``'s module ``__getattr__`` after :func:`_import_ov`: ``convert_model`` on demand."""
    if name == "convert_model":
        from openvino.tools.ovc import convert_model

        return convert_model
    raise AttributeError(f"module 'openvino' has no attribute {name!r}")


def _check_precision(precision: str) -> None:
    if precision not in PRECISION_HINTS:
        raise ConfigError(f"runtime='openvino' supports precisions {list(PRECISION_HINTS)}. Got {precision!r}.")


def _compiled(ov: Any, directory: Path, dim: int, precision: str, threads: int, exported: bool,
              throughput: bool = False) -> OpenVINOBackbone:
    # LATENCY: one stream, a batch at a time on every thread (what a synchronous loop needs).
    # THROUGHPUT: the threads split into streams that each run their own batch; the caller keeps
    # that many batches in flight (OpenVINO's OPTIMAL_NUMBER_OF_INFER_REQUESTS).
    config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision], "INFERENCE_NUM_THREADS": threads,
              "PERFORMANCE_HINT": "THROUGHPUT" if throughput else "LATENCY"}
    compiled = ov.Core().compile_model(str(directory / "model.xml"), "CPU", config)
    requests = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")) if throughput else 1
    return OpenVINOBackbone(compiled, dim, exported=exported, directory=directory, threads=threads,
                            requests=min(requests, MAX_REQUESTS))


def openvino_backbone(bb: Backbone, *, precision: str, exports_dir: Path, threads: int | None = None
                      ) -> OpenVINOBackbone:
    """The backbone compiled for the CPU at ``precision``, exporting it first unless a valid
    export is cached in ``exports_dir``; ``threads`` defaults to torch's intra-op thread count."""
    ov = _import_ov()
    _check_precision(precision)
    directory, exported = cached_export(bb.identity(), exports_dir, runtime="openvino", export_version=EXPORT_VERSION,
                                        suffix=".openvino", files=FILES, write=lambda d: _export(bb, d))
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    return _compiled(ov, directory, bb.dim, precision, threads, exported)


def find_openvino_export(spec: BackboneSpec, exports_dir: Path) -> Path | None:
    """The directory of a valid cached OpenVINO export of ``spec``, or None (no torch imported)."""
    return find_export(spec, exports_dir, runtime="openvino", export_version=EXPORT_VERSION, suffix=".openvino",
                       files=FILES)


def compile_openvino_export(directory: Path, spec: BackboneSpec, *, precision: str, threads: int,
                            throughput: bool = False) -> OpenVINOBackbone:
    """The compiled model of the export in ``directory`` (:func:`find_openvino_export`);
    ``throughput``: compiled for several batches in flight (``pipeline_depth`` of them)."""
    ov = _import_ov()
    _check_precision(precision)
    return _compiled(ov, directory, spec.dim, precision, threads, False, throughput)
