"""Metrics for numeric targets (MAE, RMSE, R² per target) and for label sets (average precision
per class, mAP, micro/macro-F1 at a threshold chosen on validation rows); plain numpy, JSON-ready.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Thresholds tried when choosing the multi-label decision threshold on validation rows.
THRESHOLD_GRID = tuple(float(t) for t in np.round(np.linspace(0.05, 0.95, 19), 2))


def _columns(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values.reshape(len(values), -1)


def r2_scores(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """R² of each target column (``1 - SSE / SST``; NaN for a constant column)."""
    truth, pred = _columns(y_true), _columns(y_pred)
    sse = ((truth - pred) ** 2).sum(axis=0)
    sst = ((truth - truth.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sst > 0, 1.0 - sse / np.where(sst > 0, sst, 1.0), np.nan)


def regression_report(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> dict[str, Any]:
    """MAE, RMSE and R² per target, and their means over targets (``mae``, ``rmse``, ``r2``)."""
    truth, pred = _columns(y_true), _columns(y_pred)
    mae = np.abs(truth - pred).mean(axis=0)
    rmse = np.sqrt(((truth - pred) ** 2).mean(axis=0))
    r2 = r2_scores(truth, pred)

    def clean(value: float) -> float | None:
        return None if np.isnan(value) else float(value)

    per_target = {name: {"mae": float(a), "rmse": float(b), "r2": clean(c)}
                  for name, a, b, c in zip(names, mae, rmse, r2, strict=True)}
    return {"n": int(len(truth)), "mae": float(mae.mean()), "rmse": float(rmse.mean()),
            "r2": clean(float(np.nanmean(r2))) if not np.isnan(r2).all() else None,
            "per_target": per_target, "target_names": list(names)}


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of one class (scikit-learn's definition: sum over distinct score
    thresholds of recall gain x precision); NaN when there is no positive row."""
    truth = np.asarray(y_true).astype(bool).reshape(-1)
    positives = int(truth.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    ranked, sorted_scores = truth[order], np.asarray(scores, dtype=np.float64)[order]
    hits = np.cumsum(ranked)
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores) != 0), len(ranked) - 1]
    tp = hits[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall_gain = np.diff(np.r_[0, tp]) / positives
    return float(np.sum(recall_gain * precision))


def _f1_counts(truth: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tp = (truth & predicted).sum(axis=0)
    return tp, (~truth & predicted).sum(axis=0), (truth & ~predicted).sum(axis=0)


def micro_f1(y_true: np.ndarray, proba: np.ndarray, threshold: float) -> float:
    """Micro-averaged F1 of ``proba >= threshold`` against the 0/1 matrix ``y_true``."""
    tp, fp, fn = (int(v.sum()) for v in _f1_counts(np.asarray(y_true).astype(bool), proba >= threshold))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def choose_threshold(y_true: np.ndarray, proba: np.ndarray, grid: tuple[float, ...] = THRESHOLD_GRID) -> tuple[float, float]:
    """The threshold of ``grid`` with the best micro-F1 (ties: the one nearest 0.5), and that F1."""
    scores = [micro_f1(y_true, proba, t) for t in grid]
    best = max(range(len(grid)), key=lambda i: (scores[i], -abs(grid[i] - 0.5)))
    return grid[best], scores[best]


def multilabel_report(y_true: np.ndarray, proba: np.ndarray, *, threshold: float,
                      class_names: list[str]) -> dict[str, Any]:
    """mAP (mean average precision over classes with a positive row), micro- and macro-F1 of
    ``proba >= threshold`` (macro over classes with a positive row), per-class AP and F1."""
    truth = np.asarray(y_true).astype(bool)
    predicted = np.asarray(proba) >= threshold
    ap = np.array([average_precision(truth[:, c], proba[:, c]) for c in range(truth.shape[1])])
    tp, fp, fn = _f1_counts(truth, predicted)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    present = truth.any(axis=0)
    total = int(tp.sum() * 2 + fp.sum() + fn.sum())
    return {
        "n": int(len(truth)),
        "mAP": float(np.mean(ap[present])) if present.any() else float("nan"),
        "micro_f1": float(2 * tp.sum() / total) if total else 0.0,
        "macro_f1": float(np.mean(f1[present])) if present.any() else float("nan"),
        "threshold": float(threshold),
        "per_class_ap": {name: (None if np.isnan(v) else float(v)) for name, v in zip(class_names, ap, strict=True)},
        "per_class_f1": {name: float(v) for name, v in zip(class_names, f1, strict=True)},
        "class_names": list(class_names),
    }
