"""``extract``: image source -> frozen backbone -> one HDF5 cache entry, in three steps.

1. :func:`~embedcache.extraction.plan.plan_extraction` resolves the entry's key; an existing
   entry is a cache hit (no model is built).
2. Rows already present are kept: a ``.partial`` from an interrupted run resumes, rows of
   unchanged files are copied from an older entry of the same configuration.
3. The rest runs through the inference loop (:mod:`embedcache.extraction.compute`, imported only
   then: a cache hit loads no torch; nor does a run whose compiled runtime finds its export
   cached, :mod:`embedcache.extraction.exported_loop`) and is written by index by a writer
   thread, committed every few batches; a
   resumed run recomputes only what is missing, in the same batches as an uninterrupted run, so
   its features are bitwise identical.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from embedcache.errors import ConfigError, CorruptEntryError
from embedcache.extraction.options import (
    ExtractStats,
    RunOptions,
    check_max_errors,
    parse_max_errors,
)
from embedcache.extraction.plan import ExtractionPlan, build_backbone, plan_extraction
from embedcache.extraction.ray_engine import (
    DEFAULT_SHARD_SIZE,
    ENGINES,
    RayOptions,
    check_ray_options,
    import_ray,
)
from embedcache.fileio import named_write_errors
from embedcache.models.backbone import Backbone
from embedcache.runtime import check_workers, resolve_threads
from embedcache.sources.base import ImageSource
from embedcache.store.reader import FeatureStore
from embedcache.store.schema import CORRUPT_SUFFIX, SUFFIX

if TYPE_CHECKING:
    from embedcache.extraction.loop import Progress


@dataclass
class ExtractResult(FeatureStore):
    """The complete entry (a :class:`FeatureStore`), whether any model ran, and the statistics."""

    cache_hit: bool = False
    stats: ExtractStats | None = None


def extract(
    data: str | os.PathLike | ImageSource,
    *,
    backbone: str | Backbone = "efficientnet_lite0",
    weights: str | None = None,
    weights_path: str | os.PathLike | None = None,
    layer: str | None = None,
    pool: str = "avg",
    image_size: int | None = None,
    layers: str | list[str] | tuple[str, ...] | None = None,
    pools: str | list[str] | tuple[str, ...] | None = None,
    views: int = 1,
    augment: str | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    threads: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    runtime: str | None = None,
    store_dtype: str = "float16",
    cache_dir: str | os.PathLike | None = None,
    max_errors: float | int | str | None = None,
    unlabelled: bool | None = None,
    val_fraction: float = 0.0,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    targets: list[str] | None = None,
    incremental: bool = True,
    progress: Callable[[Progress], None] | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    concurrency: int | None = None,
    gpus_per_worker: float = 0.0,
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
        layers: extra feature sets computed in the same forward pass and stored in the same
            entry: graph nodes and presets (``stages`` for CNNs, ``last4`` for ViTs), comma-separated
            or a list; the default features stay ``/features``. Part of the cache key.
        pools: the pooling of every ``layers`` node: avg, max, avgmax, cls (comma-separated or a
            list; default avg, ``last4``: cls and avg). Each (node, pool) is one set ``node:pool``.
        views: views of every train image: its centre view plus ``views - 1`` augmented ones,
            deterministic per image and view (val, test: the centre view only). In the key.
        augment: what an augmented view is: ``flip``, ``crop`` or ``standard`` (the default
            with ``views`` > 1); see :data:`~embedcache.sources.views.AUGMENTS`.
        batch_size: images per forward pass.
        workers: DataLoader decoding processes (0 = decode in this process).
        threads: the model's intra-op threads (default ``$EMBEDCACHE_THREADS``, else the cores
            available to this process, the decoding workers not subtracted; see
            :func:`~embedcache.runtime.resolve_threads`).
        device: auto, cpu, cuda or mps.
        precision: auto, fp32, bf16 or fp16 (autocast dtype).
        runtime: auto, torch, openvino or onnxruntime (None: ``$EMBEDCACHE_RUNTIME``, else auto:
            on the CPU OpenVINO when it is installed, else ONNX Runtime when installed, else
            torch; see :mod:`~embedcache.models.runtimes`); a runtime other than torch is in the
            cache key. ONNX Runtime runs fp32 only (``precision`` auto resolves to it).
        store_dtype: float16 (default, half the disk) or float32.
        cache_dir: where entries live (default ``$EMBEDCACHE_DIR`` or ``./cache``).
        max_errors: fail when more images than this fail to decode (count, or fraction < 1).
        unlabelled: treat a folder as unlabelled images (auto-detected by default).
        val_fraction: hold-out to the val split when the source has no splits.
        test_fraction: hold-out to the test split when the source has no splits.
        split_seed: seed of that stratified hold-out.
        targets: numeric target columns of a CSV manifest (``--target``/``--targets``), stored
            with the features (a ``labels`` column of ``;``-separated names is stored as label
            sets without asking); they are part of the cache key.
        incremental: copy rows of unchanged files from an older entry of the same config, and
            feature sets from an entry of the same images with other ``layers`` (only a missing
            set is then computed; :mod:`~embedcache.extraction.compose`).
        progress: called after every batch with a :class:`~embedcache.extraction.loop.Progress`
            (with ``engine="ray"``: after every shard).
        engine: ``local`` (this process) or ``ray`` (shards on a Ray cluster; needs
            ``embedcache[ray]``). Not in the cache key: both give the same entry.
        ray_address: ``auto`` or ``HOST:PORT`` of a running Ray cluster (default: a local Ray).
        shard_size: rows per shard with ``engine="ray"`` (a multiple of ``batch_size``).
        concurrency: backbone actors with ``engine="ray"`` (default: one per GPU group, or half
            the CPUs).
        gpus_per_worker: GPUs per backbone actor with ``engine="ray"`` (0: CPUs).

    Returns:
        The complete entry as an :class:`ExtractResult` (a :class:`FeatureStore`): ``cache_hit``
        tells whether any model ran, ``stats`` what was computed, reused and resumed.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"The 'batch_size' parameter must be a positive int. Got {batch_size!r}.")
    workers = check_workers(workers)
    threads = resolve_threads(threads)  # every core: decoding workers share them (docs/benchmarks.md)
    ray_options = _engine_options(engine, batch_size, RayOptions(ray_address, shard_size, concurrency,
                                                                 gpus_per_worker))
    started = time.perf_counter()
    plan = plan_extraction(data, backbone=backbone, weights=weights, weights_path=weights_path, layer=layer,
                           pool=pool, image_size=image_size, layers=layers, pools=pools, device=device, precision=precision,
                           store_dtype=store_dtype, cache_dir=cache_dir, unlabelled=unlabelled,
                           val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed,
                           targets=targets, worker_device="cuda" if ray_options and gpus_per_worker else None,
                           runtime=runtime, views=views, augment=augment)
    options = RunOptions(batch_size, workers, threads, parse_max_errors(max_errors, len(plan.source)), max_errors,
                         incremental)
    warnings: list[str] = []
    hit = _cache_hit(plan, options, started, warnings)
    if hit is not None:
        return hit
    if ray_options is None and incremental and plan.request is not None and plan.backbone.feature_sets:
        from embedcache.extraction.compose import compose_entry

        def extract_set(node: str, set_pool: str) -> ExtractResult:  # the same run, one set alone
            request = plan.request
            return extract(plan.source, backbone=request.name, weights=request.weights,
                           weights_path=request.weights_path, layer=node, pool=set_pool,
                           image_size=request.image_size, batch_size=batch_size, workers=workers, threads=threads,
                           device=plan.device, precision=plan.precision, runtime=plan.runtime,
                           store_dtype=plan.store_dtype, cache_dir=plan.cache_dir, max_errors=max_errors,
                           incremental=incremental, progress=progress)

        composed = compose_entry(plan, options, extract_set, warnings)
        if composed is not None:  # a donor entry held the rest: only the missing set was computed
            return _computed(*composed, started, warnings)
    export = None
    if ray_options is None:
        from embedcache.extraction.exported_loop import find_cached_export

        export = find_cached_export(plan)
    if export is not None:  # a compiled runtime whose export is cached: no torch, no torch model
        from embedcache.extraction.compute import compute_entry

        store, stats = compute_entry(plan, None, options, progress, export=export)
        return _computed(store, stats, started, warnings)
    bb, plan = build_backbone(plan)
    hit = _cache_hit(plan, options, started, warnings)  # the remembered identity was stale: the true key
    if hit is not None:
        return hit
    if ray_options is not None:
        from embedcache.extraction.ray_engine import compute_sharded

        store, stats = compute_sharded(plan, bb, options, ray_options, progress)
    else:
        from embedcache.extraction.compute import (
            compute_entry,  # torch: only when rows must be computed
        )

        store, stats = compute_entry(plan, bb, options, progress)
    return _computed(store, stats, started, warnings)


def _computed(store: FeatureStore, stats: ExtractStats, started: float, warnings: list[str]) -> ExtractResult:
    stats.seconds = time.perf_counter() - started
    stats.warnings[:0] = warnings
    return ExtractResult(**vars(store), cache_hit=False, stats=stats)


def _engine_options(engine: str, batch_size: int, ray_options: RayOptions) -> RayOptions | None:
    """The ray engine's options (checked, Ray importable), or None for the local engine."""
    if engine not in ENGINES:
        raise ConfigError(f"The 'engine' parameter must be one of {list(ENGINES)}. Got {engine!r}.")
    if engine == "local":
        return None
    check_ray_options(ray_options, batch_size)
    import_ray()
    return ray_options


def _cache_hit(plan: ExtractionPlan, options: RunOptions, started: float, warnings: list[str]) -> ExtractResult | None:
    """The existing entry, or None when there is none or it failed its checksums (it is then set
    aside as ``<key16>.h5.corrupt`` and a note added to ``warnings``, so the entry is recomputed).
    Its recorded failures count against ``max_errors`` as on the run that wrote it."""
    if not plan.final_path.exists():
        return None
    try:
        store = FeatureStore.open(plan.final_path)
    except CorruptEntryError as exc:
        aside = plan.final_path.with_name(plan.final_path.name[: -len(SUFFIX)] + CORRUPT_SUFFIX)
        with named_write_errors(aside):
            os.replace(plan.final_path, aside)
        warnings.append(f"{exc} It was moved to {str(aside)!r} and is computed again.")
        return None
    check_max_errors(len(store.errors), options, [(row, message) for row, _path, message in store.errors],
                     plan.source)
    stats = ExtractStats(n=len(plan.source), failed=len(store.errors), seconds=time.perf_counter() - started,
                         device=plan.device, precision=plan.precision, runtime=plan.runtime, warnings=warnings)
    return ExtractResult(**vars(store), cache_hit=True, stats=stats)
