"""On a GPU, one batch ahead: the next batch's upload overlaps the current forward pass, and the
features come back to the host without stopping the loop.

:func:`run_batches <embedcache.extraction.loop.run_batches>` on CUDA hands every batch to
:func:`overlapped`, which runs three stages a batch apart:

* ``upload``: the batch's pinned uint8 tensor (the DataLoader pins it) is copied to the GPU on a
  side stream (:func:`cuda_stages`), issued as soon as the batch is decoded;
* ``compute``: the main stream waits for that copy only, normalises and runs the model, and
  queues the copy of the features into pinned host memory;
* ``collect``: waits for that copy one step later, once the next batch's forward pass and the
  upload of the one after it are queued.

So while the GPU runs batch k, the host fetches batch k+1 from the DataLoader and queues its
upload, then takes batch k-1's features; nothing waits on the device except the last step. The
scheduling is plain Python over the three callables (tests/extraction/test_cuda_overlap.py
checks its order and results on the CPU); the CUDA stages are the usual streams and events.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from embedcache.extraction.batches import Batch

Stage = Callable[[Any], Any]


def overlapped(items: Iterator[tuple[Any, Any, list[tuple[int, str]]]], upload: Stage, compute: Stage,
               collect: Callable[[Any], np.ndarray]) -> Iterator[Batch]:
    """Yield one :class:`Batch` per item of ``items`` (``(indices tensor, uint8 batch,
    failures)``, as the DataLoader gives them), in order, each batch's stages a step apart (see
    the module docstring). A batch with no good image goes through without stages."""

    def fetch() -> tuple[Any, list[tuple[int, str]], float, Any] | None:
        waiting = time.perf_counter()
        item = next(items, None)
        if item is None:
            return None
        indices, images, failures = item
        wait = time.perf_counter() - waiting
        return indices, failures, wait, upload(images) if len(indices) else None

    pending: tuple[Any, list[tuple[int, str]], float, Any] | None = None
    current = fetch()
    while current is not None:
        indices, failures, wait, staged = current
        result = compute(staged) if staged is not None else None
        current = fetch()  # the next batch's upload is queued behind this forward pass
        if pending is not None:
            yield _finished(pending, collect)
        pending = (indices, failures, wait, result)
    if pending is not None:
        yield _finished(pending, collect)


def _finished(pending: tuple[Any, list[tuple[int, str]], float, Any], collect: Callable[[Any], np.ndarray]) -> Batch:
    indices, failures, wait, result = pending
    return Batch(indices.numpy(), None if result is None else collect(result), failures, wait)


def cuda_stages(device: Any, forward: Callable[[Any], Any]) -> tuple[Stage, Stage, Callable[[Any], np.ndarray]]:
    """``(upload, compute, collect)`` for :func:`overlapped` on a CUDA ``device``; ``forward``
    maps the uploaded uint8 batch to the model's output on the device (normalisation included)."""
    import torch

    copies = torch.cuda.Stream(device=device)

    def upload(images: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        with torch.cuda.stream(copies):
            on_device = images.to(device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(copies)
        return on_device, ready

    def compute(staged: tuple[torch.Tensor, torch.cuda.Event]) -> tuple[torch.Tensor, torch.cuda.Event]:
        on_device, ready = staged
        main = torch.cuda.current_stream(device)
        main.wait_event(ready)
        on_device.record_stream(main)  # allocated on the copy stream, used on this one
        outputs = forward(on_device).float()
        host = torch.empty(outputs.shape, dtype=outputs.dtype, pin_memory=True)
        host.copy_(outputs, non_blocking=True)
        done = torch.cuda.Event()
        done.record(main)
        return host, done

    def collect(result: tuple[torch.Tensor, torch.cuda.Event]) -> np.ndarray:
        host, done = result
        done.synchronize()
        return host.numpy()

    return upload, compute, collect
