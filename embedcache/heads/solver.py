"""Full-batch L-BFGS in plain torch, and a multinomial logistic regression solver built on it.

No ``torch.optim``: its first use imports ``torch._dynamo``, about 1.7 s per process, which is
more than a whole probe sweep should cost. Everything here is plain tensor code, so it runs on
any device the tensors live on.

- :class:`LBFGSMemory`: the two-loop recursion over the last few (step, gradient change) pairs.
- :func:`minimize`: L-BFGS with a backtracking line search for any smooth convex objective
  given as ``x -> (loss, gradient)``; used by the joint few-shot solver.
- :func:`fit_softmax`: L-BFGS for ``mean cross-entropy(Z W^T + b, y) + penalty/2 ||W||^2`` on a
  data matrix ``Z`` (float32 or bfloat16). Because the model is linear, the logits along a search
  direction are ``L + t * Z D^T``: one product with the data gives every trial step of the line
  search (safeguarded Newton on the step, strong Wolfe), which costs no further pass over ``Z``.
  An iteration reads the data exactly twice (that product, then the gradient ``G^T Z`` at the
  accepted point), and changing the penalty between fits of a path costs no pass at all (the
  logits and the data part of the gradient do not depend on it). The curvature memory carries
  over too: the penalty's share of each stored gradient change is known exactly and is corrected,
  so each later fit of a path starts with a Hessian model (measured at earlier iterates).
- :class:`DataCovariance`: a Kronecker preconditioner (class curvature x feature covariance),
  L-BFGS's initial inverse Hessian; it cuts the iterations on correlated features several-fold.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from embedcache.runtime import torch_threads

#: Strong Wolfe curvature constant of the softmax line search (the usual quasi-Newton value).
WOLFE_SLOPE = 0.9


class LBFGSMemory:
    """Curvature pairs (s, y) of the last ``size`` steps; ``direction(g)`` ~ -H^-1 g."""

    def __init__(self, size: int = 20, precondition: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.size = size
        self.precondition = precondition
        self.pairs: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        #: the L2 penalty the gradient changes were measured with (set by :func:`fit_softmax`)
        self.penalty: float | None = None

    def change_penalty(self, penalty: float, n_penalised: int) -> None:
        """Re-express the stored pairs for a new L2 penalty on the first ``n_penalised`` entries.

        The penalty's gradient is linear, so a gradient change measured at penalty ``a`` becomes
        the one at ``b`` by adding ``(b - a) * step`` on the penalised entries: exact, so a path
        of penalties keeps its curvature information from one fit to the next.
        """
        if self.penalty is not None and penalty != self.penalty and self.pairs:
            delta, measured, self.pairs = penalty - self.penalty, self.pairs, []
            for s, y, _ in measured:
                y = y.clone()
                y[:n_penalised].add_(s[:n_penalised], alpha=delta)
                self.push(s, y)  # kept when its curvature is still positive
        self.penalty = penalty

    def copy(self) -> LBFGSMemory:
        """A snapshot: later pushes and penalty changes of either do not affect the other (the
        stored tensors are never modified in place, so they are shared)."""
        twin = LBFGSMemory(self.size, self.precondition)
        twin.pairs, twin.penalty = list(self.pairs), self.penalty
        return twin

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


def times_data(data: torch.Tensor, weights: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """``data @ weights.T`` in float32, the product in the data's dtype (fp32 accumulation)."""
    with torch_threads(threads):
        return (data @ weights.to(data.dtype).T).float()


def _residual(logits: torch.Tensor, target: torch.Tensor,
              log_norm: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
    """Mean cross-entropy and ``G = (softmax - onehot) / n`` (``log_norm``: logsumexp of the rows, if known)."""
    n = logits.shape[0]
    if log_norm is None:
        log_norm = torch.logsumexp(logits, dim=1, keepdim=True)
    ce = float((log_norm - logits.gather(1, target[:, None])).sum(dtype=torch.float64)) / n
    residual = (logits - log_norm).exp_()
    residual.scatter_add_(1, target[:, None], residual.new_full((n, 1), -1.0))
    return ce, residual.div_(n)


def softmax_state(data: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor,
                  logits: torch.Tensor | None = None, log_norm: torch.Tensor | None = None,
                  threads: int | None = None, columns: torch.Tensor | None = None) -> SoftmaxState:
    """The state at (weights, bias): logits (one pass over ``data`` unless given) and gradient (one
    pass); ``threads``: intra-op threads for those passes (None: as set); ``columns``: optionally
    ``data`` transposed (features x rows, same values), which makes the gradient pass faster."""
    if logits is None:
        logits = (times_data(data, weights, threads) + bias if bool(weights.any())
                  else bias.expand(len(data), -1).clone())
    ce, residual = _residual(logits, target, log_norm)
    with torch_threads(threads):
        if columns is not None:
            data_grad = (columns @ residual.to(columns.dtype)).T.float()
        else:
            data_grad = (residual.T.to(data.dtype) @ data).float()
    return SoftmaxState(weights, bias, logits, ce, data_grad, residual.sum(dim=0))


def fit_softmax(data: torch.Tensor, target: torch.Tensor, state: SoftmaxState, *, penalty: float,
                max_iter: int, tol: float, history: int = 20,
                covariance: DataCovariance | None = None,
                memory: LBFGSMemory | None = None, columns: torch.Tensor | None = None) -> tuple[SoftmaxState, int]:
    """L-BFGS on ``mean CE(Z W^T + b, y) + penalty/2 ||W||^2`` from ``state``; returns (state, iterations).

    Stops after ``max_iter`` iterations, when ``max|grad| <= tol``, or when a line search can no
    longer decrease the loss at float32 resolution. Each iteration makes two passes over ``data``.
    With ``covariance`` (of ``data``'s rows), L-BFGS's initial inverse Hessian is the Kronecker
    preconditioner of :meth:`DataCovariance.preconditioner` at the current point.

    ``memory``: an :class:`LBFGSMemory` to continue (a previous fit of a penalty path; its pairs are
    corrected for the new penalty; pairs measured on fewer rows of the same data are a good
    approximation with positive curvature), else a fresh one of ``history`` pairs. It is updated
    in place. ``columns``: ``data`` transposed (features x rows), for a faster gradient pass.

    On a CPU only the two passes use the configured intra-op threads; everything else (line
    search, two-loop recursion, preconditioner) works on arrays of ``n x classes`` or smaller and
    runs on one thread, where threading costs more than it gains, and a lot more when another
    process holds a core.
    """
    if memory is None:
        memory = LBFGSMemory(history)
    memory.change_penalty(penalty, state.weights.numel())
    if data.device.type != "cpu":
        return _fit_softmax(data, target, state, penalty, max_iter, tol, covariance, memory, None, columns)
    wide = torch.get_num_threads()
    with torch_threads(1):
        return _fit_softmax(data, target, state, penalty, max_iter, tol, covariance, memory, wide, columns)


def _fit_softmax(data: torch.Tensor, target: torch.Tensor, state: SoftmaxState, penalty: float, max_iter: int,
                 tol: float, covariance: DataCovariance | None, memory: LBFGSMemory,
                 threads: int | None, columns: torch.Tensor | None) -> tuple[SoftmaxState, int]:
    n_classes, dim = state.weights.shape

    def gradient(st: SoftmaxState) -> torch.Tensor:
        return torch.cat([(st.data_grad_weights + penalty * st.weights).reshape(-1), st.grad_bias])

    grad = gradient(state)
    iterations = 0
    while iterations < max_iter and float(grad.abs().max()) > tol:
        # the class curvature moves as the fit sharpens: refresh it (and never keep a
        # preconditioner that a continued memory brought from another fit)
        memory.precondition = None if covariance is None else covariance.preconditioner(state.logits, penalty)
        direction = memory.direction(grad)
        if float(torch.dot(grad, direction)) >= 0:
            memory.pairs.clear()
            direction = -grad
        d_weights = direction[:-n_classes].reshape(n_classes, dim)
        if data.dtype != torch.float32:  # move along exactly the direction the data product sees
            d_weights = d_weights.to(data.dtype).float()
        d_bias = direction[-n_classes:]
        direction = torch.cat([d_weights.reshape(-1), d_bias])
        along = times_data(data, d_weights, threads) + d_bias  # logits(t) = logits + t * along
        iterations += 1
        found = _line_search(state, along, d_weights, target, penalty, slope=float(torch.dot(grad, direction)),
                             first=1.0 if memory.pairs or covariance else min(1.0, 1.0 / float(grad.abs().sum())))
        if found is None:
            break
        step, logits, log_norm = found
        new = softmax_state(data, target, state.weights + step * d_weights, state.bias + step * d_bias,
                            logits=logits, log_norm=log_norm, threads=threads, columns=columns)
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
        with torch_threads(1):
            try:
                values, vectors = torch.linalg.eigh(second_moment)
            except torch.linalg.LinAlgError:
                # Fewer rows than features (or duplicated features) can make float32 LAPACK give
                # up on the many zero eigenvalues; float64 with a tiny ridge always converges.
                exact = second_moment.double()
                exact.diagonal().add_(1e-9 * float(exact.diagonal().mean()) + 1e-12)
                values, vectors = torch.linalg.eigh(exact)
        self.values = values.clamp_min(0).float()
        self.vectors = vectors.float()

    def preconditioner(self, logits: torch.Tensor, penalty: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """``v -> (A kron C + penalty I)^-1 v`` on flat [weights, bias] vectors; the bias is treated
        as one more feature of second moment 1 (unpenalised)."""
        prob = torch.softmax(logits[:: max(1, len(logits) // 4096)].double(), dim=1)  # a sample is plenty
        class_curvature = (torch.diag(prob.mean(dim=0)) - prob.T @ prob / len(prob)).cpu().numpy()
        alpha, basis = np.linalg.eigh(class_curvature)  # classes x classes: numpy has less call overhead
        alpha = torch.from_numpy(alpha).float().clamp_min(0).to(logits.device)
        basis = torch.from_numpy(basis).float().to(logits.device)
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
                 penalty: float, slope: float, first: float,
                 max_trials: int = 20) -> tuple[float, torch.Tensor, torch.Tensor] | None:
    """A step t with |phi'(t)| <= WOLFE_SLOPE |phi'(0)| and a decrease (strong Wolfe), found by
    safeguarded Newton (exact phi'') on the convex 1-D function phi(t) = loss(state + t * direction),
    whose slope at 0 is ``slope``. Returns (t, logits at t, their row logsumexp).

    Every trial costs a few O(n * classes) operations on the stored logits, no pass over the
    data. Returns None when no step decreases the loss (converged to float32 resolution).
    """
    n = state.logits.shape[0]
    # penalty part, exactly quadratic in t: b t + c t^2 / 2 (plus a constant)
    pen_b = penalty * float((state.weights * d_weights).sum())
    pen_c = penalty * float((d_weights * d_weights).sum())
    pick = target[:, None]
    target_logits = float(state.logits.gather(1, pick).sum(dtype=torch.float64))
    target_along = float(along.gather(1, pick).sum(dtype=torch.float64))

    def phi(t: float) -> tuple[float, float, float, torch.Tensor, torch.Tensor]:
        logits = torch.add(state.logits, along, alpha=t)
        log_norm = torch.logsumexp(logits, dim=1, keepdim=True)
        weighted = (logits - log_norm).exp_().mul_(along)  # p * along
        first_moment = weighted.sum(dim=1)
        second_moment = weighted.mul_(along).sum(dim=1)
        sums = torch.stack([log_norm.sum(dtype=torch.float64), first_moment.sum(dtype=torch.float64),
                            second_moment.sum(dtype=torch.float64),
                            first_moment.double().dot(first_moment.double())]).tolist()
        ce = (sums[0] - target_logits - t * target_along) / n
        return (ce + pen_b * t + 0.5 * pen_c * t * t, (sums[1] - target_along) / n + pen_b + pen_c * t,
                (sums[2] - sums[3]) / n + pen_c, logits, log_norm)

    if slope >= 0:
        return None
    f0 = state.ce
    low, high = 0.0, float("inf")
    t = first
    for _ in range(max_trials):
        f, slope_t, curvature, logits, log_norm = phi(t)
        # phi is convex, so a non-positive slope already guarantees a decrease; the loss test
        # (at float32 resolution) only matters past the minimiser.
        if abs(slope_t) <= WOLFE_SLOPE * abs(slope) and (slope_t <= 0 or f <= f0 + 1e-4 * t * slope):
            return t, logits, log_norm
        if slope_t > 0 or not math.isfinite(f):  # past the minimiser (or overflow): shrink
            high = t
        else:
            low = t
        newton = t - slope_t / curvature if curvature > 0 else float("inf")
        if low < newton < high:
            t = newton
        elif high == float("inf"):
            t = 4.0 * t
        else:
            t = 0.5 * (low + high)
    if low == 0:
        return None
    _, _, _, logits, log_norm = phi(low)
    return low, logits, log_norm
