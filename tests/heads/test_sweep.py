"""Tests for embedcache.heads.sweep: the warm penalty sweep scored on validation rows, the
iteration budgets, and the refit of the chosen penalty on train+val."""

import numpy as np
import pytest

from embedcache.heads import path as path_module
from embedcache.heads.linear import predict_linear
from embedcache.heads.sweep import DEFAULT_PENALTIES, sweep_and_refit
from embedcache.heads.torch_probe import TorchLinearProbe
from tests.heads.helpers import blobs


def test_sweep_is_warm_started_strongest_first_and_ties_go_to_stronger():
    X, y = blobs(sep=10)
    result, _ = sweep_and_refit(X, y, 200, penalties=[1e-4, 1e-2, 1e-3])
    assert result.penalties == [1e-2, 1e-3, 1e-4]
    assert result.best_penalty == 1e-2  # perfectly separable: all tie, the strongest wins
    assert len(DEFAULT_PENALTIES) >= 9


def test_sweep_keeps_the_chosen_penalty_fit_and_refits_it():
    X, labels = blobs(n=600, d=40, k=4, seed=2, sep=0.7)
    result, refit = sweep_and_refit(X, labels, 450, penalties=[1e1, 1e-1, 1e-3, 1e-5])
    assert refit.penalty == result.best_penalty
    # the chosen fit on the train rows (before the refit) scores exactly the best val accuracy
    predicted = predict_linear(X[450:], result.chosen_coef, result.chosen_intercept, refit.classes_)
    assert np.mean(predicted == labels[450:]) == pytest.approx(result.best_val_accuracy)


def test_iteration_budget_is_fixed_on_large_data_and_grows_on_small_data():
    from embedcache.heads.sweep import BUDGET_REFERENCE_SIZE, SMALL_DATA_MAX_ITER, iteration_budget

    assert iteration_budget(4, (54_000, 1280)) == 4
    assert iteration_budget(4, (1_000_000, 1280)) == 4
    assert iteration_budget(4, (27_000, 1280)) == 8  # half the data: twice the iterations, same work
    assert iteration_budget(4, (300, 20)) == SMALL_DATA_MAX_ITER
    assert iteration_budget(4, (BUDGET_REFERENCE_SIZE // 1000, 1000)) == 4


def test_small_sweeps_solve_each_penalty_to_tolerance():
    from embedcache.heads.sweep import SMALL_DATA_MAX_ITER, SWEEP_FIRST_MAX_ITER

    X, y = blobs(n=600, d=40, k=4, seed=2, sep=0.7)
    result, _ = sweep_and_refit(X, y, 450, penalties=[1e-1, 1e-2, 1e-3])
    # more iterations than the large-data budgets allow (10, 17, 7 when written), each fit
    # stopping at the tolerance, not at a budget
    assert max(result.iterations) > SWEEP_FIRST_MAX_ITER and max(result.iterations) < SMALL_DATA_MAX_ITER
    for penalty, accuracy in zip(result.penalties, result.val_accuracy, strict=True):
        converged = TorchLinearProbe(penalty=penalty, tol=1e-6, max_iter=1000, data_dtype="bfloat16").fit(X[:450], y[:450])
        assert accuracy == pytest.approx(converged.score(X[450:], y[450:]), abs=1 / 150)


def test_sweep_and_refit_prepare_the_data_once(monkeypatch):
    built = []
    original = path_module.standardised_matrix
    monkeypatch.setattr(path_module, "standardised_matrix", lambda *a, **k: built.append(1) or original(*a, **k))
    X, y = blobs(n=600, d=40, k=4, seed=2, sep=0.7)
    sweep_and_refit(X, y, 450, penalties=[1e-1, 1e-2, 1e-3])
    assert len(built) == 1  # three sweep fits and the refit share one prepared matrix


def test_sweep_restores_the_chosen_fits_own_solver_memory(monkeypatch):
    restored = []
    original = path_module.SoftmaxPath.restore

    def spy(self, saved):
        original(self, saved)
        restored.append(self.memory.penalty)

    monkeypatch.setattr(path_module.SoftmaxPath, "restore", spy)
    X, y = blobs(n=600, d=40, k=4, seed=2, sep=0.7)
    result, _ = sweep_and_refit(X, y, 450, penalties=[1e1, 1e-1, 1e-3, 1e-5])
    assert result.best_penalty != 1e-5  # else the check below cannot tell the memories apart
    assert restored == [result.best_penalty]  # the refit starts from the chosen fit's memory
