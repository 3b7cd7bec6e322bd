"""``probe ENTRY --features all``: choose the feature set and the penalty together, on validation only.

Every feature set of the entry (``penultimate`` and each ``extract --layers`` set), and the
concatenation of all distinct sets, gets the usual penalty sweep on the val rows; the (set, penalty) with the best val top-1 wins (ties: the earlier
set, then the stronger penalty); only the winner, refit on train+val, is scored on test, once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from embedcache.errors import ConfigError
from embedcache.experiments.artifacts import save_probe
from embedcache.experiments.protocol import (
    DEFAULT_VAL_FRACTION,
    ProbeResult,
    artifact_view,
    fit_notes,
    open_store,
    split_for_probe,
)
from embedcache.experiments.train_views import TrainViews, add_train_views
from embedcache.heads.metrics import classification_report
from embedcache.heads.registry import LINEAR_HEADS, resolve_head
from embedcache.heads.sweep import DEFAULT_PENALTIES, sweep_and_refit
from embedcache.heads.validation import check_features, check_labels
from embedcache.runtime import run_threads
from embedcache.store.feature_sets import CONCAT
from embedcache.store.reader import FeatureStore


def _check_request(store: FeatureStore, head: str, options: dict[str, Any]) -> None:
    if store.task != "classes" or head not in LINEAR_HEADS:
        raise ConfigError(f"--features all sweeps the linear heads ({', '.join(LINEAR_HEADS)}) on class labels; "
                          f"got head {head!r} on an entry of task {store.task!r}. Name one set with --features.")
    given = [name for name, value in options.items() if value is not None]
    if given:
        raise ConfigError(f"--features all chooses the penalty on val itself; drop {', '.join('--' + g for g in given)}.")


def _same_features(a: np.ndarray, b: np.ndarray, rows: int = 2048) -> bool:
    """Whether two sets hold the same features up to rounding (the same node pooled by the model
    and by embedcache differ in the last float16 bit), judged on evenly spaced rows."""
    if a.shape != b.shape:
        return False
    pick = np.linspace(0, len(a) - 1, num=min(rows, len(a)), dtype=np.int64)
    x, y = a[pick].astype(np.float32), b[pick].astype(np.float32)
    scale = max(float(np.abs(x).max()), 1e-12)
    return bool(np.abs(x - y).max() <= 1e-2 * scale)


def _candidates(store: FeatureStore, *, saving: bool, notes: list[str]) -> list[str]:
    """Every set of the entry, then (with two or more distinct sets) their concatenation: earlier
    and later layers together often beat any one of them, and the choice stays on val. A set
    holding the same features as an earlier one up to rounding (EfficientNet's ``stages`` end on
    the penultimate features again) is left out, with a note: its sweep would repeat the earlier
    one's, and it would only duplicate columns of the concatenation. With ``saving`` (``--out``) the
    concatenation is no candidate: a saved probe rebuilds one set."""
    distinct: list[str] = []
    for name in store.feature_set_names:
        twin = next((d for d in distinct if _same_features(store.select_features(d), store.select_features(name))),
                    None)
        if twin is None:
            distinct.append(name)
        else:  # its sweep would repeat the twin's, fit for fit
            notes.append(f"Feature set {name!r} holds the same features as {twin!r} up to rounding; it is swept "
                         f"once, as {twin!r}.")
    if len(distinct) < 2:
        return distinct
    if saving:
        notes.append("With --out the concatenation of every set is not a candidate (a saved probe rebuilds one "
                     "set); drop --out to let the sweep try it.")
        return distinct
    return [*distinct, CONCAT.join(distinct)]


def probe_all_sets(entry: str | os.PathLike | FeatureStore, *, head: str | None = None, penalties: Any = None,
                   val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0, standardize: bool = True,
                   device: str = "cpu", max_iter: int | None = None, out: str | os.PathLike | None = None,
                   cache_dir: str | os.PathLike | None = None, progress: Callable[[str], None] | None = None,
                   penalty: float | None = None, k: int | None = None, ks: Any = None,
                   temperature: float | None = None, threads: int | None = None,
                   views: int | None = None) -> ProbeResult:
    """Sweep (feature set, penalty) on val, refit the winner on train+val, score test once.

    Arguments as for :func:`~embedcache.experiments.protocol.probe` (``penalty``, ``k``, ``ks``
    and ``temperature`` must be None: the penalty is swept, heads are linear).

    Returns:
        The winner's :class:`ProbeResult`, ``feature_sweep`` holding the whole validation table
        (one row per set and penalty) and ``features`` the chosen set.
    """
    with run_threads(threads) as count:
        result = _probe_all_sets(entry, head=head, penalties=penalties, val_fraction=val_fraction, seed=seed,
                                 standardize=standardize, device=device, max_iter=max_iter, out=out,
                                 cache_dir=cache_dir, progress=progress, penalty=penalty, k=k, ks=ks,
                                 temperature=temperature, views=views)
    result.threads = count
    return result


def _probe_all_sets(entry: Any, *, head: str | None, penalties: Any, val_fraction: float, seed: int,
                    standardize: bool, device: str, max_iter: int | None, out: Any, cache_dir: Any,
                    progress: Any, penalty: Any, k: Any, ks: Any, temperature: Any, views: Any) -> ProbeResult:
    started = time.perf_counter()
    store = open_store(entry, cache_dir)
    head = resolve_head(head, store.task)
    _check_request(store, head, {"penalty": penalty, "k": k, "ks": ks, "temperature": temperature})
    labels = store.labels
    parts = split_for_probe(labels, store.splits, store.paths, val_fraction=val_fraction, seed=seed)
    check_labels(labels[parts.train], len(parts.train))
    n_views = 0
    table: list[dict[str, Any]] = []
    best: tuple[str, float, Any, Any] | None = None
    notes: list[str] = []
    for name in _candidates(store, saving=out is not None, notes=notes):
        features = check_features(store.select_features(name), name=f"feature set {name!r}")
        # the views of the train images (extract --views) join the training rows, those of val never
        train, features, (fit_labels,), n_views = add_train_views(
            parts.train, np.concatenate([parts.val, parts.test]), TrainViews.of_store(store, name, views),
            features, labels)
        fit_rows = np.concatenate([train, parts.val])
        sweep, estimator = sweep_and_refit(features[fit_rows], fit_labels[fit_rows], len(train), head=head,
                                           penalties=penalties or DEFAULT_PENALTIES, standardize=standardize,
                                           device=device, max_iter=max_iter)
        table += [{"features": name, "dim": int(features.shape[1]), "penalty": p, "val_top1": a}
                  for p, a in zip(sweep.penalties, sweep.val_accuracy, strict=True)]
        if progress:
            progress(f"{name}: best penalty {sweep.best_penalty:.3g} (val top-1 {sweep.best_val_accuracy:.4f})")
        if best is None or sweep.best_val_accuracy > best[1]:
            best = (name, sweep.best_val_accuracy, sweep, estimator)
    name, _, sweep, estimator = best
    features = store.select_features(name)
    proba = estimator.predict_proba(features[parts.test])  # the one look at test
    metrics = classification_report(labels[parts.test], proba, estimator.classes_, class_names=store.class_names)
    metrics["fit_seconds"] = float(estimator.fit_seconds_)
    result = ProbeResult(
        head=head, penalty=sweep.best_penalty, swept=True, sweep=sweep, metrics=metrics, split_sizes={**parts.sizes(), **({"train_views": n_views} if store.views is not None else {})},
        val_source=parts.val_source, val_fraction=parts.val_fraction, seed=seed,
        fit_seconds=float(estimator.fit_seconds_), total_seconds=time.perf_counter() - started,
        estimator=estimator, notes=[*notes, *fit_notes(sweep, estimator)], chosen={"penalty": sweep.best_penalty, "features": name},
        store_path=str(store.path), features=name, feature_sweep=table)
    if out is not None:
        result.artifact_dir = str(save_probe(result, artifact_view(store, name), Path(out)))
    return result
