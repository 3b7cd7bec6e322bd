"""The penalty sweep: fit along a log grid (strongest first, warm), score each fit on the
validation rows, keep the best, refit it on train+val.

The rows come as one matrix, train rows first: fits of the sweep use the leading ``n_train``
rows, the refit all of them, so the torch head prepares the data once
(:class:`~embedcache.heads.path.SoftmaxPath`) and the refit continues from the chosen fit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedcache.errors import ConfigError
from embedcache.heads.linear import predict_linear
from embedcache.heads.path import SoftmaxPath, fast_data_dtype
from embedcache.heads.registry import make_head
from embedcache.heads.torch_probe import TorchLinearProbe

#: Default penalty grid: 11 values, 1e-6 ... 1e-1 (log-spaced), strongest first when sweeping.
DEFAULT_PENALTIES = tuple(float(p) for p in np.logspace(-6, -1, 11))
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
#: A fixed penalty (no sweep) is solved to this gradient tolerance, within FIXED_MAX_ITER
#: iterations: the estimators' default 1e-4 (scikit-learn's too) stops far from the optimum at
#: weak penalties, where the loss is flat (on the bundled demo's pixels at penalty 1e-6: test
#: 0.626 at 1e-4, 0.795 at 1e-6, against 0.79 for scikit-learn run to convergence).
FIXED_TOL = 1e-6
FIXED_MAX_ITER = 1000
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


@dataclass
class SweepResult:
    """Validation accuracy along the penalty path and the chosen value.

    ``chosen_coef`` / ``chosen_intercept``: the chosen penalty's fit on the train rows (before
    the refit), on raw features.
    """

    penalties: list[float]
    val_accuracy: list[float]
    iterations: list[int]
    seconds: list[float]
    best_penalty: float
    best_val_accuracy: float
    chosen_coef: np.ndarray | None = field(default=None, repr=False)
    chosen_intercept: np.ndarray | None = field(default=None, repr=False)

    @property
    def at_edge(self) -> str | None:
        """``strongest`` or ``weakest`` when the best penalty is the grid's first or last value
        (the optimum may lie beyond it), else None."""
        if len(self.penalties) < 2:
            return None
        if self.best_penalty == self.penalties[0]:
            return "strongest"
        return "weakest" if self.best_penalty == self.penalties[-1] else None

    def to_dict(self) -> dict[str, Any]:
        """The table as plain data (for reports)."""
        return {"penalties": self.penalties, "val_accuracy": self.val_accuracy, "iterations": self.iterations,
                "seconds": self.seconds, "best_penalty": self.best_penalty,
                "best_val_accuracy": self.best_val_accuracy, "at_edge": self.at_edge}


def _ordered(penalties: Any) -> list[float]:
    ordered = sorted({float(p) for p in penalties}, reverse=True)
    if not ordered:
        raise ConfigError("The 'penalties' grid is empty; give at least one value.")
    if any(not np.isfinite(p) or p < 0 for p in ordered):
        raise ConfigError(f"The 'penalties' grid must hold finite values >= 0. Got {list(penalties)!r}.")
    return ordered


def sweep_and_refit(X: np.ndarray, y: np.ndarray, n_train: int, *, head: str = "torch",
                    penalties: Any = DEFAULT_PENALTIES, standardize: bool = True, device: str = "cpu",
                    max_iter: int | None = None) -> tuple[SweepResult, Any]:
    """Sweep on ``X[:n_train]`` scored on ``X[n_train:]``, then refit the winner on all rows.

    The best validation accuracy wins; ties go to the stronger penalty (the simpler model). The
    torch head solves each penalty with a budget of :data:`SWEEP_MAX_ITER` iterations
    (:data:`SWEEP_FIRST_MAX_ITER` for the first; more on small data, see :func:`iteration_budget`)
    unless ``max_iter`` is given, on bf16 data where the CPU has native bf16 (or on CUDA).

    Args:
        X: validated float32 features, train rows then val rows.
        y: their labels.
        n_train: how many leading rows are train rows.
        head: ``torch`` or ``sklearn``.
        penalties: the grid.
        standardize: standardise with the train rows' statistics (kept for the refit).
        device: the torch head's device.
        max_iter: iteration cap of every fit instead of the budgets.

    Returns:
        The sweep table and the estimator refit on all rows at the chosen penalty.
    """
    ordered = _ordered(penalties)
    if head == "torch":
        return _sweep_torch(X, y, n_train, ordered, standardize=standardize, device=device, max_iter=max_iter)
    return _sweep_warm_estimator(X, y, n_train, ordered, head=head, standardize=standardize, max_iter=max_iter)


def _best(accuracies: list[float]) -> bool:
    """Whether the last accuracy beats every earlier one (ties keep the stronger penalty)."""
    return accuracies[-1] > max(accuracies[:-1], default=-1.0)


def _sweep_torch(X: np.ndarray, y: np.ndarray, n_train: int, ordered: list[float], *, standardize: bool,
                 device: str, max_iter: int | None) -> tuple[SweepResult, TorchLinearProbe]:
    data_dtype = fast_data_dtype(device)
    path = SoftmaxPath(X, y, standardize=standardize, stats_rows=n_train, data_dtype=data_dtype, device=device)
    X_val, y_val = X[n_train:], np.asarray(y[n_train:])
    fits, accuracies, saved = [], [], None
    for i, penalty in enumerate(ordered):
        budget = max_iter or iteration_budget(SWEEP_FIRST_MAX_ITER if i == 0 else SWEEP_MAX_ITER, (n_train, X.shape[1]))
        fits.append(path.fit(penalty, rows=n_train, max_iter=budget))
        accuracies.append(float(np.mean(predict_linear(X_val, fits[-1].coef, fits[-1].intercept, path.classes) == y_val)))
        if _best(accuracies):
            saved, chosen = path.save(), fits[-1]
    path.restore(saved)
    refit_iter = max_iter or iteration_budget(REFIT_MAX_ITER, X.shape)
    refit = path.fit(chosen.penalty, max_iter=refit_iter)
    estimator = TorchLinearProbe.from_coefficients(
        coef=refit.coef, intercept=refit.intercept, classes=path.classes, mean=path.mean, scale=path.scale,
        n_iter=refit.iterations, fit_seconds=refit.seconds, converged=refit.converged, penalty=chosen.penalty,
        standardize=standardize, device=device, max_iter=refit_iter, data_dtype=data_dtype)
    result = SweepResult(ordered, accuracies, [f.iterations for f in fits], [f.seconds for f in fits],
                         chosen.penalty, max(accuracies), chosen.coef, chosen.intercept)
    return result, estimator


def _sweep_warm_estimator(X: np.ndarray, y: np.ndarray, n_train: int, ordered: list[float], *, head: str,
                          standardize: bool, max_iter: int | None) -> tuple[SweepResult, Any]:
    params = {"standardize": standardize, **({"max_iter": max_iter} if max_iter else {})}
    estimator = make_head(head, penalty=ordered[0], warm_start=True, **params)
    X_train, y_train, X_val, y_val = X[:n_train], y[:n_train], X[n_train:], np.asarray(y[n_train:])
    accuracies, iterations, seconds, chosen = [], [], [], None
    for penalty in ordered:
        estimator.set_params(penalty=penalty)
        estimator.fit(X_train, y_train)
        accuracies.append(float(np.mean(predict_linear(X_val, estimator.coef_, estimator.intercept_,
                                                       estimator.classes_) == y_val)))
        iterations.append(int(estimator.n_iter_))
        seconds.append(float(estimator.fit_seconds_))
        if _best(accuracies):
            chosen = copy.deepcopy(estimator)  # later warm fits mutate the estimator's model
    result = SweepResult(ordered, accuracies, iterations, seconds, float(chosen.penalty), max(accuracies),
                         chosen.coef_, chosen.intercept_)
    chosen.fit(X, y)  # warm from the chosen fit, with the train rows' standardisation
    return result, chosen


def fit_fixed(X: np.ndarray, y: np.ndarray, *, head: str = "torch", penalty: float, standardize: bool = True,
              device: str = "cpu", max_iter: int | None = None) -> Any:
    """One head fitted at a given penalty (no sweep), solved to :data:`FIXED_TOL` (torch head,
    on the same fast data type as sweeps) within ``max_iter`` (default :data:`FIXED_MAX_ITER`)
    iterations; the estimator's ``converged_`` says whether it got there."""
    if head != "torch":
        return make_head(head, penalty=penalty, standardize=standardize,
                         **({"max_iter": max_iter} if max_iter else {})).fit(X, y)
    return TorchLinearProbe(penalty=penalty, standardize=standardize, device=device, tol=FIXED_TOL,
                            max_iter=max_iter or FIXED_MAX_ITER, data_dtype=fast_data_dtype(device)).fit(X, y)
