"""``SigmoidProbe``: label sets (several classes per image), one logistic output per class,
solved jointly by the shared L-BFGS (:func:`~embedcache.heads.solver.minimize`).

The objective follows the linear heads' convention (mean loss, penalty on the standardised
weights, free intercepts)::

    minimise  mean_i sum_c BCE(z_i . w_c + b_c, y_ic) + penalty/2 ||W||^2,   z = (x - mean) / std

:func:`sweep_sigmoid` chooses the penalty on validation rows by mAP (strongest first, each fit
warm-started from the previous one), then the decision threshold on the same rows by micro-F1,
and refits the chosen penalty on train+val from its sweep solution.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from embedcache.errors import ConfigError
from embedcache.heads.linear import raw_coefficients, standardisation
from embedcache.heads.selection import Selection, best_index
from embedcache.heads.solver import minimize
from embedcache.heads.target_metrics import average_precision, choose_threshold
from embedcache.heads.torch_probe import check_penalty
from embedcache.heads.validation import validate_predict_input
from embedcache.runtime import torch_threads

#: Default penalty grid: 13 values, 1e-6 ... 1 (the softmax sweep's steps, one decade further:
#: on 2,700 Fashion-MNIST two-item composites x 1280 features the best was the softmax grid's
#: strongest, 0.1), strongest first.
DEFAULT_SIGMOID_PENALTIES = tuple(float(p) for p in np.logspace(-6, 0, 13))
#: L-BFGS iterations per penalty of a sweep (warm-started) and for its refit.
SWEEP_MAX_ITER = 100
#: Multiply-adds of one data pass (rows x features x classes) from which the two passes of an
#: evaluation use every configured thread; everything else runs on one. On 2 cores with another
#: process busy, a sweep on 2,700 x 1280 x 10 took 33 s with two threads throughout, 2.3 s on one.
WIDE_PASS_SIZE = 1 << 26


def check_label_sets(Y: Any, n: int) -> np.ndarray:
    """``Y`` as an ``(n, classes)`` 0/1 float32 matrix with at least one class."""
    Y = np.asarray(Y)
    if Y.ndim != 2 or len(Y) != n or Y.shape[1] < 1:
        raise ConfigError(f"Label sets must be an (n_samples, n_classes) 0/1 matrix with {n} rows. "
                          f"Got shape {Y.shape}.")
    if not np.isin(Y, (0, 1)).all():
        raise ConfigError("Label sets must hold only 0 and 1 (1 = the image carries the class).")
    return Y.astype(np.float32)


def _objective(Z: torch.Tensor, Y: torch.Tensor, penalty: float, threads: int | None = None
               ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``x -> (loss, gradient)`` of the objective on standardised rows ``Z`` (two passes, on
    ``threads`` intra-op threads; None: as set)."""
    n, dim = Z.shape
    split = Y.shape[1] * dim

    def loss_and_grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, bias = x[:split].view(-1, dim), x[split:]
        with torch_threads(threads):
            logits = torch.addmm(bias, Z, weights.T)
        data_loss = (torch.nn.functional.softplus(logits) - Y * logits).sum(dtype=torch.float64) / n
        loss = data_loss + 0.5 * penalty * float(torch.dot(x[:split], x[:split]))
        residual = (torch.sigmoid(logits) - Y).div_(n)
        with torch_threads(threads):
            grad_weights = (residual.T @ Z).add_(weights, alpha=penalty)
        return loss, torch.cat([grad_weights.reshape(-1), residual.sum(dim=0)])

    return loss_and_grad


class SigmoidPath:
    """The standardised rows (train first) and targets of one problem, prepared once for a sweep."""

    def __init__(self, X: np.ndarray, Y: np.ndarray, *, standardize: bool = True, stats_rows: int | None = None) -> None:
        stats_rows = len(X) if stats_rows is None else stats_rows
        self.mean, self.scale = standardisation(X[:stats_rows], standardize)
        self.data = torch.from_numpy(((X - self.mean) / self.scale).astype(np.float32))
        self.target = torch.from_numpy(np.ascontiguousarray(Y, np.float32))
        self.n_classes, self.dim = self.target.shape[1], X.shape[1]

    def fit(self, penalty: float, *, rows: int | None = None, start: torch.Tensor | None = None,
            max_iter: int = 200, tol: float = 1e-4) -> torch.Tensor:
        """The flat solution [weights, biases] on the leading ``rows`` rows, from ``start``."""
        rows = len(self.data) if rows is None else rows
        x0 = torch.zeros(self.n_classes * (self.dim + 1)) if start is None else start
        wide = torch.get_num_threads() if rows * self.dim * self.n_classes >= WIDE_PASS_SIZE else 1
        with torch_threads(1):  # the line search and two-loop recursion are small: one thread
            fun = _objective(self.data[:rows], self.target[:rows], penalty, threads=wide)
            solution, _ = minimize(fun, x0, max_iter=max_iter, tol=tol)
        return solution

    def raw(self, solution: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``(coef (C, d), intercept (C,))`` on raw features."""
        split = self.n_classes * self.dim
        return raw_coefficients(solution[:split].view(self.n_classes, self.dim).numpy(), solution[split:].numpy(),
                                self.mean, self.scale)


def sigmoid(scores: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(scores, -60, 60)))


class SigmoidProbe(ClassifierMixin, BaseEstimator):
    """One logistic output per class for label sets (see the module docstring).

    Args:
        penalty: L2 strength on the standardised weights.
        standardize: centre and scale features with the training mean/std.
        max_iter: L-BFGS iterations at most; tol: stop when the largest gradient entry is below.
        threshold: ``predict`` marks the classes whose probability reaches it.

    Attributes:
        classes_ (column positions 0..C-1), coef_ (C, n_features), intercept_ (C,), mean_,
        scale_, threshold_, n_features_in_, fit_seconds_.
    """

    def __init__(self, penalty: float = 1e-4, *, standardize: bool = True, max_iter: int = 200, tol: float = 1e-4,
                 threshold: float = 0.5) -> None:
        self.penalty = penalty
        self.standardize = standardize
        self.max_iter = max_iter
        self.tol = tol
        self.threshold = threshold

    def fit(self, X: Any, Y: Any) -> SigmoidProbe:
        """Fit on ``X`` (n_samples, n_features) and the 0/1 label-set matrix ``Y`` (n_samples, C)."""
        started = time.perf_counter()
        penalty = check_penalty("SigmoidProbe", self.penalty)
        X, Y = validate_data(self, X, Y, dtype=np.float32, order="C", multi_output=True)
        Y = check_label_sets(Y, len(X))
        path = SigmoidPath(X, Y, standardize=self.standardize)
        self.coef_, self.intercept_ = path.raw(path.fit(penalty, max_iter=self.max_iter, tol=self.tol))
        self.classes_, self.mean_, self.scale_ = np.arange(Y.shape[1]), path.mean, path.scale
        self.threshold_ = float(self.threshold)
        self.fit_seconds_ = time.perf_counter() - started
        return self

    @classmethod
    def from_coefficients(cls, *, coef: np.ndarray, intercept: np.ndarray, mean: np.ndarray, scale: np.ndarray,
                          threshold: float, fit_seconds: float = 0.0, **params: Any) -> SigmoidProbe:
        """A fitted probe from a solution on raw features (a sweep's refit, or an artifact)."""
        probe = cls(threshold=threshold, **params)
        probe.coef_, probe.intercept_ = np.asarray(coef, np.float32), np.asarray(intercept, np.float32)
        probe.classes_, probe.mean_, probe.scale_ = np.arange(len(probe.coef_)), np.asarray(mean), np.asarray(scale)
        probe.threshold_, probe.n_features_in_ = float(threshold), int(probe.coef_.shape[1])
        probe.fit_seconds_ = float(fit_seconds)
        return probe

    def decision_function(self, X: Any) -> np.ndarray:
        """Logits ``(n, C)``."""
        check_is_fitted(self, "coef_")
        X = validate_predict_input(self, X)
        rows = torch.from_numpy(np.ascontiguousarray(X, np.float64))
        return torch.addmm(torch.from_numpy(self.intercept_.astype(np.float64)), rows,
                           torch.from_numpy(self.coef_.astype(np.float64)).T).numpy()

    def predict_proba(self, X: Any) -> np.ndarray:
        """Probability of each class ``(n, C)`` (independent outputs: rows need not sum to 1)."""
        return sigmoid(self.decision_function(X))

    def predict(self, X: Any) -> np.ndarray:
        """The 0/1 label-set matrix ``proba >= threshold_``."""
        return (self.predict_proba(X) >= self.threshold_).astype(np.int64)


def mean_average_precision(Y: np.ndarray, proba: np.ndarray) -> float:
    """Mean over classes with a positive row of their average precision."""
    aps = [average_precision(Y[:, c], proba[:, c]) for c in range(Y.shape[1]) if Y[:, c].any()]
    return float(np.mean(aps)) if aps else float("nan")


def sweep_sigmoid(X: np.ndarray, Y: np.ndarray, n_train: int, *,
                  penalties: Sequence[float] = DEFAULT_SIGMOID_PENALTIES, standardize: bool = True,
                  max_iter: int | None = None) -> tuple[Selection, SigmoidProbe]:
    """Penalty by val mAP (ties: the stronger), threshold by val micro-F1, refit on all rows.

    Args:
        X: validated float32 features, train rows then val rows; Y: their 0/1 label sets.
        n_train: how many leading rows are train rows.
        penalties: the grid (a single value: no choice, only the threshold is chosen).
        standardize: standardise with the train rows' statistics (kept for the refit).
        max_iter: L-BFGS iterations per fit (default :data:`SWEEP_MAX_ITER`).
    """
    started = time.perf_counter()
    ordered = sorted({check_penalty("the sigmoid grid", float(p)) for p in penalties}, reverse=True)
    if not ordered:
        raise ConfigError("The 'penalties' grid is empty; give at least one value.")
    Y = check_label_sets(Y, len(X))
    budget = max_iter or SWEEP_MAX_ITER
    path = SigmoidPath(X, Y, standardize=standardize, stats_rows=n_train)
    X_val, Y_val = X[n_train:], Y[n_train:]
    solutions, scores, solution = [], [], None
    for penalty in ordered:
        solution = path.fit(penalty, rows=n_train, start=solution, max_iter=budget)
        coef, intercept = path.raw(solution)
        proba = SigmoidProbe.from_coefficients(coef=coef, intercept=intercept, mean=path.mean, scale=path.scale,
                                               threshold=0.5).predict_proba(X_val)
        solutions.append((solution, proba))
        scores.append(mean_average_precision(Y_val, proba))
    best = best_index(scores, ties="first")
    threshold, val_f1 = choose_threshold(Y_val, solutions[best][1])
    refit_started = time.perf_counter()
    coef, intercept = path.raw(path.fit(ordered[best], start=solutions[best][0], max_iter=budget))
    estimator = SigmoidProbe.from_coefficients(
        coef=coef, intercept=intercept, mean=path.mean, scale=path.scale, threshold=threshold,
        fit_seconds=time.perf_counter() - refit_started, penalty=ordered[best], standardize=standardize,
        max_iter=budget)
    selection = Selection("penalty", "mAP", ordered, scores, time.perf_counter() - started, ordered[best],
                          scores[best], {"threshold": threshold, "val_micro_f1": val_f1})
    return selection, estimator
