"""Probe artifacts on disk and loading them back (the files' integrity: :mod:`.probe_files`).

A probe directory holds:

* ``probe.safetensors`` (torch head: coef, intercept, classes, mean, scale; no pickle) or
  ``probe.joblib`` (sklearn head; joblib is pickle: load only files you trust),
* ``probe.json``, written last: head, classes and class names, penalty, standardisation, cache
  key and absolute path, backbone spec, preprocessing, precision, metrics, versions, the
  validation hold-out, and the sha256 and size of every other file (checked on load),
* ``report.json`` (the full probe report) and ``confusion.png`` when matplotlib is installed,
* for a fine-tuned model (``embedcache finetune``): ``backbone.safetensors``, the fine-tuned
  backbone weights, named by ``weights_file`` in probe.json and used by ``predict`` automatically.

``predict`` needs only this directory: it rebuilds the backbone from the metadata.

The k-NN, ridge and sklearn heads and probes of numeric targets or label sets are written and
read by :mod:`~embedcache.experiments.head_artifacts` (safetensors, no pickle); ``probe.joblib``
is what earlier versions wrote for the sklearn head, and still loads here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedcache.errors import ConfigError, WeightsError
from embedcache.experiments import head_artifacts
from embedcache.experiments.probe_files import (
    ARTIFACT_VERSION,
    check_probe_files,
    load_tensors,
    read_meta,
    record_file,
    write_probe_dir,
)
from embedcache.experiments.reports import confusion_png
from embedcache.fileio import atomic_write
from embedcache.heads.sklearn_probe import SklearnProbe
from embedcache.heads.torch_probe import TorchLinearProbe
from embedcache.models.build import get_backbone
from embedcache.models.preprocess import PreprocessSpec
from embedcache.store.feature_sets import DEFAULT_SET, SELECTED_SET
from embedcache.store.fingerprint import software_versions

_COMPARED = ("name", "weights", "weights_sha256", "layer", "pool")


def save_probe(result: Any, store: Any, out: Path) -> Path:
    """Write the artifact for a :class:`~embedcache.experiments.protocol.ProbeResult` trained on
    ``store``.

    Files are written to temporary names and moved into place, so a crash never leaves a
    half-written probe behind.
    """
    if head_artifacts.handles(result):  # k-NN, ridge, sklearn, numeric targets, label sets: head_artifacts.py
        return head_artifacts.save_head_probe(result, store, out)
    est = result.estimator
    meta = {
        "artifact_version": ARTIFACT_VERSION,
        "head": result.head,
        "penalty": result.penalty,
        "standardize": bool(est.standardize),
        "classes": [int(c) for c in est.classes_],
        "class_names": list(store.class_names),
        "n_features": int(est.n_features_in_),
        "cache_key": store.cache_key,
        "cache_path": str(Path(store.path).resolve()),
        "backbone": store.backbone,
        "feature_set": store.attrs.get(SELECTED_SET, DEFAULT_SET),
        "preprocess": store.attrs.get("preprocess"),
        "precision": store.attrs.get("precision"),
        "runtime": store.attrs.get("runtime", "torch"),
        "metrics": {k: v for k, v in result.metrics.items() if k != "confusion_matrix"},
        "val_fraction": result.val_fraction,
        "seed": result.seed,
        "versions": software_versions(),
    }
    picture = confusion_png(result.metrics, title=f"{store.backbone.get('name')} + {result.head} probe: "
                                                  f"test top-1 {result.metrics['top1']:.3f}")
    write_probe_dir(out, meta, {**result.to_dict(), "probe": meta},
                    tensors={"coef": est.coef_, "intercept": est.intercept_, "classes": est.classes_,
                             "mean": est.mean_, "scale": est.scale_},
                    pictures={"confusion.png": picture})
    return out


@dataclass
class LoadedProbe:
    """A fitted head plus the metadata needed to use it on new images."""

    estimator: Any
    metadata: dict[str, Any]
    path: Path

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata.get("class_names", []))

    def check_compatible(self, backbone_spec: dict[str, Any], preprocess: dict[str, Any] | None = None,
                         dim: int | None = None) -> None:
        """Refuse features from another backbone, weights, layer, pooling or preprocessing."""
        ours = self.metadata.get("backbone", {})
        differences = [f"{key}: probe {ours.get(key)!r} vs features {backbone_spec.get(key)!r}"
                       for key in _COMPARED if ours.get(key) != backbone_spec.get(key)]
        recorded = self.metadata.get("preprocess")
        if preprocess is not None and recorded is not None and (
            json.dumps(recorded, sort_keys=True) != json.dumps(preprocess, sort_keys=True)
        ):
            differences.append(f"preprocessing: probe {recorded} vs features {preprocess}")
        if dim is not None and dim != self.metadata.get("n_features"):
            differences.append(f"dim: probe {self.metadata.get('n_features')} vs features {dim}")
        if differences:
            raise ConfigError(
                f"This probe ({self.path}) was trained on features from another backbone setup: "
                + "; ".join(differences) + ". Use features extracted the same way, or retrain the probe."
            )

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return self.estimator.predict_proba(features)

    def build_backbone(self, weights_path: str | os.PathLike | None = None) -> Any:
        """The probe's backbone, rebuilt from the metadata and checked against it (weights hash,
        layer, pooling, preprocessing, dim). A fine-tuned probe's own weights file is used unless
        ``weights_path`` is given; a probe built on another local weights file needs it."""
        meta = self.metadata
        spec = meta["backbone"]
        tag = spec.get("weights")
        if weights_path is None and meta.get("weights_file"):
            weights_path = self.path / meta["weights_file"]
        if str(tag).startswith("file:") and weights_path is None:
            raise WeightsError(f"This probe's backbone used a local weights file ({tag[5:]}); pass it "
                               f"with --weights FILE (its sha256 is checked).")
        preprocess = PreprocessSpec.from_dict(meta["preprocess"])
        bb = get_backbone(spec["name"], weights=None if weights_path else tag, weights_path=weights_path,
                          layer=spec.get("layer"), pool=spec.get("pool") or "avg",
                          image_size=preprocess.crop_size)
        self.check_compatible({**bb.spec(), "weights": tag if weights_path else bb.weights_tag},
                              bb.preprocess.to_dict(), bb.dim)
        return bb


def save_finetuned(out: Path, head: Any, network: Any, loaded: LoadedProbe, report: dict[str, Any], *,
                   image_size: int, precision: str, weights_file: str = "backbone.safetensors") -> None:
    """Write a fine-tuned model as a probe directory: the backbone weights (safetensors), the head
    as a torch probe on raw features, probe.json naming the weights file, and report.json."""
    from safetensors.torch import save

    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in network.state_dict().items()}
    atomic_write(out / weights_file, save(state))
    spec = loaded.metadata["backbone"]
    exported = get_backbone(spec["name"], weights_path=out / weights_file, layer=spec.get("layer"),
                            pool=spec.get("pool") or "avg", image_size=image_size)  # also proves it loads
    meta = {
        **{k: v for k, v in loaded.metadata.items() if k not in ("cache_key", "cache_path", "metrics", "versions")},
        "artifact_version": ARTIFACT_VERSION, "head": "torch", "penalty": None, "standardize": False,
        "backbone": exported.spec(), "preprocess": exported.preprocess.to_dict(), "precision": precision,
        "weights_file": weights_file, "finetuned_from": str(loaded.path),
        "metrics": {k: v for k, v in report["test"].items() if k != "confusion_matrix"},
        "versions": software_versions(),
    }
    dim = head.in_features
    write_probe_dir(out, meta, report, files={weights_file: record_file(out / weights_file)}, tensors={
        "coef": head.weight.detach().float().cpu().numpy(), "intercept": head.bias.detach().float().cpu().numpy(),
        "classes": np.asarray(loaded.estimator.classes_), "mean": np.zeros(dim), "scale": np.ones(dim)})


def load_probe(path: str | os.PathLike) -> LoadedProbe:
    """Load a probe directory (or its probe.json), after checking every file it lists against
    probe.json (sizes, sha256s, tensor shapes, classes). The torch head loads without pickle; a
    sklearn head's probe.joblib is checked before it is unpickled (joblib is pickle: load only
    probes you trust)."""
    path = Path(path)
    directory = path.parent if path.is_file() else path
    meta = read_meta(directory)
    if head_artifacts.handles_meta(meta):  # k-NN, ridge, sklearn, numeric targets, label sets: head_artifacts.py
        return LoadedProbe(head_artifacts.load_head(meta, directory), meta, directory)
    head = meta.get("head")
    if head not in ("torch", "sklearn"):
        raise ConfigError(f"{str(directory / 'probe.json')!r} names an unknown head {head!r}.")
    weights_file = directory / ("probe.safetensors" if head == "torch" else "probe.joblib")
    if not weights_file.is_file():
        raise ConfigError(f"Incomplete probe directory {str(directory)!r}: {weights_file.name} is missing.")
    check_probe_files(directory, meta)
    estimator = _load_torch_head(weights_file, meta) if head == "torch" else _load_sklearn_head(weights_file, meta)
    return LoadedProbe(estimator, meta, directory)


def _load_torch_head(weights_file: Path, meta: dict[str, Any]) -> TorchLinearProbe:
    tensors = load_tensors(weights_file, meta)
    try:
        return TorchLinearProbe.from_coefficients(
            coef=tensors["coef"], intercept=tensors["intercept"], classes=tensors["classes"],
            mean=tensors["mean"], scale=tensors["scale"], penalty=meta["penalty"], standardize=meta["standardize"])
    except (KeyError, TypeError, ValueError) as exc:  # a foreign file: name it, never a traceback
        raise ConfigError(f"Cannot load probe weights {str(weights_file)!r} ({type(exc).__name__}: {exc}).") from exc


def _load_sklearn_head(weights_file: Path, meta: dict[str, Any]) -> SklearnProbe:
    import joblib

    try:
        est = joblib.load(weights_file)  # trusted files only: joblib is pickle (its sha256 was checked)
    except Exception as exc:  # noqa: BLE001 - whatever the unpickling raises, name the file
        raise ConfigError(f"Cannot load probe {str(weights_file)!r} ({exc}).") from exc
    if not isinstance(est, SklearnProbe):
        raise ConfigError(f"{str(weights_file)!r} holds a {type(est).__name__}, not an embedcache SklearnProbe; "
                          f"refusing to use it.")
    if [int(c) for c in np.asarray(est.classes_)] != [int(c) for c in meta.get("classes", [])]:
        raise ConfigError(f"The classes in probe.json differ from those of {str(weights_file)!r}: the metadata "
                          f"was edited or belongs to another probe. Re-run `embedcache probe`.")
    return est


def normalise_class_name(name: str) -> str:
    """A class name as compared across sources (``T-shirt/top`` matches the folder ``T-shirt_top``)."""
    return name.replace("/", "_").strip().lower()
