"""Fine-tuning setup: the probe's backbone rebuilt, the data opened and split exactly like the
probe's (its recorded ``val_fraction`` and seed), and the run key that decides whether an output
directory holds the same run."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedcache.errors import ConfigError, DataSourceError
from embedcache.experiments.artifacts import LoadedProbe, normalise_class_name
from embedcache.experiments.finetune.config import FinetuneConfig
from embedcache.experiments.protocol import DEFAULT_VAL_FRACTION, ProbeSplit, split_for_probe
from embedcache.fileio import sha256_file
from embedcache.models.backbone import Backbone
from embedcache.sources.base import ImageSource
from embedcache.sources.open import open_source
from embedcache.store.fingerprint import sha256_json
from embedcache.store.reader import row_keys
from embedcache.store.schema import default_cache_dir, entry_paths

#: Files of a probe directory that identify it (their contents go into the run key).
PROBE_FILES = ("probe.json", "probe.safetensors", "probe.joblib", "backbone.safetensors")


@dataclass(frozen=True)
class FinetuneData:
    """The images, their labels as the probe's head columns, and the train/val/test rows."""

    source: ImageSource
    labels: np.ndarray
    split: ProbeSplit
    split_check: str


def rebuild_backbone(loaded: LoadedProbe, weights_path: str | os.PathLike | None) -> Backbone:
    """The probe's backbone (see :meth:`LoadedProbe.build_backbone`), refused when it has nothing
    to train or the probe has no linear head to start from."""
    task = loaded.metadata.get("task", "classes")
    if task != "classes":
        raise ConfigError(f"The probe at {loaded.path} fits {task} targets; fine-tuning trains a class head "
                          f"(cross-entropy), so it needs a probe of class labels.")
    if not hasattr(loaded.estimator, "coef_"):
        raise ConfigError(f"The probe at {loaded.path} has no linear coefficients to start a head from.")
    bb = loaded.build_backbone(weights_path)
    if not any(True for _ in bb.module.parameters()):
        raise ConfigError(f"Backbone {bb.name!r} has no parameters to fine-tune (it is a fixed "
                          f"feature map); the probe is already the whole model.")
    return bb


def probe_holdout(loaded: LoadedProbe) -> tuple[float, int]:
    """The ``val_fraction`` and seed the probe held its validation rows out with (probe.json;
    report.json of older probes; the protocol's defaults when neither records them)."""
    meta = loaded.metadata
    if "val_fraction" in meta:
        return float(meta["val_fraction"]), int(meta.get("seed", 0))
    report: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError, TypeError):
        report = json.loads((loaded.path / "report.json").read_text())
    return float(report.get("val_fraction", DEFAULT_VAL_FRACTION)), int(report.get("seed", 0))


def _head_labels(source: ImageSource, loaded: LoadedProbe) -> np.ndarray:
    """Each sample's label as the probe head's column (-1 = unlabelled)."""
    probe_names = loaded.class_names
    classes = [int(c) for c in loaded.estimator.classes_]
    column_of = {normalise_class_name(probe_names[c]) if c < len(probe_names) else str(c): j
                 for j, c in enumerate(classes)}
    unknown = sorted({n for n in source.class_names if normalise_class_name(n) not in column_of})
    if unknown:
        raise DataSourceError(
            f"DATA has classes the probe does not predict: {unknown[:8]}. The probe knows "
            f"{[probe_names[c] for c in classes if c < len(probe_names)][:12]}. Fine-tune on data "
            f"labelled with the probe's classes."
        )
    source_column = [column_of[normalise_class_name(n)] for n in source.class_names]
    return np.array([source_column[s.label] if s.label >= 0 else -1 for s in source.samples], np.int64)


def open_data(data: Any, loaded: LoadedProbe, *, val_fraction: float, test_fraction: float,
              split_seed: int, cache_dir: str | os.PathLike | None = None,
              allow_unchecked_split: bool = False) -> FinetuneData:
    """The source (split like extract with the given fractions), its labels mapped to the probe's
    head columns, and disjoint train/val/test rows (val held out exactly as the probe did).

    The test rows are checked against the rows the probe was fitted on, read from its cache entry
    (found by the absolute path the probe recorded, else by its key in ``cache_dir``). When the
    entry cannot be found, fine-tuning is refused unless ``allow_unchecked_split``: its test
    score could otherwise be inflated without anyone knowing."""
    source = open_source(data, unlabelled=False, val_fraction=val_fraction, test_fraction=test_fraction,
                         split_seed=split_seed)
    labels = _head_labels(source, loaded)
    splits = np.array([s.split for s in source.samples], np.uint8)
    keys = np.array([s.path for s in source.samples])
    holdout, seed = probe_holdout(loaded)
    split = split_for_probe(labels, splits, keys, val_fraction=holdout, seed=seed)
    entry = _probe_entry(loaded, cache_dir)
    if entry is None:
        if not allow_unchecked_split:
            raise DataSourceError(
                f"Cannot check the test images against the probe's training rows: its cache entry "
                f"{str(loaded.metadata.get('cache_key', '?'))[:16]} is not at {loaded.metadata.get('cache_path')!r} "
                f"nor in the cache directory {str(cache_dir or default_cache_dir())!r}. Pass --cache-dir DIR where it "
                f"is, or --allow-unchecked-split to fine-tune without the check (the report then says so)."
            )
        return FinetuneData(source, labels, split, "UNCHECKED: the probe's cache entry was not found, so test images "
                            "were not compared with its training rows (allow_unchecked_split)")
    return FinetuneData(source, labels, split, _check_against_probe_cache(entry, keys, split))


def _probe_entry(loaded: LoadedProbe, cache_dir: str | os.PathLike | None) -> Path | None:
    """The probe's cache entry: at its recorded path, else by key in ``cache_dir``."""
    recorded = loaded.metadata.get("cache_path")
    if recorded and Path(recorded).is_absolute() and Path(recorded).is_file():
        return Path(recorded)
    key = loaded.metadata.get("cache_key")
    if key:
        candidate = entry_paths(Path(cache_dir) if cache_dir is not None else default_cache_dir(), key)[0]
        if candidate.is_file():
            return candidate
    return None


def _check_against_probe_cache(entry: Path, keys: np.ndarray, split: ProbeSplit) -> str:
    """Refuse test images the probe trained on; note when the test split differs from the probe's."""
    paths, cache_splits = row_keys(entry)  # only the keys (checksums verified): no features read
    cache_keys = np.asarray(paths).astype(str)
    test = set(keys[split.test].astype(str).tolist())
    fitted = set(cache_keys[cache_splits <= 1].tolist())
    leaked = test & fitted
    if leaked:
        raise DataSourceError(
            f"{len(leaked)} test images of DATA were train/val images of the probe (e.g. "
            f"{sorted(leaked)[:3]}): its accuracy on them would be inflated. Open DATA with the same "
            f"--val-fraction/--test-fraction/--split-seed as at extraction, or use its train/val/test folders."
        )
    same = test == set(cache_keys[cache_splits == 2].tolist())
    return "test split identical to the probe's" if same else "test split differs from the probe's (no overlap with its training rows)"


def run_key(config: FinetuneConfig, loaded: LoadedProbe, source: ImageSource, *, fmt: str, version: int) -> str:
    """sha256 of the run's format, settings, the probe directory's files and the data's manifest."""
    probe_files = sorted(p for p in loaded.path.iterdir() if p.name in PROBE_FILES)
    payload = {"format": fmt, "version": version, "config": config.to_dict(),
               "probe": {p.name: sha256_file(p) for p in probe_files},
               "data": source.manifest_sha256()}
    return sha256_json(payload)
