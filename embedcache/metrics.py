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


def pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend, or None when matplotlib (an
    optional extra) is not installed: every PNG this package writes is skipped then."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_confusion_png(report: dict[str, Any], path: str, *, title: str = "") -> bool:
    """Write a confusion-matrix heatmap when matplotlib is installed; returns whether it did."""
    plt = pyplot()
    if plt is None:
        return False
    matrix = np.asarray(report["confusion_matrix"], dtype=float)
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    names = report["class_names"]
    size = max(4.0, 0.5 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(names) <= 20:
        for i in range(len(names)):
            for j in range(len(names)):
                if matrix[i, j]:
                    ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if normalised[i, j] > 0.5 else "black")
    ax.set_title(title or f"top-1 {report['top1']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def save_curve_png(report: dict[str, Any], path: str) -> bool:
    """Train loss and val accuracy per epoch (epoch 0 = the starting point) when matplotlib is installed."""
    plt = pyplot()
    if plt is None:
        return False
    epochs = report["epochs"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot([r["epoch"] for r in epochs], [r["train_loss"] for r in epochs], marker="o")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("train loss")
    ax_acc.plot([0] + [r["epoch"] for r in epochs], [report["start"]["val_top1"]] + [r["val_top1"] for r in epochs],
                marker="o", label="val top-1")
    ax_acc.axhline(report["test"]["top1"], color="grey", linestyle="--", label="test top-1 (best epoch)")
    ax_acc.set_xlabel("epoch")
    ax_acc.legend()
    fig.suptitle(f"fine-tune from {report['config']['head_init']} head, unfreeze {report['config']['unfreeze']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
