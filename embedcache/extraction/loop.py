"""The one inference loop: batches of source rows -> decoded uint8 tensors -> a frozen module.

Extraction, ``predict`` and fine-tuning's evaluation all run images through :func:`run_batches`.
DataLoader workers decode and resize to compact uint8 tensors (channels-last memory);
normalisation happens next to the model in one fused multiply-add; the model runs under
``inference_mode`` with autocast at the resolved precision. A bad image never stops the loop:
it comes back as a failure ``(row, message)``.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedcache.errors import ConfigError
from embedcache.extraction.batches import Batch, Progress, decode_row, row_batches
from embedcache.extraction.cuda_overlap import cuda_stages, overlapped
from embedcache.models.backbone import Backbone
from embedcache.models.fuse import fold_batchnorms
from embedcache.models.preprocess import PreprocessSpec, normalize_batch, to_uint8_tensor
from embedcache.models.runtimes import resolve_runtime_precision
from embedcache.runtime import autocast, resolve_device, reuse_freed_memory
from embedcache.sources.base import ImageSource

#: Batches each DataLoader worker prepares ahead of the model.
PREFETCH_BATCHES = 4

__all__ = ["Batch", "Deferred", "ImageDataset", "Progress", "collate_images", "compute_features", "image_loader",
           "inference_module", "input_buffer", "model_input", "row_batches", "run_batches"]


class ImageDataset(torch.utils.data.Dataset):
    """Decode + preprocess in DataLoader workers; ``item i -> (i, uint8 (3,H,W) | None, error)``.

    Never raises for a bad image: the error message comes back instead of the tensor.
    """

    def __init__(self, source: ImageSource, spec: PreprocessSpec) -> None:
        self.source = source
        self.spec = spec

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        return decode_row(self.tensor, index)

    def tensor(self, index: int) -> torch.Tensor:
        """Item ``index`` as a uint8 ``(3, H, W)`` tensor; subclasses change what is loaded and how."""
        return to_uint8_tensor(self.source.load_pixels(index), self.spec)


def collate_images(items: list[tuple[int, torch.Tensor | None, str | None]]
                   ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
    """Stack the good rows; return ``(indices, uint8 batch (M,3,H,W), [(index, message)])``.

    A batch of only bad images gives indices of length 0 and a ``(0, 3, 0, 0)`` batch.
    """
    good = [(i, t) for i, t, _ in items if t is not None]
    failures = [(int(i), str(msg)) for i, t, msg in items if t is None]
    indices = torch.tensor([i for i, _ in good], dtype=torch.long)
    if not good:
        return indices, torch.empty((0, 3, 0, 0), dtype=torch.uint8), failures
    # Stack as (M, H, W, 3) and view as (M, 3, H, W): the batch is channels_last in memory, the
    # layout the model runs in, so no reordering copy is needed later.
    batch = torch.stack([t.permute(1, 2, 0) for _, t in good]).permute(0, 3, 1, 2)
    return indices, batch, failures


def image_loader(dataset: torch.utils.data.Dataset, batches: Sequence[Sequence[int]], *, workers: int,
                 device: torch.device) -> torch.utils.data.DataLoader:
    """A DataLoader yielding ``collate_images`` batches of exactly ``batches``, in order."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=[list(b) for b in batches], num_workers=workers, collate_fn=collate_images,
        pin_memory=device.type == "cuda", prefetch_factor=PREFETCH_BATCHES if workers > 0 else None)


class Deferred:
    """A model built only once :func:`run_batches` has started its decoding workers (so they are
    forked from a process without the runtime's thread pool, and a runtime's compile overlaps
    their start-up)."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self.build = build


def model_input(images: torch.Tensor, device: torch.device, preprocess: PreprocessSpec,
                buffer: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 batch -> normalised float on ``device``, channels-last (the layout the model runs in).

    ``buffer``: a float32 channels-last tensor at least as long as the batch (:func:`input_buffer`)
    written into instead of a new tensor; its contents are overwritten by the next batch.
    """
    if buffer is not None:
        return normalize_batch(images.to(device, non_blocking=True), preprocess, out=buffer[: len(images)])
    x = normalize_batch(images.to(device, non_blocking=True), preprocess)
    if device.type in ("cpu", "cuda"):
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def input_buffer(buffer: torch.Tensor | None, images: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """The model-input buffer of a CPU loop, reused by every batch of the same shape (None on
    other devices, whose caching allocators reuse memory already).

    A new float32 batch per step (38 MB at 64 x 224 px) is above glibc's largest mmap threshold
    (32 MiB): every batch mapped fresh pages that the kernel zeroed again (system CPU time).
    """
    if device.type != "cpu":
        return None
    if buffer is not None and buffer.shape[1:] == images.shape[1:] and len(buffer) >= len(images):
        return buffer
    return torch.empty(tuple(images.shape), dtype=torch.float32, memory_format=torch.channels_last)


def inference_module(bb: Backbone, device: torch.device, *, runtime: str = "torch", precision: str = "fp32",
                     exports_dir: Path | None = None) -> Any:
    """The backbone ready for inference on ``device``: for torch its module, BatchNorm folded,
    channels-last; for ``runtime="openvino"`` or ``"onnxruntime"`` the runtime's model of the
    export (cached in ``exports_dir``)."""
    if runtime in ("openvino", "onnxruntime"):
        if exports_dir is None:
            raise ConfigError(f"runtime={runtime!r} needs a directory for its exports (the cache directory).")
        if runtime == "openvino":
            from embedcache.models.openvino_backbone import openvino_backbone as build
        else:
            from embedcache.models.onnx_backbone import onnx_backbone as build
        return build(bb, precision=precision, exports_dir=exports_dir)
    model = fold_batchnorms(bb.module, input_size=bb.preprocess.crop_size).to(device)
    if device.type in ("cpu", "cuda"):
        model = model.to(memory_format=torch.channels_last)
    return model


def run_batches(module: Any | Deferred, dataset: ImageDataset, batches: Sequence[Sequence[int]], *,
                device: torch.device, precision: str, workers: int) -> Iterator[Batch]:
    """Yield one :class:`Batch` per entry of ``batches`` (row indices of ``dataset``), in order.

    Args:
        module: a module on ``device`` mapping normalised ``(N, 3, H, W)`` to ``(N, D)``, or a
            runtime's model (``takes_uint8``) mapping the uint8 batch to float32 numpy; or a
            :class:`Deferred` one, built after the workers have started.
        dataset: decodes rows (its ``spec`` is the preprocessing applied).
        batches: the rows of each batch.
        device: where the module runs.
        precision: a resolved precision (``fp32``, ``bf16``, ``fp16``).
        workers: DataLoader decoding processes (0 = decode in this process).
    """
    if not batches:
        return
    if workers > 0 and "openvino" in sys.modules:
        # Decoding workers are forked, and a process that has run OpenVINO (its thread pool, its
        # allocator) is not safe to fork: in a test session that forked and ran OpenVINO again the
        # process later crashed. So a second run in one process decodes in-process; a command's
        # single run forks first and builds the runtime after (see Deferred).
        workers = 0
    loader = iter(image_loader(dataset, batches, workers=workers, device=device))  # workers start here
    built = isinstance(module, Deferred)
    if built:
        module = module.build()
    buffer = None
    reuse = reuse_freed_memory() if device.type == "cpu" else contextlib.nullcontext()
    try:
        with reuse, torch.inference_mode(), autocast(device, precision):
            if device.type == "cuda" and not getattr(module, "takes_uint8", False):
                # one batch ahead: uploads overlap the forward passes, features come back async
                yield from overlapped(loader, *cuda_stages(device, lambda x: module(model_input(x, device, dataset.spec))))
                return
            while True:
                waiting = time.perf_counter()
                item = next(loader, None)  # in-process decoding (workers=0) is all waiting
                if item is None:
                    break
                indices, images, failures = item
                wait = time.perf_counter() - waiting
                if len(indices) == 0:
                    yield Batch(indices.numpy(), None, failures, wait)
                    continue
                if getattr(module, "takes_uint8", False):
                    yield Batch(indices.numpy(), module(images), failures, wait)
                    continue
                buffer = input_buffer(buffer, images, device)
                outputs = module(model_input(images, device, dataset.spec, buffer)).float().cpu()
                if buffer is not None and outputs.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():
                    outputs = outputs.clone()  # a module that returns (a view of) its input: the next batch overwrites it
                yield Batch(indices.numpy(), outputs.numpy(), failures, wait)
    finally:
        if built and hasattr(module, "close"):
            module.close()  # a runtime's compiled model is released here, not at a random collection
        del loader  # the workers stop now


def compute_features(bb: Backbone, source: ImageSource, *, batch_size: int = 64, workers: int = 0,
                     device: str = "auto", precision: str = "auto", runtime: str = "torch",
                     exports_dir: Path | None = None, progress: Callable[[Progress], None] | None = None
                     ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Features of every image of ``source`` in memory, without the cache (used by predict);
    ``runtime`` is a resolved runtime (``torch``, or ``openvino`` or ``onnxruntime``, whose exports
    go to ``exports_dir``), ``precision`` one it can run (see
    :func:`~embedcache.models.runtimes.resolve_runtime_precision`).

    Returns:
        ``(rows, features (len(rows), D) float32, failures [(row, message)])``.
    """
    dev = resolve_device(device)
    prec = resolve_runtime_precision(runtime, precision, dev.type)
    batches = row_batches(np.zeros(len(source), dtype=bool), batch_size)
    rows, feats, failures = [], [], []
    started = time.perf_counter()
    dataset = ImageDataset(source, bb.preprocess)
    module = Deferred(lambda: inference_module(bb, dev, runtime=runtime, precision=prec, exports_dir=exports_dir))
    for batch in run_batches(module, dataset, batches, device=dev, precision=prec, workers=workers):
        failures.extend(batch.failures)
        if batch.outputs is not None:
            rows.append(batch.rows)
            feats.append(batch.outputs)
        if progress is not None:
            done = sum(len(r) for r in rows) + len(failures)
            elapsed = time.perf_counter() - started
            progress(Progress(done, len(source), len(failures), done / elapsed if elapsed else 0.0))
    if not rows:
        return np.zeros(0, np.int64), np.zeros((0, bb.dim), np.float32), failures
    return np.concatenate(rows), np.concatenate(feats), failures

