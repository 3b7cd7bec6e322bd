"""Checks of feature matrices and labels with errors that name the problem and the fix.

:func:`check_features` is what the probe protocol and few-shot use: one pass, a fast float16
conversion, a NaN/inf scan in blocks. The estimators validate their input the scikit-learn way
(:func:`validate_fit_input`), so that they behave as scikit-learn users expect.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embedcache.errors import ConfigError

#: Rows scanned at a time for NaN/inf (no full-size boolean temporary).
SCAN_BLOCK_ROWS = 4096


def check_features(X: Any, *, name: str = "X", n_features: int | None = None) -> np.ndarray:
    """``X`` as a float32 ``(n, d)`` array, refusing what no head can use.

    Args:
        X: the feature matrix (float16 caches are converted by torch, ~8x faster than numpy).
        name: what to call it in messages.
        n_features: the width it must have (a fitted probe's), if any.

    Raises:
        ConfigError: not 2-D, no rows, wrong width, not numeric, NaN or infinite values.
    """
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
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise ConfigError(f"{name} must hold real numbers. Got dtype {X.dtype}.")
    if any(stride < 0 for stride in X.strides):  # reversed views: torch cannot wrap them
        X = np.ascontiguousarray(X)
    if X.dtype == np.float16:
        import torch

        X = torch.from_numpy(np.ascontiguousarray(X)).float().numpy()
    else:
        X = X.astype(np.float32, copy=False)
    if not all(np.isfinite(X[i:i + SCAN_BLOCK_ROWS]).all() for i in range(0, len(X), SCAN_BLOCK_ROWS)):
        bad = int((~np.isfinite(X)).any(axis=1).sum())
        raise ConfigError(f"{name} contains NaN or infinite values in {bad} rows; clean or drop them.")
    return X


def check_labels(y: Any, n: int) -> np.ndarray:
    """``y`` as a 1-D array of ``n`` labels with at least two classes."""
    y = np.asarray(y).reshape(-1)
    if len(y) != n:
        raise ConfigError(f"y has {len(y)} labels for {n} rows of X.")
    classes = np.unique(y)
    if len(classes) < 2:
        raise ConfigError(
            f"A probe needs at least 2 classes in its training data; got one class only "
            f"({classes.tolist()})."
        )
    return y


def validate_fit_input(estimator: Any, X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's own checks for ``fit`` (2-D finite real X, 1-D classification targets,
    ``n_features_in_`` recorded) plus ours (at least two classes). X comes back float32."""
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import validate_data

    X, y = validate_data(estimator, X, y, dtype=np.float32, order="C")
    check_classification_targets(y)
    return X, check_labels(y, len(X))


def validate_predict_input(estimator: Any, X: Any) -> np.ndarray:
    """scikit-learn's checks for prediction (same width as at ``fit``); X comes back float32."""
    from sklearn.utils.validation import validate_data

    return validate_data(estimator, X, dtype=np.float32, reset=False)
