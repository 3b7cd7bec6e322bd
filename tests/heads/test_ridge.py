"""Tests for embedcache.heads.ridge and ridge_probe: the closed form against scikit-learn's Ridge, every penalty
of the path against a direct solve, streamed blocks against one pass, the penalty chosen on
validation rows only, and the estimator contracts."""

import numpy as np
import pytest
from sklearn.linear_model import Ridge, RidgeClassifier
from sklearn.preprocessing import StandardScaler

from embedcache.errors import ConfigError
from embedcache.heads import ridge as ridge_module
from embedcache.heads.ridge import RidgePath, RidgeStatistics, solve
from embedcache.heads.ridge_probe import RidgeClassifierProbe, RidgeRegressor, sweep_ridge
from tests.heads.helpers import blobs


def regression_data(n=300, d=12, t=2, seed=0):
    rng = np.random.default_rng(seed)
    X = (rng.normal(size=(n, d)) * rng.uniform(0.1, 5, d) + rng.normal(size=d) * 3).astype(np.float32)
    Y = X @ rng.normal(size=(d, t)) + 40 + rng.normal(size=(n, t))
    return X, Y.astype(np.float32)


@pytest.mark.parametrize("penalty", [1e-4, 0.1, 10.0])
def test_regressor_matches_sklearn_ridge_on_standardised_features(penalty):
    X, Y = regression_data()
    ours = RidgeRegressor(penalty=penalty).fit(X, Y)
    scaler = StandardScaler().fit(X)
    theirs = Ridge(alpha=penalty * len(X)).fit(scaler.transform(X), Y)
    np.testing.assert_allclose(ours.predict(X), theirs.predict(scaler.transform(X)), rtol=1e-4, atol=1e-3)
    one = RidgeRegressor(penalty=penalty).fit(X, Y[:, 0])
    assert one.coef_.shape == (12,) and isinstance(one.intercept_, float) and one.predict(X[:3]).shape == (3,)


def test_every_penalty_of_the_path_equals_a_direct_solve():
    X, Y = regression_data(d=30)
    stats = RidgeStatistics.from_rows(X, n_targets=2, targets=Y)
    path = RidgePath(stats)
    penalties = [1e-5, 1e-2, 1.0, 100.0]
    for penalty, prediction in zip(penalties, path.predictions(X[:50], penalties), strict=True):
        coef, intercept, _, _ = solve(stats, penalty)
        path_coef, path_intercept = path.coefficients(penalty)
        np.testing.assert_allclose(path_coef, coef, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(prediction, X[:50] @ coef.T + intercept, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(path_intercept, intercept, rtol=1e-5)


def test_streamed_blocks_and_added_statistics_equal_one_pass():
    X, Y = regression_data(n=1000)
    whole = RidgeStatistics.from_rows(X, n_targets=2, targets=Y, block_rows=10_000)
    streamed = RidgeStatistics.from_rows(X, n_targets=2, targets=Y, block_rows=37)
    first = RidgeStatistics.from_rows(X[:600], n_targets=2, targets=Y[:600])
    added = first + first.sibling().accumulate(X[600:], targets=Y[600:], block_rows=100)
    reference = solve(whole, 0.01)
    for other in (streamed, added):
        for a, b in zip(solve(other, 0.01), reference, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="share their shifts"):
        _ = first + RidgeStatistics.from_rows(X[600:], n_targets=2, targets=Y[600:])


def test_labels_accumulate_like_one_hot_targets():
    X, y = blobs(n=200, d=6, k=4)
    by_labels = RidgeStatistics.from_rows(X, n_targets=4, labels=y, block_rows=64)
    by_onehot = RidgeStatistics.from_rows(X, n_targets=4, targets=np.eye(4, dtype=np.float32)[y], block_rows=64)
    for a, b in zip(solve(by_labels, 0.1), solve(by_onehot, 0.1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_classifier_matches_sklearn_ridge_classifier():
    X, y = blobs(n=400, d=10, k=3, sep=1.0)
    ours = RidgeClassifierProbe(penalty=0.05).fit(X, y)
    scaler = StandardScaler().fit(X)
    theirs = RidgeClassifier(alpha=0.05 * len(X)).fit(scaler.transform(X), y)
    assert np.mean(ours.predict(X) == theirs.predict(scaler.transform(X))) == 1.0
    assert ours.class_scores(X).shape == (400, 3) and not hasattr(ours, "predict_proba")
    binary = RidgeClassifierProbe().fit(X[y < 2], y[y < 2])
    assert binary.decision_function(X[:5]).shape == (5,)


def test_constant_and_collinear_columns_are_solved():
    X, Y = regression_data(d=4)
    plain = RidgeRegressor(penalty=0.0).fit(X, Y).score(X, Y)
    X = np.hstack([X, np.full((len(X), 1), 3.0, np.float32), X[:, :1]])  # a constant and a duplicate column
    for penalty in (0.0, 1e-3):
        model = RidgeRegressor(penalty=penalty).fit(X, Y)
        assert np.isfinite(model.coef_).all() and model.score(X, Y) == pytest.approx(plain, abs=1e-4)
        assert model.coef_[0, 4] == 0  # the constant column carries no weight


def test_penalty_is_chosen_on_validation_rows_only(monkeypatch):
    X, y = blobs(n=300, d=8, k=3, sep=1.0)
    seen = []
    original = ridge_module.RidgePath.predictions

    def spy(self, X_val, penalties):
        seen.append(np.array(X_val, copy=True))
        return original(self, X_val, penalties)

    monkeypatch.setattr(ridge_module.RidgePath, "predictions", spy)
    selection, estimator = sweep_ridge(X[:250], y[:250], 200, penalties=[1e-3, 1.0, 1e3])
    assert selection.values == [1e3, 1.0, 1e-3] and selection.parameter == "penalty"
    assert np.array_equal(seen[0], X[200:250]) and estimator.penalty == selection.best_value
    # the refit uses train+val: it equals a fit on those rows at the chosen penalty
    direct = RidgeClassifierProbe(penalty=selection.best_value).fit(X[:250], y[:250])
    np.testing.assert_allclose(estimator.coef_, direct.coef_, rtol=1e-4, atol=1e-5)


def test_regression_sweep_scores_mean_r2():
    X, Y = regression_data(n=400)
    selection, estimator = sweep_ridge(X, Y, 300, task="regression", penalties=[1e-4, 1e-2, 10.0])
    assert selection.metric == "r2" and selection.best_score > 0.9
    assert estimator.predict(X).shape == (400, 2)


def test_bad_penalties_are_named():
    X, y = blobs(n=50, d=3)
    with pytest.raises(ConfigError, match="'penalty' parameter"):
        RidgeClassifierProbe(penalty=-1.0).fit(X, y)
    with pytest.raises(ConfigError, match="grid is empty"):
        sweep_ridge(X, y, 40, penalties=[])
