"""Asking later for a feature set that is missing computes only that one.

An ``extract --layers`` request whose entry does not exist may find an entry of the same images
and the same configuration but other feature sets: a plain ``extract`` (its default features),
or an earlier ``--layers`` list. Such a *donor* is recognised by its key, not by its names: its
``config_key`` attribute must equal the key this request would have with the donor's sets in
place of its own (:func:`~embedcache.extraction.plan.config_key_with_sets`), so every set it
holds is the same node, pool, preprocessing, precision and runtime as ours of that name.

When at most :data:`MAX_COMPUTED_SETS` of the asked sets are missing from the best donor, each
missing set is extracted on its own, as ``--layer NODE --pool POOL`` would (the network cut at
that node, so an early node costs a fraction of a pass; an entry of its own, cached, resumable),
and the entry is assembled from the columns, each checked against its block checksums as it is
read. The assembled entry has the requested key and reads like one built in one pass; its
``composed_from`` attribute names the entries it was built from. When more sets are missing,
one pass over the whole list is about as fast as running the network once per missing set, and
the ordinary extraction runs instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedcache.errors import CacheError, CorruptEntryError
from embedcache.extraction.compute import entry_writer
from embedcache.extraction.options import ExtractStats, RunOptions, check_max_errors
from embedcache.extraction.plan import ExtractionPlan, config_key_with_sets
from embedcache.store.feature_sets import DEFAULT_SET, SET_CRCS_GROUP, SETS_GROUP, recorded_sets
from embedcache.store.hdf5 import (
    check_safe,
    open_h5,
    read_errors,
    read_numbers,
    verify_feature_blocks,
)
from embedcache.store.reader import FeatureStore, complete_entries
from embedcache.store.schema import BLOCK_CRC32

#: Missing sets computed one at a time at most; with more, the whole list runs in one pass.
MAX_COMPUTED_SETS = 1

#: Rows per write (and commit) when the entry is assembled.
COPY_BLOCK_ROWS = 8192

#: Extracts one set alone: ``(node, pool) ->`` the :class:`~embedcache.extraction.extract.ExtractResult`
#: of ``extract(..., layer=node, pool=pool)`` (typed loosely: extract imports this module).
SetExtractor = Callable[[str, str], Any]


@dataclass(frozen=True)
class Donor:
    """A complete entry of the same images and configuration holding other feature sets."""

    path: Path
    cache_key: str
    missing: tuple[str, ...]


def split_set_name(name: str) -> tuple[str, str]:
    """``(node, pool)`` of a set name ``<node>:<pool>`` (a pool never holds ``:``)."""
    node, _, pool = name.rpartition(":")
    return node, pool


def find_donor(plan: ExtractionPlan) -> Donor | None:
    """The complete entry that lacks the fewest of the plan's feature sets, or None."""
    wanted = [name for name, _ in plan.backbone.feature_sets]
    best: Donor | None = None
    for path, attrs in complete_entries(plan.cache_dir):
        if path == plan.final_path:
            continue
        if attrs.get("manifest_sha256") != plan.manifest_sha256:
            continue
        try:
            sets = tuple(recorded_sets(attrs))
        except (KeyError, TypeError, ValueError):
            continue
        if attrs.get("config_key") != config_key_with_sets(plan, sets):
            continue
        held = {name for name, _ in sets}
        missing = tuple(name for name in wanted if name not in held)
        if best is None or len(missing) < len(best.missing):
            best = Donor(path, str(attrs.get("cache_key", "")), missing)
    return best


def _done_rows(path: Path) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
    with open_h5(path) as handle:
        check_safe(handle, path)
        return read_numbers(handle["done"], path).astype(bool), read_errors(handle)


def _read_column(path: Path, dataset: str, checksums: str, shape: tuple[int, int]) -> np.ndarray:
    """One feature set of another entry, whole, checked against its block checksums."""
    with open_h5(path) as handle:
        check_safe(handle, path)
        stored = read_numbers(handle[dataset], path)
        verify_feature_blocks(handle, path, stored, dataset=dataset, checksums=checksums)
    if stored.shape != shape:
        raise CorruptEntryError(f"{str(path)!r}: /{dataset} has shape {stored.shape}, {shape} expected.")
    return stored


def compose_entry(plan: ExtractionPlan, options: RunOptions, extract_set: SetExtractor, warnings: list[str]
                  ) -> tuple[FeatureStore, ExtractStats] | None:
    """The plan's entry assembled from a donor and the missing sets extracted alone, or None
    when there is no donor, too many sets are missing, a donor's column fails its checksums, or
    the rows do not line up (an image that decoded for one entry and failed for another); the
    caller then extracts in one pass. Why a found donor was not used is added to ``warnings``."""
    if not plan.backbone.feature_sets or plan.request is None:
        return None
    donor = find_donor(plan)
    if donor is None or len(donor.missing) > MAX_COMPUTED_SETS:
        return None
    computed = {name: extract_set(*split_set_name(name)) for name in donor.missing}
    started = time.perf_counter()
    n = len(plan.source)
    sources = [(donor.path, "features", BLOCK_CRC32, plan.backbone.dim)]
    for name, dim in plan.backbone.feature_sets:
        sources.append((computed[name].path, "features", BLOCK_CRC32, dim) if name in computed
                       else (donor.path, f"{SETS_GROUP}/{name}", f"{SET_CRCS_GROUP}/{name}", dim))
    try:
        done, errors = _done_rows(donor.path)
        if any(not np.array_equal(_done_rows(r.path)[0], done) for r in computed.values()):
            warnings.append(f"The entry {donor.path.name} holds the other feature sets, but its images and the "
                            f"new set's did not decode alike; every set is computed in one pass instead.")
            return None
        columns = [_read_column(path, dataset, crcs, (n, dim)) for path, dataset, crcs, dim in sources]
    except (CacheError, OSError, KeyError) as exc:
        warnings.append(f"The entry {donor.path.name} holds the other feature sets but could not be read "
                        f"({exc}); every set is computed in one pass instead.")
        return None
    model_seconds = sum((r.stats.model_seconds or 0.0) for r in computed.values() if r.stats is not None)
    computed_rows = sum((r.stats.computed_rows if r.stats else 0) for r in computed.values())
    rate = computed_rows / model_seconds if computed_rows and model_seconds > 0 else None
    with entry_writer(plan) as writer:
        writer.record_errors((row, message) for row, _path, message in errors)
        rows = np.flatnonzero(done & ~writer.attempted)
        for begin in range(0, len(rows), COPY_BLOCK_ROWS):
            block = rows[begin:begin + COPY_BLOCK_ROWS]
            writer.write_rows(block, np.concatenate([c[block] for c in columns], axis=1))
            writer.commit()
        del columns
        check_max_errors(writer.n_failed, options, writer.recorded_failures(), plan.source)
        final_path = writer.finalize({
            "extract_seconds": model_seconds, "extract_images_per_s": rate or 0.0, "extract_threads": options.threads,
            "extract_workers": options.workers, "extract_write_seconds": time.perf_counter() - started,
            "extract_write_wait_seconds": 0.0, "extract_decode_wait_seconds": 0.0, "extract_decode_threads": 0,
            "extract_loop": "composed",
            "composed_from": {DEFAULT_SET: donor.cache_key, **{
                name: (computed[name].cache_key if name in computed else donor.cache_key)
                for name, _ in plan.backbone.feature_sets}}})
        resumed, notes = writer.resumed_rows, list(writer.warnings)
    for result in computed.values():
        if result.stats is not None:
            notes += result.stats.warnings
    store = FeatureStore.open(final_path)
    stats = ExtractStats(
        n=n, failed=len(store.errors), seconds=0.0, device=plan.device, precision=plan.precision,
        runtime=plan.runtime, model_seconds=model_seconds, computed_rows=computed_rows, reused_rows=len(rows),
        resumed_rows=resumed, images_per_s=rate, threads=options.threads, warnings=notes)
    return store, stats
