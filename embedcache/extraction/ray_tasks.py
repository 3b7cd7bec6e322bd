"""What runs inside Ray (``--engine ray``): decoding a shard in a task, and the backbone in an actor
that runs the shard's batches and writes the shard file.

The batches inside a shard are the rows ``[k*B, (k+1)*B)`` of the whole entry (shards start at
multiples of the batch size), decoded, stacked and normalised by the same functions as the
single-process loop, so the features are the same numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedcache.extraction.loop import ImageDataset, inference_module, model_input
from embedcache.models.backbone import Backbone
from embedcache.models.preprocess import PreprocessSpec
from embedcache.runtime import autocast
from embedcache.sources.base import ImageSource
from embedcache.store.shards import write_shard

#: Test hook: an actor calls ``os._exit`` after this many batches (once per shard directory, so the
#: restarted actor finishes), to prove that Ray retries a shard whose worker died.
FAULT_ENV = "EMBEDCACHE_FAULT_EXIT_AFTER_BATCHES"
#: The marker that the fault hook fired (in the shard directory; removed with the entry).
FAULT_MARKER = ".fault-injected"


def decode_shard(batch: dict[str, np.ndarray], *, source: ImageSource, spec: PreprocessSpec,
                 ranges: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """Ray Data task: decode every row of the shard in ``batch["shard"]`` (one shard per batch).

    Returns one row: the shard index, its images ``(1, rows, H, W, 3)`` uint8 (zeros where a file
    failed), which rows decoded, and the failures as JSON ``[[row in shard, message], ...]``.
    """
    (shard,) = batch["shard"].tolist()
    start, stop = ranges[shard]
    dataset = ImageDataset(source, spec)
    tensors, failures = [], []
    for row in range(start, stop):
        _, tensor, error = dataset[row]
        tensors.append(None if tensor is None else tensor.permute(1, 2, 0).numpy())
        if tensor is None:
            failures.append([row - start, str(error)])
    shape = next((t.shape for t in tensors if t is not None), (spec.crop_size, spec.crop_size, 3))
    images = np.zeros((stop - start, *shape), dtype=np.uint8)
    for i, tensor in enumerate(tensors):
        if tensor is not None:
            images[i] = tensor
    good = np.array([t is not None for t in tensors], dtype=bool)
    return {"shard": np.array([shard]), "images": images[None], "good": good[None],
            "failures": np.array([json.dumps(failures)])}


class ShardEmbedder:
    """Ray Data actor: the backbone, prepared once; each call embeds one decoded shard and writes
    its shard file (temporary name, read back, fsync, rename)."""

    def __init__(self, *, backbone: Backbone, device: str, precision: str, batch_size: int,
                 ranges: list[tuple[int, int]], writing: dict[str, Any], fault_after: int | None = None,
                 runtime: str = "torch", exports_dir: str | None = None) -> None:
        self.device = torch.device(device)
        self.module = inference_module(backbone, self.device, runtime=runtime, precision=precision,
                                       exports_dir=None if exports_dir is None else Path(exports_dir))
        self.preprocess = backbone.preprocess
        self.precision, self.batch_size, self.ranges = precision, batch_size, ranges
        self.writing = writing
        self.fault_after = fault_after
        self.batches_run = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (shard,) = batch["shard"].tolist()
        start, stop = self.ranges[shard]
        images, good = batch["images"][0], batch["good"][0].astype(bool)
        features = self._embed(images, good, start)
        failures = [(int(row), str(message)) for row, message in json.loads(str(batch["failures"][0]))]
        w = self.writing
        static = {k: (v[start:stop] if k != "target_names" else v) for k, v in w["static"].items()}
        path = write_shard(folder=Path(w["folder"]), index=shard, rows=(start, stop), cache_key=w["cache_key"],
                           dim=w["dim"], store_dtype=w["store_dtype"], static=static, attrs=w["attrs"],
                           features=features, done=good, failures=failures)
        return {"shard": np.array([shard]), "done": np.array([int(good.sum())]),
                "failed": np.array([len(failures)]), "path": np.array([str(path)]),
                "failures": batch["failures"]}

    def _embed(self, images: np.ndarray, good: np.ndarray, start: int) -> np.ndarray:
        """Features of the good rows, batch by batch on the entry's batch grid (NaN elsewhere)."""
        n = len(good)
        out = np.full((n, self.writing["dim"]), np.nan, dtype=np.float32)
        with torch.inference_mode(), autocast(self.device, self.precision):
            for begin in range(0, n, self.batch_size):
                rows = np.flatnonzero(good[begin:begin + self.batch_size]) + begin
                if len(rows) == 0:
                    continue
                self._maybe_fail()
                # (M, H, W, 3) viewed as (M, 3, H, W): channels-last in memory, as the local loop stacks it
                batch = torch.from_numpy(np.ascontiguousarray(images[rows])).permute(0, 3, 1, 2)
                if getattr(self.module, "takes_uint8", False):  # a runtime's model (OpenVINO, ONNX Runtime)
                    out[rows] = self.module(batch)
                else:
                    out[rows] = self.module(model_input(batch, self.device, self.preprocess)).float().cpu().numpy()
                self.batches_run += 1
        return out

    def _maybe_fail(self) -> None:
        if self.fault_after is None or self.batches_run < self.fault_after:
            return
        marker = Path(self.writing["folder"]) / FAULT_MARKER
        with contextlib.suppress(FileExistsError):
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            os._exit(1)
