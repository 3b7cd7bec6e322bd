"""``predict``: classify new images with a saved probe; the backbone is rebuilt from its metadata
and checked against the recorded weights hash, layer, pooling and preprocessing."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedcache.errors import ConfigError
from embedcache.experiments.artifacts import load_probe, normalise_class_name
from embedcache.experiments.predict_targets import class_scores, target_outputs, truth_options
from embedcache.extraction.loop import Progress, compute_features
from embedcache.models.runtimes import (
    EXPORTS_DIR,
    RUNTIME_ENV,
    RUNTIME_PRECISIONS,
    resolve_runtime,
    runtime_installed,
)
from embedcache.runtime import check_workers, resolve_device, run_threads
from embedcache.sources.base import FileSource, ImageSource, Sample
from embedcache.sources.open import open_source
from embedcache.splits import Split
from embedcache.store.schema import default_cache_dir


@dataclass
class Prediction:
    """One classified image: its path, true class name (None when unknown), top-k classes and
    probabilities (the ridge head: scores). Label sets: ``true``/``pred`` the sets (``pred`` the
    classes at or above the probe's threshold, ``prob`` theirs) and ``values`` every class's
    probability. Numeric targets: ``values`` the predictions, ``true_values`` the truth."""

    path: str
    true: str | None
    pred: list[str]
    prob: list[float]
    values: list[float] | None = None
    true_values: list[float] | None = None


@dataclass
class PredictResult:
    """Every prediction, the images that failed to decode, and the accuracy on labelled ones."""

    rows: list[Prediction]
    failures: list[tuple[str, str]]
    accuracy: float | None
    n_scored: int
    root: str
    task: str = "classes"
    names: list[str] = field(default_factory=list)
    metrics: dict | None = None
    score_name: str = "prob"
    threads: int | None = None  # intra-op threads the backbone and head ran with


def predict(probe_path: str | os.PathLike, inputs: Sequence[str], *, top_k: int = 1, batch_size: int = 64,
            workers: int | None = None, device: str = "auto", weights_path: str | os.PathLike | None = None,
            runtime: str | None = None, progress: Callable[[Progress], None] | None = None,
            threads: int | None = None) -> PredictResult:
    """Classify images (files, folders, or any DATA form) with a saved probe.

    Args:
        probe_path: a probe directory (``embedcache probe ENTRY --out DIR``) or a fine-tuned run.
        inputs: image files, or one folder / CSV / ``.npz`` / any DATA form.
        top_k: classes returned per image.
        batch_size, workers, device: how the backbone runs.
        weights_path: the local weights file, when the probe's backbone used one.
        runtime: auto, torch, openvino or onnxruntime; None: ``$EMBEDCACHE_RUNTIME`` if set, else
            the runtime the probe's features were extracted with (torch where that one is not
            available). The recorded precision is used where the runtime runs it (ONNX Runtime:
            fp32 only).
        progress: called after every batch.
        threads: the backbone's intra-op threads (default ``$EMBEDCACHE_THREADS``, else the cores
            available; see :func:`~embedcache.runtime.resolve_threads`).

    Returns:
        The predictions; ``accuracy`` when the inputs carry labels named like the probe's classes;
        for numeric targets and label sets ``metrics`` when a CSV manifest carries the truth.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"The 'top_k' parameter must be a positive int. Got {top_k!r}.")
    workers = check_workers(workers)
    with run_threads(threads) as count:  # every core, as extract
        result = _predict(probe_path, list(inputs), top_k=top_k, batch_size=batch_size, workers=workers,
                          device=device, weights_path=weights_path, runtime=runtime, progress=progress)
    result.threads = count
    return result


def _predict(probe_path: str | os.PathLike, inputs: list[str], *, top_k: int, batch_size: int, workers: int,
             device: str, weights_path: str | os.PathLike | None, runtime: str | None,
             progress: Callable[[Progress], None] | None) -> PredictResult:
    loaded = load_probe(probe_path)
    bb = loaded.build_backbone(weights_path)
    source = _open_inputs(list(inputs), **truth_options(loaded.metadata, list(inputs)))
    runtime, precision = _runtime_and_precision(runtime, loaded.metadata, device, bb.name)
    rows_idx, features, failures = compute_features(
        bb, source, batch_size=batch_size, workers=workers, device=device, precision=precision,
        runtime=runtime, exports_dir=default_cache_dir() / EXPORTS_DIR, progress=progress)
    if loaded.metadata.get("task", "classes") != "classes":  # numeric targets, label sets: predict_targets.py
        return _target_result(loaded, source, rows_idx, features, failures)
    names = loaded.class_names
    proba, score_name = class_scores(loaded.estimator, features) if len(features) else (np.zeros((0, len(names))), "prob")
    classes = np.asarray(loaded.estimator.classes_)
    k = min(top_k, proba.shape[1]) if proba.size else top_k
    order = np.argsort(-proba, axis=1)[:, :k]
    truth = _true_labels(source, names)
    rows = []
    for pos, row in enumerate(rows_idx.tolist()):
        labels = [names[int(classes[j])] if int(classes[j]) < len(names) else str(classes[j]) for j in order[pos]]
        rows.append(Prediction(source.samples[row].path, truth[row], labels, [float(proba[pos, j]) for j in order[pos]]))
    scored = [r for r in rows if r.true is not None]
    accuracy = float(np.mean([r.pred[0] == r.true for r in scored])) if scored else None
    return PredictResult(rows, [(source.samples[i].path, m) for i, m in failures], accuracy, len(scored), source.root,
                         score_name=score_name)


def _runtime_and_precision(runtime: str | None, metadata: dict, device: str, backbone_name: str) -> tuple[str, str]:
    """The resolved runtime for ``predict`` (see its ``runtime`` argument) and the precision to
    ask it for: the recorded one, unless this device or runtime cannot run it."""
    device_type = resolve_device(device).type
    precision = metadata.get("precision") or "auto"
    if precision == "fp16" and device_type == "cpu":
        precision = "auto"  # recorded on a GPU; CPUs have no fp16 autocast: use this machine's best
    if runtime is None and not os.environ.get(RUNTIME_ENV):
        runtime = metadata.get("runtime") or "torch"
        if runtime != "torch" and not (device_type == "cpu" and runtime_installed(runtime)):
            runtime = "torch"  # the features agree to a cosine of ~0.9999 (docs/benchmarks.md)
    resolved = resolve_runtime(runtime, device_type, backbone_name=backbone_name, precision=precision)
    if precision not in RUNTIME_PRECISIONS.get(resolved, (precision,)):
        precision = "auto"  # recorded with another runtime (torch at bf16): this one's own precision
    return resolved, precision


def _target_result(loaded: object, source: ImageSource, rows_idx: np.ndarray, features: np.ndarray,
                   failures: list[tuple[int, str]]) -> PredictResult:
    out = target_outputs(loaded, source, rows_idx, features)
    rows = []
    for pos, row in enumerate(rows_idx.tolist()):
        values = [float(v) for v in out.values[pos]]
        if out.sets is None:
            truth = None if out.true_values is None else [float(v) for v in out.true_values[pos]]
            rows.append(Prediction(source.samples[row].path, None, [], [], values, truth))
        else:
            probs = [values[out.names.index(n)] for n in out.sets[pos]]
            rows.append(Prediction(source.samples[row].path, None if out.true_sets is None else out.true_sets[pos],
                                   out.sets[pos], probs, values))
    n_scored = len(rows) if out.metrics is not None else 0
    return PredictResult(rows, [(source.samples[i].path, m) for i, m in failures], None, n_scored, source.root,
                         task=loaded.metadata["task"], names=out.names, metrics=out.metrics)


def _true_labels(source: ImageSource, probe_names: list[str]) -> list[str | None]:
    """Each sample's class name when the source is labelled with names the probe knows."""
    known = {normalise_class_name(n): n for n in probe_names}
    out: list[str | None] = []
    for sample in source.samples:
        if sample.label < 0:
            out.append(None)
            continue
        out.append(known.get(normalise_class_name(source.class_names[sample.label])))
    return out


def _open_inputs(inputs: list[str], **options: object) -> ImageSource:
    if not inputs:
        raise ConfigError("Give at least one image file or folder to classify.")
    if len(inputs) == 1 and (not Path(inputs[0]).is_file() or inputs[0].lower().endswith((".csv", ".npz"))):
        return open_source(inputs[0], **options)
    files = [Path(p).resolve() for p in inputs]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise ConfigError(f"Not files: {', '.join(missing[:5])}. Pass one folder, or image files.")
    root = Path(os.path.commonpath([str(p.parent) for p in files]))
    samples = [Sample(p.relative_to(root).as_posix(), -1, int(Split.UNSPLIT), p.stat().st_size, p.stat().st_mtime_ns)
               for p in files]
    return FileSource(kind="files", root=str(root), samples=samples, class_names=[],
                      description=f"{len(files)} files under {root}")

