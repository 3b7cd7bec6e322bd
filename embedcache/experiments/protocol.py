"""The probe protocol on a cache entry: choose the penalty on validation rows only, refit on
train+val, score once on test.

Validation rows are the cache's ``val`` split, else a stratified seeded hold-out of ``train``
(``val_fraction``, ``seed``: both recorded, so fine-tuning can hold out the very same rows).
Train, val and test are checked disjoint; unlabelled rows are never used.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedcache.errors import ConfigError
from embedcache.experiments.artifacts import save_probe
from embedcache.heads.metrics import classification_report
from embedcache.heads.registry import check_head
from embedcache.heads.sweep import DEFAULT_PENALTIES, SweepResult, fit_fixed, sweep_and_refit
from embedcache.heads.torch_probe import check_penalty
from embedcache.heads.validation import check_features, check_labels
from embedcache.runtime import check_torch_device
from embedcache.splits import Split, holdout_splits
from embedcache.store.entries import resolve_entry
from embedcache.store.reader import FeatureStore
from embedcache.store.schema import default_cache_dir

#: Fraction of train held out for validation when the cache has no val split.
DEFAULT_VAL_FRACTION = 0.1


@dataclass(frozen=True)
class ProbeSplit:
    """Row positions of train, val and test, and where val came from."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    val_source: str
    val_fraction: float
    seed: int

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def split_for_probe(labels: np.ndarray, splits: np.ndarray, keys: np.ndarray, *,
                    val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0) -> ProbeSplit:
    """Train/val/test positions for a probe; val from the cache or a seeded hold-out from train.

    Unlabelled rows (label -1) are never used. The three sets are checked disjoint.

    Args:
        labels: label per row (-1 = unlabelled).
        splits: split code per row.
        keys: a stable key per row (its relative path), which orders the hold-out.
        val_fraction: share of each class of train held out when there is no val split.
        seed: seed of that hold-out.
    """
    labelled = labels >= 0
    train = np.flatnonzero((splits == Split.TRAIN) & labelled)
    val = np.flatnonzero((splits == Split.VAL) & labelled)
    test = np.flatnonzero((splits == Split.TEST) & labelled)
    val_source = "cache"
    if len(val) == 0:
        if not 0 < val_fraction < 1:
            raise ConfigError(
                f"The cache has no val split, so 'val_fraction' must be in (0, 1) to hold one out "
                f"of train. Got {val_fraction!r}."
            )
        held = holdout_splits([str(k) for k in keys[train]], labels[train], val_fraction=val_fraction,
                              test_fraction=0.0, seed=seed)
        val, train = train[held == Split.VAL], train[held == Split.TRAIN]
        val_source = f"hold-out of {val_fraction:g} of train (stratified, seed {seed})"
    for name, rows in (("train", train), ("val", val), ("test", test)):
        if len(rows) == 0:
            raise ConfigError(
                f"The {name} split has no labelled rows. A probe needs train, val (or enough train "
                f"to hold one out) and test; re-extract with --test-fraction/--val-fraction, or use "
                f"train/val/test folders."
            )
    for a, rows_a, b, rows_b in (("train", train, "val", val), ("train", train, "test", test),
                                 ("val", val, "test", test)):
        if np.intersect1d(rows_a, rows_b).size:  # an explicit check: it must survive python -O
            raise ConfigError(f"Internal error: the {a} and {b} rows of the probe overlap; nothing was fitted.")
    return ProbeSplit(train, val, test, val_source, float(val_fraction), int(seed))


@dataclass
class ProbeResult:
    """What :func:`probe` returns (also written as report.json)."""

    head: str
    penalty: float
    swept: bool
    sweep: SweepResult | None
    metrics: dict[str, Any]
    split_sizes: dict[str, int]
    val_source: str
    val_fraction: float
    seed: int
    fit_seconds: float
    total_seconds: float
    estimator: Any = field(repr=False)
    store_path: str = ""
    artifact_dir: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "head": self.head,
            "penalty": self.penalty,
            "swept": self.swept,
            "sweep": None if self.sweep is None else self.sweep.to_dict(),
            "test": self.metrics,
            "split_sizes": self.split_sizes,
            "val_source": self.val_source,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "fit_seconds": self.fit_seconds,
            "total_seconds": self.total_seconds,
            "cache": self.store_path,
            "converged": bool(getattr(self.estimator, "converged_", True)),
            "notes": self.notes,
        }


def open_store(entry: str | os.PathLike | FeatureStore, cache_dir: str | os.PathLike | None) -> FeatureStore:
    """A FeatureStore as given, or opened from a path / key prefix in ``cache_dir``."""
    if isinstance(entry, FeatureStore):
        return entry
    return FeatureStore.open(resolve_entry(entry, cache_dir or default_cache_dir()))


def probe(entry: str | os.PathLike | FeatureStore, *, head: str = "torch", penalty: float | None = None,
          penalties: tuple[float, ...] | list[float] | None = None, val_fraction: float = DEFAULT_VAL_FRACTION,
          seed: int = 0, standardize: bool = True, device: str = "cpu", max_iter: int | None = None,
          out: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
          progress: Callable[[str], None] | None = None) -> ProbeResult:
    """Train a linear head on a cache entry: sweep (or a fixed penalty), refit, test once.

    Args:
        entry: a FeatureStore, an ``.h5`` path, or a cache-key prefix.
        head: ``torch`` (L-BFGS) or ``sklearn`` (LogisticRegression).
        penalty: use this penalty and skip the sweep.
        penalties: the sweep grid (default: 11 values from 1e-6 to 1e-1).
        val_fraction: hold-out from train for selection when the cache has no val split.
        seed: seed of that hold-out.
        standardize: standardise features (statistics from the fitting rows only).
        device: torch head device.
        max_iter: solver iteration cap for every fit (default: the head's; for a torch sweep and
            its refit, the budgets of :func:`~embedcache.heads.sweep.iteration_budget`).
        out: directory for the probe artifact, report.json and confusion.png.
        cache_dir: where to resolve a key prefix (default ``$EMBEDCACHE_DIR`` or ``./cache``).
        progress: called with a short message after each step.
    """
    store = open_store(entry, cache_dir)
    result = probe_arrays(store.features, store.labels, store.splits, store.paths, head=head,
                          penalty=penalty, penalties=penalties, val_fraction=val_fraction, seed=seed,
                          standardize=standardize, device=device, max_iter=max_iter,
                          class_names=store.class_names, progress=progress)
    result.store_path = str(store.path)
    if out is not None:
        result.artifact_dir = str(save_probe(result, store, Path(out)))
    return result


def probe_arrays(features: np.ndarray, labels: np.ndarray, splits: np.ndarray, keys: np.ndarray, *,
                 head: str = "torch", penalty: float | None = None,
                 penalties: tuple[float, ...] | list[float] | None = None,
                 val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0, standardize: bool = True,
                 device: str = "cpu", max_iter: int | None = None, class_names: list[str] | None = None,
                 progress: Callable[[str], None] | None = None) -> ProbeResult:
    """The probe protocol on in-memory arrays (features, labels, split codes, stable row keys)."""
    started = time.perf_counter()
    check_head(head)
    check_torch_device(device)
    features = check_features(features, name="features")
    labels, splits, keys = np.asarray(labels), np.asarray(splits), np.asarray(keys)
    if not len(labels) == len(splits) == len(keys) == len(features):
        raise ConfigError(f"features, labels, splits and keys must have one row each per sample; got "
                          f"{len(features)}, {len(labels)}, {len(splits)} and {len(keys)} rows.")
    parts = split_for_probe(labels, splits, keys, val_fraction=val_fraction, seed=seed)
    fit_rows = np.concatenate([parts.train, parts.val])  # train rows first: the sweep fits those
    X_fit, y_fit = features[fit_rows], labels[fit_rows]
    check_labels(y_fit[:len(parts.train)], len(parts.train))
    sweep = None
    if penalty is None:
        sweep, estimator = sweep_and_refit(X_fit, y_fit, len(parts.train), head=head,
                                           penalties=penalties or DEFAULT_PENALTIES, standardize=standardize,
                                           device=device, max_iter=max_iter)
        chosen = sweep.best_penalty
        if progress:
            progress(f"sweep: {len(sweep.penalties)} penalties, best {chosen:.3g} "
                     f"(val top-1 {sweep.best_val_accuracy:.4f})")
    else:
        chosen = check_penalty("probe", penalty)
        estimator = fit_fixed(X_fit, y_fit, head=head, penalty=chosen, standardize=standardize, device=device,
                              max_iter=max_iter)
    notes = _notes(sweep, estimator)
    proba = estimator.predict_proba(features[parts.test])
    metrics = classification_report(labels[parts.test], proba, estimator.classes_, class_names=class_names)
    metrics["fit_seconds"] = float(estimator.fit_seconds_)
    return ProbeResult(
        head=head, penalty=chosen, swept=sweep is not None, sweep=sweep, metrics=metrics,
        split_sizes=parts.sizes(), val_source=parts.val_source, val_fraction=parts.val_fraction, seed=seed,
        fit_seconds=float(estimator.fit_seconds_), total_seconds=time.perf_counter() - started,
        estimator=estimator, notes=notes,
    )


def _notes(sweep: SweepResult | None, estimator: Any) -> list[str]:
    """What the user should know about the fit: a choice at the grid's edge, no convergence."""
    notes = []
    if sweep is not None and sweep.at_edge:
        beyond = "stronger (larger)" if sweep.at_edge == "strongest" else "weaker (smaller)"
        notes.append(f"The best penalty, {sweep.best_penalty:.3g}, is the {sweep.at_edge} value of the grid: the "
                     f"optimum may lie beyond it. Pass --penalties with {beyond} values to look further.")
    if sweep is None and not getattr(estimator, "converged_", True):  # sweeps run to documented budgets
        notes.append(f"The solver stopped after {estimator.n_iter_} iterations without reaching its tolerance; "
                     f"pass --max-iter with a larger value to solve further.")
    return notes
