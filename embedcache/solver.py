"""Full-batch L-BFGS in plain torch, and a multinomial logistic regression solver built on it.

No ``torch.optim``: its first use imports ``torch._dynamo``, about 1.7 s per process, which is
more than a whole probe sweep should cost. Everything here is plain tensor code, so it runs on
any device the tensors live on.

- :class:`LBFGSMemory`: the two-loop recursion over the last few (step, gradient change) pairs.
- :func:`minimize`: L-BFGS with a backtracking (Armijo) line search for any smooth objective
  given as ``x -> (loss, gradient)``; used by the joint few-shot solver.
- :func:`fit_softmax`: L-BFGS for ``mean cross-entropy(Z W^T + b, y) + penalty/2 ||W||^2`` on a
  data matrix ``Z`` (float32 or bfloat16). Because the model is linear, the logits along a search
  direction are ``L + t * Z D^T``: one product with the data gives every trial step of the line
  search, which is therefore exact-ish and costs no further pass over ``Z``. An iteration reads
  the data exactly twice (that product, then the gradient ``G^T Z`` at the accepted point), and
  changing the penalty between fits of a path costs no pass at all (the logits and the data part
  of the gradient do not depend on it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


class LBFGSMemory:
    """Curvature pairs (s, y) of the last ``size`` steps; ``direction(g)`` ~ -H^-1 g."""

    def __init__(self, size: int = 20, precondition: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.size = size
        self.precondition = precondition
        self.pairs: list[tuple[torch.Tensor, torch.Tensor, float]] = []

    def push(self, step: torch.Tensor, grad_change: torch.Tensor) -> bool:
        """Store a pair when its curvature s.y is positive (always, for a convex objective)."""
        curvature = float(torch.dot(step, grad_change))
        if curvature <= 1e-10 * float(torch.dot(grad_change, grad_change)) or curvature <= 0:
            return False
        self.pairs.append((step, grad_change, 1.0 / curvature))
        if len(self.pairs) > self.size:
            self.pairs.pop(0)
        return True

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        """The two-loop recursion, with the usual initial scaling s.y / y.y."""
        q = grad.clone()
        alphas = []
        for s, y, rho in reversed(self.pairs):
            alpha = rho * float(torch.dot(s, q))
            q.add_(y, alpha=-alpha)
            alphas.append(alpha)
        if self.precondition is not None:  # initial inverse Hessian: gamma * P, gamma = s.y / y.P(y)
            if self.pairs:
                s, y, rho = self.pairs[-1]
                q = self.precondition(q).mul_(1.0 / (rho * float(torch.dot(y, self.precondition(y)))))
            else:
                q = self.precondition(q)
        elif self.pairs:
            s, y, rho = self.pairs[-1]
            q.mul_(1.0 / (rho * float(torch.dot(y, y))))
        for (s, y, rho), alpha in zip(self.pairs, reversed(alphas), strict=True):
            beta = rho * float(torch.dot(y, q))
            q.add_(s, alpha=alpha - beta)
        return q.neg_()


def minimize(fun: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], x0: torch.Tensor, *,
             max_iter: int = 200, tol: float = 1e-4, history: int = 20) -> tuple[torch.Tensor, int]:
    """L-BFGS from ``x0`` (a flat tensor) for a convex objective ``x -> (loss, gradient)``; stops
    when ``max|grad| <= tol``. Returns (x, evaluations).

    The line search starts from the unit step (the first step is scaled to length ~1) and takes a
    trial step when the loss decreases enough (Armijo) or, once loss differences drown in rounding,
    when the slope along the direction is still non-positive (for a convex function that implies
    a decrease); otherwise it shrinks the step to the secant root of the slope.
    """
    x = x0.clone()
    loss, grad = fun(x)
    evaluations = 1
    memory = LBFGSMemory(history)
    for _ in range(max_iter):
        if float(grad.abs().max()) <= tol:
            break
        direction = memory.direction(grad)
        slope = float(torch.dot(grad, direction))
        if slope >= 0:  # not a descent direction (cannot happen with positive curvature pairs)
            memory.pairs.clear()
            direction, slope = -grad, -float(torch.dot(grad, grad))
        step = 1.0 if memory.pairs else min(1.0, 1.0 / float(grad.abs().sum()))
        for _ in range(30):
            trial = x + step * direction
            new_loss, new_grad = fun(trial)
            evaluations += 1
            new_slope = float(torch.dot(new_grad, direction))
            if math.isfinite(float(new_loss)) and (float(new_loss) <= float(loss) + 1e-4 * step * slope
                                                  or new_slope <= 0):
                break
            shrink = -slope / (new_slope - slope) if math.isfinite(new_slope) else 0.1
            step *= min(max(shrink, 0.1), 0.5)
        else:
            break  # no step along the direction helps: converged to floating-point resolution
        memory.push(trial - x, new_grad - grad)
        x, loss, grad = trial, new_loss, new_grad
    return x, evaluations


@dataclass
class SoftmaxState:
    """A point of the softmax problem with what the next iteration needs, all float32.

    ``logits = Z W^T + b`` on the rows of the fit; ``data_grad_weights = G^T Z`` and
    ``grad_bias = G.sum(0)`` with ``G = (softmax(logits) - onehot(y)) / n`` (the penalty part of
    the gradient is added separately, so the state is valid for any penalty).
    """

    weights: torch.Tensor
    bias: torch.Tensor
    logits: torch.Tensor
    ce: float
    data_grad_weights: torch.Tensor
    grad_bias: torch.Tensor


def times_data(data: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``data @ weights.T`` in float32, the product in the data's dtype (fp32 accumulation)."""
    return (data @ weights.to(data.dtype).T).float()


def _residual(logits: torch.Tensor, target: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean cross-entropy and ``G = (softmax - onehot) / n``."""
    n = logits.shape[0]
    log_norm = torch.logsumexp(logits, dim=1, keepdim=True)
    ce = float((log_norm - logits.gather(1, target[:, None])).sum() / n)
    residual = (logits - log_norm).exp_()
    residual.scatter_add_(1, target[:, None], torch.full_like(residual[:, :1], -1.0))
    return ce, residual.div_(n)


def softmax_state(data: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor,
                  logits: torch.Tensor | None = None) -> SoftmaxState:
    """The state at (weights, bias): logits (one pass over ``data`` unless given) and gradient (one pass)."""
    if logits is None:
        logits = times_data(data, weights) + bias if bool(weights.any()) else bias.expand(len(data), -1).clone()
    ce, residual = _residual(logits, target)
    data_grad = (residual.T.to(data.dtype) @ data).float()
    return SoftmaxState(weights, bias, logits, ce, data_grad, residual.sum(dim=0))


def fit_softmax(data: torch.Tensor, target: torch.Tensor, state: SoftmaxState, *, penalty: float,
                max_iter: int, tol: float, history: int = 20,
                covariance: DataCovariance | None = None) -> tuple[SoftmaxState, int]:
    """L-BFGS on ``mean CE(Z W^T + b, y) + penalty/2 ||W||^2`` from ``state``; returns (state, iterations).

    Stops after ``max_iter`` iterations, when ``max|grad| <= tol``, or when a line search can no
    longer decrease the loss at float32 resolution. Each iteration makes two passes over ``data``.
    With ``covariance`` (of ``data``'s rows), L-BFGS's initial inverse Hessian is the Kronecker
    preconditioner of :meth:`DataCovariance.preconditioner` at the current point.
    """
    n_classes, dim = state.weights.shape
    memory = LBFGSMemory(history)

    def gradient(st: SoftmaxState) -> torch.Tensor:
        return torch.cat([(st.data_grad_weights + penalty * st.weights).reshape(-1), st.grad_bias])

    grad = gradient(state)
    iterations = 0
    while iterations < max_iter and float(grad.abs().max()) > tol:
        if covariance is not None:  # the class curvature moves as the fit sharpens: refresh it
            memory.precondition = covariance.preconditioner(state.logits, penalty)
        direction = memory.direction(grad)
        if float(torch.dot(grad, direction)) >= 0:
            memory.pairs.clear()
            direction = -grad
        d_weights = direction[:-n_classes].reshape(n_classes, dim)
        if data.dtype != torch.float32:  # move along exactly the direction the data product sees
            d_weights = d_weights.to(data.dtype).float()
        d_bias = direction[-n_classes:]
        direction = torch.cat([d_weights.reshape(-1), d_bias])
        along = times_data(data, d_weights) + d_bias  # logits(t) = logits + t * along
        iterations += 1
        step = _line_search(state, along, d_weights, target, penalty,
                            first=1.0 if memory.pairs or covariance else min(1.0, 1.0 / float(grad.abs().sum())))
        if step is None:
            break
        weights = state.weights + step * d_weights
        bias = state.bias + step * d_bias
        new = softmax_state(data, target, weights, bias, logits=state.logits + step * along)
        new_grad = gradient(new)
        memory.push(step * direction, new_grad - grad)
        state, grad = new, new_grad
    return state, iterations


class DataCovariance:
    """Eigendecomposition of the data's second-moment matrix ``Z^T Z / n``, estimated on a
    strided sample of at most ``max_rows`` rows (a preconditioner need not be exact).

    The Hessian of the softmax loss is ``mean_i (diag(p_i) - p_i p_i^T) kron z_i z_i^T + penalty I``
    (for the weights); :meth:`preconditioner` inverts its Kronecker approximation
    ``A kron C + penalty I`` with ``A`` the mean class curvature at the current point and ``C``
    this matrix. Both factors are diagonalised, so applying it costs two (classes x dim x dim)
    products. The eigendecomposition runs on one thread: at this size LAPACK gains little from
    more, and loses a lot when another process holds a core.
    """

    def __init__(self, data: torch.Tensor, max_rows: int = 4096) -> None:
        sample = data[:: max(1, len(data) // max_rows)].float()
        second_moment = (sample.T @ sample).div_(len(sample))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            values, vectors = torch.linalg.eigh(second_moment)
        finally:
            torch.set_num_threads(threads)
        self.values = values.clamp_min(0).float()
        self.vectors = vectors.float()

    def preconditioner(self, logits: torch.Tensor, penalty: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """``v -> (A kron C + penalty I)^-1 v`` on flat [weights, bias] vectors; the bias is treated
        as one more feature of second moment 1 (unpenalised)."""
        prob = torch.softmax(logits[:: max(1, len(logits) // 4096)].double(), dim=1)  # a sample is plenty
        class_curvature = torch.diag(prob.mean(dim=0)) - prob.T @ prob / len(prob)
        alpha, basis = torch.linalg.eigh(class_curvature)
        alpha, basis = alpha.clamp_min(0).float(), basis.float()
        n_classes, vectors = len(alpha), self.vectors
        denominator = alpha[:, None] * torch.cat([self.values, self.values.new_ones(1)]) + penalty
        inverse = 1.0 / denominator.clamp_min(1e-6 * float(denominator.max()) + 1e-12)
        inverse_weights, inverse_bias = inverse[:, :-1], inverse[:, -1]

        def apply(v: torch.Tensor) -> torch.Tensor:
            weights = v[:-n_classes].reshape(n_classes, -1)
            weights = basis @ ((basis.T @ weights @ vectors) * inverse_weights) @ vectors.T
            bias = basis @ ((basis.T @ v[-n_classes:]) * inverse_bias)
            return torch.cat([weights.reshape(-1), bias])

        return apply


def _line_search(state: SoftmaxState, along: torch.Tensor, d_weights: torch.Tensor, target: torch.Tensor,
                 penalty: float, first: float, max_trials: int = 20) -> float | None:
    """A step t with |phi'(t)| <= 0.25 |phi'(0)| and a decrease (strong Wolfe), found by
    safeguarded Newton (exact phi'') on the convex 1-D function phi(t) = loss(state + t * direction).

    Every trial costs O(n * classes) on the stored logits, no pass over the data. Returns None
    when no step decreases the loss (converged to float32 resolution).
    """
    n = state.logits.shape[0]
    # penalty part, exactly quadratic in t: a + b t + c t^2 / 2
    pen_b = penalty * float((state.weights * d_weights).sum())
    pen_c = penalty * float((d_weights * d_weights).sum())
    along_target = along.gather(1, target[:, None])

    def phi(t: float) -> tuple[float, float, float]:
        logits = state.logits + t * along
        log_norm = torch.logsumexp(logits, dim=1, keepdim=True)
        prob = (logits - log_norm).exp_()
        ce = float((log_norm - logits.gather(1, target[:, None])).sum() / n)
        mean_along = (prob * along).sum(dim=1, keepdim=True)
        slope = float((mean_along - along_target).sum() / n)
        curvature = float(((prob * along * along).sum(dim=1, keepdim=True) - mean_along ** 2).sum() / n)
        return ce + pen_b * t + 0.5 * pen_c * t * t, slope + pen_b + pen_c * t, curvature + pen_c

    f0, slope0, _ = phi(0.0)
    if slope0 >= 0:
        return None
    low, high = 0.0, float("inf")
    t = first
    for _ in range(max_trials):
        f, slope, curvature = phi(t)
        # phi is convex, so a non-positive slope already guarantees a decrease; the loss test
        # (at float32 resolution) only matters past the minimiser.
        if abs(slope) <= 0.25 * abs(slope0) and (slope <= 0 or f <= f0 + 1e-4 * t * slope0):
            return t
        if slope > 0 or not math.isfinite(f):  # past the minimiser (or overflow): shrink
            high = t
        else:
            low = t
        newton = t - slope / curvature if curvature > 0 else float("inf")
        if low < newton < high:
            t = newton
        elif high == float("inf"):
            t = 4.0 * t
        else:
            t = 0.5 * (low + high)
    return low if low > 0 else None
