"""Tests for embedcache.experiments.protocol: the split for a probe, validation input named, no
fit on test, the data prepared once, and results that keep no training matrices."""

import numpy as np
import pytest
import torch

from embedcache.errors import ConfigError
from embedcache.experiments.protocol import probe_arrays, split_for_probe
from embedcache.heads import path as path_module
from tests.heads.helpers import blobs


def test_split_for_probe_never_mixes_sets():
    labels = np.repeat(np.arange(3), 20)
    splits = np.array([0] * 45 + [2] * 15)
    rng = np.random.default_rng(0)
    rng.shuffle(splits)
    labels[0] = -1
    parts = split_for_probe(labels, splits, np.array([f"r{i}" for i in range(60)]), val_fraction=0.2, seed=3)
    train, val, test = (set(rows.tolist()) for rows in (parts.train, parts.val, parts.test))
    assert not (train & val or train & test or val & test)
    assert test == set(np.flatnonzero(splits == 2).tolist()) - {0}
    assert 0 not in train | val | test
    assert (parts.val_fraction, parts.seed) == (0.2, 3) and parts.val_source.startswith("hold-out")
    again = split_for_probe(labels, splits, np.array([f"r{i}" for i in range(60)]), val_fraction=0.2, seed=3)
    assert np.array_equal(again.val, parts.val)


@pytest.mark.parametrize(
    "X, y, splits, match",
    [
        (np.zeros((4, 3, 2)), [0, 1, 0, 1], [0, 0, 1, 2], "2-D array"),
        (np.array([[np.nan, 1.0], [0.0, 1.0]]), [0, 1], [0, 2], "NaN or infinite values in 1 rows"),
        (np.zeros((0, 3)), [], [], "no rows"),
        (np.ones((4, 3)), [1, 1, 1, 1], [0, 0, 1, 2], "at least 2 classes"),
    ],
)
def test_malformed_input_is_named(X, y, splits, match):
    with pytest.raises(ConfigError, match=match):
        probe_arrays(X, np.array(y), np.array(splits, np.uint8), np.arange(len(y)).astype(str))


def test_probe_arrays_never_fits_on_test(monkeypatch):
    X, y = blobs(n=200)
    splits = np.array([0] * 150 + [2] * 50)
    seen = []
    original = path_module.SoftmaxPath.__init__

    def spy(self, Xf, yf, **kwargs):  # every torch fit (sweep, refit, fixed penalty) prepares its rows here
        seen.append(np.array(Xf, copy=True))
        original(self, Xf, yf, **kwargs)

    monkeypatch.setattr(path_module.SoftmaxPath, "__init__", spy)
    probe_arrays(X, y, splits, np.arange(200).astype(str))
    probe_arrays(X, y, splits, np.arange(200).astype(str), penalty=1e-3)
    test_rows = {row.tobytes() for row in X[150:]}
    assert len(seen) == 2 and all(not ({row.tobytes() for row in Xf} & test_rows) for Xf in seen)


def test_empty_test_split_is_refused():
    X, y = blobs(n=50)
    with pytest.raises(ConfigError, match="test split has no labelled rows"):
        probe_arrays(X, y, np.zeros(50, np.uint8), np.arange(50).astype(str))


def test_probe_on_separate_float64_features_prepares_the_data_once(monkeypatch):
    built = []
    original = path_module.standardised_matrix
    monkeypatch.setattr(path_module, "standardised_matrix", lambda *a, **k: built.append(1) or original(*a, **k))
    X, y = blobs(n=600, d=40, k=4, seed=2, sep=0.7)
    splits = np.array([0] * 450 + [2] * 150, np.uint8)
    probe_arrays(X.astype(np.float64), y, splits, np.arange(600).astype(str), penalties=[1e-1, 1e-2, 1e-3])
    assert len(built) == 1


def _holds_training_matrices(obj, n_values):
    for value in vars(obj).values():
        if isinstance(value, (torch.Tensor, path_module.SoftmaxPath)):
            return True
        if isinstance(value, np.ndarray) and value.size >= n_values:
            return True
    return False


def test_probe_result_does_not_keep_the_training_matrices():
    X, y = blobs(n=200)
    result = probe_arrays(X, y, np.array([0] * 150 + [2] * 50), np.arange(200).astype(str))
    assert not _holds_training_matrices(result.estimator, X[:150].size)
    np.testing.assert_array_equal(result.estimator.predict(X[150:]), result.estimator.predict(X[150:].copy()))
    result.estimator.fit(X[:150], y[:150])  # a later fit prepares the data again, and keeps none of it
    assert not _holds_training_matrices(result.estimator, X[:150].size)
