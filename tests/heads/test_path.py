"""Tests for embedcache.heads.path.SoftmaxPath: one prepared problem solved along a path of
penalties, the refit on more rows continuing the state, and the bf16 transposed copy."""

import numpy as np
import pytest

from embedcache.heads import path as path_module
from embedcache.heads.path import SoftmaxPath
from embedcache.heads.torch_probe import TorchLinearProbe
from tests.heads.helpers import blobs


def test_refit_on_more_rows_reuses_the_prepared_rows_and_matches_a_fresh_fit(monkeypatch):
    X, labels = blobs(n=500, d=30, k=4, sep=1.0)
    built = []
    original = path_module.standardised_matrix
    monkeypatch.setattr(path_module, "standardised_matrix", lambda *a, **k: built.append(1) or original(*a, **k))
    shared = SoftmaxPath(X, labels, stats_rows=400)
    prepared = shared.data
    shared.fit(1e-2, rows=400, max_iter=500, tol=1e-6)
    refit = shared.fit(1e-2, max_iter=500, tol=1e-6)  # continues from the 400-row state
    assert shared.data is prepared and len(built) == 1  # no second copy of the data
    assert refit.rows == 500 and shared.state_rows == 500
    fresh_path = SoftmaxPath(X.copy(), labels, stats_rows=400)
    fresh = fresh_path.fit(1e-2, max_iter=500, tol=1e-6)  # from zero, on all rows
    np.testing.assert_allclose(refit.coef, fresh.coef, atol=1e-4)
    np.testing.assert_allclose(refit.intercept, fresh.intercept, atol=1e-3)
    assert refit.iterations < fresh.iterations  # the warm refit started near the solution
    np.testing.assert_allclose(shared.mean, X[:400].mean(0), atol=1e-5)  # the refit keeps the train statistics


def test_warm_started_estimator_refit_matches_a_cold_fit():
    X, labels = blobs(n=500, d=30, k=4, sep=1.0)
    warm = TorchLinearProbe(penalty=1e-2, warm_start=True, tol=1e-6, max_iter=500).fit(X[:400], labels[:400])
    warm.fit(X, labels)
    cold = TorchLinearProbe(penalty=1e-2, tol=1e-6, max_iter=500).fit(X.copy(), labels)
    np.testing.assert_allclose(warm.coef_, cold.coef_, atol=1e-4)
    assert warm.n_iter_ < cold.n_iter_


@pytest.mark.parametrize("limit", [0, 1 << 30])
def test_transposed_copy_is_kept_within_its_memory_limit_and_changes_nothing(monkeypatch, limit):
    X, y = blobs(n=500, d=30, k=4, sep=1.0)
    monkeypatch.setattr(path_module, "COLUMNS_MAX_BYTES", limit)
    path = SoftmaxPath(X, y, data_dtype="bfloat16")
    assert (path.columns is not None) == (limit > 0)
    fit = path.fit(1e-2, tol=1e-6, max_iter=500)
    monkeypatch.setattr(path_module, "COLUMNS_MAX_BYTES", 1 << 30 if limit == 0 else 0)
    other_path = SoftmaxPath(X, y, data_dtype="bfloat16")
    assert (other_path.columns is not None) == (limit == 0)
    other = other_path.fit(1e-2, tol=1e-6, max_iter=500)
    np.testing.assert_allclose(fit.coef, other.coef, atol=2e-3)


def test_float32_data_keeps_no_transposed_copy():
    X, y = blobs(n=300, d=30, k=3)
    assert SoftmaxPath(X, y, data_dtype="float32").columns is None
    assert SoftmaxPath(X, y, data_dtype="bfloat16").columns is not None


def test_wide_features_are_preconditioned_only_on_large_data():
    from embedcache.heads.path import preconditioned

    assert preconditioned(50, 2048) and preconditioned(54_000, 1280)
    assert preconditioned(54_000, 2096)                 # lite0's stages concatenated, full Fashion-MNIST
    assert not preconditioned(500, 2096)                # a few-shot fit: the decomposition would dominate
    assert not preconditioned(1_000_000, 4096)          # 17.6 s for the decomposition alone on 2 cores
