"""The extraction loop: image source → frozen backbone → HDF5 cache entry.

Performance choices (measured in benchmarks/): DataLoader workers decode and resize to compact
uint8 tensors; normalisation happens next to the model in one fused multiply-add; the model runs
under ``inference_mode`` in ``channels_last`` with autocast at the resolved precision (bf16 on CPUs
with native bf16, fp16 on CUDA/MPS); rows are written by index so a resumed run recomputes only
what is missing, in the same batches as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedcache import data as data_mod
from embedcache.backbones import Backbone, get_backbone
from embedcache.errors import ConfigError, TooManyErrorsError
from embedcache.fingerprint import cache_key as make_cache_key
from embedcache.fingerprint import config_key as make_config_key
from embedcache.fingerprint import library_versions, software_versions
from embedcache.preprocess import normalize_batch
from embedcache.store import (
    FeatureStore,
    StoreWriter,
    default_cache_dir,
    entry_paths,
    find_reusable_entry,
    reusable_rows,
)

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: Commit progress (data, then done flags, then flush) every this many batches.
COMMIT_EVERY_BATCHES = 4
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Progress:
    """What the progress callback receives after every batch."""

    done: int  # rows attempted so far in this run (including reused/resumed)
    total: int
    failed: int
    images_per_s: float


def resolve_device(device: str) -> torch.device:
    """``auto`` → cuda, else mps, else cpu; an unavailable explicit device is an error."""
    if device not in DEVICES:
        raise ConfigError(f"The 'device' parameter must be one of {list(DEVICES)}. Got {device!r}.")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' was asked for but torch sees no CUDA GPU. Use --device cpu.")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device='mps' was asked for but MPS is not available. Use --device cpu.")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX512_BF16 or AMX), where bf16 autocast pays off."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16 on CPUs with native bf16, fp16 on CUDA/MPS, else fp32."""
    if precision not in PRECISIONS:
        raise ConfigError(
            f"The 'precision' parameter must be one of {list(PRECISIONS)}. Got {precision!r}."
        )
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ConfigError("precision='fp16' is not supported on CPU; use bf16 or fp32.")
        return precision
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp16"


def default_workers() -> int:
    """One decoding worker per spare core, at least one, at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _batches(attempted: np.ndarray, batch_size: int) -> list[list[int]]:
    """Index ranges ``[k*B, (k+1)*B)`` minus attempted rows; whole-batch commits keep a resumed
    run's batches identical to an uninterrupted run's."""
    out = []
    n = len(attempted)
    for start in range(0, n, batch_size):
        rows = [i for i in range(start, min(n, start + batch_size)) if not attempted[i]]
        if rows:
            out.append(rows)
    return out


def _parse_max_errors(max_errors: float | int | str | None, n: int) -> int | None:
    if max_errors is None:
        return None
    try:
        value = float(max_errors)
    except (TypeError, ValueError):
        raise ConfigError(
            f"The 'max_errors' parameter must be a count (e.g. 10) or a fraction in (0, 1) "
            f"(e.g. 0.01). Got {max_errors!r}."
        ) from None
    if value < 0:
        raise ConfigError(f"The 'max_errors' parameter must be >= 0. Got {max_errors!r}.")
    if 0 < value < 1:
        return int(np.floor(value * n))
    if value != int(value):
        raise ConfigError(
            f"The 'max_errors' parameter must be a whole count or a fraction below 1. Got {max_errors!r}."
        )
    return int(value)


def extraction_plan(
    data: str | os.PathLike | data_mod.ImageSource,
    *,
    backbone: str | Backbone = "efficientnet_lite0",
    weights: str | None = None,
    weights_path: str | os.PathLike | None = None,
    layer: str | None = None,
    pool: str = "avg",
    image_size: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    store_dtype: str = "float16",
    cache_dir: str | os.PathLike | None = None,
    unlabelled: bool | None = None,
    val_fraction: float = 0.0,
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> dict[str, Any]:
    """Resolve everything that defines an entry (no model run): source, backbone, keys, path."""
    source = data if isinstance(data, data_mod.ImageSource) else data_mod.open_source(
        data,
        unlabelled=unlabelled,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        split_seed=split_seed,
    )
    if len(source) == 0:
        raise ConfigError(f"The data source {source.description!r} holds no images.")
    bb = backbone if isinstance(backbone, Backbone) else get_backbone(
        backbone, weights=weights, weights_path=weights_path, layer=layer, pool=pool, image_size=image_size
    )
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    backbone_spec = {k: v for k, v in bb.spec().items() if k != "dim"}
    cfg_key = make_config_key(
        backbone=backbone_spec,
        preprocess=bb.preprocess.to_dict(),
        precision=prec,
        store_dtype=store_dtype,
        decoder_version=data_mod.DECODER_VERSION,
    )
    manifest = source.manifest_sha256()
    key = make_cache_key(config=cfg_key, manifest_sha256=manifest)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final, partial, _ = entry_paths(cache_dir, key)
    return {
        "source": source,
        "backbone": bb,
        "device": dev,
        "precision": prec,
        "config_key": cfg_key,
        "manifest_sha256": manifest,
        "cache_key": key,
        "cache_dir": cache_dir,
        "final_path": final,
        "partial_path": partial,
    }


def extract(
    data: str | os.PathLike | data_mod.ImageSource,
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
) -> FeatureStore:
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
        progress: called after every batch with a :class:`Progress`.

    Returns:
        The complete :class:`FeatureStore`; ``cache_hit`` tells whether any model ran, ``stats``
        has n, failures, seconds, images/s, reused and computed rows.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"The 'batch_size' parameter must be a positive int. Got {batch_size!r}.")
    if store_dtype not in ("float16", "float32"):
        raise ConfigError(
            f"The 'store_dtype' parameter must be 'float16' or 'float32'. Got {store_dtype!r}."
        )
    workers = default_workers() if workers is None else workers
    if not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"The 'workers' parameter must be an int >= 0. Got {workers!r}.")
    started = time.perf_counter()
    plan = extraction_plan(
        data,
        backbone=backbone,
        weights=weights,
        weights_path=weights_path,
        layer=layer,
        pool=pool,
        image_size=image_size,
        device=device,
        precision=precision,
        store_dtype=store_dtype,
        cache_dir=cache_dir,
        unlabelled=unlabelled,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        split_seed=split_seed,
    )
    source: data_mod.ImageSource = plan["source"]
    bb: Backbone = plan["backbone"]
    n = len(source)
    limit = _parse_max_errors(max_errors, n)
    final: Path = plan["final_path"]
    if final.exists():
        store = FeatureStore.open(final)
        store.cache_hit = True
        store.stats = {
            "n": n,
            "failed": len(store.errors),
            "seconds": time.perf_counter() - started,
            "computed_rows": 0,
            "reused_rows": 0,
            "resumed_rows": 0,
            "images_per_s": None,
        }
        return store

    samples = source.samples
    attrs = {
        "name": f"{bb.name}-{Path(source.root).name or source.kind}",
        "config_key": plan["config_key"],
        "backbone": bb.spec(),
        "preprocess": bb.preprocess.to_dict(),
        "precision": plan["precision"],
        "decoder_version": data_mod.DECODER_VERSION,
        "versions": _versions(),
        "manifest_sha256": plan["manifest_sha256"],
        "source": source.to_dict(),
        "class_names": list(source.class_names),
    }
    with StoreWriter(
        cache_dir=plan["cache_dir"],
        cache_key=plan["cache_key"],
        n=n,
        dim=bb.dim,
        store_dtype=store_dtype,
        attrs=attrs,
        paths=[s.path for s in samples],
        labels=[s.label for s in samples],
        splits=[s.split for s in samples],
        file_sizes=[s.size for s in samples],
        file_mtimes_ns=[s.mtime_ns for s in samples],
    ) as writer:
        reused = 0
        if incremental:
            reused = _reuse_unchanged_rows(writer, plan, samples)
        batches = _batches(writer.attempted, batch_size)
        computed = sum(len(b) for b in batches)
        loop_started = time.perf_counter()
        attempted = int(writer.attempted.sum())
        for index, (rows, feats, failures) in enumerate(
            _run_model(bb, source, batches, device=plan["device"], precision=plan["precision"], workers=workers)
        ):
            writer.write_rows(rows, feats)
            writer.record_errors(failures)
            attempted += len(rows) + len(failures)
            if limit is not None and writer.n_failed > limit:
                writer.commit()
                raise TooManyErrorsError(
                    f"{writer.n_failed} images failed to decode, more than max_errors={max_errors} "
                    f"allows. First failures: "
                    + "; ".join(f"{samples[i].path}: {m}" for i, m in failures[:3])
                    + ". Progress is kept: fix or remove the files and rerun, or raise --max-errors."
                )
            if (index + 1) % COMMIT_EVERY_BATCHES == 0:
                writer.commit()
            if progress is not None:
                elapsed = time.perf_counter() - loop_started
                done_now = attempted - (n - computed)
                progress(
                    Progress(
                        done=attempted,
                        total=n,
                        failed=writer.n_failed,
                        images_per_s=done_now / elapsed if elapsed > 0 else 0.0,
                    )
                )
        loop_seconds = time.perf_counter() - loop_started
        rate = computed / loop_seconds if computed and loop_seconds > 0 else 0.0
        final_path = writer.finalize({"extract_seconds": loop_seconds, "extract_images_per_s": rate})
        resumed = writer.resumed_rows
        warnings = list(writer.warnings)
    store = FeatureStore.open(final_path)
    store.stats = {
        "n": n,
        "failed": len(store.errors),
        "seconds": time.perf_counter() - started,
        "model_seconds": loop_seconds,
        "computed_rows": computed,
        "reused_rows": reused,
        "resumed_rows": resumed,
        "images_per_s": computed / loop_seconds if computed and loop_seconds > 0 else None,
        "device": str(plan["device"]),
        "precision": plan["precision"],
        "warnings": warnings,
    }
    return store


def _versions() -> dict[str, Any]:
    return {**software_versions(), "key_libraries": library_versions()}


def _reuse_unchanged_rows(writer: StoreWriter, plan: dict[str, Any], samples: list) -> int:
    """Copy rows of files unchanged since the newest complete entry of the same config."""
    previous = find_reusable_entry(plan["cache_dir"], plan["config_key"])
    if previous is None:
        return 0
    old = reusable_rows(previous)
    attempted = writer.attempted
    mapping = {}
    for row, sample in enumerate(samples):
        if attempted[row] or sample.size <= 0:
            continue
        match = old.get((sample.path, sample.size, sample.mtime_ns))
        if match is not None:
            mapping[row] = match
    return writer.copy_rows_from(previous, mapping)


def fold_batchnorms(module: torch.nn.Module, *, input_size: int) -> torch.nn.Module:
    """A copy of a frozen module with BatchNorm folded into the preceding convolutions.

    Inference-only (running statistics are baked in). Measured on EfficientNet-Lite0 with
    channels_last on a 2-core CPU: about 1.5x faster under bf16 autocast. Tries torch.fx's
    conv-bn fusion first (ResNets and most torchvision models), then folds conv→bn pairs inside
    ``nn.Sequential`` and EfficientNet-Lite's conv/bn blocks. The result is checked against the
    original on a random fp32 batch; if they disagree, the original is used unchanged.

    Args:
        module: the frozen feature extractor.
        input_size: side of the square input used for the check.
    """
    import copy

    from torch import nn
    from torch.fx.experimental.optimization import fuse as fx_fuse
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from embedcache.efficientnet_lite import ConvBNAct

    module = module.eval()
    try:
        fused = fx_fuse(module, inplace=False)
    except Exception:  # not traceable by torch.fx (Python-side shape logic): fold by structure
        fused = copy.deepcopy(module)
        for parent in list(fused.modules()):
            if isinstance(parent, ConvBNAct):
                pairs = [("conv", "bn")]
            elif isinstance(parent, nn.Sequential):
                names = [name for name, _ in parent.named_children()]
                pairs = list(zip(names[:-1], names[1:], strict=True))
            else:
                continue
            for conv_name, bn_name in pairs:
                conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
                if (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                        and bn.track_running_stats and bn.num_features == conv.out_channels):
                    setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                    setattr(parent, bn_name, nn.Identity())
    fused = fused.eval().requires_grad_(False)
    with torch.inference_mode(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        probe = torch.randn(2, 3, input_size, input_size)
        reference, candidate = module(probe).float(), fused(probe).float()
    scale = reference.abs().max().clamp_min(1e-6)
    if reference.shape != candidate.shape or not ((reference - candidate).abs().max() <= 1e-3 * scale):
        return module
    return fused


def compute_features(
    bb: Backbone,
    source: data_mod.ImageSource,
    *,
    batch_size: int = 64,
    workers: int = 0,
    device: str = "auto",
    precision: str = "auto",
    progress: Callable[[Progress], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Features of every image of ``source`` in memory, without the cache (used by predict).

    Returns:
        ``(rows, features (len(rows), D) float32, failures [(row, message)])``.
    """
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    batches = _batches(np.zeros(len(source), dtype=bool), batch_size)
    rows, feats, failures = [], [], []
    started = time.perf_counter()
    for got_rows, got, failed in _run_model(bb, source, batches, device=dev, precision=prec, workers=workers):
        rows.append(got_rows)
        feats.append(got)
        failures.extend(failed)
        if progress is not None:
            done = sum(len(r) for r in rows) + len(failures)
            elapsed = time.perf_counter() - started
            progress(Progress(done, len(source), len(failures), done / elapsed if elapsed else 0.0))
    if not rows:
        return np.zeros(0, np.int64), np.zeros((0, bb.dim), np.float32), failures
    return np.concatenate(rows), np.concatenate(feats), failures


class _ListBatchSampler(torch.utils.data.Sampler):
    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _run_model(
    bb: Backbone,
    source: data_mod.ImageSource,
    batches: list[list[int]],
    *,
    device: torch.device,
    precision: str,
    workers: int,
) -> Iterator[tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]]:
    """Yield ``(rows, float32 features, failures)`` per batch, in batch order."""
    if not batches:
        return
    dataset = data_mod.ImageDataset(source, bb.preprocess)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=_ListBatchSampler(batches),
        num_workers=workers,
        collate_fn=data_mod.collate_images,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )
    model = fold_batchnorms(bb.module, input_size=bb.preprocess.crop_size).to(device)
    use_channels_last = device.type in ("cpu", "cuda")
    if use_channels_last:
        model = model.to(memory_format=torch.channels_last)
    autocast = (
        torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision])
        if precision in _AUTOCAST_DTYPES
        else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        for indices, images, failures in loader:
            if len(indices) == 0:
                yield np.zeros(0, np.int64), np.zeros((0, bb.dim), np.float32), failures
                continue
            x = images.to(device, non_blocking=True)
            x = normalize_batch(x, bb.preprocess)  # keeps the batch's channels_last layout
            x = x.contiguous(memory_format=torch.channels_last if use_channels_last else torch.contiguous_format)
            feats = model(x).float()
            yield indices.numpy(), feats.cpu().numpy(), failures
