"""The probes pass scikit-learn's own estimator checks."""

from __future__ import annotations

from sklearn.utils.estimator_checks import parametrize_with_checks

from embedcache.heads.knn import KNNProbe
from embedcache.heads.ridge_probe import RidgeClassifierProbe, RidgeRegressor
from embedcache.heads.sklearn_probe import SklearnProbe
from embedcache.heads.torch_probe import TorchLinearProbe


@parametrize_with_checks([TorchLinearProbe(), SklearnProbe(), KNNProbe(k=3, data_dtype="float32"),
                          RidgeClassifierProbe(), RidgeRegressor()])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
