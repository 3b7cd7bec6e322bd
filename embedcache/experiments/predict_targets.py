"""What ``predict`` does beyond one class per image: predicted values for numeric targets, predicted
label sets with per-class probabilities, and the metrics when the inputs carry the truth.

:mod:`~embedcache.experiments.predict` computes the features and turns these outputs into its
rows; a CSV manifest with the probe's target columns (or a ``labels`` column) supplies the truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedcache.heads.target_metrics import multilabel_report, regression_report
from embedcache.sources.base import ImageSource
from embedcache.sources.targets import LABELS_COLUMN, csv_columns


def class_scores(estimator: Any, features: np.ndarray) -> tuple[np.ndarray, str]:
    """``(scores (n, classes), name)``: probabilities where the head has them (``prob``), else
    its class outputs (``score``: the ridge head's one-hot regression outputs)."""
    if hasattr(estimator, "predict_proba"):
        return estimator.predict_proba(features), "prob"
    return estimator.class_scores(features), "score"


def truth_options(meta: dict[str, Any], inputs: list[str]) -> dict[str, Any]:
    """``open_source`` options that read the truth from a CSV manifest given as the only input:
    the probe's target columns when the CSV has them all, its classes for a ``labels`` column."""
    if len(inputs) != 1 or not inputs[0].lower().endswith(".csv") or not Path(inputs[0]).is_file():
        return {}
    header, task = csv_columns(inputs[0]), meta.get("task", "classes")
    if task == "regression":
        names = list(meta.get("target_names", []))
        return {"targets": names} if names and all(n.lower() in header for n in names) else {}
    if task == "multilabel" and LABELS_COLUMN in header:
        return {"label_vocabulary": list(meta.get("class_names", []))}
    return {}


@dataclass
class TargetOutputs:
    """Per computed row: ``values`` (predicted targets, or class probabilities for label sets),
    ``sets`` (predicted label sets, most probable first), the truth where known, and metrics."""

    names: list[str]
    values: np.ndarray
    sets: list[list[str]] | None
    true_values: np.ndarray | None
    true_sets: list[str] | None
    metrics: dict[str, Any] | None


def target_outputs(loaded: Any, source: ImageSource, rows: np.ndarray, features: np.ndarray) -> TargetOutputs:
    """Predictions of a regression or multi-label probe for the computed ``rows`` of ``source``."""
    meta, est = loaded.metadata, loaded.estimator
    if meta.get("task") == "regression":
        names = list(meta.get("target_names", []))
        values = np.asarray(est.predict(features), np.float64).reshape(len(features), -1) if len(features) \
            else np.zeros((0, len(names)))
        truth = source.target_array() if source.target_names == names else None
        truth = None if truth is None else truth[rows]
        metrics = regression_report(truth, values, names) if truth is not None and len(rows) else None
        return TargetOutputs(names, values, None, truth, None, metrics)
    names = list(meta.get("class_names", []))
    proba = est.predict_proba(features) if len(features) else np.zeros((0, len(names)))
    sets = [[names[c] for c in np.argsort(-p) if p[c] >= est.threshold_] for p in proba]
    truth = source.label_set_array() if source.multilabel and source.class_names == names else None
    truth = None if truth is None else truth[rows]
    true_sets = None if truth is None else [";".join(n for n, on in zip(names, t, strict=True) if on) for t in truth]
    metrics = None
    if truth is not None and len(rows):
        metrics = multilabel_report(truth, proba, threshold=est.threshold_, class_names=names)
    return TargetOutputs(names, proba, sets, None, true_sets, metrics)
