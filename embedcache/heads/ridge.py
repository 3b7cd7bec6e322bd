"""Ridge regression on standardised features: a whole path of penalties from one
eigendecomposition; one-hot targets make it a classifier (the estimators are in :mod:`~embedcache.heads.ridge_probe`).

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

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from embedcache.errors import ConfigError
from embedcache.runtime import torch_threads

#: Rows per block when accumulating statistics (8192 x 2048 float32: 64 MiB).
STATS_BLOCK_ROWS = 8192
#: Outputs (rows x targets x penalties) computed at once when scoring a path on validation rows.
PREDICTION_BLOCK_VALUES = 1 << 25


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
        # float32 within the block (the rows are shifted, so there is little to cancel), float64
        # across blocks: a float64 reduction of the block cost 7x more (0.2 s of 0.8 on 54k x 1280)
        self.sum_x += shifted.sum(dim=0).double()
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
