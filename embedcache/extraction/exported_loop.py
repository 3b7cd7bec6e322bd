"""The inference loop of a cached export, without torch.

When the runtime is OpenVINO or ONNX Runtime and the backbone's export is already in the cache
directory (exported by an earlier run: once per backbone configuration), nothing of torch is
needed: the export is found from the backbone's remembered identity
(:func:`find_cached_export`), images are decoded to uint8 HWC arrays, straight into their
batch's array, by decoding threads (PIL releases the GIL while it decodes and resizes;
:class:`DecodePool`: one thread to begin with, another each time the model had to wait for a
batch) running :data:`PREFETCH_BATCHES` batches ahead of the model, and the runtime is compiled
while the first batches decode (with a longer lead then, :func:`startup_lead`, so that the other
cores do not idle). A runtime that runs several
batches side by side (OpenVINO compiled for throughput: each batch split over its streams) is
kept fed with that many batches in flight; they are collected in order. The batches, the
decoding and the export are the ones the DataLoader loop uses, so the features are the same,
bitwise; what is saved is importing torch (seconds of start-up) and building the torch model.
"""

from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
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
#: The model waited this long for a batch's images: one more decoding thread (up to the limit).
GROW_AFTER_WAIT_SECONDS = 0.002


class DecodePool:
    """Decoding threads, started one at a time (:meth:`grow`), taking jobs in submission order.

    Decoding is mostly Python holding the GIL (PIL releases it only inside its C calls), so on a
    2-core machine a second decoding thread bought nothing and cost CPU the model lost: 3,000
    112 px images took 1.0 s of decoding CPU with two threads, 0.6 s with one, and the whole
    run 6-8 % longer. The loop starts one thread and adds one each time the model had to wait
    for decoded images (a fast model on many cores), up to ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self.grow()

    @property
    def size(self) -> int:
        return len(self._threads)

    def grow(self) -> bool:
        """Start one more thread unless ``limit`` run already; whether one was started."""
        if len(self._threads) >= self.limit:
            return False
        thread = threading.Thread(target=self._work, name=f"embedcache-decode_{len(self._threads)}", daemon=True)
        thread.start()
        self._threads.append(thread)
        return True

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(exc)

    def shutdown(self) -> None:
        """Cancel the jobs not started, let the running ones finish, stop the threads."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()


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
        decoders: decoding threads at most (:class:`DecodePool`; 0: decode in this thread,
            between forward passes).
    """
    if not batches:
        return
    # each image is written straight into its row of the batch's array, which the model then
    # reads in place (no stacking, no copy into the runtime's input)
    load = lambda index, out: to_uint8_array(source.load_pixels(index), spec, out)  # noqa: E731
    pool = DecodePool(decoders) if decoders > 0 else None
    model = None

    def submit(rows: Sequence[int]) -> tuple[np.ndarray, list[Future] | list[tuple[int, np.ndarray]]]:
        images = np.empty((len(rows), spec.crop_size, spec.crop_size, 3), dtype=np.uint8)
        jobs = [(i, images[k]) for k, i in enumerate(rows)]
        return images, [pool.submit(decode_row, load, i, out) for i, out in jobs] if pool is not None else jobs

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
                    images, items = decoding.popleft()
                    while len(decoding) < PREFETCH_BATCHES:
                        following = next(upcoming, None)
                        if following is None:
                            break
                        decoding.append(submit(following))
                    waiting = time.perf_counter()
                    decoded = [f.result() for f in items] if pool is not None else [decode_row(load, *job) for job in items]
                    wait = time.perf_counter() - waiting
                    if pool is not None and wait > GROW_AFTER_WAIT_SECONDS:
                        pool.grow()
                    running.append((*_start(model, images, decoded), wait))
                rows, failures, handle, wait = running.popleft()  # the oldest first: batches stay in order
                yield Batch(rows, None if handle is None else model.wait(handle), failures, wait,
                            pool.size if pool is not None else 0)
    finally:
        if model is not None:
            model.close()
        if pool is not None:
            pool.shutdown()


def startup_lead(batches: Sequence[Sequence[int]], spec: PreprocessSpec) -> int:
    """How many batches decode while the runtime is built: as many as fit in
    :data:`STARTUP_DECODE_BYTES` of decoded images, at least :data:`PREFETCH_BATCHES`."""
    per_batch = max(1, max(len(rows) for rows in batches) * spec.crop_size * spec.crop_size * 3)
    return max(PREFETCH_BATCHES, min(len(batches), STARTUP_DECODE_BYTES // per_batch))


def _start(model: ExportedBackbone, images: np.ndarray, decoded: list[tuple[int, np.ndarray | None, str | None]]
           ) -> tuple[np.ndarray, list[tuple[int, str]], Any]:
    """(rows, failures, the model's handle or None when no image of the batch decoded);
    ``images``: the batch's array, row k written by ``decoded[k]`` when it did not fail."""
    good = [k for k, (_, array, _) in enumerate(decoded) if array is not None]
    failures = [(int(i), str(message)) for i, array, message in decoded if array is None]
    rows = np.array([decoded[k][0] for k in good], dtype=np.int64)
    if not good:
        return rows, failures, None
    return rows, failures, model.start(images if len(good) == len(decoded) else images[good])
