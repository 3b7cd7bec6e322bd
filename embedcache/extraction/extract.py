"""``extract``: image source -> frozen backbone -> one HDF5 cache entry, in three steps.

1. :func:`~embedcache.extraction.plan.plan_extraction` resolves the entry's key; an existing
   entry is a cache hit (no model is built).
2. Rows already present are kept: a ``.partial`` from an interrupted run resumes, rows of
   unchanged files are copied from an older entry of the same configuration.
3. The rest runs through the inference loop (:mod:`embedcache.extraction.loop`) and is written by
   index, committed every few batches; a resumed run recomputes only what is missing, in the same
   batches as an uninterrupted run, so its features are bitwise identical.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedcache.errors import ConfigError, TooManyErrorsError
from embedcache.extraction.loop import (
    ImageDataset,
    Progress,
    inference_module,
    row_batches,
    run_batches,
)
from embedcache.extraction.plan import ExtractionPlan, build_backbone, plan_extraction
from embedcache.models.backbone import Backbone
from embedcache.runtime import check_workers
from embedcache.sources.base import ImageSource
from embedcache.store.reader import FeatureStore, find_reusable_entry, reusable_rows
from embedcache.store.writer import StoreWriter

#: Commit progress (data, then done flags, then flush) every this many batches.
COMMIT_EVERY_BATCHES = 4


@dataclass
class ExtractStats:
    """What one ``extract`` call did.

    Attributes:
        n: rows of the entry; failed: images recorded as undecodable.
        seconds: the whole call; model_seconds: the inference loop (None on a cache hit).
        computed_rows / reused_rows / resumed_rows: rows run through the model in this call,
            copied from an older entry, found done in a ``.partial``.
        images_per_s: computed rows per second of the loop (None when nothing was computed).
        device, precision: where and how the model ran (or would have run).
        warnings: notes such as a discarded unreadable ``.partial``.
    """

    n: int
    failed: int
    seconds: float
    device: str
    precision: str
    model_seconds: float | None = None
    computed_rows: int = 0
    reused_rows: int = 0
    resumed_rows: int = 0
    images_per_s: float | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ExtractResult(FeatureStore):
    """The complete entry (a :class:`FeatureStore`), whether any model ran, and the statistics."""

    cache_hit: bool = False
    stats: ExtractStats | None = None


@dataclass(frozen=True)
class RunOptions:
    """How the rows are computed (none of it is in the cache key)."""

    batch_size: int
    workers: int
    max_errors: int | None
    max_errors_text: Any
    incremental: bool


def parse_max_errors(max_errors: float | int | str | None, n: int) -> int | None:
    """A count, or a fraction in (0, 1) of ``n``; None = unlimited."""
    if max_errors is None:
        return None
    try:
        value = float(max_errors)
    except (TypeError, ValueError):
        raise ConfigError(
            f"The 'max_errors' parameter must be a count (e.g. 10) or a fraction in (0, 1) "
            f"(e.g. 0.01). Got {max_errors!r}."
        ) from None
    if not np.isfinite(value) or value < 0:
        raise ConfigError(f"The 'max_errors' parameter must be a finite number >= 0. Got {max_errors!r}.")
    if 0 < value < 1:
        return int(np.floor(value * n))
    if value != int(value):
        raise ConfigError(
            f"The 'max_errors' parameter must be a whole count or a fraction below 1. Got {max_errors!r}."
        )
    return int(value)


def extract(
    data: str | os.PathLike | ImageSource,
    *,
    backbone: str | Backbone = "efficientnet_lite0",
    weights: str | None = None,
    weights_path: str | os.PathLike | None = None,
    layer: str | None = None,
    pool: str = "avg",
    image_size: int | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    store_dtype: str = "float16",
    cache_dir: str | os.PathLike | None = None,
    max_errors: float | int | str | None = None,
    unlabelled: bool | None = None,
    val_fraction: float = 0.0,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    incremental: bool = True,
    progress: Callable[[Progress], None] | None = None,
) -> ExtractResult:
    """Extract pooled features once into the cache; a second call with the same inputs is a hit.

    Args:
        data: a folder, a CSV manifest, ``torchvision:NAME:ROOT``, ``demo``, or an ImageSource.
        backbone: a backbone name (see ``embedcache backbones``) or a built :class:`Backbone`.
        weights: weights tag for the backbone (``DEFAULT``, ``none``, ...).
        weights_path: local state dict (.safetensors / .pt) loaded into the architecture.
        layer: intermediate graph node instead of the penultimate features.
        pool: pooling of ``layer``: avg, max, avgmax, cls.
        image_size: model input size (pixels); default: the backbone's own.
        batch_size: images per forward pass.
        workers: DataLoader decoding processes (0 = decode in this process).
        device: auto, cpu, cuda or mps.
        precision: auto, fp32, bf16 or fp16 (autocast dtype).
        store_dtype: float16 (default, half the disk) or float32.
        cache_dir: where entries live (default ``$EMBEDCACHE_DIR`` or ``./cache``).
        max_errors: fail when more images than this fail to decode (count, or fraction < 1).
        unlabelled: treat a folder as unlabelled images (auto-detected by default).
        val_fraction: hold-out to the val split when the source has no splits.
        test_fraction: hold-out to the test split when the source has no splits.
        split_seed: seed of that stratified hold-out.
        incremental: copy rows of unchanged files from an older entry of the same config.
        progress: called after every batch with a :class:`~embedcache.extraction.loop.Progress`.

    Returns:
        The complete entry as an :class:`ExtractResult` (a :class:`FeatureStore`): ``cache_hit``
        tells whether any model ran, ``stats`` what was computed, reused and resumed.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"The 'batch_size' parameter must be a positive int. Got {batch_size!r}.")
    workers = check_workers(workers)
    started = time.perf_counter()
    plan = plan_extraction(data, backbone=backbone, weights=weights, weights_path=weights_path, layer=layer,
                           pool=pool, image_size=image_size, device=device, precision=precision,
                           store_dtype=store_dtype, cache_dir=cache_dir, unlabelled=unlabelled,
                           val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed)
    options = RunOptions(batch_size, workers, parse_max_errors(max_errors, len(plan.source)), max_errors, incremental)
    if plan.final_path.exists():
        return _cache_hit(plan, started)
    bb, plan = build_backbone(plan)
    if plan.final_path.exists():  # the remembered identity was stale: the true key is a hit
        return _cache_hit(plan, started)
    return _compute(plan, bb, options, started, progress)


def _cache_hit(plan: ExtractionPlan, started: float) -> ExtractResult:
    store = FeatureStore.open(plan.final_path)
    stats = ExtractStats(n=len(plan.source), failed=len(store.errors), seconds=time.perf_counter() - started,
                         device=str(plan.device), precision=plan.precision)
    return ExtractResult(**vars(store), cache_hit=True, stats=stats)


def _compute(plan: ExtractionPlan, bb: Backbone, options: RunOptions, started: float,
             progress: Callable[[Progress], None] | None) -> ExtractResult:
    samples = plan.source.samples
    n = len(samples)
    with StoreWriter(cache_dir=plan.cache_dir, cache_key=plan.cache_key, n=n, dim=plan.backbone.dim,
                     store_dtype=plan.store_dtype, attrs=plan.entry_attrs(), paths=[s.path for s in samples],
                     labels=[s.label for s in samples], splits=[s.split for s in samples],
                     file_sizes=[s.size for s in samples], file_mtimes_ns=[s.mtime_ns for s in samples]) as writer:
        reused = _reuse_unchanged_rows(writer, plan) if options.incremental else 0
        batches = row_batches(writer.attempted, options.batch_size)
        loop_seconds = _write_batches(plan, bb, writer, batches, options, progress)
        computed = sum(len(b) for b in batches)
        rate = computed / loop_seconds if computed and loop_seconds > 0 else None
        final_path = writer.finalize({"extract_seconds": loop_seconds, "extract_images_per_s": rate or 0.0})
        resumed, warnings = writer.resumed_rows, list(writer.warnings)
    store = FeatureStore.open(final_path)
    stats = ExtractStats(n=n, failed=len(store.errors), seconds=time.perf_counter() - started,
                         device=str(plan.device), precision=plan.precision, model_seconds=loop_seconds,
                         computed_rows=computed, reused_rows=reused, resumed_rows=resumed, images_per_s=rate,
                         warnings=warnings)
    return ExtractResult(**vars(store), cache_hit=False, stats=stats)


def _write_batches(plan: ExtractionPlan, bb: Backbone, writer: StoreWriter, batches: list[list[int]],
                   options: RunOptions, progress: Callable[[Progress], None] | None) -> float:
    """Run ``batches`` through the model into ``writer``; returns the loop's seconds."""
    n = len(plan.source)
    computed = sum(len(b) for b in batches)
    attempted = int(writer.attempted.sum())
    loop_started = time.perf_counter()
    module = inference_module(bb, plan.device) if batches else None
    dataset = ImageDataset(plan.source, bb.preprocess)
    for index, batch in enumerate(run_batches(module, dataset, batches, device=plan.device,
                                              precision=plan.precision, workers=options.workers)):
        if batch.outputs is not None:
            writer.write_rows(batch.rows, batch.outputs)
        writer.record_errors(batch.failures)
        attempted += len(batch.rows) + len(batch.failures)
        if options.max_errors is not None and writer.n_failed > options.max_errors:
            writer.commit()
            raise TooManyErrorsError(
                f"{writer.n_failed} images failed to decode, more than max_errors={options.max_errors_text} "
                f"allows. First failures: "
                + "; ".join(f"{plan.source.samples[i].path}: {m}" for i, m in batch.failures[:3])
                + ". Progress is kept: fix or remove the files and rerun, or raise --max-errors."
            )
        if (index + 1) % COMMIT_EVERY_BATCHES == 0:
            writer.commit()
        if progress is not None:
            elapsed = time.perf_counter() - loop_started
            done_now = attempted - (n - computed)
            progress(Progress(done=attempted, total=n, failed=writer.n_failed,
                              images_per_s=done_now / elapsed if elapsed > 0 else 0.0))
    return time.perf_counter() - loop_started


def _reuse_unchanged_rows(writer: StoreWriter, plan: ExtractionPlan) -> int:
    """Copy rows of files unchanged since the newest complete entry of the same config."""
    previous = find_reusable_entry(plan.cache_dir, plan.config_key)
    if previous is None:
        return 0
    old = reusable_rows(previous)
    attempted = writer.attempted
    mapping = {}
    for row, sample in enumerate(plan.source.samples):
        if attempted[row] or sample.size <= 0:
            continue
        match = old.get((sample.path, sample.size, sample.mtime_ns))
        if match is not None:
            mapping[row] = match
    return writer.copy_rows_from(previous, mapping)
