"""Probe speed, side by side in one run on the same features.

    python benchmarks/probe_speed.py [CACHE_ENTRY.h5] [--synthetic-only] [--repeats 1]

For each case prints: the torch probe protocol (an 11-value penalty sweep on a val hold-out,
selection, refit on train+val, one test score) against ONE default scikit-learn fit
(StandardScaler + LogisticRegression(), lbfgs, C=1, max_iter=100) on the same train rows, with
both test accuracies and the time ratio. Cases: the given cache entry (e.g. full Fashion-MNIST
efficientnet_lite0 features, 60k x 1280) and a synthetic 50k x 1280, 10-class problem.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from embedcache.experiments.protocol import probe_arrays
from embedcache.store.reader import FeatureStore


def synthetic(n_train: int = 50_000, n_test: int = 10_000, dim: int = 1280, k: int = 10, seed: int = 0):
    """Class means in a 64-d subspace plus correlated noise: hard enough to need regularisation."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, 64)) @ rng.normal(size=(64, dim)) / 150
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    y = rng.integers(0, k, n_train + n_test)
    X = means[y] + rng.normal(size=(n_train + n_test, dim)) @ mixing
    X = np.maximum(X, 0).astype(np.float32)  # post-ReLU-like, as backbone features are
    splits = np.array([0] * n_train + [2] * n_test, np.uint8)
    return X, y, splits


def run_case(name: str, X: np.ndarray, y: np.ndarray, splits: np.ndarray, repeats: int) -> None:
    keys = np.arange(len(y)).astype(str)
    train, test = splits == 0, splits == 2
    ours, theirs = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        result = probe_arrays(X, y, splits, keys, head="torch")
        ours.append(time.perf_counter() - started)
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = make_pipeline(StandardScaler(), LogisticRegression()).fit(X[train], y[train])
        theirs.append(time.perf_counter() - started)
        sk_acc = float(model.score(X[test], y[test]))
    t_ours, t_theirs = statistics.median(ours), statistics.median(theirs)
    print(f"\n{name}: {int(train.sum())} train x {X.shape[1]} features, {len(np.unique(y))} classes, "
          f"{int(test.sum())} test")
    print(f"  torch sweep ({len(result.sweep.penalties)} penalties + selection + refit) "
          f"{t_ours:7.2f} s   test top-1 {result.metrics['top1']:.4f}   chosen penalty {result.penalty:.3g}")
    print(f"  sklearn LogisticRegression(), one default fit       "
          f"{t_theirs:7.2f} s   test top-1 {sk_acc:.4f}")
    print(f"  ratio sklearn/torch-sweep = {t_theirs / t_ours:.1f}x, accuracy difference "
          f"{100 * (result.metrics['top1'] - sk_acc):+.2f} points")
    print(f"  sweep iterations per penalty: {result.sweep.iterations}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("entry", nargs="?", default=None)
    parser.add_argument("--synthetic-only", action="store_true")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.entry and not args.synthetic_only:
        store = FeatureStore.open(args.entry)
        run_case(f"cache {store.attrs.get('name')}", store.features.astype(np.float32), store.labels,
                 store.splits, args.repeats)
    X, y, splits = synthetic()
    run_case("synthetic", X, y, splits, args.repeats)


if __name__ == "__main__":
    main()
