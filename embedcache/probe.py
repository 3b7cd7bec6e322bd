"""Linear probes on cached features: a torch L-BFGS head, a scikit-learn head, honest sweeps.

Both heads solve the same problem, multinomial logistic regression with an L2 penalty::

    minimise  mean cross-entropy(X_std W^T + b, y) + penalty / 2 * ||W||^2

on standardised features (``standardize=True``; the intercept is not penalised). In
scikit-learn's terms ``C = 1 / (penalty * n_samples)``. Both honour the estimator contract, so
they drop into ``sklearn.pipeline`` and ``cross_val_score``.

:func:`probe` runs the protocol: sweep the penalty on a log grid, choose on the validation split
only (the cache's ``val`` split, else a stratified seeded hold-out from ``train``), refit on
train+val with the chosen value, score once on ``test``.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from embedcache.errors import ConfigError
from embedcache.solver import (
    DataCovariance,
    LBFGSMemory,
    SoftmaxState,
    fit_softmax,
    softmax_state,
    times_data,
)

#: Default penalty grid: 11 values, 1e-6 ... 1e-1 (log-spaced), strongest first when sweeping.
DEFAULT_PENALTIES = tuple(float(p) for p in np.logspace(-6, -1, 11))
HEADS = ("torch", "sklearn")
#: Largest feature dimension for which the torch head preconditions L-BFGS with the data's
#: covariance eigenbasis (an eigendecomposition of a dim x dim matrix: ~0.2 s at 1280, ~d^3).
PRECONDITION_MAX_DIM = 2048
#: Largest bf16 data matrix (bytes) for which the torch head on a CPU also keeps a transposed
#: copy: the bf16 gradient pass ``G^T Z`` reads a (features x rows) matrix about 30% faster than
#: the row-major one (2-core AVX-512 CPU, 54k x 1280), for twice the memory. In float32 the
#: row-major product is the faster one, so no copy is made.
COLUMNS_MAX_BYTES = 1 << 30
#: Fraction of train held out for validation when the cache has no val split.
DEFAULT_VAL_FRACTION = 0.1


def _check_features(X: Any, *, name: str = "X", n_features: int | None = None) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2:
        raise ConfigError(f"{name} must be a 2-D array (n_samples, n_features). Got shape {X.shape}.")
    if X.shape[0] == 0:
        raise ConfigError(f"{name} has no rows; the split it comes from is empty.")
    if n_features is not None and X.shape[1] != n_features:
        raise ConfigError(
            f"{name} has {X.shape[1]} features but the probe was fitted on {n_features}. Features "
            f"must come from the same backbone (and layer/pool) as the probe's training features."
        )
    if not np.issubdtype(X.dtype, np.number):
        raise ConfigError(f"{name} must be numeric. Got dtype {X.dtype}.")
    if any(stride < 0 for stride in X.strides):  # reversed views: torch cannot wrap them
        X = np.ascontiguousarray(X)
    if X.dtype == np.float16:  # caches store fp16; numpy's half conversion is ~8x slower than torch's
        X = torch.from_numpy(np.ascontiguousarray(X)).float().numpy()
    else:
        X = X.astype(np.float32, copy=False)
    if not all(np.isfinite(X[i:i + 4096]).all() for i in range(0, len(X), 4096)):  # blocks: no big temporary
        bad = int((~np.isfinite(X)).any(axis=1).sum())
        raise ConfigError(f"{name} contains NaN or infinite values in {bad} rows; clean or drop them.")
    return X


def _check_labels(y: Any, n: int) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if len(y) != n:
        raise ConfigError(f"y has {len(y)} labels for {n} rows of X.")
    classes = np.unique(y)
    if len(classes) < 2:
        raise ConfigError(
            f"A probe needs at least 2 classes in its training data; got only class {classes.tolist()}."
        )
    return y


def linear_scores(X: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """``X @ coef.T + intercept`` in float32, computed by torch rather than numpy: numpy's BLAS
    (OpenBLAS) keeps its own threads spinning after a product, and on a small CPU they then steal
    cores from the torch solver's next passes (a probe sweep ran 25% slower on 2 cores)."""
    with warnings.catch_warnings():  # read-only inputs (memory-mapped) are fine: nothing writes to them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        data = torch.from_numpy(np.asarray(X, np.float32))
    scores = data @ torch.from_numpy(np.asarray(coef, np.float32)).T
    return scores.add_(torch.from_numpy(np.asarray(intercept, np.float32))).numpy()


def predict_linear(X: np.ndarray, coef: np.ndarray, intercept: np.ndarray, classes: Any) -> np.ndarray:
    """Class labels from a linear map, for features that were already validated."""
    return np.asarray(classes)[np.argmax(linear_scores(X, coef, intercept), axis=1)]


class _LinearMixin:
    """Shared prediction code: both heads expose ``coef_`` / ``intercept_`` on raw features."""

    def decision_function(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "coef_")
        X = _check_features(X, n_features=self.coef_.shape[1])
        return linear_scores(X, self.coef_, self.intercept_)

    def predict_proba(self, X: Any) -> np.ndarray:
        logits = self.decision_function(X)
        logits = logits - logits.max(axis=1, keepdims=True)
        expo = np.exp(logits)
        return expo / expo.sum(axis=1, keepdims=True)

    def predict(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "coef_")
        X = _check_features(X, n_features=self.coef_.shape[1])
        return predict_linear(X, self.coef_, self.intercept_, self.classes_)


def _standardisation(X: np.ndarray, standardize: bool, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and std (population), in one blocked pass: sums of the values and their squares
    around the first block's mean (so the squares do not cancel), accumulated in float64."""
    if not standardize:
        return np.zeros(X.shape[1], np.float32), np.ones(X.shape[1], np.float32)
    data = torch.from_numpy(X)
    centre = data[:block].mean(dim=0)
    total = torch.zeros(X.shape[1], dtype=torch.float64)
    squares = torch.zeros(X.shape[1], dtype=torch.float64)
    for begin in range(0, len(X), block):
        shifted = data[begin:begin + block] - centre
        total += shifted.sum(dim=0)
        squares += shifted.mul_(shifted).sum(dim=0)
    shift = total / len(X)
    std = (squares / len(X) - shift * shift).clamp_min(0).sqrt()
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return (centre + shift).float().numpy(), std.float().numpy()


class TorchLinearProbe(_LinearMixin, ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression by full-batch L-BFGS in torch (:mod:`embedcache.solver`).

    Each L-BFGS iteration reads the (standardised) data matrix exactly twice, two skinny matrix
    products which on a CPU are bound by memory bandwidth; the line search works on the stored
    logits and costs no pass. ``data_dtype="bfloat16"`` keeps that matrix in bf16 (accumulation,
    weights, logits and gradients stay float32): about 3x faster per pass on CPUs with native
    bf16, at the cost of solving the problem on bf16-rounded features. Sweeps use it.

    Args:
        penalty: L2 strength on the standardised weights (see the module docstring).
        standardize: centre and scale features with the training mean/std (folded into
            ``coef_``/``intercept_`` after fitting, so prediction takes raw features).
        max_iter: L-BFGS iterations at most.
        tol: stop when the largest gradient entry falls below this.
        device: ``cpu`` (default) or ``cuda``.
        warm_start: start from the previous solution when refitting, keeping the first fit's
            standardisation (used by sweeps; refitting the same X, or a longer array whose
            leading rows were prepared already, reuses the prepared data, logits, gradient and
            L-BFGS curvature memory, the latter corrected exactly for a change of penalty).
        data_dtype: ``float32`` (default) or ``bfloat16`` for the data matrix.

    Attributes:
        classes_, coef_ (n_classes, n_features), intercept_ (n_classes,), mean_, scale_,
        n_iter_ (L-BFGS iterations), fit_seconds_, n_features_in_.
    """

    def __init__(self, penalty: float = 1e-4, *, standardize: bool = True, max_iter: int = 200,
                 tol: float = 1e-4, device: str = "cpu", warm_start: bool = False,
                 data_dtype: str = "float32") -> None:
        self.penalty = penalty
        self.standardize = standardize
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.warm_start = warm_start
        self.data_dtype = data_dtype

    def fit(self, X: Any, y: Any) -> TorchLinearProbe:
        if not (isinstance(self.penalty, (int, float)) and self.penalty >= 0):
            raise ConfigError(
                f"The 'penalty' parameter of TorchLinearProbe must be a float >= 0. Got {self.penalty!r}."
            )
        if self.data_dtype not in ("float32", "bfloat16"):
            raise ConfigError(
                f"The 'data_dtype' parameter must be 'float32' or 'bfloat16'. Got {self.data_dtype!r}."
            )
        started = time.perf_counter()
        source = getattr(self, "_row_source", None)
        if X is not getattr(self, "_validated_X", None) and not (source is not None and _leading_rows_of(X, source)):
            X = _check_features(X)  # sweeps refit the same array (or rows of a shared one): check once
            self._validated_X = X
        y = _check_labels(y, len(X))
        classes, y_idx = np.unique(y, return_inverse=True)
        warm = (self.warm_start and hasattr(self, "_weights")
                and self._weights.shape == (len(classes), X.shape[1])
                and np.array_equal(getattr(self, "classes_", None), classes))
        if not warm:
            self.mean_, self.scale_ = _standardisation(X, self.standardize)
        data, columns = self._prepared_data(X)
        target = torch.from_numpy(y_idx.astype(np.int64)).to(data.device)
        state = self._start_state(data, columns, target, warm, len(classes))
        self._target = target
        if getattr(self, "_covariance_key", None) != self._data_key:  # rows of the first fit only
            self._covariance = DataCovariance(data) if data.shape[1] <= PRECONDITION_MAX_DIM else None
            self._covariance_key = self._data_key
        # a warm refit on the same rows (or more of them) continues the solver's curvature memory
        memory = getattr(self, "_memory", None) if warm else None
        memory = memory if memory is not None else LBFGSMemory()
        self._memory = memory
        state, self.n_iter_ = fit_softmax(data, target, state, penalty=float(self.penalty),
                                          max_iter=self.max_iter, tol=self.tol, covariance=self._covariance,
                                          memory=memory, columns=columns)
        self._state = state
        self._weights = state.weights.cpu().numpy()
        self._bias = state.bias.cpu().numpy()
        self.classes_ = classes
        self.coef_ = (self._weights / self.scale_).astype(np.float32)
        self.intercept_ = (self._bias - (self.coef_ * self.mean_).sum(axis=1)).astype(np.float32)  # no BLAS call
        self.n_features_in_ = X.shape[1]
        self.fit_seconds_ = time.perf_counter() - started
        return self

    def _share_rows(self, source: np.ndarray) -> None:
        """Prepare the data for all rows of ``source`` (already checked by :func:`_check_features`)
        when a fit gets its leading rows as a view: a later fit on ``source`` itself (say train+val
        after a sweep on train) then reuses the prepared matrix and extends the warm state by the
        new rows. Fits on ``source`` or its leading rows skip the input check."""
        self._row_source = source

    def _prepared_data(self, X: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The standardised ``data_dtype`` matrix for X's rows, built once per source array, and
        its transposed copy (None when not kept, see :data:`COLUMNS_MAX_BYTES`)."""
        source = getattr(self, "_row_source", None)
        if source is None or not _leading_rows_of(X, source):
            source = X
        key = (id(source), source.shape, hash(source[:: max(1, len(source) // 97)].tobytes()),
               self.data_dtype, self.device, self.mean_.tobytes(), self.scale_.tobytes())
        if getattr(self, "_data_key", None) != key:
            self._data = self._columns = None  # free the old matrices before building the new ones
            device, dtype = torch.device(self.device), getattr(torch, self.data_dtype)
            transposed = (device.type == "cpu" and dtype == torch.bfloat16
                          and source.size * dtype.itemsize <= COLUMNS_MAX_BYTES)
            self._data, self._columns = _standardised_matrix(source, self.mean_, self.scale_, dtype, device,
                                                             transposed=transposed)
            self._data_source, self._data_key = source, key
            for stale in ("_state", "_target", "_memory"):  # logits of another matrix
                self.__dict__.pop(stale, None)
        return self._data[: len(X)], None if self._columns is None else self._columns[:, : len(X)]

    def _start_state(self, data: torch.Tensor, columns: torch.Tensor | None, target: torch.Tensor, warm: bool,
                     n_classes: int) -> SoftmaxState:
        """Zeros, or the previous solution with as much of its logits/gradient as still applies."""
        if not warm:
            zeros = torch.zeros(n_classes, data.shape[1], device=data.device)
            return softmax_state(data, target, zeros, torch.zeros(n_classes, device=data.device), columns=columns)
        previous, previous_target = getattr(self, "_state", None), getattr(self, "_target", None)
        if (previous is not None and previous_target is not None and len(previous_target) <= len(data)
                and torch.equal(target[: len(previous_target)], previous_target)):
            if len(previous_target) == len(data):  # same rows: only the penalty changed, no data pass
                return previous
            extra = times_data(data[len(previous_target):], previous.weights) + previous.bias
            return softmax_state(data, target, previous.weights, previous.bias,
                                 logits=torch.cat([previous.logits, extra]), columns=columns)
        self.__dict__.pop("_memory", None)  # another problem's curvature: start the memory afresh
        return softmax_state(data, target, torch.from_numpy(self._weights).to(data.device),
                             torch.from_numpy(self._bias).to(data.device), columns=columns)

    #: attributes holding training data and solver state (not model state): never pickled
    _TRAINING_CACHES = ("_data", "_columns", "_data_key", "_data_source", "_row_source", "_validated_X",
                        "_state", "_target", "_covariance", "_covariance_key", "_memory")

    def release_training_data(self) -> None:
        """Drop the prepared data matrices and solver state kept for warm refits (hundreds of MB
        on large caches). The fitted model is unaffected; a later warm fit starts from its weights
        but prepares the data again."""
        for cached in self._TRAINING_CACHES:
            self.__dict__.pop(cached, None)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for cached in self._TRAINING_CACHES:
            state.pop(cached, None)
        return state


def _leading_rows_of(X: np.ndarray, source: np.ndarray) -> bool:
    """Whether X is ``source`` or a view of its first ``len(X)`` rows (same memory)."""
    return X is source or (X.ndim == 2 and len(X) <= len(source) and _same_view(X, source[: len(X)]))


def _standardised_matrix(X: np.ndarray, mean: np.ndarray, scale: np.ndarray, dtype: torch.dtype,
                         device: torch.device, *, transposed: bool = False,
                         block: int = 256) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(X - mean) / scale`` as a ``dtype`` tensor on ``device``, and with ``transposed`` also a
    (features x rows) copy of it (else None). Built in row blocks small enough to stay in cache,
    with no full float32 temporary."""
    if device.type != "cpu":
        block = max(block, 16384)  # fewer, larger host-to-device copies
    out = torch.empty(X.shape, dtype=dtype, device=device)
    columns = torch.empty(X.shape[::-1], dtype=dtype, device=device) if transposed else None
    shift = torch.from_numpy(np.asarray(mean, np.float32)).to(device)
    inverse = torch.from_numpy((1.0 / np.asarray(scale, np.float64)).astype(np.float32)).to(device)
    for begin in range(0, len(X), block):
        chunk = (torch.from_numpy(X[begin:begin + block]).to(device) - shift).mul_(inverse)
        out[begin:begin + block] = chunk
        if columns is not None:
            columns[:, begin:begin + block] = chunk.T
    return out, columns


class SklearnProbe(_LinearMixin, ClassifierMixin, BaseEstimator):
    """scikit-learn ``LogisticRegression`` (lbfgs) behind the same interface and penalty.

    Args:
        penalty: L2 strength, as for :class:`TorchLinearProbe` (``C = 1/(penalty*n)``).
        standardize: centre and scale features with the training mean/std.
        max_iter: solver iterations at most.
        tol: solver tolerance.
        warm_start: reuse the previous solution as the starting point.
    """

    def __init__(self, penalty: float = 1e-4, *, standardize: bool = True, max_iter: int = 1000,
                 tol: float = 1e-4, warm_start: bool = False) -> None:
        self.penalty = penalty
        self.standardize = standardize
        self.max_iter = max_iter
        self.tol = tol
        self.warm_start = warm_start

    def fit(self, X: Any, y: Any) -> SklearnProbe:
        from sklearn.linear_model import LogisticRegression

        if not (isinstance(self.penalty, (int, float)) and self.penalty > 0):
            raise ConfigError(
                f"The 'penalty' parameter of SklearnProbe must be a float > 0. Got {self.penalty!r}."
            )
        started = time.perf_counter()
        X = _check_features(X)
        y = _check_labels(y, len(X))
        warm = self.warm_start and hasattr(self, "model_") and self.model_.coef_.shape[1] == X.shape[1]
        if not warm:
            self.mean_, self.scale_ = _standardisation(X, self.standardize)
            self.model_ = LogisticRegression(max_iter=self.max_iter, tol=self.tol, warm_start=True)
        self.model_.set_params(C=1.0 / (self.penalty * len(X)))
        self.model_.fit((X - self.mean_) / self.scale_, y)
        self.classes_ = self.model_.classes_
        coef = self.model_.coef_
        intercept = self.model_.intercept_
        if len(self.classes_) == 2:  # sklearn stores one row for binary problems
            coef = np.vstack([-coef / 2, coef / 2])
            intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
        self.coef_ = (coef / self.scale_).astype(np.float32)
        self.intercept_ = (intercept - self.coef_ @ self.mean_).astype(np.float32)
        self.n_iter_ = int(np.max(self.model_.n_iter_))
        self.n_features_in_ = X.shape[1]
        self.fit_seconds_ = time.perf_counter() - started
        return self


def _fast_data_dtype(device: str) -> str:
    """bf16 where matrix products in bf16 are native (AVX512-BF16/AMX CPUs, CUDA), else fp32."""
    if str(device).startswith("cuda"):
        return "bfloat16"
    from embedcache.extract import cpu_has_native_bf16

    return "bfloat16" if cpu_has_native_bf16() else "float32"


def make_head(head: str, **params: Any) -> TorchLinearProbe | SklearnProbe:
    """``torch`` → :class:`TorchLinearProbe`, ``sklearn`` → :class:`SklearnProbe`."""
    if head == "torch":
        return TorchLinearProbe(**params)
    if head == "sklearn":
        params.pop("device", None)
        params.pop("data_dtype", None)
        return SklearnProbe(**params)
    raise ConfigError(f"The 'head' parameter must be one of {list(HEADS)}. Got {head!r} instead.")


@dataclass
class SweepResult:
    """Validation accuracy along the penalty path and the chosen value."""

    penalties: list[float]
    val_accuracy: list[float]
    iterations: list[int]
    seconds: list[float]
    best_penalty: float
    best_val_accuracy: float
    estimator: Any = field(repr=False, default=None)


#: Iteration budgets of a torch sweep, for data of :data:`BUDGET_REFERENCE_SIZE` elements or more
#: (L-BFGS warm-started along the path, preconditioned, each iteration two passes over the data).
#: The solver's curvature memory carries from one penalty to the next (corrected exactly for the
#: penalty change), so a few iterations per penalty track the converged fits: on full
#: Fashion-MNIST features (54k x 1280) 4 iterations give a val curve within 0.2 points of the
#: sweep run to convergence and test top-1 within 0.15 point.
#: SWEEP_MAX_ITER: per penalty; SWEEP_FIRST_MAX_ITER: the strongest penalty, which starts from
#: zero; REFIT_MAX_ITER: the refit of the chosen penalty on train+val (6 to 20 gave the same test
#: accuracy), warm-started from its sweep fit.
SWEEP_MAX_ITER = 4
SWEEP_FIRST_MAX_ITER = 8
REFIT_MAX_ITER = 6
#: rows x features at which the budgets above apply; smaller data gets proportionally more
#: iterations (the same work, so cheap problems are solved to tolerance), at most
#: :data:`SMALL_DATA_MAX_ITER`.
BUDGET_REFERENCE_SIZE = 54_000 * 1280
SMALL_DATA_MAX_ITER = 100


def iteration_budget(base: int, shape: tuple[int, ...]) -> int:
    """``base`` iterations on data of :data:`BUDGET_REFERENCE_SIZE` elements or more; more on
    smaller data, for about the same work, up to :data:`SMALL_DATA_MAX_ITER`."""
    size = max(1, int(np.prod(shape)))
    return int(min(max(base, SMALL_DATA_MAX_ITER), max(base, base * BUDGET_REFERENCE_SIZE // size)))


def sweep_penalty(X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, *,
                  head: str = "torch", penalties: tuple[float, ...] | list[float] = DEFAULT_PENALTIES,
                  **params: Any) -> SweepResult:
    """Fit along the penalty path (strongest first, warm-started) and score each on val.

    The torch head solves each penalty with a budget of :data:`SWEEP_MAX_ITER` iterations
    (:data:`SWEEP_FIRST_MAX_ITER` for the first; more on small data, see :func:`iteration_budget`)
    unless ``max_iter`` is given, and bf16 data where the CPU has native bf16 (or on CUDA). The
    best validation accuracy wins; ties go to the stronger penalty (the simpler model). The
    returned estimator holds the fit at the chosen penalty. When ``X_train`` and ``X_val`` are
    consecutive row slices of one array (as :func:`probe_arrays` passes them), the torch head
    prepares the data for both at once, so the refit on that whole array reuses it.
    """
    if len(penalties) == 0:
        raise ConfigError("The 'penalties' grid is empty; give at least one value.")
    ordered = sorted({float(p) for p in penalties}, reverse=True)
    budgets: list[dict[str, int]] = [{} for _ in ordered]  # per-fit max_iter, unless the caller set one
    if head == "torch":
        if "max_iter" not in params:  # the first fit starts from zero and gets a larger budget
            budgets = [{"max_iter": iteration_budget(SWEEP_FIRST_MAX_ITER if i == 0 else SWEEP_MAX_ITER,
                                                     np.shape(X_train))} for i in range(len(ordered))]
        params.setdefault("data_dtype", _fast_data_dtype(params.get("device", "cpu")))
    estimator = make_head(head, penalty=ordered[0], warm_start=True, **params)
    whole = _stacked_base(X_train, X_val)
    if whole is not None:  # check train and val rows at once; the torch fits reuse the prepared rows
        _check_features(whole, name="X_train/X_val")
        if head == "torch":
            estimator._share_rows(whole)
    else:  # checked (and converted to float32) once, not per fit: the fits then reuse the prepared data
        X_train = _check_features(X_train, name="X_train")
        X_val = _check_features(X_val, name="X_val")
    y_val = np.asarray(y_val)
    accuracies, iterations, seconds = [], [], []
    best_fit: dict[str, Any] = {}
    for penalty, budget in zip(ordered, budgets, strict=True):
        estimator.set_params(penalty=penalty, **budget)
        estimator.fit(X_train, y_train)
        predicted = predict_linear(X_val, estimator.coef_, estimator.intercept_, estimator.classes_)
        accuracies.append(float(np.mean(predicted == y_val)))
        iterations.append(int(estimator.n_iter_))
        seconds.append(float(estimator.fit_seconds_))
        if accuracies[-1] > max(accuracies[:-1], default=-1.0):  # ties keep the stronger penalty
            best_fit = _fitted_state(estimator)
    vars(estimator).update(best_fit)
    best = int(np.argmax(accuracies))  # argmax returns the first (strongest) of equal maxima
    return SweepResult(ordered, accuracies, iterations, seconds, ordered[best], accuracies[best], estimator)


def _fitted_state(estimator: Any) -> dict[str, Any]:
    """What restores ``estimator`` to its current fit (attributes are replaced, never mutated,
    by later fits; the sklearn head's warm-started model and the torch head's L-BFGS memory are
    mutated, so they are copied)."""
    import copy

    saved = dict(vars(estimator))
    if "model_" in saved:
        saved["model_"] = copy.deepcopy(saved["model_"])
    if saved.get("_memory") is not None:
        saved["_memory"] = saved["_memory"].copy()
    return saved


def _stacked_base(top: np.ndarray, bottom: np.ndarray) -> np.ndarray | None:
    """The float32 array whose rows are exactly ``top`` then ``bottom`` (both views of it), else None."""
    base = getattr(top, "base", None)
    if not (isinstance(base, np.ndarray) and getattr(bottom, "base", None) is base and base.ndim == 2
            and base.dtype == np.float32 and len(base) == len(top) + len(bottom)):
        return None
    return base if _same_view(top, base[: len(top)]) and _same_view(bottom, base[len(top):]) else None


def _same_view(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0])


def split_for_probe(labels: np.ndarray, splits: np.ndarray, keys: np.ndarray, *,
                    val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0) -> dict[str, Any]:
    """Train/val/test positions for a probe; val from the cache or a seeded hold-out from train.

    Unlabelled rows (label -1) are never used. The three sets are asserted disjoint.
    """
    from embedcache.data import holdout_splits

    labelled = labels >= 0
    train = np.flatnonzero((splits == 0) & labelled)
    val = np.flatnonzero((splits == 1) & labelled)
    test = np.flatnonzero((splits == 2) & labelled)
    val_source = "cache"
    if len(val) == 0:
        if not 0 < val_fraction < 1:
            raise ConfigError(
                f"The cache has no val split, so 'val_fraction' must be in (0, 1) to hold one out "
                f"of train. Got {val_fraction!r}."
            )
        held = holdout_splits([str(k) for k in keys[train]], labels[train], val_fraction=val_fraction,
                              test_fraction=0.0, seed=seed)
        val, train = train[held == 1], train[held == 0]
        val_source = f"hold-out of {val_fraction:g} of train (stratified, seed {seed})"
    for name, rows in (("train", train), ("val", val), ("test", test)):
        if len(rows) == 0:
            raise ConfigError(
                f"The {name} split has no labelled rows. A probe needs train, val (or enough train "
                f"to hold one out) and test; re-extract with --test-fraction/--val-fraction, or use "
                f"train/val/test folders."
            )
    assert not (set(train.tolist()) & set(val.tolist())), "train and val overlap"
    assert not (set(train.tolist()) & set(test.tolist())), "train and test overlap"
    assert not (set(val.tolist()) & set(test.tolist())), "val and test overlap"
    return {"train": train, "val": val, "test": test, "val_source": val_source, "seed": seed}


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
    seed: int
    fit_seconds: float
    total_seconds: float
    estimator: Any = field(repr=False)
    store_path: str = ""
    artifact_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "head": self.head,
            "penalty": self.penalty,
            "swept": self.swept,
            "sweep": None if self.sweep is None else {
                "penalties": self.sweep.penalties, "val_accuracy": self.sweep.val_accuracy,
                "iterations": self.sweep.iterations, "seconds": self.sweep.seconds,
                "best_penalty": self.sweep.best_penalty,
                "best_val_accuracy": self.sweep.best_val_accuracy},
            "test": self.metrics,
            "split_sizes": self.split_sizes,
            "val_source": self.val_source,
            "seed": self.seed,
            "fit_seconds": self.fit_seconds,
            "total_seconds": self.total_seconds,
            "cache": self.store_path,
        }


def probe(entry: str | os.PathLike | Any, *, head: str = "torch", penalty: float | None = None,
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
            its refit, the budgets of :func:`iteration_budget`).
        out: directory for the probe artifact, report.json and confusion.png.
        cache_dir: where to resolve a key prefix (default ``$EMBEDCACHE_DIR`` or ``./cache``).
        progress: called with a short message after each step.
    """
    from embedcache.store import FeatureStore, default_cache_dir, resolve_entry

    if isinstance(entry, FeatureStore):
        store = entry
    else:
        store = FeatureStore.open(resolve_entry(entry, cache_dir or default_cache_dir()))
    result = probe_arrays(store.features, store.labels, store.splits, store.paths, head=head,
                          penalty=penalty, penalties=penalties, val_fraction=val_fraction, seed=seed,
                          standardize=standardize, device=device, max_iter=max_iter,
                          class_names=store.class_names, progress=progress)
    result.store_path = str(store.path)
    if out is not None:
        from embedcache.artifacts import save_probe

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
    if head not in HEADS:
        raise ConfigError(f"The 'head' parameter must be one of {list(HEADS)}. Got {head!r} instead.")
    features = _check_features(features, name="features")
    labels, splits, keys = np.asarray(labels), np.asarray(splits), np.asarray(keys)
    parts = split_for_probe(labels, splits, keys, val_fraction=val_fraction, seed=seed)
    train, val, test = parts["train"], parts["val"], parts["test"]
    params: dict[str, Any] = {"standardize": standardize}
    if head == "torch":
        params["device"] = device
    if max_iter is not None:
        params["max_iter"] = max_iter
    fit_rows = np.concatenate([train, val])
    X_fit, y_fit = features[fit_rows], labels[fit_rows]  # train rows first: the sweep fits a view
    sweep = None
    if penalty is None:
        n_train = len(train)
        sweep = sweep_penalty(X_fit[:n_train], y_fit[:n_train], X_fit[n_train:], y_fit[n_train:],
                              head=head, penalties=penalties or DEFAULT_PENALTIES, **params)
        chosen = sweep.best_penalty
        estimator = sweep.estimator  # holds the chosen penalty's fit on train: the refit starts there
        refit_iter = iteration_budget(REFIT_MAX_ITER, X_fit.shape) if head == "torch" else make_head(head).max_iter
        estimator.set_params(penalty=chosen, max_iter=max_iter or refit_iter)
        if progress:
            progress(f"sweep: {len(sweep.penalties)} penalties, best {chosen:.3g} "
                     f"(val top-1 {sweep.best_val_accuracy:.4f})")
    else:
        chosen = float(penalty)
        estimator = make_head(head, penalty=chosen, warm_start=True, **params)
    estimator.fit(X_fit, y_fit)
    from embedcache.metrics import classification_report

    if isinstance(estimator, TorchLinearProbe):
        estimator.release_training_data()  # the result outlives the fit: do not keep its matrices
    proba = estimator.predict_proba(features[test])
    metrics = classification_report(labels[test], proba, estimator.classes_, class_names=class_names)
    metrics["fit_seconds"] = float(estimator.fit_seconds_)
    return ProbeResult(
        head=head, penalty=chosen, swept=sweep is not None, sweep=sweep, metrics=metrics,
        split_sizes={"train": len(train), "val": len(val), "test": len(test)},
        val_source=parts["val_source"], seed=seed, fit_seconds=float(estimator.fit_seconds_),
        total_seconds=time.perf_counter() - started, estimator=estimator,
    )
