"""One softmax problem prepared once and solved along a path of penalties, warm.

A penalty sweep solves the same multinomial logistic regression for many penalties, first on the
train rows, then (the chosen penalty) on train+val. :class:`SoftmaxPath` holds what those fits
share so that none of it is built twice: the standardised data matrix (bf16 on CPUs with native
bf16, with a transposed copy for a faster gradient pass), the class targets, the feature
covariance that preconditions L-BFGS, and the warm state: weights, logits, gradient and the
L-BFGS curvature memory, which :func:`~embedcache.heads.solver.fit_softmax` corrects exactly for
a change of penalty. Fits use the leading ``rows`` rows of the matrix, so the refit on train+val
extends the train fit's state by the val rows instead of starting over.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from embedcache.errors import ConfigError
from embedcache.heads.linear import raw_coefficients, standardisation
from embedcache.heads.solver import (
    DataCovariance,
    LBFGSMemory,
    SoftmaxState,
    fit_softmax,
    softmax_state,
    times_data,
)
from embedcache.runtime import cpu_has_native_bf16

#: Largest feature dimension for which L-BFGS is always preconditioned with the data's
#: covariance eigenbasis. The eigendecomposition runs on one thread and grows faster than d^3
#: (2-core AMD EPYC, float32: 0.31 s at 1280, 1.2 s at 2048, 6.3 s at 3072, 17.6 s at 4096).
PRECONDITION_MAX_DIM = 2048
#: Wider features are preconditioned too, up to this dimension, when the data are large
#: (rows x dim >= PRECONDITION_LARGE_SIZE), where the fits cost more than the decomposition and
#: converge too slowly without it: on full Fashion-MNIST, lite0's distinct stages concatenated
#: (54k x 2096) reached test 0.9069 unpreconditioned within the sweep's iteration budgets and
#: 0.9142 with it (19.7 s for that set's whole sweep, against 32.5 s for 0.9141 unpreconditioned at
#: 12 iterations). Small data (few-shot fits) stay unpreconditioned above PRECONDITION_MAX_DIM.
PRECONDITION_LARGE_MAX_DIM = 3072
PRECONDITION_LARGE_SIZE = 54_000 * 1280


def preconditioned(rows: int, dim: int) -> bool:
    """Whether a path on ``rows`` x ``dim`` data gets the covariance preconditioner."""
    return dim <= PRECONDITION_MAX_DIM or (dim <= PRECONDITION_LARGE_MAX_DIM and rows * dim >= PRECONDITION_LARGE_SIZE)


#: Largest bf16 data matrix (bytes) for which a CPU fit also keeps a transposed copy: the bf16
#: gradient pass ``G^T Z`` reads a (features x rows) matrix about 30% faster than the row-major
#: one (2-core AVX-512 CPU, 54k x 1280), for twice the memory. In float32 the row-major product
#: is the faster one, so no copy is made.
COLUMNS_MAX_BYTES = 1 << 30
#: Rows standardised at a time on a CPU (small enough to stay in cache, no full float32 temporary).
CPU_BLOCK_ROWS = 256
#: Rows per host-to-device copy when the matrix lives on a GPU.
GPU_BLOCK_ROWS = 16384
DATA_DTYPES = ("float32", "bfloat16")


def fast_data_dtype(device: str) -> str:
    """bf16 where matrix products in bf16 are native (AVX512-BF16/AMX CPUs, CUDA), else fp32."""
    if str(device).startswith("cuda") or cpu_has_native_bf16():
        return "bfloat16"
    return "float32"


def standardised_matrix(X: np.ndarray, mean: np.ndarray, scale: np.ndarray, dtype: torch.dtype,
                        device: torch.device, *, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(X - mean) / scale`` as a ``dtype`` tensor on ``device``, and with ``transposed`` also a
    (features x rows) copy of it (else None), built in row blocks."""
    block = CPU_BLOCK_ROWS if device.type == "cpu" else GPU_BLOCK_ROWS
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


@dataclass
class PathFit:
    """One solved point of the path, on raw features."""

    penalty: float
    rows: int
    coef: np.ndarray
    intercept: np.ndarray
    iterations: int
    seconds: float
    gradient_max: float
    converged: bool


@dataclass
class PathState:
    """What restores a path to one of its fits (see :meth:`SoftmaxPath.save`)."""

    state: SoftmaxState
    rows: int
    memory: LBFGSMemory


class SoftmaxPath:
    """``mean CE(Z W^T + b, y) + penalty/2 ||W||^2`` on standardised rows ``Z`` of ``X``.

    Args:
        X: validated float32 features ``(n, d)``: every row any fit of the path will use.
        y: their labels; the classes are those of all ``n`` rows.
        standardize: centre and scale with the statistics of the first ``stats_rows`` rows.
        stats_rows: rows the standardisation (and the preconditioner) are estimated on (the
            train rows of a sweep; default all).
        data_dtype: ``float32`` or ``bfloat16`` for the data matrix (accumulation, weights,
            logits and gradients stay float32).
        device: where the matrix lives (``cpu`` or ``cuda``).
    """

    def __init__(self, X: np.ndarray, y: np.ndarray, *, standardize: bool = True, stats_rows: int | None = None,
                 data_dtype: str = "float32", device: str = "cpu") -> None:
        if data_dtype not in DATA_DTYPES:
            raise ConfigError(f"The 'data_dtype' parameter must be one of {list(DATA_DTYPES)}. Got {data_dtype!r}.")
        stats_rows = len(X) if stats_rows is None else stats_rows
        self.classes, y_index = np.unique(np.asarray(y), return_inverse=True)
        self.mean, self.scale = standardisation(X[:stats_rows], standardize)
        self.device = torch.device(device)
        dtype = getattr(torch, data_dtype)
        transposed = self.device.type == "cpu" and dtype == torch.bfloat16 and X.size * dtype.itemsize <= COLUMNS_MAX_BYTES
        self.data, self.columns = standardised_matrix(X, self.mean, self.scale, dtype, self.device,
                                                      transposed=transposed)
        self.target = torch.from_numpy(y_index.astype(np.int64).reshape(-1)).to(self.device)
        self.covariance = DataCovariance(self.data[:stats_rows]) if preconditioned(stats_rows, X.shape[1]) else None
        self.memory = LBFGSMemory()
        self.state: SoftmaxState | None = None
        self.state_rows = 0

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def start_from(self, coef: np.ndarray, intercept: np.ndarray) -> None:
        """Start the next fit from a solution on raw features (a warm start across problems:
        the curvature memory starts afresh)."""
        weights = torch.from_numpy((np.asarray(coef, np.float32) * self.scale).astype(np.float32)).to(self.device)
        bias = np.asarray(intercept, np.float32) + (np.asarray(coef, np.float32) * self.mean).sum(axis=1)
        rows = len(self.data)
        self.state = softmax_state(self.data, self.target, weights, torch.from_numpy(bias.astype(np.float32)).to(self.device),
                                   columns=self.columns)
        self.state_rows, self.memory = rows, LBFGSMemory()

    def fit(self, penalty: float, *, rows: int | None = None, max_iter: int = 200, tol: float = 1e-4) -> PathFit:
        """Solve for ``penalty`` on the leading ``rows`` rows (default all), from the path's state.

        Returns:
            The solution on raw features (``coef = W / scale``, ``intercept = b - coef . mean``).
        """
        started = time.perf_counter()
        rows = len(self.data) if rows is None else rows
        data, target = self.data[:rows], self.target[:rows]
        columns = None if self.columns is None else self.columns[:, :rows]
        state, iterations = fit_softmax(data, target, self._start_state(rows, data, target, columns),
                                        penalty=float(penalty), max_iter=max_iter, tol=tol,
                                        covariance=self.covariance, memory=self.memory, columns=columns)
        self.state, self.state_rows = state, rows
        coef, intercept = raw_coefficients(state.weights.cpu().numpy(), state.bias.cpu().numpy(), self.mean, self.scale)
        gradient = float(torch.cat([(state.data_grad_weights + penalty * state.weights).reshape(-1),
                                    state.grad_bias]).abs().max())
        # stopping before max_iter with a larger gradient means no step could lower the loss at
        # this floating-point resolution: as converged as this arithmetic allows
        return PathFit(float(penalty), rows, coef, intercept, iterations, time.perf_counter() - started,
                       gradient, gradient <= tol or iterations < max_iter)

    def _start_state(self, rows: int, data: torch.Tensor, target: torch.Tensor,
                     columns: torch.Tensor | None) -> SoftmaxState:
        """Zeros; the current state (same rows: only the penalty changes, no data pass); or the
        current state extended by the new rows' logits (one pass over those rows only)."""
        previous = self.state
        if previous is None:
            zeros = torch.zeros(self.n_classes, data.shape[1], device=self.device)
            return softmax_state(data, target, zeros, torch.zeros(self.n_classes, device=self.device), columns=columns)
        if rows == self.state_rows:
            return previous
        if rows > self.state_rows:
            extra = times_data(data[self.state_rows:], previous.weights) + previous.bias
            return softmax_state(data, target, previous.weights, previous.bias,
                                 logits=torch.cat([previous.logits, extra]), columns=columns)
        return softmax_state(data, target, previous.weights, previous.bias, columns=columns)

    def save(self) -> PathState:
        """A snapshot of the current fit, its rows and its curvature memory."""
        if self.state is None:
            raise ConfigError("Nothing to save: the path has not been fitted yet.")
        return PathState(self.state, self.state_rows, self.memory.copy())

    def restore(self, saved: PathState) -> None:
        """Go back to a snapshot taken by :meth:`save` (later fits continue from there)."""
        self.state, self.state_rows, self.memory = saved.state, saved.rows, saved.memory.copy()
