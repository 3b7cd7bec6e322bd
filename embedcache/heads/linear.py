"""What the linear heads share: scores of a linear map, standardisation, and prediction.

Scores go through torch rather than numpy: numpy's BLAS (OpenBLAS) keeps its own threads
spinning after a product, and on a small CPU they then steal cores from the torch solver's next
passes (a probe sweep ran 25% slower on 2 cores).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from embedcache.heads.validation import validate_predict_input

#: Rows per block when computing column statistics.
STATS_BLOCK_ROWS = 4096


def _tensor(X: np.ndarray, dtype: Any) -> torch.Tensor:
    with warnings.catch_warnings():  # read-only inputs (memory-mapped) are fine: nothing writes to them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(X, dtype))


def linear_scores(X: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """``X @ coef.T + intercept`` in float32 (for validated features)."""
    scores = _tensor(X, np.float32) @ _tensor(coef, np.float32).T
    return scores.add_(_tensor(intercept, np.float32)).numpy()


def predict_linear(X: np.ndarray, coef: np.ndarray, intercept: np.ndarray, classes: Any) -> np.ndarray:
    """Class labels from a linear map, for features that were already validated."""
    return np.asarray(classes)[np.argmax(linear_scores(X, coef, intercept), axis=1)]


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax of a score matrix."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    expo = np.exp(shifted)
    return expo / expo.sum(axis=1, keepdims=True)


class LinearClassifierMixin:
    """Prediction for heads exposing ``coef_`` (n_classes, n_features) / ``intercept_`` on raw
    features. Scores are computed in float64, so a row's score does not depend on the batch it
    comes in; for two classes ``decision_function`` is the scikit-learn 1-D margin."""

    def _scores(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "coef_")
        X = validate_predict_input(self, X)
        scores = _tensor(X, np.float64) @ _tensor(self.coef_, np.float64).T
        return scores.add_(_tensor(self.intercept_, np.float64)).numpy()

    def decision_function(self, X: Any) -> np.ndarray:
        scores = self._scores(X)
        return scores[:, 1] - scores[:, 0] if scores.shape[1] == 2 else scores

    def predict_proba(self, X: Any) -> np.ndarray:
        return softmax(self._scores(X))

    def predict(self, X: Any) -> np.ndarray:
        scores = self._scores(X)
        return np.asarray(self.classes_)[np.argmax(scores, axis=1)]


def standardisation(X: np.ndarray, standardize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and std (population) of a float32 array, in one blocked pass: sums of the
    values and their squares around the first block's mean (so the squares do not cancel),
    accumulated in float64. Without ``standardize``: zeros and ones."""
    if not standardize:
        return np.zeros(X.shape[1], np.float32), np.ones(X.shape[1], np.float32)
    data = _tensor(X, np.float32)
    centre = data[:STATS_BLOCK_ROWS].mean(dim=0)
    total = torch.zeros(X.shape[1], dtype=torch.float64)
    squares = torch.zeros(X.shape[1], dtype=torch.float64)
    for begin in range(0, len(X), STATS_BLOCK_ROWS):
        shifted = data[begin:begin + STATS_BLOCK_ROWS] - centre
        total += shifted.sum(dim=0)
        squares += shifted.mul_(shifted).sum(dim=0)
    shift = total / len(X)
    std = (squares / len(X) - shift * shift).clamp_min(0).sqrt()
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return (centre + shift).float().numpy(), std.float().numpy()


def raw_coefficients(weights: np.ndarray, bias: np.ndarray, mean: np.ndarray,
                     scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weights on standardised features -> ``(coef, intercept)`` on raw features."""
    coef = (weights / scale).astype(np.float32)
    intercept = (bias - (coef * mean).sum(axis=1)).astype(np.float32)  # no BLAS call
    return coef, intercept
