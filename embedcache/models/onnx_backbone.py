"""The frozen backbone as an ONNX Runtime session: exported once per configuration, then loaded.

The export and its cache are shared with OpenVINO (:mod:`embedcache.models.exports`,
:mod:`embedcache.models.export_cache`: uint8
channels-last input normalised inside the graph, BatchNorm folded, a fixed input size and a
dynamic batch dimension). ONNX Runtime's exports live in ``<cache_dir>/exports/<key16>.onnx/``
(``model.onnx`` with its weights inside, ``export.json``), keyed by the backbone's identity and
the ONNX Runtime and torch versions. The graph is exported with ``torch.onnx.export`` (the
torch.export-based exporter, which needs the ``onnx`` and ``onnxscript`` packages), so a
backbone's weights must fit in one 2 GB protobuf.

The session runs on the CPUExecutionProvider in float32 (the only precision it is used at), with
the thread policy's intra-op threads, one inter-op thread, every graph optimisation, and
intra-op spinning disabled: a spinning thread burns the core that the thread it waits for
(descheduled by another process) needs, as for torch's OpenMP threads
(:func:`~embedcache.runtime.prefer_passive_waiting`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedcache.errors import ConfigError
from embedcache.models.backbone import BackboneSpec
from embedcache.models.export_cache import ExportedBackbone, cached_export, find_export
from embedcache.models.runtimes import INSTALL_ONNX, RUNTIME_PRECISIONS

if TYPE_CHECKING:
    from embedcache.models.backbone import Backbone

#: Bump when the exported graph changes (old exports are then ignored, not reused).
EXPORT_VERSION = 1
#: The file of an ONNX export (besides export.json).
MODEL_FILE = "model.onnx"
#: ONNX Runtime's session option that lets idle intra-op threads spin ("0": they sleep).
ALLOW_SPINNING = "session.intra_op.allow_spinning"


def _fold_weight_pads(node: Any) -> bool | None:
    """onnxscript's folding rule, changed for ``Pad`` nodes of constants: always folded.

    EfficientNet-Lite's TF "SAME" convolutions pad their kernel (not the activation) where the
    padding is asymmetric. Such a ``Pad`` of a weight larger than the folding limit (8,192
    values) stays in the graph, and ONNX Runtime (1.32) then refuses the model at load ("Node
    input 'pad' is not a graph input, initializer, or output of a previous node": its Pad-into-Conv
    fusion takes the kernel's Pad for the input's). Folded at export, the padded kernel is
    just a weight.
    """
    return True if node.op_type == "Pad" else None


def _export(bb: Backbone, directory: Path) -> None:
    """Export the folded backbone (uint8 input, dynamic batch) to ``directory/model.onnx``."""
    import torch

    from embedcache.models.exports import exportable

    wrapped, example = exportable(bb)
    batch = torch.export.Dim("batch", min=1)
    try:
        from onnxscript.optimizer import optimize_ir  # here: an ImportError is named below

        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # notes on the exporter's own deprecations and shape arithmetic
            program = torch.onnx.export(wrapped, (example,), input_names=["images"], output_names=["features"],
                                        dynamic_shapes={"images": {0: batch}}, dynamo=True, external_data=False,
                                        optimize=False, verbose=False)  # verbose=False: no progress lines
            optimize_ir(program.model, should_fold=_fold_weight_pads)  # what optimize=True runs, plus the pads
            program.save(str(directory / MODEL_FILE), external_data=False)
    except ImportError as exc:  # torch's exporter imports onnx and onnxscript only now
        raise ConfigError(f"Exporting the backbone for runtime='onnxruntime' needs the onnx and onnxscript "
                          f"packages ({exc}): {INSTALL_ONNX}.") from exc


class OnnxRuntimeBackbone(ExportedBackbone):
    """An ONNX Runtime session of the backbone (see :class:`~embedcache.models.export_cache.ExportedBackbone`)."""

    def __init__(self, session: Any, dim: int, *, exported: bool, directory: Path, threads: int) -> None:
        super().__init__(dim, exported=exported, directory=directory, threads=threads)
        self.session = session
        self._input = session.get_inputs()[0].name
        self._output = session.get_outputs()[0].name

    def close(self) -> None:
        """Release the session now (not whenever the garbage collector gets to it)."""
        self.session = None

    def infer(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``(N, H, W, 3)`` -> float32 ``(N, D)``."""
        [out] = self.session.run([self._output], {self._input: images})
        return np.asarray(out, dtype=np.float32)


def session_options(ort: Any, threads: int) -> Any:
    """The session's options (see the module docstring)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry(ALLOW_SPINNING, "0")
    options.log_severity_level = 3  # errors only: not its notes on the graph's unused initialisers
    return options


def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ConfigError(f"runtime='onnxruntime' needs the onnxruntime package: {INSTALL_ONNX}.") from exc
    return ort


def _check_precision(precision: str) -> None:
    if precision not in RUNTIME_PRECISIONS["onnxruntime"]:
        raise ConfigError(f"runtime='onnxruntime' supports precisions {list(RUNTIME_PRECISIONS['onnxruntime'])}. "
                          f"Got {precision!r}; pass --precision fp32 (or auto), or --runtime torch.")


def _session(ort: Any, directory: Path, dim: int, threads: int, exported: bool) -> OnnxRuntimeBackbone:
    session = ort.InferenceSession(str(directory / MODEL_FILE), sess_options=session_options(ort, threads),
                                   providers=["CPUExecutionProvider"])
    return OnnxRuntimeBackbone(session, dim, exported=exported, directory=directory, threads=threads)


def onnx_backbone(bb: Backbone, *, precision: str, exports_dir: Path, threads: int | None = None
                  ) -> OnnxRuntimeBackbone:
    """The backbone as an ONNX Runtime CPU session, exporting it first unless a valid export is
    cached in ``exports_dir``; ``precision`` must be a resolved precision ONNX Runtime runs
    (fp32); ``threads`` defaults to torch's intra-op thread count (the thread policy's)."""
    ort = _import_ort()
    _check_precision(precision)
    directory, exported = cached_export(bb.identity(), exports_dir, runtime="onnxruntime",
                                        export_version=EXPORT_VERSION, suffix=".onnx", files=(MODEL_FILE,),
                                        write=lambda d: _export(bb, d))
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    return _session(ort, directory, bb.dim, threads, exported)


def find_onnx_export(spec: BackboneSpec, exports_dir: Path) -> Path | None:
    """The directory of a valid cached ONNX export of ``spec``, or None (no torch imported)."""
    return find_export(spec, exports_dir, runtime="onnxruntime", export_version=EXPORT_VERSION, suffix=".onnx",
                       files=(MODEL_FILE,))


def onnx_export_session(directory: Path, spec: BackboneSpec, *, precision: str, threads: int
                        ) -> OnnxRuntimeBackbone:
    """The session of the export in ``directory`` (:func:`find_onnx_export`)."""
    ort = _import_ort()
    _check_precision(precision)
    return _session(ort, directory, spec.dim, threads, False)
