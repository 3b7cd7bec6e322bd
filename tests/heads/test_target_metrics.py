"""Tests for embedcache.heads.target_metrics against scikit-learn's metrics."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, mean_absolute_error, r2_score

from embedcache.heads.target_metrics import (
    average_precision,
    choose_threshold,
    multilabel_report,
    regression_report,
)


def test_regression_report_per_target():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(100, 2)) * [1, 10]
    pred = truth + rng.normal(size=(100, 2))
    report = regression_report(truth, pred, ["age", "x1"])
    assert report["per_target"]["x1"]["r2"] == pytest.approx(r2_score(truth[:, 1], pred[:, 1]))
    assert report["per_target"]["age"]["mae"] == pytest.approx(mean_absolute_error(truth[:, 0], pred[:, 0]))
    assert report["r2"] == pytest.approx(r2_score(truth, pred))  # uniform average over targets
    assert regression_report(np.ones(3), np.ones(3), ["c"])["per_target"]["c"]["r2"] is None


@pytest.mark.parametrize("seed", range(4))
def test_average_precision_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, 60)
    scores = np.round(rng.random(60), 1)  # many ties
    assert average_precision(truth, scores) == pytest.approx(average_precision_score(truth, scores))
    assert np.isnan(average_precision(np.zeros(5), np.arange(5)))


def test_multilabel_report_and_threshold():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 2, (80, 3))
    proba = np.clip(truth * 0.6 + rng.random((80, 3)) * 0.5, 0, 1)
    threshold, f1 = choose_threshold(truth, proba)
    report = multilabel_report(truth, proba, threshold=threshold, class_names=["a", "b", "c"])
    predicted = (proba >= threshold).astype(int)
    assert report["micro_f1"] == pytest.approx(f1_score(truth, predicted, average="micro")) == pytest.approx(f1)
    assert report["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert report["mAP"] == pytest.approx(average_precision_score(truth, proba, average="macro"))
