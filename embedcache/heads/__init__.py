"""Heads: estimators and solvers that train on feature matrices (no images, no cache files).

- :mod:`~embedcache.heads.solver`: full-batch L-BFGS in plain torch and the softmax solver.
- :mod:`~embedcache.heads.path`: one softmax problem prepared once and solved along a path of
  penalties, warm (what sweeps use).
- :mod:`~embedcache.heads.many`: many small problems solved jointly (few-shot seeds).
- :mod:`~embedcache.heads.torch_probe`, :mod:`~embedcache.heads.sklearn_probe`: the two
  scikit-learn estimators; :mod:`~embedcache.heads.linear` what they share.
- :mod:`~embedcache.heads.sweep`: the penalty sweep scored on validation rows, and the refit.
- :mod:`~embedcache.heads.knn`: the cosine k-NN probe (blocked top-k search, votes, k on val).
- :mod:`~embedcache.heads.ridge`: ridge statistics accumulated in row blocks and the closed-form
  path (one eigendecomposition, every penalty); :mod:`~embedcache.heads.ridge_probe` the ridge
  classifier and regressor and the ridge sweep.
- :mod:`~embedcache.heads.multilabel`: one sigmoid per class for label sets, and its sweep.
- :mod:`~embedcache.heads.selection`: a value chosen on validation rows (k, penalty) and its table.
- :mod:`~embedcache.heads.registry`: head names to estimators, and which heads fit which targets.
- :mod:`~embedcache.heads.validation`: named checks of feature matrices and labels.
- :mod:`~embedcache.heads.metrics`: classification metrics; :mod:`~embedcache.heads.target_metrics`
  regression (MAE, RMSE, R²) and multi-label (mAP, micro/macro-F1) metrics.
"""
