"""``fewshot``: a k-shot x seed learning curve from a cache entry, in seconds.

For each k and seed, k examples per class are drawn from the train split, a probe with a fixed
penalty is fitted on them and scored on the full test split. The penalty is never chosen by
looking at test, and a k-shot set is too small to hold out an honest validation split. With the
torch head the seeds of one k are solved jointly (:mod:`embedcache.heads.many`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedcache.errors import ConfigError
from embedcache.experiments.protocol import open_store
from embedcache.experiments.reports import write_fewshot
from embedcache.heads.linear import predict_linear
from embedcache.heads.many import fit_many_torch
from embedcache.heads.registry import LINEAR_HEADS, check_head, make_head
from embedcache.heads.torch_probe import check_penalty
from embedcache.heads.validation import check_features, check_labels
from embedcache.runtime import run_threads
from embedcache.splits import Split
from embedcache.store.reader import FeatureStore

#: Penalty used by few-shot probes (standardised features; strong, as small k needs).
FEWSHOT_PENALTY = 0.1
DEFAULT_SHOTS = (1, 2, 5, 10, 20)


@dataclass
class ShotResult:
    """Test accuracy over seeds for one k."""

    k: int
    mean: float
    std: float
    accuracies: list[float]


@dataclass
class FewshotResult:
    """The learning curve (also written as fewshot.json)."""

    cache: str
    backbone: str | None
    head: str
    penalty: float
    seeds: int
    n_test: int
    results: list[ShotResult]
    seconds: float
    threads: int | None = None  # intra-op threads the fits ran with

    def to_dict(self) -> dict[str, Any]:
        return {"cache": self.cache, "backbone": self.backbone, "head": self.head, "penalty": self.penalty,
                "penalty_rule": "fixed (never chosen on test)", "seeds": self.seeds, "n_test": self.n_test,
                "results": [vars(r) for r in self.results], "seconds": self.seconds,
                "threads": self.threads}


def draw_shots(labels: np.ndarray, candidates: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k rows per class from ``candidates`` (positions), seeded; refuses k above a class's size."""
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels[candidates]):
        members = candidates[labels[candidates] == cls]
        if k > len(members):
            raise ConfigError(
                f"--shots {k} is more than class {int(cls)} has in the train split ({len(members)} "
                f"images). Use shots <= {len(members)}."
            )
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen))


def _check_grid(shots: Sequence[int], seeds: int) -> list[int]:
    shots = [int(k) for k in shots]
    if not shots or min(shots) < 1:
        raise ConfigError(f"The 'shots' parameter must be positive ints. Got {shots!r}.")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"The 'seeds' parameter must be a positive int. Got {seeds!r}.")
    return shots


def _fit_seeds(features: np.ndarray, labels: np.ndarray, row_sets: list[np.ndarray], *, head: str,
               penalty: float) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    if head == "torch":
        return fit_many_torch(features, labels, row_sets, penalty=penalty)
    fitted = []
    for rows in row_sets:
        est = make_head(head, penalty=penalty).fit(features[rows], labels[rows])
        fitted.append((est.coef_, est.intercept_, np.asarray(est.classes_)))
    return fitted


def fewshot(entry: str | os.PathLike | FeatureStore, *, shots: Sequence[int] = DEFAULT_SHOTS, seeds: int = 10,
            head: str = "torch", penalty: float = FEWSHOT_PENALTY, cache_dir: str | os.PathLike | None = None,
            out: str | os.PathLike | None = None, fit_log: list | None = None,
            threads: int | None = None, features: str | None = None) -> FewshotResult:
    """k-shot x seed grid on a cache entry's train split, scored on its full test split.

    Args:
        entry: a FeatureStore, an ``.h5`` path or a key prefix.
        shots: values of k (examples per class).
        seeds: number of seeds (0 .. seeds-1) per k.
        head: ``torch`` or ``sklearn``.
        penalty: the fixed penalty (see the module docstring).
        cache_dir: where to resolve a key prefix.
        out: directory for fewshot.json, fewshot.md and fewshot.png (matplotlib).
        fit_log: if given, receives the row positions of every fit (for leakage checks).
        threads: torch's intra-op threads (default ``$EMBEDCACHE_THREADS``, else the cores
            available; see :func:`~embedcache.runtime.resolve_threads`); recorded in fewshot.json.
        features: the entry's feature set (a name, or names joined by ``+``); default ``penultimate``.
    """
    started = time.perf_counter()
    shots = _check_grid(shots, seeds)
    with run_threads(threads) as count:
        result = _grid(entry, shots=shots, seeds=seeds, head=head, penalty=penalty, cache_dir=cache_dir,
                       fit_log=fit_log, features=features)
    result.threads = count
    result.seconds = time.perf_counter() - started
    if out is not None:
        write_fewshot(result.to_dict(), Path(out))
    return result


def _grid(entry: str | os.PathLike | FeatureStore, *, shots: list[int], seeds: int, head: str, penalty: float,
          cache_dir: str | os.PathLike | None, fit_log: list | None, features: str | None) -> FewshotResult:
    """The k x seed fits and their test accuracies (``seconds`` is set by the caller)."""
    check_head(head, allowed=LINEAR_HEADS)
    penalty = check_penalty("fewshot", penalty, strictly_positive=head == "sklearn")
    store = open_store(entry, cache_dir)
    features = check_features(store.select_features(features), name="cached features")  # validated once, here
    labels = store.labels
    train = np.flatnonzero((store.splits == Split.TRAIN) & (labels >= 0))
    test = np.flatnonzero((store.splits == Split.TEST) & (labels >= 0))
    if len(test) == 0 or len(train) == 0:
        raise ConfigError("Few-shot needs labelled train and test splits in the cache.")
    check_labels(labels[train], len(train))
    x_test, y_test = features[test], labels[test]
    results = []
    for k in shots:
        row_sets = [draw_shots(labels, train, k, seed) for seed in range(seeds)]
        for rows in row_sets:
            if np.intersect1d(rows, test).size:  # explicit: must survive python -O
                raise ConfigError("Internal error: few-shot rows overlap the test split; nothing was scored.")
            if fit_log is not None:
                fit_log.append(rows)
        accuracies = [float(np.mean(predict_linear(x_test, coef, intercept, classes) == y_test))
                      for coef, intercept, classes in _fit_seeds(features, labels, row_sets, head=head, penalty=penalty)]
        results.append(ShotResult(k, float(np.mean(accuracies)), float(np.std(accuracies)), accuracies))
    result = FewshotResult(cache=str(store.path), backbone=store.backbone.get("name"), head=head, penalty=penalty,
                           seeds=seeds, n_test=int(len(test)), results=results, seconds=0.0)
    return result
