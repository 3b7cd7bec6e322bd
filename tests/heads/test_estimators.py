"""Tests for the two scikit-learn estimators, embedcache.heads.torch_probe.TorchLinearProbe and
embedcache.heads.sklearn_probe.SklearnProbe: the estimator contract, pipelines, labels, the shared
objective, and input refused the scikit-learn way."""

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from embedcache.errors import ConfigError
from embedcache.heads.sklearn_probe import SklearnProbe
from embedcache.heads.torch_probe import TorchLinearProbe
from tests.heads.helpers import blobs


@pytest.mark.parametrize("head", [TorchLinearProbe, SklearnProbe])
def test_estimator_contract(head):
    X, y = blobs()
    est = head(penalty=1e-3)
    assert est.get_params()["penalty"] == 1e-3 and not hasattr(est, "coef_")
    assert est.fit(X, y) is est
    assert est.coef_.shape == (3, 20) and est.intercept_.shape == (3,)
    assert list(est.classes_) == [0, 1, 2]
    proba = est.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-5)
    assert est.score(X, y) > 0.95
    assert np.array_equal(est.predict(X), est.classes_[proba.argmax(1)])
    assert clone(est).get_params() == est.get_params()


@pytest.mark.parametrize("head", [TorchLinearProbe, SklearnProbe])
def test_pipeline_and_cross_val_score(head):
    X, y = blobs()
    scores = cross_val_score(make_pipeline(StandardScaler(), head(penalty=1e-3)), X, y, cv=3)
    assert scores.mean() > 0.95


def test_string_labels_and_binary():
    X, y = blobs(k=2)
    labels = np.array(["cat", "dog"])[y]
    est = TorchLinearProbe(penalty=1e-3).fit(X, labels)
    assert set(est.predict(X)) <= {"cat", "dog"} and est.score(X, labels) > 0.95
    sk = SklearnProbe(penalty=1e-3).fit(X, labels)
    assert sk.coef_.shape == (2, 20)
    assert np.mean(sk.predict(X) == est.predict(X)) > 0.97


def test_torch_and_sklearn_heads_solve_the_same_problem():
    X, y = blobs(n=400, d=30, k=4, sep=1.0)
    penalty = 1e-2
    ours = TorchLinearProbe(penalty=penalty, tol=1e-7, max_iter=2000).fit(X, y)
    Xs = (X - X.mean(0)) / X.std(0)
    ref = LogisticRegression(C=1 / (penalty * len(X)), tol=1e-10, max_iter=5000).fit(Xs, y)
    np.testing.assert_allclose(ours.decision_function(X) - ours.decision_function(X).mean(1, keepdims=True),
                               ref.decision_function(Xs) - ref.decision_function(Xs).mean(1, keepdims=True),
                               atol=2e-3)


@pytest.mark.parametrize(
    "X, y",
    [
        (np.zeros((4, 3, 2)), [0, 1, 0, 1]),
        (np.array([[np.nan, 1.0], [0.0, 1.0]]), [0, 1]),
        (np.zeros((0, 3)), []),
        (np.ones((4, 3)), [1, 1, 1, 1]),
        (np.ones((4, 3)), [0, 1]),
    ],
)
def test_malformed_input_is_refused(X, y):
    # the estimator validates like scikit-learn (its ValueErrors); the named ConfigError messages
    # are heads.validation's, raised by the probe protocol (tests/heads/test_validation.py,
    # tests/experiments/test_protocol.py)
    with pytest.raises(ValueError):
        TorchLinearProbe().fit(X, y)


def test_wrong_dims_at_predict_time():
    X, y = blobs()
    est = TorchLinearProbe().fit(X, y)
    with pytest.raises(ValueError, match="X has 5 features, but TorchLinearProbe is expecting 20 features"):
        est.predict(np.zeros((2, 5)))


def test_bad_penalty():
    with pytest.raises(ConfigError, match="'penalty' parameter of TorchLinearProbe"):
        TorchLinearProbe(penalty=-1).fit(*blobs())


@pytest.mark.parametrize("head", [TorchLinearProbe, SklearnProbe])
def test_reversed_and_read_only_feature_arrays_are_accepted(head):
    X, y = blobs(n=200)
    est = head(penalty=1e-2).fit(X[::-1], y[::-1])
    frozen = X.copy()
    frozen.flags.writeable = False
    np.testing.assert_array_equal(est.predict(X[:, ::-1][:, ::-1]), est.predict(frozen))
    assert est.score(X[::-1], y[::-1]) == pytest.approx(est.score(X, y))
