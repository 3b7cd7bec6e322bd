"""``SklearnProbe``: scikit-learn's ``LogisticRegression`` (lbfgs) behind the torch probe's
interface and penalty (``C = 1 / (penalty * n_samples)``)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from embedcache.heads.linear import LinearClassifierMixin, standardisation
from embedcache.heads.torch_probe import check_penalty
from embedcache.heads.validation import validate_fit_input


class SklearnProbe(LinearClassifierMixin, ClassifierMixin, BaseEstimator):
    """scikit-learn ``LogisticRegression`` (lbfgs) with the same objective as ``TorchLinearProbe``.

    Args:
        penalty: L2 strength, as for :class:`TorchLinearProbe` (``C = 1/(penalty*n)``).
        standardize: centre and scale features with the training mean/std.
        max_iter: solver iterations at most.
        tol: solver tolerance.
        warm_start: reuse the previous solution as the starting point.

    Attributes:
        classes_, coef_ (n_classes, n_features; two rows for two classes), intercept_, mean_,
        scale_, model_ (the fitted LogisticRegression), n_iter_, fit_seconds_, n_features_in_.
    """

    def __init__(self, penalty: float = 1e-4, *, standardize: bool = True, max_iter: int = 1000,
                 tol: float = 1e-4, warm_start: bool = False) -> None:
        self.penalty = penalty
        self.standardize = standardize
        self.max_iter = max_iter
        self.tol = tol
        self.warm_start = warm_start

    def fit(self, X: Any, y: Any) -> SklearnProbe:
        """Fit on ``X`` (n_samples, n_features) and labels ``y``; returns self."""
        from sklearn.linear_model import LogisticRegression

        penalty = check_penalty("SklearnProbe", self.penalty, strictly_positive=True)
        started = time.perf_counter()
        X, y = validate_fit_input(self, X, y)
        warm = self.warm_start and hasattr(self, "model_") and self.model_.coef_.shape[1] == X.shape[1]
        if not warm:
            self.mean_, self.scale_ = standardisation(X, self.standardize)
            self.model_ = LogisticRegression(max_iter=self.max_iter, tol=self.tol, warm_start=True)
        self.model_.set_params(C=1.0 / (penalty * len(X)), max_iter=self.max_iter, tol=self.tol)
        self.model_.fit((X - self.mean_) / self.scale_, y)
        self.classes_ = self.model_.classes_
        coef, intercept = self.model_.coef_, self.model_.intercept_
        if len(self.classes_) == 2:  # sklearn stores one row for binary problems
            coef = np.vstack([-coef / 2, coef / 2])
            intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
        self.coef_ = (coef / self.scale_).astype(np.float32)
        self.intercept_ = (intercept - self.coef_ @ self.mean_).astype(np.float32)
        self.n_iter_ = int(np.max(self.model_.n_iter_))
        self.fit_seconds_ = time.perf_counter() - started
        return self

    @classmethod
    def from_coefficients(cls, *, coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray,
                          mean: np.ndarray, scale: np.ndarray, **params: Any) -> SklearnProbe:
        """A fitted probe from its solution on raw features (an artifact: no pickle). It predicts
        like the probe it was saved from; without ``model_``, a warm-started refit starts afresh."""
        probe = cls(**params)
        probe.coef_, probe.intercept_ = np.asarray(coef, np.float32), np.asarray(intercept, np.float32)
        probe.classes_, probe.mean_, probe.scale_ = np.asarray(classes), np.asarray(mean), np.asarray(scale)
        probe.n_features_in_, probe.n_iter_, probe.fit_seconds_ = int(probe.coef_.shape[1]), 0, 0.0
        return probe
