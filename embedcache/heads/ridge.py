"""Ridge regression on standardised features: a whole path of penalties from one
eigendecomposition; one-hot targets make it a classifier.

The objective follows the linear heads' convention (mean loss, penalty on the standardised
weights, free intercept)::

    minimise  1/(2n) ||Y - Z W^T - 1 b^T||^2 + penalty/2 ||W||^2,   Z = (X - mean) / std

Its solution is ``W^T = (R + penalty I)^-1 B``, ``R`` the standardised covariance of the rows
(their correlation matrix) and ``B`` their standardised cross-covariance with the targets. With
``R = V diag(lam) V^T`` computed once, each penalty costs one (d x d x targets) product,
``W^T = V diag(1 / (lam + penalty)) V^T B``, and its validation predictions one
(rows x d x targets) product of the rotated validation rows ``Z V``. In scikit-learn terms this is
``Ridge(alpha=penalty * n)`` on standardised features.

:class:`RidgeStatistics` holds what a solution needs (row count, column sums, ``X^T X``,
``X^T Y``, target sums), accumulated a block of rows at a time in float64 around a shift (the
first block's means, so that squares do not cancel). Nothing larger than one block of rows is
ever materialised, so data larger than memory streams through; and the statistics of two row
sets add up: train + val are the refit's statistics, without another pass over the data.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from embedcache.errors import ConfigError
from embedcache.heads.selection import Selection, best_index
from embedcache.heads.target_metrics import r2_scores
from embedcache.heads.torch_probe import check_penalty
from embedcache.heads.validation import validate_fit_input, validate_predict_input
from embedcache.runtime import torch_threads

#: Rows per block when accumulating statistics (8192 x 2048 float32: 64 MiB).
STATS_BLOCK_ROWS = 8192
#: Outputs (rows x targets x penalties) computed at once when scoring a path on validation rows.
PREDICTION_BLOCK_VALUES = 1 << 25
#: The ridge sweep's default grid: 50 penalties, 1e-5 ... 1e3, log-spaced (strongest first when
#: sweeping). The penalty is added to the eigenvalues of the standardised covariance (mean 1):
#: large values matter for few rows per feature, and on full Fashion-MNIST features (54k x 1280)
#: the val curve is flat below 1e-3.
DEFAULT_RIDGE_PENALTIES = tuple(float(p) for p in np.logspace(-5, 3, 50))


def _rows_tensor(X: np.ndarray) -> torch.Tensor:
    if X.dtype == np.float16:  # torch converts half ~8x faster than numpy
        return torch.from_numpy(np.ascontiguousarray(X)).float()
    return torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))


def gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows^T rows`` from three of its four column-half blocks (the fourth is a transpose):
    3/4 of the multiply-adds of one product."""
    half = rows.shape[1] // 2
    if half < 64:
        return rows.T @ rows
    left, right = rows[:, :half], rows[:, half:]
    out = torch.empty((rows.shape[1], rows.shape[1]), dtype=rows.dtype)
    out[:half, :half] = left.T @ left
    out[:half, half:] = left.T @ right
    out[half:, :half] = out[:half, half:].T
    out[half:, half:] = right.T @ right
    return out


@dataclass
class Standardised:
    """The standardised problem: feature ``mean``/``scale``, correlation-like matrix ``R``
    (d x d), cross-covariance ``B`` (d x T) and target means, all float64."""

    mean: torch.Tensor
    scale: torch.Tensor
    R: torch.Tensor
    B: torch.Tensor
    y_mean: torch.Tensor


class RidgeStatistics:
    """Sufficient statistics of a ridge problem, accumulated in row blocks (module docstring).

    Args:
        dim: feature dimension; n_targets: target columns (classes, for labels).
        shift: feature shift (default: the first block's means); statistics to be added
            together must share it.
        target_shift: target shift (default: the first block's target means; 0 for labels).
    """

    def __init__(self, dim: int, n_targets: int, *, shift: torch.Tensor | None = None,
                 target_shift: torch.Tensor | None = None) -> None:
        self.dim, self.n_targets, self.n = dim, n_targets, 0
        self.shift, self.target_shift = shift, target_shift
        self.sum_x = torch.zeros(dim, dtype=torch.float64)
        self.gram = torch.zeros(dim, dim, dtype=torch.float64)
        self.cross = torch.zeros(dim, n_targets, dtype=torch.float64)
        self.sum_y = torch.zeros(n_targets, dtype=torch.float64)

    def sibling(self) -> RidgeStatistics:
        """Empty statistics with the same shifts (to be added to these later)."""
        return RidgeStatistics(self.dim, self.n_targets, shift=self.shift, target_shift=self.target_shift)

    def update(self, X: np.ndarray, *, targets: np.ndarray | None = None,
               labels: np.ndarray | None = None) -> RidgeStatistics:
        """Add one block of rows with float ``targets`` (rows x T) or class positions ``labels``
        (one-hot targets, accumulated as per-class sums: no one-hot matrix is built)."""
        x = _rows_tensor(X)
        if self.shift is None:
            self.shift = x.mean(dim=0)
        shifted = x - self.shift
        self.n += len(x)
        self.sum_x += shifted.sum(dim=0, dtype=torch.float64)
        self.gram += gram(shifted).double()
        if labels is not None:
            index = torch.from_numpy(np.asarray(labels, dtype=np.int64).reshape(-1))
            if self.target_shift is None:
                self.target_shift = torch.zeros(self.n_targets)
            per_class = torch.zeros(self.n_targets, self.dim).index_add_(0, index, shifted)
            self.cross += per_class.T.double()
            self.sum_y += torch.bincount(index, minlength=self.n_targets).double()
            return self
        y = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32)).reshape(len(x), self.n_targets)
        if self.target_shift is None:
            self.target_shift = y.mean(dim=0)
        y = y - self.target_shift
        self.cross += (shifted.T @ y).double()
        self.sum_y += y.sum(dim=0, dtype=torch.float64)
        return self

    @classmethod
    def from_rows(cls, X: np.ndarray, *, n_targets: int, targets: np.ndarray | None = None,
                  labels: np.ndarray | None = None, block_rows: int = STATS_BLOCK_ROWS) -> RidgeStatistics:
        """Statistics of all rows of ``X``, a block at a time."""
        return cls(X.shape[1], n_targets).accumulate(X, targets=targets, labels=labels, block_rows=block_rows)

    def accumulate(self, X: np.ndarray, *, targets: np.ndarray | None = None, labels: np.ndarray | None = None,
                   block_rows: int = STATS_BLOCK_ROWS) -> RidgeStatistics:
        """:meth:`update` with every block of ``block_rows`` rows of ``X``."""
        for begin in range(0, len(X), block_rows):
            stop = begin + block_rows
            self.update(X[begin:stop], targets=None if targets is None else targets[begin:stop],
                        labels=None if labels is None else labels[begin:stop])
        return self

    def __add__(self, other: RidgeStatistics) -> RidgeStatistics:
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        if not (torch.equal(self.shift, other.shift) and torch.equal(self.target_shift, other.target_shift)):
            raise ConfigError("Ridge statistics can only be added when they share their shifts; build one "
                              "with the other's sibling().")
        total = self.sibling()
        total.n = self.n + other.n
        for name in ("sum_x", "gram", "cross", "sum_y"):
            setattr(total, name, getattr(self, name) + getattr(other, name))
        return total

    def standardised(self, standardize: bool = True) -> Standardised:
        """Means, scales (population std, 1 for constant columns or without ``standardize``),
        ``R`` and ``B`` of the rows seen so far."""
        if self.n == 0:
            raise ConfigError("Ridge statistics hold no rows; the split they come from is empty.")
        centre = self.sum_x / self.n
        covariance = self.gram / self.n - torch.outer(centre, centre)
        std = covariance.diagonal().clamp_min(0).sqrt()
        std = torch.where(std > 1e-12, std, torch.ones_like(std)) if standardize else torch.ones_like(std)
        y_centre = self.sum_y / self.n
        cross = self.cross / self.n - torch.outer(centre, y_centre)
        return Standardised(mean=self.shift.double() + centre, scale=std, R=covariance / torch.outer(std, std),
                            B=cross / std[:, None], y_mean=self.target_shift.double() + y_centre)


def _raw(weights: torch.Tensor, st: Standardised) -> tuple[np.ndarray, np.ndarray]:
    """Standardised solution (d x T) -> (coef (T x d), intercept (T,)) on raw features."""
    coef = (weights / st.scale[:, None]).T
    intercept = st.y_mean - coef @ st.mean
    return coef.float().numpy(), intercept.float().numpy()


def solve(stats: RidgeStatistics, penalty: float, *, standardize: bool = True
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One penalty's solution by Cholesky (cheaper than the eigendecomposition of a path):
    ``(coef (T, d), intercept (T,), mean, scale)`` on raw features."""
    st = stats.standardised(standardize)
    system = st.R.clone()
    system.diagonal().add_(penalty)
    with torch_threads(1):  # see RidgePath: LAPACK on one thread
        factor, info = torch.linalg.cholesky_ex(system)
        if int(info) == 0:
            weights = torch.cholesky_solve(st.B, factor)
        else:  # singular (penalty 0 on collinear features): the minimum-norm solution
            weights = torch.linalg.pinv(system, hermitian=True) @ st.B
    coef, intercept = _raw(weights, st)
    return coef, intercept, st.mean.float().numpy(), st.scale.float().numpy()


class RidgePath:
    """Every penalty's solution from one eigendecomposition of the standardised covariance.

    The eigendecomposition (float64) runs on one thread: with two threads it took 0.17 s on an
    idle 2-core machine but 14 s while another process held a core (OpenMP threads waiting on
    each other), against 0.37 s on one thread.
    """

    def __init__(self, stats: RidgeStatistics, *, standardize: bool = True) -> None:
        self.standardised = st = stats.standardised(standardize)
        with torch_threads(1):
            values, self.vectors = torch.linalg.eigh(st.R)
        self.values = values.clamp_min(0)
        self.projected = self.vectors.T @ st.B  # (d, T)

    def _shrink(self, penalty: float) -> torch.Tensor:
        """``1 / (lam + penalty)``, 0 where that is not finite (the minimum-norm solution)."""
        denominator = self.values + penalty
        floor = 1e-12 * max(float(self.values.max()), 1.0)
        return torch.where(denominator > floor, 1.0 / denominator, torch.zeros_like(denominator))

    def coefficients(self, penalty: float) -> tuple[np.ndarray, np.ndarray]:
        """``(coef (T, d), intercept (T,))`` on raw features for ``penalty``."""
        return _raw(self.vectors @ (self._shrink(penalty)[:, None] * self.projected), self.standardised)

    def predictions(self, X: np.ndarray, penalties: Sequence[float]) -> Iterator[np.ndarray]:
        """Predictions ``(rows, T)`` float32 of ``X``, one array per penalty, in order: ``X`` is
        rotated into the eigenbasis once, then the penalties are scored a group at a time by one
        (rows x d x group*T) product (at most :data:`PREDICTION_BLOCK_VALUES` outputs at once)."""
        st = self.standardised
        rows = (_rows_tensor(X) - st.mean.float()) / st.scale.float()
        rotated = rows @ self.vectors.float()
        y_mean = st.y_mean.float()
        n_targets = self.projected.shape[1]
        group = max(1, PREDICTION_BLOCK_VALUES // max(1, len(rows) * n_targets))
        for begin in range(0, len(penalties), group):
            chosen = penalties[begin:begin + group]
            shrunk = torch.stack([self._shrink(p)[:, None] * self.projected for p in chosen], dim=1)  # (d, g, T)
            out = rotated @ shrunk.reshape(len(self.vectors), -1).float()
            for i in range(len(chosen)):
                yield out[:, i * n_targets:(i + 1) * n_targets].add(y_mean).numpy()


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
