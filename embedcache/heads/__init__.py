"""Heads: estimators and solvers that train on feature matrices (no images, no cache files).

- :mod:`~embedcache.heads.solver`: full-batch L-BFGS in plain torch and the softmax solver.
- :mod:`~embedcache.heads.path`: one softmax problem prepared once and solved along a path of
  penalties, warm (what sweeps use).
- :mod:`~embedcache.heads.many`: many small problems solved jointly (few-shot seeds).
- :mod:`~embedcache.heads.torch_probe`, :mod:`~embedcache.heads.sklearn_probe`: the two
  scikit-learn estimators; :mod:`~embedcache.heads.linear` what they share.
- :mod:`~embedcache.heads.sweep`: the penalty sweep scored on validation rows, and the refit.
- :mod:`~embedcache.heads.registry`: head names to estimators.
- :mod:`~embedcache.heads.validation`: named checks of feature matrices and labels.
- :mod:`~embedcache.heads.metrics`: classification metrics.
"""
