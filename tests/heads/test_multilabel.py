"""Tests for embedcache.heads.multilabel: the objective's gradient, agreement with independent
scikit-learn logistic regressions, the sweep choosing on validation rows only."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from embedcache.errors import ConfigError
from embedcache.heads import multilabel as ml
from embedcache.heads.multilabel import SigmoidProbe, sweep_sigmoid


def label_sets(n=400, d=10, c=4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32) * 2 + 1
    Y = (X @ rng.normal(size=(d, c)) + rng.normal(size=(n, c)) > 0.5).astype(np.float32)
    return X, Y


def test_gradient_matches_autograd():
    X, Y = label_sets(n=50, d=5, c=3)
    fun = ml._objective(torch.from_numpy(X), torch.from_numpy(Y), 0.3)
    x = torch.randn(3 * 6, dtype=torch.float32) * 0.1
    loss, grad = fun(x)
    leaf = x.clone().double().requires_grad_()
    W, b = leaf[:15].view(3, 5), leaf[15:]
    logits = torch.from_numpy(X).double() @ W.T + b
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(Y).double(),
                                                               reduction="sum") / 50 + 0.15 * (W * W).sum()
    ref.backward()
    assert float(loss) == pytest.approx(float(ref.detach()), rel=1e-5)
    np.testing.assert_allclose(grad.numpy(), leaf.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_each_class_matches_an_independent_sklearn_logistic_regression():
    X, Y = label_sets()
    penalty = 1e-2
    ours = SigmoidProbe(penalty=penalty, tol=1e-7, max_iter=500).fit(X, Y)
    Z = StandardScaler().fit_transform(X)
    for c in range(Y.shape[1]):
        theirs = LogisticRegression(C=1 / (penalty * len(X)), tol=1e-10, max_iter=5000).fit(Z, Y[:, c])
        np.testing.assert_allclose(ours.predict_proba(X)[:, c], theirs.predict_proba(Z)[:, 1], atol=2e-4)
    assert ours.predict(X).shape == Y.shape and set(np.unique(ours.predict(X))) <= {0, 1}


def test_sweep_chooses_penalty_and_threshold_on_validation_rows(monkeypatch):
    X, Y = label_sets(n=500)
    seen = []
    original = ml.mean_average_precision

    def spy(Y_val, proba):
        seen.append(len(Y_val))
        return original(Y_val, proba)

    monkeypatch.setattr(ml, "mean_average_precision", spy)
    selection, estimator = sweep_sigmoid(X[:400], Y[:400], 300, penalties=[1e-1, 1e-3, 1e-5])
    assert seen == [100, 100, 100] and selection.metric == "mAP" and selection.best_score > 0.8
    assert estimator.threshold_ == selection.extra["threshold"] and estimator.penalty == selection.best_value


def test_malformed_label_sets_are_named():
    X, _ = label_sets(n=20)
    with pytest.raises(ConfigError, match="only 0 and 1"):
        SigmoidProbe().fit(X, np.full((20, 2), 2.0))
    with pytest.raises(ConfigError, match="grid is empty"):
        sweep_sigmoid(X, np.zeros((20, 2)), 10, penalties=[])
