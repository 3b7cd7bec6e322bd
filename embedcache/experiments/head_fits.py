"""The probe protocol's fits for the k-NN and ridge heads, numeric targets and label sets.

:mod:`~embedcache.experiments.protocol` splits the rows (train, val, test: disjoint) and sends
every head but the linear softmax ones here. Each fit chooses on the val rows only (k for k-NN; the
penalty for ridge and the sigmoid head, plus its decision threshold), refits on train+val (the
k-NN references become train+val), and scores the test rows once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedcache.errors import ConfigError
from embedcache.heads.knn import DEFAULT_KS, KNNProbe, check_k, check_temperature, select_k
from embedcache.heads.metrics import classification_report
from embedcache.heads.multilabel import DEFAULT_SIGMOID_PENALTIES, check_label_sets, sweep_sigmoid
from embedcache.heads.ridge_probe import (
    DEFAULT_RIDGE_PENALTIES,
    RidgeClassifierProbe,
    RidgeRegressor,
    sweep_ridge,
)
from embedcache.heads.selection import Selection
from embedcache.heads.target_metrics import multilabel_report, regression_report


@dataclass
class HeadFit:
    """What a fit gives the protocol: the refit estimator, what was chosen and the test metrics.

    ``reference_positions``: for k-NN, the rows (positions in the arrays) that are its references.
    """

    estimator: Any
    penalty: float | None
    selection: Selection | None
    metrics: dict[str, Any]
    chosen: dict[str, Any]
    reference_positions: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Rows:
    """Row positions of the three sets (from :func:`~embedcache.experiments.protocol.split_for_probe`)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @property
    def fit(self) -> np.ndarray:
        """Train rows, then val rows (what a refit uses; sweeps fit the leading train rows)."""
        return np.concatenate([self.train, self.val])


def check_options(head: str, *, penalty: float | None, penalties: Sequence[float] | None, k: int | None,
                  ks: Sequence[int] | None) -> None:
    """Refuse options that do not apply to ``head`` (rather than ignoring them)."""
    if head == "knn" and (penalty is not None or penalties):
        raise ConfigError("The k-NN head has no penalty; choose k with 'ks' (--ks 10,20,100,200) or fix it with "
                          "'k' (--k 20) instead of penalty/penalties.")
    if head != "knn" and (k is not None or ks):
        raise ConfigError(f"'k' and 'ks' (--k/--ks) only apply to the k-NN head (--head knn); the {head} head "
                          f"takes a penalty.")


def fit_head(task: str, head: str, features: np.ndarray, rows: Rows, *, labels: np.ndarray,
             targets: np.ndarray | None = None, target_names: list[str] | None = None,
             label_sets: np.ndarray | None = None, class_names: list[str] | None = None,
             penalty: float | None = None, penalties: Sequence[float] | None = None, k: int | None = None,
             ks: Sequence[int] | None = None, temperature: float = 0.07, standardize: bool = True,
             device: str = "cpu", max_iter: int | None = None) -> HeadFit:
    """Choose on val, refit on train+val, score test once, for ``task`` (``classes``,
    ``regression``, ``multilabel``) and ``head`` (``knn``/``ridge`` for classes, ``ridge`` for
    regression, ``torch`` for label sets); options as for :func:`~embedcache.experiments.protocol.probe`."""
    check_options(head, penalty=penalty, penalties=penalties, k=k, ks=ks)
    grid = None if penalty is not None else penalties
    if task == "regression":
        return _fit_regression(features, rows, targets, target_names or [], penalty, grid, standardize)
    if task == "multilabel":
        return _fit_label_sets(features, rows, label_sets, class_names or [], penalty, grid, standardize, max_iter)
    if head == "knn":
        return _fit_knn(features, rows, labels, class_names, k, ks, temperature, device)
    return _fit_ridge_classes(features, rows, labels, class_names, penalty, grid, standardize)


def _fit_knn(features: np.ndarray, rows: Rows, labels: np.ndarray, class_names: list[str] | None,
             k: int | None, ks: Sequence[int] | None, temperature: float, device: str) -> HeadFit:
    temperature = check_temperature("probe", temperature)
    selection = None
    if k is None:
        selection = select_k(features[rows.train], labels[rows.train], features[rows.val], labels[rows.val],
                             ks=ks or DEFAULT_KS, temperature=temperature, device=device)
        k = int(selection.best_value)
    estimator = KNNProbe(k=check_k("probe", k), temperature=temperature, device=device)
    estimator.fit(features[rows.fit], labels[rows.fit])
    proba = estimator.predict_proba(features[rows.test])
    metrics = classification_report(labels[rows.test], proba, estimator.classes_, class_names=class_names)
    metrics["fit_seconds"] = float(estimator.fit_seconds_)
    return HeadFit(estimator, None, selection, metrics, {"k": k, "temperature": temperature},
                   reference_positions=rows.fit)


def _fit_ridge_classes(features: np.ndarray, rows: Rows, labels: np.ndarray, class_names: list[str] | None,
                       penalty: float | None, grid: Sequence[float] | None, standardize: bool) -> HeadFit:
    X_fit, y_fit = features[rows.fit], labels[rows.fit]
    selection = None
    if penalty is None:
        selection, estimator = sweep_ridge(X_fit, y_fit, len(rows.train), task="classes",
                                           penalties=grid or DEFAULT_RIDGE_PENALTIES, standardize=standardize)
    else:
        estimator = RidgeClassifierProbe(penalty=penalty, standardize=standardize).fit(X_fit, y_fit)
    scores = estimator.class_scores(features[rows.test])  # ranks classes like probabilities would
    metrics = classification_report(labels[rows.test], scores, estimator.classes_, class_names=class_names)
    metrics["fit_seconds"] = float(estimator.fit_seconds_)
    return HeadFit(estimator, float(estimator.penalty), selection, metrics, {"penalty": float(estimator.penalty)})


def _fit_regression(features: np.ndarray, rows: Rows, targets: np.ndarray | None, names: list[str],
                    penalty: float | None, grid: Sequence[float] | None, standardize: bool) -> HeadFit:
    if targets is None:
        raise ConfigError("Regression needs numeric targets (extract a CSV manifest with --target/--targets).")
    Y = np.asarray(targets, np.float32).reshape(len(features), -1)
    if not np.isfinite(Y[np.concatenate([rows.fit, rows.test])]).all():
        raise ConfigError("The numeric targets contain NaN or infinite values; clean or drop those rows.")
    names = names or [f"target{i}" for i in range(Y.shape[1])]
    selection = None
    if penalty is None:
        selection, estimator = sweep_ridge(features[rows.fit], Y[rows.fit], len(rows.train), task="regression",
                                           penalties=grid or DEFAULT_RIDGE_PENALTIES, standardize=standardize)
    else:
        estimator = RidgeRegressor(penalty=penalty, standardize=standardize).fit(features[rows.fit], Y[rows.fit])
    predicted = np.asarray(estimator.predict(features[rows.test])).reshape(len(rows.test), -1)
    metrics = regression_report(Y[rows.test], predicted, names)
    metrics["fit_seconds"] = float(estimator.fit_seconds_)
    return HeadFit(estimator, float(estimator.penalty), selection, metrics, {"penalty": float(estimator.penalty)})


def _fit_label_sets(features: np.ndarray, rows: Rows, label_sets: np.ndarray | None, class_names: list[str],
                    penalty: float | None, grid: Sequence[float] | None, standardize: bool,
                    max_iter: int | None) -> HeadFit:
    if label_sets is None:
        raise ConfigError("A multi-label probe needs label sets (a CSV manifest with a 'labels' column).")
    Y = check_label_sets(label_sets, len(features))
    grid = [penalty] if penalty is not None else (grid or DEFAULT_SIGMOID_PENALTIES)
    selection, estimator = sweep_sigmoid(features[rows.fit], Y[rows.fit], len(rows.train), penalties=grid,
                                         standardize=standardize, max_iter=max_iter)
    names = class_names or [str(c) for c in range(Y.shape[1])]
    proba = estimator.predict_proba(features[rows.test])
    metrics = multilabel_report(Y[rows.test], proba, threshold=estimator.threshold_, class_names=names)
    metrics["fit_seconds"] = float(estimator.fit_seconds_)
    chosen = {"penalty": float(estimator.penalty), "threshold": float(estimator.threshold_)}
    return HeadFit(estimator, float(estimator.penalty), selection if penalty is None else None, metrics, chosen)
