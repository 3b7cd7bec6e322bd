"""The ridge estimators and the ridge sweep, on :mod:`~embedcache.heads.ridge`'s closed form.

- :class:`RidgeClassifierProbe`: ridge on one-hot class targets (``--head ridge``).
- :class:`RidgeRegressor`: ridge on float targets (numeric targets of a CSV manifest).
- :func:`sweep_ridge`: every penalty of a grid scored on validation rows from one
  eigendecomposition, the winner refit on train+val from the added statistics.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from embedcache.errors import ConfigError
from embedcache.heads.ridge import RidgePath, RidgeStatistics, solve
from embedcache.heads.selection import Selection, best_index
from embedcache.heads.target_metrics import r2_scores
from embedcache.heads.torch_probe import check_penalty
from embedcache.heads.validation import validate_fit_input, validate_predict_input

#: The ridge sweep's default grid: 50 penalties, 1e-5 ... 1e3, log-spaced (strongest first when
#: sweeping). The penalty is added to the eigenvalues of the standardised covariance (mean 1):
#: large values matter for few rows per feature, and on full Fashion-MNIST features (54k x 1280)
#: the val curve is flat below 1e-3.
DEFAULT_RIDGE_PENALTIES = tuple(float(p) for p in np.logspace(-5, 3, 50))


def _scores(X: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """``X @ coef.T + intercept`` in float64 through torch (see heads/linear.py on numpy's BLAS)."""
    rows = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float64))
    return torch.addmm(torch.from_numpy(np.asarray(intercept, np.float64)), rows,
                       torch.from_numpy(np.asarray(coef, np.float64)).T).numpy()


class RidgeClassifierProbe(ClassifierMixin, BaseEstimator):
    """Ridge regression on one-hot class targets, on standardised features; the class with the
    largest output wins. Its outputs are scores, not probabilities (no ``predict_proba``).

    Args:
        penalty: L2 strength on the standardised weights (``alpha = penalty * n`` in sklearn).
        standardize: centre and scale features with the training mean/std (folded into ``coef_``).

    Attributes:
        classes_, coef_ (n_classes, n_features), intercept_, mean_, scale_, n_features_in_,
        fit_seconds_.
    """

    def __init__(self, penalty: float = 1e-2, *, standardize: bool = True) -> None:
        self.penalty = penalty
        self.standardize = standardize

    def fit(self, X: Any, y: Any) -> RidgeClassifierProbe:
        """Fit on ``X`` (n_samples, n_features) and labels ``y``; returns self."""
        started = time.perf_counter()
        penalty = check_penalty("RidgeClassifierProbe", self.penalty)
        X, y = validate_fit_input(self, X, y)
        self.classes_, labels = np.unique(y, return_inverse=True)
        stats = RidgeStatistics.from_rows(X, n_targets=len(self.classes_), labels=labels.reshape(-1))
        self.coef_, self.intercept_, self.mean_, self.scale_ = solve(stats, penalty, standardize=self.standardize)
        self.fit_seconds_ = time.perf_counter() - started
        return self

    @classmethod
    def from_coefficients(cls, *, coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray,
                          mean: np.ndarray, scale: np.ndarray, fit_seconds: float = 0.0,
                          **params: Any) -> RidgeClassifierProbe:
        """A fitted probe from a solution on raw features (a sweep's refit, or an artifact)."""
        probe = cls(**params)
        probe.coef_, probe.intercept_ = np.asarray(coef, np.float32), np.asarray(intercept, np.float32)
        probe.classes_, probe.mean_, probe.scale_ = np.asarray(classes), np.asarray(mean), np.asarray(scale)
        probe.n_features_in_, probe.fit_seconds_ = int(probe.coef_.shape[1]), float(fit_seconds)
        return probe

    def class_scores(self, X: Any) -> np.ndarray:
        """Outputs ``(n, n_classes)`` (columns ordered as ``classes_``)."""
        check_is_fitted(self, "coef_")
        return _scores(validate_predict_input(self, X), self.coef_, self.intercept_)

    def decision_function(self, X: Any) -> np.ndarray:
        scores = self.class_scores(X)
        return scores[:, 1] - scores[:, 0] if scores.shape[1] == 2 else scores

    def predict(self, X: Any) -> np.ndarray:
        scores = self.class_scores(X)
        return np.asarray(self.classes_)[np.argmax(scores, axis=1)]


class RidgeRegressor(RegressorMixin, BaseEstimator):
    """Ridge regression of one or several float targets on standardised features.

    Args:
        penalty: L2 strength on the standardised weights (``alpha = penalty * n`` in sklearn).
        standardize: centre and scale features with the training mean/std.

    Attributes:
        coef_ ``(n_features,)`` for a 1-D target, else ``(n_targets, n_features)``; intercept_
        (a float or ``(n_targets,)``); mean_, scale_, n_features_in_, fit_seconds_.
    """

    def __init__(self, penalty: float = 1e-2, *, standardize: bool = True) -> None:
        self.penalty = penalty
        self.standardize = standardize

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True  # one solve serves every target column
        return tags

    def fit(self, X: Any, y: Any) -> RidgeRegressor:
        """Fit on ``X`` (n_samples, n_features) and targets ``y`` (n_samples[, n_targets])."""
        started = time.perf_counter()
        penalty = check_penalty("RidgeRegressor", self.penalty)
        X, y = validate_data(self, X, y, dtype=np.float32, order="C", multi_output=True, y_numeric=True)
        Y = np.asarray(y, np.float32).reshape(len(X), -1)
        stats = RidgeStatistics.from_rows(X, n_targets=Y.shape[1], targets=Y)
        coef, intercept, self.mean_, self.scale_ = solve(stats, penalty, standardize=self.standardize)
        self._store(coef, intercept, one_target=np.ndim(y) == 1)
        self.fit_seconds_ = time.perf_counter() - started
        return self

    def _store(self, coef: np.ndarray, intercept: np.ndarray, *, one_target: bool) -> None:
        self.coef_ = coef[0] if one_target else coef
        self.intercept_ = float(intercept[0]) if one_target else intercept

    @classmethod
    def from_coefficients(cls, *, coef: np.ndarray, intercept: np.ndarray, mean: np.ndarray, scale: np.ndarray,
                          one_target: bool = False, fit_seconds: float = 0.0, **params: Any) -> RidgeRegressor:
        """A fitted regressor from ``coef (T, d)`` / ``intercept (T,)`` on raw features."""
        probe = cls(**params)
        coef = np.asarray(coef, np.float32).reshape(-1, np.shape(coef)[-1])
        probe._store(coef, np.asarray(intercept, np.float32).reshape(-1), one_target=one_target)
        probe.mean_, probe.scale_ = np.asarray(mean), np.asarray(scale)
        probe.n_features_in_, probe.fit_seconds_ = int(coef.shape[1]), float(fit_seconds)
        return probe

    def predict(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "coef_")
        X = validate_predict_input(self, X)
        coef = np.asarray(self.coef_).reshape(-1, X.shape[1])
        out = _scores(X, coef, np.asarray(self.intercept_).reshape(-1))
        return out[:, 0] if np.ndim(self.coef_) == 1 else out


def _ordered(penalties: Sequence[float]) -> list[float]:
    ordered = sorted({check_penalty("the ridge grid", float(p)) for p in penalties}, reverse=True)
    if not ordered:
        raise ConfigError("The 'penalties' grid is empty; give at least one value.")
    return ordered


def sweep_ridge(X: np.ndarray, y: np.ndarray, n_train: int, *, task: str = "classes",
                penalties: Sequence[float] = DEFAULT_RIDGE_PENALTIES, standardize: bool = True
                ) -> tuple[Selection, Any]:
    """Every penalty fitted on ``X[:n_train]`` and scored on ``X[n_train:]`` (val top-1 for
    ``task="classes"``, mean R² over the targets for ``"regression"``); the best (ties: the
    stronger penalty) is refit on all rows from the added statistics, by Cholesky.

    Returns:
        The selection table and the refit estimator.
    """
    started = time.perf_counter()
    ordered = _ordered(penalties)
    if task == "classes":
        classes, position = np.unique(np.asarray(y), return_inverse=True)
        position = position.reshape(-1)
        kwargs_train, kwargs_val = {"labels": position[:n_train]}, {"labels": position[n_train:]}
        n_targets = len(classes)
    else:
        Y = np.asarray(y, np.float32).reshape(len(X), -1)
        kwargs_train, kwargs_val, n_targets = {"targets": Y[:n_train]}, {"targets": Y[n_train:]}, Y.shape[1]
    train = RidgeStatistics.from_rows(X[:n_train], n_targets=n_targets, **kwargs_train)
    val = train.sibling().accumulate(X[n_train:], **kwargs_val)
    predictions = RidgePath(train, standardize=standardize).predictions(X[n_train:], ordered)
    if task == "classes":
        scores = [float(np.mean(np.argmax(p, axis=1) == position[n_train:])) for p in predictions]
    else:
        scores = [float(np.mean(r2_scores(Y[n_train:], p))) for p in predictions]
    best = best_index(scores, ties="first")
    chosen = ordered[best]
    refit_started = time.perf_counter()
    coef, intercept, mean, scale = solve(train + val, chosen, standardize=standardize)
    params = {"penalty": chosen, "standardize": standardize, "fit_seconds": time.perf_counter() - refit_started}
    if task == "classes":
        estimator = RidgeClassifierProbe.from_coefficients(coef=coef, intercept=intercept, classes=classes, mean=mean,
                                                           scale=scale, **params)
    else:
        estimator = RidgeRegressor.from_coefficients(coef=coef, intercept=intercept, mean=mean, scale=scale, **params)
    selection = Selection("penalty", "top1" if task == "classes" else "r2", ordered, scores,
                          time.perf_counter() - started, chosen, scores[best])
    return selection, estimator
