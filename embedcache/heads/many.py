"""Many small softmax problems solved jointly: the seeds of a few-shot grid.

Each row set gets exactly :class:`~embedcache.heads.torch_probe.TorchLinearProbe`'s objective
(its own standardisation, mean cross-entropy + penalty/2 ||W||^2); the sum of the independent
problems is minimised by one L-BFGS (:func:`~embedcache.heads.solver.minimize`, gradient written
by hand), so every block reaches its own optimum while Python overhead is paid once, not once
per seed.
"""

from __future__ import annotations

import numpy as np
import torch

from embedcache.heads.solver import minimize


def fit_many_torch(features: np.ndarray, labels: np.ndarray, row_sets: list[np.ndarray], *,
                   penalty: float, max_iter: int = 200, tol: float = 1e-4
                   ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Fit one probe problem per row set, all at once (see the module docstring).

    Args:
        features: validated float32 features of every row.
        labels: labels of every row.
        row_sets: row positions of each problem; equal sizes and the same classes (k per class).
        penalty: the L2 penalty of every problem.
        max_iter: L-BFGS iterations at most; tol: gradient tolerance.

    Returns:
        ``[(coef_, intercept_, classes_)]`` on raw features, one per row set.
    """
    classes = np.unique(labels[row_sets[0]])
    X = torch.from_numpy(np.stack([features[rows] for rows in row_sets]))  # (S, n, D)
    target = torch.from_numpy(np.stack([np.searchsorted(classes, labels[rows]) for rows in row_sets]))
    std, mean = torch.std_mean(X, dim=1, keepdim=True, correction=0)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    Xs = (X - mean) / std
    n_sets, n, dim = X.shape
    n_classes = len(classes)
    onehot = torch.nn.functional.one_hot(target, n_classes).float()  # (S, n, C)
    split = n_sets * n_classes * dim

    def loss_and_grad(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, bias = flat[:split].view(n_sets, n_classes, dim), flat[split:].view(n_sets, n_classes)
        logits = torch.baddbmm(bias[:, None, :], Xs, weights.transpose(1, 2))  # (S, n, C)
        log_norm = torch.logsumexp(logits, dim=2, keepdim=True)
        loss = ((log_norm - logits) * onehot).sum() / n + 0.5 * penalty * weights.pow(2).sum()
        residual = ((logits - log_norm).exp() - onehot) / n  # d loss / d logits
        grad_weights = residual.transpose(1, 2) @ Xs + penalty * weights
        return loss, torch.cat([grad_weights.reshape(-1), residual.sum(dim=1).reshape(-1)])

    solution, _ = minimize(loss_and_grad, torch.zeros(split + n_sets * n_classes), max_iter=max_iter, tol=tol)
    weights = solution[:split].view(n_sets, n_classes, dim)
    bias = solution[split:].view(n_sets, n_classes)
    coef = weights / std
    intercept = bias - (coef * mean).sum(dim=-1)
    return [(coef[i].numpy(), intercept[i].numpy(), classes) for i in range(n_sets)]

