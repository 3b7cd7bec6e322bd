"""The probe protocol on a cache entry: choose the penalty on validation rows only, refit on
train+val, score once on test.

The linear softmax heads (torch, sklearn) sweep here through :mod:`~embedcache.heads.sweep`; the
k-NN and ridge heads and entries with numeric targets or label sets are fitted by
:mod:`~embedcache.experiments.head_fits` on the same split.

Validation rows are the cache's ``val`` split, else a stratified seeded hold-out of ``train``
(``val_fraction``, ``seed``: both recorded, so fine-tuning can hold out the very same rows).
Train, val and test are checked disjoint; unlabelled rows are never used.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedcache.errors import ConfigError
from embedcache.experiments.artifacts import save_probe
from embedcache.experiments.head_fits import Rows, check_options, fit_head
from embedcache.experiments.train_views import TrainViews, add_train_views
from embedcache.heads.knn import DEFAULT_TEMPERATURE
from embedcache.heads.metrics import classification_report
from embedcache.heads.registry import LINEAR_HEADS, resolve_head
from embedcache.heads.selection import Selection
from embedcache.heads.sweep import DEFAULT_PENALTIES, SweepResult, fit_fixed, sweep_and_refit
from embedcache.heads.torch_probe import check_penalty
from embedcache.heads.validation import check_features, check_labels
from embedcache.runtime import check_torch_device, run_threads
from embedcache.splits import Split, holdout_splits
from embedcache.store.entries import resolve_entry
from embedcache.store.feature_sets import CONCAT, DEFAULT_SET, SELECTED_SET
from embedcache.store.reader import FeatureStore
from embedcache.store.schema import default_cache_dir

#: Fraction of train held out for validation when the cache has no val split.
DEFAULT_VAL_FRACTION = 0.1
#: ``features=`` value that chooses the feature set on validation too.
ALL_SETS = "all"


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
        stratified = "stratified, " if len(np.unique(labels[train])) > 1 else ""
        val, train = train[held == Split.VAL], train[held == Split.TRAIN]
        val_source = f"hold-out of {val_fraction:g} of train ({stratified}seed {seed})"
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
    """What :func:`probe` returns (also written as report.json).

    ``penalty`` is None for the k-NN head; ``selection`` is the validation table of the heads
    fitted by :mod:`~embedcache.experiments.head_fits` (``sweep`` that of the linear heads);
    ``chosen`` what was chosen (``k``, ``temperature``, ``penalty``, ``threshold``); ``task``
    ``classes``, ``regression`` or ``multilabel``.
    """

    head: str
    penalty: float | None
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
    task: str = "classes"
    #: The feature set probed (``penultimate``, a set name, or a ``+`` concatenation).
    features: str = "penultimate"
    #: ``probe --features all``: the (feature set, penalty) validation table.
    feature_sweep: list[dict[str, Any]] | None = None
    selection: Selection | None = None
    chosen: dict[str, Any] = field(default_factory=dict)
    target_names: list[str] = field(default_factory=list)
    reference_positions: np.ndarray | None = field(default=None, repr=False)
    threads: int | None = None  # intra-op threads the fits ran with (set by probe())

    def to_dict(self) -> dict[str, Any]:
        return {
            "head": self.head,
            "task": self.task,
            "chosen": self.chosen,
            "selection": None if self.selection is None else self.selection.to_dict(),
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
            "threads": self.threads,
            "cache": self.store_path,
            "features": self.features,
            **({"feature_sweep": self.feature_sweep} if self.feature_sweep is not None else {}),
            "converged": bool(getattr(self.estimator, "converged_", True)),
            "notes": self.notes,
        }


def open_store(entry: str | os.PathLike | FeatureStore, cache_dir: str | os.PathLike | None) -> FeatureStore:
    """A FeatureStore as given, or opened from a path / key prefix in ``cache_dir``."""
    if isinstance(entry, FeatureStore):
        return entry
    return FeatureStore.open(resolve_entry(entry, cache_dir or default_cache_dir()))


def probe(entry: str | os.PathLike | FeatureStore, *, head: str | None = None, penalty: float | None = None,
          penalties: tuple[float, ...] | list[float] | None = None, val_fraction: float = DEFAULT_VAL_FRACTION,
          seed: int = 0, standardize: bool = True, device: str = "cpu", max_iter: int | None = None,
          out: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
          progress: Callable[[str], None] | None = None, k: int | None = None,
          ks: tuple[int, ...] | list[int] | None = None, temperature: float = DEFAULT_TEMPERATURE,
          threads: int | None = None, features: str | None = None, views: int | None = None) -> ProbeResult:
    """Train a head on a cache entry: choose on val (penalty sweep, or k), refit, test once.

    What the entry's rows carry decides the task: one class each (heads ``torch``, ``sklearn``,
    ``knn``, ``ridge``), numeric targets (``ridge``) or label sets (``torch``: one sigmoid per class).

    Args:
        entry: a FeatureStore, an ``.h5`` path, or a cache-key prefix.
        head: ``torch`` (L-BFGS), ``sklearn`` (LogisticRegression), ``knn`` (cosine k-NN) or
            ``ridge`` (closed-form ridge path); default ``torch``, ``ridge`` for numeric targets.
        penalty: use this penalty and skip the sweep.
        penalties: the sweep grid (default: 11 values from 1e-6 to 1e-1; ridge: 50 from 1e-5 to 1e3).
        val_fraction: hold-out from train for selection when the cache has no val split.
        seed: seed of that hold-out.
        standardize: standardise features (statistics from the fitting rows only).
        device: torch head device.
        max_iter: solver iteration cap for every fit (default: the head's; for a torch sweep and
            its refit, the budgets of :func:`~embedcache.heads.sweep.iteration_budget`).
        out: directory for the probe artifact, report.json and confusion.png.
        cache_dir: where to resolve a key prefix (default ``$EMBEDCACHE_DIR`` or ``./cache``).
        progress: called with a short message after each step.
        k: k-NN: use this k and skip its choice; ks: the k grid (default 10, 20, 100, 200).
        temperature: k-NN vote temperature (votes ``softmax(similarity / temperature)``).
        threads: torch's intra-op threads (default ``$EMBEDCACHE_THREADS``, else the cores
            available; see :func:`~embedcache.runtime.resolve_threads`); recorded in the report.
        features: which feature set of the entry (``extract --layers``): a name such as
            ``features.3:avg``, several joined by ``+`` (concatenated now), or None /
            ``penultimate`` for the default features. To choose the set on val too, see
            :func:`~embedcache.experiments.feature_sweep.probe_all_sets`.
        views: an entry of ``extract --views K``: train on the first ``views`` views of each
            train image (1: the centre view only; default: all K).
    """
    if features == ALL_SETS:
        raise ConfigError("features='all' chooses the feature set on val too: call embedcache.probe_all_sets(entry, "
                          "...) (the CLI's `probe ENTRY --features all`), or name one set.")
    store = open_store(entry, cache_dir)
    chosen_features = store.select_features(features)
    train_views = TrainViews.of_store(store, features, views)
    if out is not None:
        store = artifact_view(store, features)  # before fitting: a concatenation cannot be saved
    with run_threads(threads) as count:
        result = probe_arrays(chosen_features, store.labels, store.splits, store.paths, head=head,
                              penalty=penalty, penalties=penalties, val_fraction=val_fraction, seed=seed,
                              standardize=standardize, device=device, max_iter=max_iter,
                              class_names=store.class_names, progress=progress, targets=store.targets,
                              target_names=store.target_names, label_sets=store.label_sets, k=k, ks=ks,
                              temperature=temperature, views=train_views)
    result.threads = count
    result.store_path = str(store.path)
    result.features = features or DEFAULT_SET
    if out is not None:
        result.artifact_dir = str(save_probe(result, store, Path(out)))
    return result


def artifact_view(store: FeatureStore, features: str | None) -> FeatureStore:
    """``store`` as a saved probe must see it: the chosen feature set as its features and a
    backbone spec that rebuilds exactly that set (``layer`` and ``pool`` of the node), so
    ``predict`` computes the same features.

    Raises:
        ConfigError: a concatenation of sets (one backbone spec cannot rebuild it).
    """
    name = features or DEFAULT_SET
    if CONCAT in name:
        raise ConfigError(f"A probe on a concatenation of feature sets ({name!r}) cannot be saved with --out: "
                          f"predict rebuilds one set per probe. Probe one set (e.g. {name.split(CONCAT)[0]!r}) "
                          f"to save it, or drop --out.")
    chosen = store.select_features(name)
    spec = {k: v for k, v in store.backbone.items() if k != "feature_sets"}
    if name != DEFAULT_SET:
        node, _, pool = name.rpartition(":")
        spec.update(layer=node, pool=pool, dim=int(chosen.shape[1]))
    attrs = {**store.attrs, "backbone": spec, "dim": int(chosen.shape[1]), SELECTED_SET: name}
    return dataclasses.replace(store, features=chosen, feature_sets={}, attrs=attrs)


def task_of(targets: np.ndarray | None, label_sets: np.ndarray | None) -> str:
    """``regression`` with numeric targets, ``multilabel`` with label sets, else ``classes``."""
    return "regression" if targets is not None else "multilabel" if label_sets is not None else "classes"


def probe_arrays(features: np.ndarray, labels: np.ndarray, splits: np.ndarray, keys: np.ndarray, *,
                 head: str | None = None, penalty: float | None = None,
                 penalties: tuple[float, ...] | list[float] | None = None,
                 val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0, standardize: bool = True,
                 device: str = "cpu", max_iter: int | None = None, class_names: list[str] | None = None,
                 progress: Callable[[str], None] | None = None, targets: np.ndarray | None = None,
                 target_names: list[str] | None = None, label_sets: np.ndarray | None = None,
                 k: int | None = None, ks: tuple[int, ...] | list[int] | None = None,
                 temperature: float = DEFAULT_TEMPERATURE, views: TrainViews | None = None) -> ProbeResult:
    """The probe protocol on in-memory arrays (features, labels, split codes, stable row keys;
    ``targets`` (n, T) or ``label_sets`` (n, C) for those tasks; other arguments as :func:`probe`).

    ``views``: augmented views of some of the images; those of the train images join the
    training rows (of the sweep and of the refit), those of val and test images are never used.
    Positions at or past ``len(features)`` (a k-NN probe's ``reference_positions``) are views."""
    started = time.perf_counter()
    task = task_of(targets, label_sets)
    head = resolve_head(head, task)
    check_options(head, penalty=penalty, penalties=penalties, k=k, ks=ks)
    check_torch_device(device)
    features = check_features(features, name="features")
    labels, splits, keys = np.asarray(labels), np.asarray(splits), np.asarray(keys)
    extra = [len(a) for a in (targets, label_sets) if a is not None]
    if not len(labels) == len(splits) == len(keys) == len(features) == (extra[0] if extra else len(labels)):
        raise ConfigError(f"features, labels, splits and keys (and targets or label sets) must have one row each "
                          f"per sample; got {len(features)}, {len(labels)}, {len(splits)}, {len(keys)} "
                          f"(and {extra}) rows.")
    strata = labels if task == "classes" else np.zeros(len(labels), np.int64)  # every row carries a target
    parts = split_for_probe(strata, splits, keys, val_fraction=val_fraction, seed=seed)
    if task == "classes":
        check_labels(labels[parts.train], len(parts.train))
    image_sizes = parts.sizes()
    train, features, (labels, targets, label_sets), n_views = add_train_views(
        parts.train, np.concatenate([parts.val, parts.test]), views, features, labels, targets, label_sets)
    parts = dataclasses.replace(parts, train=train)
    sizes = {**image_sizes, **({"train_views": n_views} if views is not None else {})}
    if task != "classes" or head not in LINEAR_HEADS:
        fit = fit_head(task, head, features, Rows(parts.train, parts.val, parts.test), labels=labels,
                       targets=targets, target_names=target_names, label_sets=label_sets, class_names=class_names,
                       penalty=penalty, penalties=penalties, k=k, ks=ks, temperature=temperature,
                       standardize=standardize, device=device, max_iter=max_iter)
        if progress and fit.selection is not None:
            sel = fit.selection
            progress(f"{sel.parameter}: {len(sel.values)} values, best {sel.best_value:.3g} "
                     f"(val {sel.metric} {sel.best_score:.4f})")
        return ProbeResult(
            head=head, penalty=fit.penalty, swept=fit.selection is not None, sweep=None, metrics=fit.metrics,
            split_sizes=sizes, val_source=parts.val_source, val_fraction=parts.val_fraction, seed=seed,
            fit_seconds=float(fit.estimator.fit_seconds_), total_seconds=time.perf_counter() - started,
            estimator=fit.estimator, task=task, selection=fit.selection, chosen=fit.chosen,
            target_names=list(target_names or []), reference_positions=fit.reference_positions)
    fit_rows = np.concatenate([parts.train, parts.val])  # train rows first: the sweep fits those
    X_fit, y_fit = features[fit_rows], labels[fit_rows]
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
    notes = fit_notes(sweep, estimator)
    proba = estimator.predict_proba(features[parts.test])
    metrics = classification_report(labels[parts.test], proba, estimator.classes_, class_names=class_names)
    metrics["fit_seconds"] = float(estimator.fit_seconds_)
    return ProbeResult(
        head=head, penalty=chosen, swept=sweep is not None, sweep=sweep, metrics=metrics,
        split_sizes=sizes, val_source=parts.val_source, val_fraction=parts.val_fraction, seed=seed,
        fit_seconds=float(estimator.fit_seconds_), total_seconds=time.perf_counter() - started,
        estimator=estimator, notes=notes, chosen={"penalty": chosen},
    )


def fit_notes(sweep: SweepResult | None, estimator: Any) -> list[str]:
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
