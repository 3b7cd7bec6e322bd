"""Tests for embedcache.heads.many: many small probe problems solved jointly."""

import numpy as np

from embedcache.heads.many import fit_many_torch
from embedcache.heads.torch_probe import TorchLinearProbe


def k_per_class(labels, k, seed):
    """k rows of every class, seeded (what few-shot draws)."""
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), size=k, replace=False)
                                   for c in np.unique(labels)]))


def test_joint_fewshot_solver_matches_one_probe_per_seed():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 16)).astype(np.float32) + np.repeat(np.eye(3, 16) * 2, 100, axis=0).astype(np.float32)
    labels = np.repeat(np.arange(3), 100)
    row_sets = [k_per_class(labels, 5, seed) for seed in range(3)]
    joint = fit_many_torch(features, labels, row_sets, penalty=0.1, tol=1e-7, max_iter=1000)
    for rows, (coef, intercept, classes) in zip(row_sets, joint, strict=True):
        single = TorchLinearProbe(penalty=0.1, tol=1e-7, max_iter=1000).fit(features[rows], labels[rows])
        np.testing.assert_allclose(coef, single.coef_, atol=2e-3)
        np.testing.assert_allclose(intercept, single.intercept_, atol=2e-3)
        assert list(classes) == list(single.classes_)
