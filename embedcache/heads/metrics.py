"""Classification metrics for probe reports (plain numpy, JSON-ready)."""

from __future__ import annotations

from typing import Any

import numpy as np


def classification_report(
    y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray, *, class_names: list[str] | None = None
) -> dict[str, Any]:
    """Top-1, top-5, balanced accuracy, macro-F1, per-class accuracy and the confusion matrix.

    Args:
        y_true: true labels, values in ``classes``.
        proba: ``(n, len(classes))`` class probabilities (columns ordered as ``classes``).
        classes: the label value of each column.
        class_names: display names indexed by label value (optional).
    """
    classes = np.asarray(classes)
    index_of = {c: i for i, c in enumerate(classes.tolist())}
    true_idx = np.array([index_of.get(v, -1) for v in np.asarray(y_true).tolist()])
    known = true_idx >= 0
    order = np.argsort(-proba, axis=1)
    pred_idx = order[:, 0]
    k = min(5, proba.shape[1])
    top5 = (order[:, :k] == true_idx[:, None]).any(axis=1)
    n_classes = len(classes)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (true_idx[known], pred_idx[known]), 1)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    correct = np.diag(confusion)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, correct / np.maximum(support, 1), np.nan)
        precision = np.where(predicted > 0, correct / np.maximum(predicted, 1), 0.0)
        f1 = np.where(precision + np.nan_to_num(recall) > 0,
                      2 * precision * np.nan_to_num(recall) / (precision + np.nan_to_num(recall)), 0.0)
    present = support > 0
    names = [
        (class_names[int(c)] if class_names is not None and 0 <= int(c) < len(class_names) else str(c))
        for c in classes
    ]
    return {
        "n": int(len(true_idx)),
        "top1": float(np.mean(pred_idx == true_idx)) if len(true_idx) else float("nan"),
        f"top{k}": float(np.mean(top5)) if len(true_idx) else float("nan"),
        "balanced_accuracy": float(np.mean(recall[present])) if present.any() else float("nan"),
        "macro_f1": float(np.mean(f1[present])) if present.any() else float("nan"),
        "per_class_accuracy": {name: (None if np.isnan(r) else float(r)) for name, r in zip(names, recall, strict=True)},
        "confusion_matrix": confusion.tolist(),
        "class_names": names,
    }
