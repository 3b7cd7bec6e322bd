"""The inference loop of a cached export, without torch.

When the runtime is OpenVINO or ONNX Runtime and the backbone's export is already in the cache
directory (exported by an earlier run: once per backbone configuration), nothing of torch is
needed: the export is found from the backbone's remembered identity
(:func:`find_cached_export`), images are decoded to uint8 HWC arrays by a pool of threads (PIL
releases the GIL while it decodes and resizes) running :data:`PREFETCH_BATCHES` batches ahead
of the model, and the runtime is compiled while the first batches decode (with a longer lead
then, :func:`startup_lead`, so that the other cores do not idle). A runtime that runs several
batches side by side (OpenVINO compiled for throughput: each batch split over its streams) is
kept fed with that many batches in flight; they are collected in order. The batches, the
decoding and the export are the ones the DataLoader loop uses, so the features are the same,
bitwise; what is saved is importing torch (seconds of start-up) and building the torch model.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from embedcache.extraction.batches import Batch, decode_row
from embedcache.extraction.plan import ExtractionPlan
from embedcache.models.export_cache import ExportedBackbone
from embedcache.models.preprocess import PreprocessSpec, to_uint8_array
from embedcache.models.runtimes import EXPORTS_DIR
from embedcache.runtime import reuse_freed_memory
from embedcache.sources.base import ImageSource

#: Batches being decoded ahead of the model.
PREFETCH_BATCHES = 2
#: While the runtime is imported and compiled (a few tenths of a second on one core), the
#: decoding threads run further ahead, up to this many bytes of decoded images: the other cores
#: would idle otherwise. The model then drains that lead; the steady state is PREFETCH_BATCHES.
STARTUP_DECODE_BYTES = 64 << 20


def find_cached_export(plan: ExtractionPlan) -> Path | None:
    """The directory of a valid cached export for the plan's runtime on the CPU, or None (then the
    torch loop runs, exporting first)."""
    if plan.device != "cpu" or plan.built is not None:
        return None
    exports = plan.cache_dir / EXPORTS_DIR
    if plan.runtime == "openvino":
        from embedcache.models.openvino_backbone import find_openvino_export

        return find_openvino_export(plan.backbone, exports)
    if plan.runtime == "onnxruntime":
        from embedcache.models.onnx_backbone import find_onnx_export

        return find_onnx_export(plan.backbone, exports)
    return None


def compile_cached_export(plan: ExtractionPlan, directory: Path, threads: int) -> ExportedBackbone:
    """The plan's runtime model of the export in ``directory`` (:func:`find_cached_export`)."""
    if plan.runtime == "openvino":
        from embedcache.models.openvino_backbone import compile_openvino_export

        # Compiled for throughput: this loop keeps several batches in flight (run_exported_batches).
        return compile_openvino_export(directory, plan.backbone, precision=plan.precision, threads=threads,
                                       throughput=True)
    from embedcache.models.onnx_backbone import onnx_export_session

    return onnx_export_session(directory, plan.backbone, precision=plan.precision, threads=threads)


def run_exported_batches(build: Callable[[], ExportedBackbone], source: ImageSource, spec: PreprocessSpec,
                         batches: Sequence[Sequence[int]], *, decoders: int) -> Iterator[Batch]:
    """Yield one :class:`Batch` per entry of ``batches`` (row indices of ``source``), in order.

    Args:
        build: makes the runtime's model (called once the first batches are decoding).
        source, spec: the images and their preprocessing.
        batches: the rows of each batch.
        decoders: decoding threads (0: decode in this thread, between forward passes).
    """
    if not batches:
        return
    load = lambda index: to_uint8_array(source.load_pixels(index), spec)  # noqa: E731
    pool = ThreadPoolExecutor(decoders, thread_name_prefix="embedcache-decode") if decoders > 0 else None
    model = None

    def submit(rows: Sequence[int]) -> list[Future] | Sequence[int]:
        return [pool.submit(decode_row, load, i) for i in rows] if pool is not None else rows

    try:
        upcoming = iter(batches)
        lead = startup_lead(batches, spec) if pool is not None else PREFETCH_BATCHES
        decoding = collections.deque(submit(rows) for rows in itertools.islice(upcoming, lead))
        model = build()
        depth = max(1, int(model.pipeline_depth))
        running: collections.deque[tuple[np.ndarray, list[tuple[int, str]], Any, float]] = collections.deque()
        with reuse_freed_memory():
            while decoding or running:
                while decoding and len(running) < depth:  # keep the model's requests busy
                    items = decoding.popleft()
                    while len(decoding) < PREFETCH_BATCHES:
                        following = next(upcoming, None)
                        if following is None:
                            break
                        decoding.append(submit(following))
                    waiting = time.perf_counter()
                    decoded = [f.result() for f in items] if pool is not None else [decode_row(load, i) for i in items]
                    running.append((*_start(model, decoded), time.perf_counter() - waiting))
                rows, failures, handle, wait = running.popleft()  # the oldest first: batches stay in order
                yield Batch(rows, None if handle is None else model.wait(handle), failures, wait)
    finally:
        if model is not None:
            model.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def startup_lead(batches: Sequence[Sequence[int]], spec: PreprocessSpec) -> int:
    """How many batches decode while the runtime is built: as many as fit in
    :data:`STARTUP_DECODE_BYTES` of decoded images, at least :data:`PREFETCH_BATCHES`."""
    per_batch = max(1, max(len(rows) for rows in batches) * spec.crop_size * spec.crop_size * 3)
    return max(PREFETCH_BATCHES, min(len(batches), STARTUP_DECODE_BYTES // per_batch))


def _start(model: ExportedBackbone, decoded: list[tuple[int, np.ndarray | None, str | None]]
           ) -> tuple[np.ndarray, list[tuple[int, str]], Any]:
    """(rows, failures, the model's handle or None when no image of the batch decoded)."""
    good = [(i, array) for i, array, _ in decoded if array is not None]
    failures = [(int(i), str(message)) for i, array, message in decoded if array is None]
    rows = np.array([i for i, _ in good], dtype=np.int64)
    if not good:
        return rows, failures, None
    return rows, failures, model.start(np.stack([array for _, array in good]))
