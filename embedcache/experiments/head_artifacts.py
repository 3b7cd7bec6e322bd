"""Probe directories of the k-NN, ridge and sklearn heads and of numeric targets and label sets;
no pickle.

:mod:`~embedcache.experiments.artifacts` hands these heads here (``save_probe`` / ``load_probe``;
the torch head keeps its own writer there, and sklearn probes saved by earlier versions as
``probe.joblib`` still load there).
A directory holds:

* ``probe.safetensors``: the numbers. Ridge, sklearn and sigmoid heads: ``coef``, ``intercept``,
  ``mean``, ``scale`` (+ ``classes`` for class labels). k-NN: no copy of the reference features, only
  ``reference_rows`` (their row indices in the cache entry), ``reference_labels`` and ``classes``.
* ``probe.json``: the linear heads' metadata (backbone, preprocessing, cache key, metrics,
  versions...) plus ``task``, ``chosen`` (k and temperature, penalty, threshold), ``target_names``,
  and for k-NN ``references`` (the cache entry holding the features, by key and absolute path).
* ``report.json`` (and ``confusion.png`` for class labels, when matplotlib is installed).

The directory is written and checked as a unit by :mod:`~embedcache.experiments.probe_files`
(staged files renamed into place, probe.json last, with the sha256 and size of every file and
the tensor shapes, all checked on loading).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from embedcache.errors import CacheError, ConfigError
from embedcache.experiments.probe_files import (
    ARTIFACT_VERSION,
    FILES_KEY,
    check_probe_files,
    load_tensors,
    write_probe_dir,
)
from embedcache.experiments.reports import confusion_png
from embedcache.heads.knn import KNNProbe
from embedcache.heads.multilabel import SigmoidProbe
from embedcache.heads.ridge_probe import RidgeClassifierProbe, RidgeRegressor
from embedcache.heads.sklearn_probe import SklearnProbe
from embedcache.store.feature_sets import DEFAULT_SET, SELECTED_SET
from embedcache.store.fingerprint import software_versions
from embedcache.store.reader import FeatureStore
from embedcache.store.schema import default_cache_dir, entry_paths

#: Class heads whose artifacts are written here (the torch head keeps artifacts.py's writer).
OWN_HEADS = ("knn", "ridge", "sklearn")


def handles(result: Any) -> bool:
    """Whether a :class:`~embedcache.experiments.protocol.ProbeResult` is saved by this module."""
    return result.task != "classes" or result.head in OWN_HEADS


def handles_meta(meta: dict[str, Any]) -> bool:
    """Whether a probe.json is loaded by this module (not an older sklearn probe.joblib)."""
    head, files = meta.get("head"), meta.get(FILES_KEY) or {}
    return meta.get("task", "classes") != "classes" or head in ("knn", "ridge") or (
        head == "sklearn" and "probe.safetensors" in files)


def _metadata(result: Any, store: Any) -> dict[str, Any]:
    est = result.estimator
    meta = {
        "artifact_version": ARTIFACT_VERSION, "head": result.head, "task": result.task,
        "penalty": result.penalty, "chosen": result.chosen, "n_features": int(est.n_features_in_),
        "class_names": list(store.class_names), "target_names": list(result.target_names),
        "cache_key": store.cache_key, "cache_path": str(Path(store.path).resolve()), "backbone": store.backbone,
        "feature_set": store.attrs.get(SELECTED_SET, DEFAULT_SET), "preprocess": store.attrs.get("preprocess"),
        "precision": store.attrs.get("precision"), "runtime": store.attrs.get("runtime", "torch"),
        "metrics": {k: v for k, v in result.metrics.items() if k != "confusion_matrix"},
        "val_fraction": result.val_fraction, "seed": result.seed, "versions": software_versions(),
    }
    if hasattr(est, "standardize"):
        meta["standardize"] = bool(est.standardize)
    if result.task == "classes":
        meta["classes"] = [int(c) for c in est.classes_]
    return meta


def _tensors(result: Any, store: Any, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    est = result.estimator
    if result.head == "knn":
        positions = np.asarray(result.reference_positions, np.int64)
        meta["references"] = {"cache_key": store.cache_key, "cache_path": str(Path(store.path).resolve()),
                              "n": int(len(positions)), "rows": "probe.safetensors: reference_rows",
                              "feature_set": store.attrs.get(SELECTED_SET, DEFAULT_SET)}
        rows, labels = _rows_and_labels(store)
        return {"reference_rows": rows[positions], "reference_labels": labels[positions],
                "classes": np.asarray(est.classes_, np.int64)}
    tensors = {"coef": np.asarray(est.coef_, np.float32).reshape(-1, int(est.n_features_in_)),
               "intercept": np.asarray(est.intercept_, np.float32).reshape(-1),
               "mean": np.asarray(est.mean_, np.float32), "scale": np.asarray(est.scale_, np.float32)}
    if result.task == "classes":
        tensors["classes"] = np.asarray(est.classes_, np.int64)
    return tensors


def _rows_and_labels(store: FeatureStore) -> tuple[np.ndarray, np.ndarray]:
    """File rows and labels of every position a probe can use: the images, then their views
    (``extract --views``: a view's label is its image's)."""
    rows, labels = np.asarray(store.rows, np.int64), np.asarray(store.labels, np.int64)
    if store.views is None:
        return rows, labels
    return np.concatenate([rows, store.views.rows]), np.concatenate([labels, labels[store.views.origin]])


def save_head_probe(result: Any, store: Any, out: Path) -> Path:
    """Write the directory described in the module docstring for ``result`` trained on ``store``."""
    meta = _metadata(result, store)
    tensors = _tensors(result, store, meta)
    picture = None
    if result.task == "classes":
        picture = confusion_png(result.metrics, title=f"{store.backbone.get('name')} + {result.head} probe: "
                                                      f"test top-1 {result.metrics['top1']:.3f}")
    write_probe_dir(out, meta, {**result.to_dict(), "probe": meta}, tensors=tensors,
                    pictures={"confusion.png": picture})
    return out


def _read_tensors(directory: Path, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    path = directory / "probe.safetensors"
    if "probe.safetensors" not in (meta.get(FILES_KEY) or {}):
        raise ConfigError(f"{str(directory / 'probe.json')!r} does not list probe.safetensors; the probe "
                          f"directory is incomplete or was edited. Re-run `embedcache probe ... --out`.")
    check_probe_files(directory, meta)
    return load_tensors(path, meta)


def _reference_store(meta: dict[str, Any]) -> FeatureStore:
    """The cache entry holding a k-NN probe's references: at its recorded path, else under the
    default cache directory by key; its key must be the recorded one."""
    refs = meta.get("references") or {}
    key = refs.get("cache_key", "")
    candidates = [Path(refs.get("cache_path", "")), entry_paths(default_cache_dir(), key)[0] if key else None]
    path = next((p for p in candidates if p is not None and p.is_file()), None)
    if path is None:
        raise CacheError(f"This k-NN probe's reference features are cache entry {key[:16]} at "
                         f"{refs.get('cache_path')!r}, which no longer exists. Re-extract the same data "
                         f"with the same backbone (the key is the same) or restore the entry.")
    store = FeatureStore.open(path)
    if store.cache_key != key:
        raise CacheError(f"{str(path)!r} holds cache entry {store.cache_key[:16]}, not this k-NN probe's "
                         f"references ({key[:16]}); restore the original entry.")
    return store


def _knn(meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> KNNProbe:
    store = _reference_store(meta)
    rows, labels = tensors["reference_rows"], tensors["reference_labels"]
    held_rows, held_labels = _rows_and_labels(store)  # ascending: every view row follows the images' rows
    positions = np.searchsorted(held_rows, rows)
    found = (positions < len(held_rows)) & (held_rows[np.minimum(positions, len(held_rows) - 1)] == rows)
    if not found.all() or not np.array_equal(held_labels[positions], labels):
        raise CacheError(f"Cache entry {str(store.path)!r} does not hold this k-NN probe's reference rows "
                         f"and labels; restore the original entry or retrain the probe.")
    chosen = meta.get("chosen", {})
    feature_set = (meta.get("references") or {}).get("feature_set")
    references = store.select_features(feature_set)
    if store.views is not None:
        references = np.concatenate([references, store.views.select_features(feature_set)])
    return KNNProbe.from_references(references=references[positions], labels=labels, classes=tensors["classes"],
                                    k=int(chosen["k"]), temperature=float(chosen["temperature"]))


def load_head(meta: dict[str, Any], directory: Path) -> Any:
    """The fitted estimator of a probe directory written by :func:`save_head_probe`."""
    tensors = _read_tensors(directory, meta)
    task, head = meta.get("task", "classes"), meta.get("head")
    if head == "knn" and task == "classes":
        return _knn(meta, tensors)
    linear = {"coef": tensors["coef"], "intercept": tensors["intercept"], "mean": tensors["mean"],
              "scale": tensors["scale"], "penalty": meta["penalty"], "standardize": meta.get("standardize", True)}
    if head == "ridge" and task == "classes":
        return RidgeClassifierProbe.from_coefficients(classes=tensors["classes"], **linear)
    if head == "sklearn" and task == "classes":
        return SklearnProbe.from_coefficients(classes=tensors["classes"], **linear)
    if head == "ridge" and task == "regression":
        return RidgeRegressor.from_coefficients(**linear)
    if head == "torch" and task == "multilabel":
        return SigmoidProbe.from_coefficients(threshold=float(meta["chosen"]["threshold"]), **linear)
    raise ConfigError(f"{directory / 'probe.json'} names head {head!r} for task {task!r}, which this "
                      f"embedcache cannot load.")
