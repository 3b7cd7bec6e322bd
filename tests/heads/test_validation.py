"""Tests for embedcache.heads.validation: the named checks of feature matrices and labels."""

import numpy as np
import pytest

from embedcache.errors import ConfigError
from embedcache.heads.validation import check_features, check_labels


@pytest.mark.parametrize(
    "X, y, match",
    [
        (np.zeros((4, 3, 2)), [0, 1, 0, 1], "2-D array"),
        (np.array([[np.nan, 1.0], [0.0, 1.0]]), [0, 1], "NaN or infinite values in 1 rows"),
        (np.zeros((0, 3)), [], "no rows"),
        (np.ones((4, 3)), [1, 1, 1, 1], "at least 2 classes"),
        (np.ones((4, 3)), [0, 1], "2 labels for 4 rows"),
    ],
)
def test_malformed_input_is_named(X, y, match):
    with pytest.raises(ConfigError, match=match):
        check_labels(y, len(check_features(X)))


def test_wrong_dims_at_predict_time():
    with pytest.raises(ConfigError, match="has 5 features but the probe was fitted on 20"):
        check_features(np.zeros((2, 5)), n_features=20)
