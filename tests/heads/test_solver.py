import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from embedcache.heads.solver import (
    DataCovariance,
    LBFGSMemory,
    fit_softmax,
    minimize,
    softmax_state,
)


def problem(n=400, d=30, k=4, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    y = rng.integers(0, k, n)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)  # correlated features
    X = (centres[y] + rng.normal(size=(n, d))) @ mixing
    X = (X - X.mean(0)) / X.std(0)
    return torch.from_numpy(X.astype(np.float32)), torch.from_numpy(y.astype(np.int64))


def reference(Z, y, penalty):
    """sklearn's lbfgs converged far past our tolerance, in float64."""
    ref = LogisticRegression(C=1 / (penalty * len(Z)), tol=1e-12, max_iter=10000)
    ref.fit(Z.double().numpy(), y.numpy())
    return ref.coef_, ref.intercept_


def test_hand_written_gradient_equals_autograd():
    Z, y = problem()
    weights = torch.randn(4, 30) * 0.3
    bias = torch.randn(4) * 0.1
    state = softmax_state(Z, y, weights, bias)
    w, b = weights.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(Z @ w.T + b, y)
    loss.backward()
    assert state.ce == pytest.approx(float(loss.detach()), rel=1e-6)
    torch.testing.assert_close(state.data_grad_weights, w.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state.grad_bias, b.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state.logits, (Z @ weights.T + bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preconditioned", [False, True])
def test_fit_softmax_reaches_the_converged_optimum(preconditioned):
    Z, y = problem()
    penalty = 1e-2
    start = softmax_state(Z, y, torch.zeros(4, 30), torch.zeros(4))
    covariance = DataCovariance(Z) if preconditioned else None
    state, iterations = fit_softmax(Z, y, start, penalty=penalty, max_iter=500, tol=1e-6, covariance=covariance)
    coef, intercept = reference(Z, y, penalty)
    assert iterations < 500
    # softmax is invariant to adding one vector to every class; the penalty pins W's class mean
    # to zero, the intercept's is free: compare centred over classes
    np.testing.assert_allclose(state.weights.numpy(), coef, atol=1e-4)
    np.testing.assert_allclose(state.bias.numpy() - state.bias.numpy().mean(), intercept - intercept.mean(), atol=5e-4)


def test_preconditioning_cuts_iterations_on_correlated_features():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 2000)
    factors = rng.normal(size=(2000, 6)) + np.eye(4, 6)[y] * 0.5  # 6 strong directions, 54 weak ones
    X = factors @ rng.normal(size=(6, 60)) + 0.2 * rng.normal(size=(2000, 60)) + 0.1 * np.eye(4, 60)[y]
    Z = torch.from_numpy(((X - X.mean(0)) / X.std(0)).astype(np.float32))
    y = torch.from_numpy(y)
    start = softmax_state(Z, y, torch.zeros(4, 60), torch.zeros(4))
    plain, plain_iterations = fit_softmax(Z, y, start, penalty=1e-4, max_iter=1000, tol=1e-6)
    preconditioned, iterations = fit_softmax(Z, y, start, penalty=1e-4, max_iter=1000, tol=1e-6,
                                             covariance=DataCovariance(Z))
    assert iterations * 5 < plain_iterations
    np.testing.assert_allclose(preconditioned.weights.numpy(), plain.weights.numpy(), atol=1e-3)


def test_bfloat16_data_solves_the_rounded_problem():
    Z, y = problem()
    low = Z.to(torch.bfloat16)
    start = softmax_state(low, y, torch.zeros(4, 30), torch.zeros(4))
    state, _ = fit_softmax(low, y, start, penalty=1e-2, max_iter=500, tol=1e-5, covariance=DataCovariance(low))
    coef, _ = reference(low.float(), y, 1e-2)
    np.testing.assert_allclose(state.weights.numpy(), coef, atol=5e-3)
    # the stored logits follow the iterates: they match a fresh product with the final weights
    torch.testing.assert_close(state.logits, low.float() @ state.weights.T + state.bias, atol=2e-2, rtol=1e-2)


def test_minimize_solves_a_quadratic_and_a_logistic_problem():
    rng = np.random.default_rng(0)
    M = rng.normal(size=(20, 20))
    A = torch.from_numpy(M @ M.T + np.eye(20))
    b = torch.from_numpy(rng.normal(size=20))
    x, evaluations = minimize(lambda x: (0.5 * x @ A @ x - b @ x, A @ x - b), torch.zeros(20, dtype=torch.float64),
                              tol=1e-10, max_iter=500)
    np.testing.assert_allclose(x.numpy(), np.linalg.solve(A.numpy(), b.numpy()), atol=1e-8)
    assert evaluations < 200

    Z, y = problem()
    onehot = torch.nn.functional.one_hot(y, 4).float()

    def loss_and_grad(flat):
        w, bias = flat[:120].view(4, 30), flat[120:]
        logits = Z @ w.T + bias
        log_norm = torch.logsumexp(logits, 1, keepdim=True)
        residual = ((logits - log_norm).exp() - onehot) / len(Z)
        loss = ((log_norm - logits) * onehot).sum() / len(Z) + 0.5 * 1e-2 * w.pow(2).sum()
        return loss, torch.cat([(residual.T @ Z + 1e-2 * w).reshape(-1), residual.sum(0)])

    flat, _ = minimize(loss_and_grad, torch.zeros(124), tol=1e-6, max_iter=1000)
    np.testing.assert_allclose(flat[:120].view(4, 30).numpy(), reference(Z, y, 1e-2)[0], atol=1e-4)


def test_lbfgs_memory_skips_pairs_without_positive_curvature():
    memory = LBFGSMemory(size=2)
    assert not memory.push(torch.ones(3), -torch.ones(3))
    for scale in (1.0, 2.0, 3.0):
        assert memory.push(torch.ones(3) * scale, torch.ones(3))
    assert len(memory.pairs) == 2
    assert float(torch.dot(memory.direction(torch.ones(3)), torch.ones(3))) < 0


def test_covariance_of_fewer_rows_than_features_still_decomposes():
    torch.manual_seed(0)
    data = torch.relu(torch.randn(200, 1280)).to(torch.bfloat16)  # rank <= 200: many zero eigenvalues
    cov = DataCovariance(data)
    assert cov.values.shape == (1280,) and torch.isfinite(cov.values).all() and (cov.values >= 0).all()
    second = data.float().T @ data.float() / 200
    rebuilt = cov.vectors @ torch.diag(cov.values) @ cov.vectors.T
    assert torch.allclose(rebuilt, second, atol=1e-3)


def test_memory_corrected_for_a_new_penalty_equals_one_measured_there():
    Z, y = problem()
    start = softmax_state(Z, y, torch.zeros(4, 30), torch.zeros(4))
    memory = LBFGSMemory()
    fit_softmax(Z, y, start, penalty=1e-1, max_iter=6, tol=0.0, memory=memory)
    assert memory.penalty == 1e-1 and len(memory.pairs) == 6
    measured = [(s.clone(), y_.clone()) for s, y_, _ in memory.pairs]
    memory.change_penalty(1e-3, n_penalised=120)
    for (s, corrected, rho), (_, at_old) in zip(memory.pairs, measured, strict=True):
        # the gradient change at penalty 1e-3 is the data part plus 1e-3 x the weights' step
        expected = at_old.clone()
        expected[:120] += (1e-3 - 1e-1) * s[:120]
        torch.testing.assert_close(corrected, expected)
        assert rho == pytest.approx(1 / float(torch.dot(s, expected)))
    assert memory.penalty == 1e-3


def test_carried_memory_reaches_the_next_penalty_in_fewer_iterations():
    Z, y = problem(n=1000, d=40)
    start = softmax_state(Z, y, torch.zeros(4, 40), torch.zeros(4))
    covariance = DataCovariance(Z)
    memory = LBFGSMemory()
    first, _ = fit_softmax(Z, y, start, penalty=1e-3, max_iter=500, tol=1e-6, covariance=covariance, memory=memory)
    carried, carried_iterations = fit_softmax(Z, y, first, penalty=1e-4, max_iter=500, tol=1e-6,
                                              covariance=covariance, memory=memory)
    fresh, fresh_iterations = fit_softmax(Z, y, first, penalty=1e-4, max_iter=500, tol=1e-6, covariance=covariance)
    assert carried_iterations * 1.3 < fresh_iterations  # 11 against 17 when written
    np.testing.assert_allclose(carried.weights.numpy(), reference(Z, y, 1e-4)[0], atol=5e-3)  # weights ~1 here
    np.testing.assert_allclose(fresh.weights.numpy(), carried.weights.numpy(), atol=5e-3)


def test_transposed_copy_gives_the_same_state():
    Z, y = problem()
    low = Z.to(torch.bfloat16)
    weights, bias = torch.randn(4, 30) * 0.3, torch.randn(4) * 0.1
    rows = softmax_state(low, y, weights, bias)
    columns = softmax_state(low, y, weights, bias, columns=low.T.contiguous())
    torch.testing.assert_close(columns.data_grad_weights, rows.data_grad_weights, atol=1e-4, rtol=1e-2)
    assert columns.ce == rows.ce
    state, _ = fit_softmax(low, y, rows, penalty=1e-2, max_iter=500, tol=1e-5, columns=low.T.contiguous())
    np.testing.assert_allclose(state.weights.numpy(), reference(low.float(), y, 1e-2)[0], atol=5e-3)
