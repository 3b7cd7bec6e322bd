"""Computing an entry's rows: resume, reuse, run the inference loop, write, publish.

Rows are written by index and committed after the first batch that ends
:data:`COMMIT_EVERY_SECONDS` after the previous commit (and at the end); a resumed run recomputes
only what is missing, in the same batches as an uninterrupted run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from embedcache.extraction.batches import Batch, Progress, row_batches
from embedcache.extraction.exported_loop import compile_cached_export, run_exported_batches
from embedcache.extraction.options import ExtractStats, RunOptions, check_max_errors
from embedcache.extraction.plan import ExtractionPlan
from embedcache.extraction.writer_thread import WriterThread
from embedcache.models.runtimes import EXPORTS_DIR
from embedcache.sources.views import view_array
from embedcache.store.reader import FeatureStore, find_reusable_entry, reusable_rows
from embedcache.store.writer import StoreWriter

if TYPE_CHECKING:
    from embedcache.models.backbone import Backbone

#: Commit progress (data, then done flags, then flush) once this many seconds have passed since
#: the last commit: an interruption loses about this much work. A commit costs ~20 ms of the
#: writer thread (two flushes, block checksums read back, the root attributes); committing
#: every 4 batches was 11 commits in a 2 s run of 3,000 small images, CPU the model lost.
COMMIT_EVERY_SECONDS = 1.0


@dataclass(frozen=True)
class LoopTimes:
    """Seconds of the inference loop, of the writer thread's writes, of the loop waiting on
    the writer (a full queue), and of the loop waiting for decoded images; the most decoding
    threads that ran (0: none, DataLoader workers decoded)."""

    loop: float
    write: float
    write_wait: float
    decode_wait: float
    decoders: int = 0


def compute_entry(plan: ExtractionPlan, bb: Backbone | None, options: RunOptions,
                  progress: Callable[[Progress], None] | None, *, export: Path | None = None
                  ) -> tuple[FeatureStore, ExtractStats]:
    """Write the plan's entry: resume a ``.partial``, copy unchanged rows, compute the rest,
    publish; returns the entry (read back) and what was done (``seconds`` is the caller's).

    ``bb``: the built backbone, run by the DataLoader loop; or None and ``export``: the cached
    export's directory (:func:`~embedcache.extraction.exported_loop.find_cached_export`), run by
    the loop that needs no torch."""
    n = len(plan.source)
    with entry_writer(plan) as writer:
        reused = _reuse_unchanged_rows(writer, plan) if options.incremental else 0
        batches = row_batches(writer.attempted, options.batch_size)
        times = _write_batches(plan, writer, batches, options, progress, bb=bb, export=export)
        loop_seconds = times.loop
        # a resumed run counts the failures recorded before it too
        check_max_errors(writer.n_failed, options, writer.recorded_failures(), plan.source)
        computed = sum(len(b) for b in batches)
        rate = computed / loop_seconds if computed and loop_seconds > 0 else None
        final_path = writer.finalize({"extract_seconds": loop_seconds, "extract_images_per_s": rate or 0.0,
                                      "extract_threads": options.threads, "extract_workers": options.workers,
                                      "extract_write_seconds": times.write,
                                      "extract_write_wait_seconds": times.write_wait,
                                      "extract_decode_wait_seconds": times.decode_wait,
                                      "extract_decode_threads": times.decoders,
                                      "extract_loop": "dataloader" if export is None else "threads"})
        resumed, warnings = writer.resumed_rows, list(writer.warnings)
    store = FeatureStore.open(final_path)
    stats = ExtractStats(n=n, failed=len(store.errors), seconds=0.0, device=plan.device, precision=plan.precision,
                         runtime=plan.runtime, model_seconds=loop_seconds, computed_rows=computed, reused_rows=reused,
                         resumed_rows=resumed, images_per_s=rate, threads=options.threads, warnings=warnings)
    return store, stats


def entry_writer(plan: ExtractionPlan) -> StoreWriter:
    """The writer of the plan's entry (rows, labels, splits, targets and views of its source)."""
    samples = plan.source.samples
    return StoreWriter(cache_dir=plan.cache_dir, cache_key=plan.cache_key, n=len(samples), dim=plan.backbone.dim,
                       store_dtype=plan.store_dtype, attrs=plan.entry_attrs(), paths=[s.path for s in samples],
                       labels=[s.label for s in samples], splits=[s.split for s in samples],
                       file_sizes=[s.size for s in samples], file_mtimes_ns=[s.mtime_ns for s in samples],
                       targets=plan.source.target_array(), target_names=plan.source.target_names,
                       label_sets=plan.source.label_set_array(), views=view_array(plan.source))


def _stream(plan: ExtractionPlan, batches: list[list[int]], options: RunOptions, bb: Backbone | None,
            export: Path | None) -> Iterator[Batch]:
    """The batches through the model: the cached export's torch-free loop, or the DataLoader loop."""
    if export is not None:
        yield from run_exported_batches(lambda: compile_cached_export(plan, export, options.threads), plan.source,
                                        plan.backbone.preprocess, batches,
                                        decoders=options.threads if options.workers > 0 else 0)
        return
    import torch

    from embedcache.extraction.loop import Deferred, ImageDataset, inference_module, run_batches
    from embedcache.runtime import torch_threads

    device = torch.device(plan.device)
    module = Deferred(lambda: inference_module(bb, device, runtime=plan.runtime, precision=plan.precision,
                                               exports_dir=plan.cache_dir / EXPORTS_DIR))
    with torch_threads(options.threads):
        yield from run_batches(module, ImageDataset(plan.source, bb.preprocess), batches, device=device,
                               precision=plan.precision, workers=options.workers)


def _write_batches(plan: ExtractionPlan, writer: StoreWriter, batches: list[list[int]], options: RunOptions,
                   progress: Callable[[Progress], None] | None, *, bb: Backbone | None,
                   export: Path | None) -> LoopTimes:
    """Run ``batches`` through the model into ``writer`` (written by a :class:`WriterThread`, off
    the model's critical path); returns the loop's times."""
    n = len(plan.source)
    computed = sum(len(b) for b in batches)
    attempted = int(writer.attempted.sum())
    failed = writer.n_failed  # the loop's own count: the writer is the thread's until it is closed
    loop_started = last_commit = time.perf_counter()
    decode_wait, decoders = 0.0, 0
    with WriterThread(writer) as thread:
        for batch in _stream(plan, batches, options, bb, export):
            decode_wait += batch.decode_wait
            decoders = max(decoders, batch.decoders)
            failed += len(batch.failures)  # rows not attempted before: every failure is new
            attempted += len(batch.rows) + len(batch.failures)
            too_many = options.max_errors is not None and failed > options.max_errors
            now = time.perf_counter()
            commit = too_many or now - last_commit >= COMMIT_EVERY_SECONDS
            last_commit = now if commit else last_commit
            thread.put(batch.rows, batch.outputs, batch.failures, commit=commit)
            if too_many:
                thread.close()
                check_max_errors(writer.n_failed, options, batch.failures, plan.source)
            if progress is not None:
                elapsed = time.perf_counter() - loop_started
                done_now = attempted - (n - computed)
                progress(Progress(done=attempted, total=n, failed=failed,
                                  images_per_s=done_now / elapsed if elapsed > 0 else 0.0))
    return LoopTimes(time.perf_counter() - loop_started, thread.write_seconds, thread.wait_seconds, decode_wait,
                     decoders)


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
