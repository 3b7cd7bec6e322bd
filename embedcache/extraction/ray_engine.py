"""``--engine ray``: the same entry, computed shard by shard on a Ray cluster (docs/schema.md).

The driver plans as the single process does (sorted manifest, cache key), cuts the rows into
fixed shards of ``shard_size`` rows and keeps every shard file that exists and verifies. The rest
flow through Ray Data: a decoding task per shard, then an actor pool (one backbone per actor,
``num_gpus`` each on GPU clusters) that embeds a shard and writes its file. Only small summaries
come back to the driver. When every shard verifies, the driver publishes ``<key16>.h5`` with
virtual datasets over the shards. Engine, shard size and concurrency are not in the cache key.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from embedcache.errors import CacheError, ConfigError, EmbedcacheError
from embedcache.extraction.options import ExtractStats, RunOptions, check_max_errors
from embedcache.extraction.plan import ExtractionPlan
from embedcache.fileio import named_write_errors
from embedcache.models.backbone import Backbone
from embedcache.models.runtimes import EXPORTS_DIR
from embedcache.sources.views import view_array
from embedcache.store.locking import EntryLock
from embedcache.store.reader import FeatureStore
from embedcache.store.schema import DEFAULT_SHARD_SIZE, entry_paths
from embedcache.store.shards import (
    publish_sharded,
    shard_name,
    shard_problems,
    shard_ranges,
    shards_dir,
)

if TYPE_CHECKING:
    from embedcache.extraction.loop import Progress

#: How to install the optional dependency (the one line ``--engine ray`` prints without it).
RAY_INSTALL = "pip install 'embedcache[ray]'"
#: How often Ray restarts a dead actor, and retries the shard it was embedding.
ACTOR_RESTARTS = 3
ENGINES = ("local", "ray")
_STALE_TEMPORARY = re.compile(r"\.shard-[0-9]{5,}\.h5\..*\.tmp")


@dataclass(frozen=True)
class RayOptions:
    """How the ``ray`` engine runs (none of it is in the cache key).

    Attributes:
        address: ``auto``, ``HOST:PORT``, or None for a local Ray started by this process.
        shard_size: rows per shard; a multiple of the batch size.
        concurrency: backbone actors (None: one per GPU group, or half the cluster's CPUs).
        gpus_per_worker: GPUs each actor reserves (0: the backbone runs on the CPU).
    """

    address: str | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    concurrency: int | None = None
    gpus_per_worker: float = 0.0


def import_ray() -> Any:
    """``ray`` with Ray Data, or a one-line error saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the engine streams with Ray Data
    except ImportError:
        raise ConfigError(f"The 'engine' parameter 'ray' needs Ray, which is not installed. Run: {RAY_INSTALL}") \
            from None
    return ray


def check_ray_options(options: RayOptions, batch_size: int) -> None:
    """One-line errors naming the parameter, what is allowed and the fix."""
    size = options.shard_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"The 'shard_size' parameter must be a positive int. Got {size!r}.")
    if size % batch_size:
        raise ConfigError(f"The 'shard_size' parameter must be a multiple of the batch size ({batch_size}), so the "
                          f"batches match a single-process run. Got {size}; try --shard-size "
                          f"{max(1, size // batch_size) * batch_size}.")
    c = options.concurrency
    if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
        raise ConfigError(f"The 'concurrency' parameter must be a positive int. Got {c!r}.")
    g = options.gpus_per_worker
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not g >= 0:
        raise ConfigError(f"The 'gpus_per_worker' parameter must be a number >= 0 (e.g. 1 or 0.5). Got {g!r}.")


def _start_ray(ray: Any, address: str | None) -> None:
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"Cannot connect to Ray at --ray-address {address!r} ({exc}). Start a cluster with "
                          f"`ray start --head`, or omit --ray-address for a local Ray.") from None


def _concurrency(ray: Any, options: RayOptions) -> int:
    resources = ray.cluster_resources()
    cpus = int(resources.get("CPU", 1))
    if options.gpus_per_worker > 0:
        fits = int(resources.get("GPU", 0) // options.gpus_per_worker)
        if fits < 1:
            raise ConfigError(f"The 'gpus_per_worker' parameter asks {options.gpus_per_worker} GPUs per actor, but the "
                              f"Ray cluster has {resources.get('GPU', 0)}. Pass --gpus-per-worker 0 to run on CPUs.")
        return options.concurrency or fits
    wanted = options.concurrency or max(1, cpus // 2)
    if wanted >= cpus:
        raise ConfigError(f"The 'concurrency' parameter ({wanted}) leaves no CPU for decoding on a Ray cluster of "
                          f"{cpus} CPUs. Pass --concurrency {max(1, cpus - 1)} or fewer.")
    return wanted


def _existing_shards(plan: ExtractionPlan, ranges: list[tuple[int, int]], warnings: list[str]) -> set[int]:
    """Shards whose files verify (kept); damaged ones are removed, to be computed again."""
    folder = shards_dir(plan.cache_dir, plan.cache_key)
    if not folder.is_dir():
        return set()
    for stale in folder.iterdir():
        if _STALE_TEMPORARY.fullmatch(stale.name):  # left by a killed worker; we hold the entry lock
            with named_write_errors(stale):
                stale.unlink()
    good = set()
    for index, rows in enumerate(ranges):
        path = folder / shard_name(index)
        problems = shard_problems(path, cache_key=plan.cache_key, index=index, rows=rows, dim=plan.backbone.dim)
        if not problems:
            good.add(index)
        elif problems != ["missing"]:
            warnings.append(f"Shard {str(path)!r} did not verify ({problems[0]}); it is computed again.")
            with named_write_errors(path):
                path.unlink()
    return good


def _static_columns(plan: ExtractionPlan) -> dict[str, Any]:
    import numpy as np

    samples = plan.source.samples
    static: dict[str, Any] = {
        "paths": [s.path for s in samples], "labels": np.array([s.label for s in samples], dtype=np.int64),
        "split": np.array([s.split for s in samples], dtype=np.uint8),
        "file_size": np.array([s.size for s in samples], dtype=np.int64),
        "file_mtime_ns": np.array([s.mtime_ns for s in samples], dtype=np.int64)}
    targets, label_sets = plan.source.target_array(), plan.source.label_set_array()
    if targets is not None:
        static["targets"] = np.asarray(targets, dtype=np.float32).reshape(len(samples), -1)
        static["target_names"] = list(plan.source.target_names)
    if label_sets is not None:
        static["label_sets"] = np.asarray(label_sets, dtype=np.uint8).reshape(len(samples), -1)
    views = view_array(plan.source)
    if views is not None:
        static["view"] = views
    return static


def _dataset(ray: Any, plan: ExtractionPlan, bb: Backbone, options: RunOptions, ray_options: RayOptions,
             todo: list[int], ranges: list[tuple[int, int]]) -> Any:
    """The Ray Data pipeline: shard indices -> decoding tasks -> backbone actors -> summaries."""
    from embedcache.extraction.ray_tasks import FAULT_ENV, ShardEmbedder, decode_shard

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.verbose_progress = False
    context.print_on_execution_start = False  # Ray Data would print its settings to stdout (--json!)
    gpus = ray_options.gpus_per_worker
    fault = os.environ.get(FAULT_ENV)
    writing = {"folder": str(shards_dir(plan.cache_dir, plan.cache_key).resolve()), "cache_key": plan.cache_key,
               "dim": plan.backbone.dim, "store_dtype": plan.store_dtype, "attrs": plan.entry_attrs(),
               "static": _static_columns(plan)}
    items = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
    decoded = items.map_batches(decode_shard, batch_size=1, num_cpus=1,
                                fn_kwargs={"source": plan.source, "spec": bb.preprocess, "ranges": ranges})
    pool = ray.data.ActorPoolStrategy(size=_concurrency(ray, ray_options))
    with warnings.catch_warnings():  # Ray 2.60 calls the restart limits "deprecated"; they still apply
        warnings.simplefilter("ignore")
        return decoded.map_batches(
            ShardEmbedder, batch_size=1, compute=pool, num_gpus=gpus or None, num_cpus=0 if gpus else 1,
            max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS,
            fn_constructor_kwargs={"backbone": bb, "device": plan.device,
                                   "precision": plan.precision, "batch_size": options.batch_size,
                                   "ranges": ranges, "writing": writing,
                                   "fault_after": int(fault) if fault else None, "runtime": plan.runtime,
                                   "exports_dir": str(plan.cache_dir / EXPORTS_DIR)})


def compute_sharded(plan: ExtractionPlan, bb: Backbone, options: RunOptions, ray_options: RayOptions,
                    progress: Callable[[Progress], None] | None) -> tuple[FeatureStore, ExtractStats]:
    """Compute the missing shards on Ray, then publish the entry; returns it (read back) and what
    was done (``seconds`` is the caller's)."""
    check_ray_options(ray_options, options.batch_size)
    ray = import_ray()
    n = len(plan.source)
    ranges = shard_ranges(n, ray_options.shard_size)
    lock = EntryLock(entry_paths(plan.cache_dir, plan.cache_key)[2])
    lock.acquire()
    try:
        warnings: list[str] = []
        kept = _existing_shards(plan, ranges, warnings)
        failed = _kept_failures(plan, ranges, kept)
        check_max_errors(len(failed), options, failed, plan.source)
        todo = [s for s in range(len(ranges)) if s not in kept]
        started = time.perf_counter()
        if todo:
            with named_write_errors(plan.cache_dir):
                shards_dir(plan.cache_dir, plan.cache_key).mkdir(parents=True, exist_ok=True)
            # Ray's driver prints worker failures and retries to stdout: diagnostics, so to stderr
            # (stdout stays the command's result, e.g. --json)
            with contextlib.redirect_stdout(sys.stderr):
                _start_ray(ray, ray_options.address)
                try:
                    _run(_dataset(ray, plan, bb, options, ray_options, todo, ranges), plan, options, ranges,
                         failed, kept, progress)
                except EmbedcacheError:
                    raise
                except Exception as exc:  # noqa: BLE001 - Ray wraps a worker's failure in its own types
                    raise _worker_failure(exc) from None
        loop_seconds = time.perf_counter() - started
        final = _publish(plan, ranges, ray_options, loop_seconds, sum(ranges[s][1] - ranges[s][0] for s in todo))
    finally:
        lock.release(unlink=plan.final_path.exists())
    store = FeatureStore.open(final)
    computed = sum(ranges[s][1] - ranges[s][0] for s in todo)
    stats = ExtractStats(n=n, failed=len(store.errors), seconds=0.0, device=plan.device, precision=plan.precision,
                         runtime=plan.runtime, model_seconds=loop_seconds, computed_rows=computed, resumed_rows=n - computed,
                         images_per_s=computed / loop_seconds if computed and loop_seconds > 0 else None,
                         warnings=warnings)
    return store, stats


def _worker_failure(exc: BaseException) -> EmbedcacheError:
    """A failure inside Ray as one of our errors: the worker's own error when it was ours, else
    the last line of Ray's report; finished shards are kept either way."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, EmbedcacheError):
            return type(cause)(f"{cause} Finished shards are kept; rerun the same command to resume.")
        cause = cause.__cause__ or getattr(cause, "cause", None)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return CacheError(f"The Ray extraction failed ({type(exc).__name__}: {lines[-1] if lines else exc}). Finished "
                      f"shards are kept; rerun the same command to resume only the others.")


def _kept_failures(plan: ExtractionPlan, ranges: list[tuple[int, int]], kept: set[int]) -> list[tuple[int, str]]:
    """``(row, message)`` recorded in the shards kept from an earlier run (they count too)."""
    from embedcache.store.hdf5 import open_h5, read_errors

    out = []
    folder = shards_dir(plan.cache_dir, plan.cache_key)
    for index in sorted(kept):
        with open_h5(folder / shard_name(index)) as handle:
            out.extend((ranges[index][0] + row, message) for row, _path, message in read_errors(handle))
    return out


def _run(dataset: Any, plan: ExtractionPlan, options: RunOptions, ranges: list[tuple[int, int]],
         failed: list[tuple[int, str]], kept: set[int], progress: Callable[[Progress], None] | None) -> None:
    """Stream the pipeline; only per-shard summaries reach the driver. ``--max-errors`` counts
    the whole run (shards kept from before included)."""
    n = len(plan.source)
    done = sum(ranges[s][1] - ranges[s][0] for s in kept)
    computed, started = 0, time.perf_counter()
    for summary in dataset.iter_rows():
        shard = int(summary["shard"])
        rows = ranges[shard][1] - ranges[shard][0]
        failed.extend((ranges[shard][0] + int(r), str(m)) for r, m in json.loads(str(summary["failures"])))
        done, computed = done + rows, computed + rows
        check_max_errors(len(failed), options, failed[-3:], plan.source)
        if progress is not None:
            from embedcache.extraction.loop import Progress

            elapsed = time.perf_counter() - started
            progress(Progress(done=done, total=n, failed=len(failed),
                              images_per_s=computed / elapsed if elapsed > 0 else 0.0))


def _publish(plan: ExtractionPlan, ranges: list[tuple[int, int]], ray_options: RayOptions, seconds: float,
             computed: int) -> Any:
    """Verify every shard, then write ``<key16>.h5`` over them."""
    folder = shards_dir(plan.cache_dir, plan.cache_key)
    shards = []
    for index, rows in enumerate(ranges):
        path = folder / shard_name(index)
        problems = shard_problems(path, cache_key=plan.cache_key, index=index, rows=rows, dim=plan.backbone.dim)
        if problems:
            raise CacheError(f"Shard {str(path)!r} did not verify after the run ({problems[0]}); the entry was not "
                             f"published. Rerun the same command: only shards that do not verify are computed.")
        shards.append((path, *rows))
    attrs = {**plan.entry_attrs(), "engine": "ray", "extract_seconds": seconds,
             "extract_images_per_s": computed / seconds if computed and seconds > 0 else 0.0}
    return publish_sharded(final_path=plan.final_path, shards=shards, cache_key=plan.cache_key,
                           dim=plan.backbone.dim, store_dtype=plan.store_dtype, attrs=attrs,
                           shard_size=ray_options.shard_size)
