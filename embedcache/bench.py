"""Compare backbones on your data (``bench``) and rerun small-data experiments (``fewshot``).

``bench``: for each backbone, extract (a cache hit when the entry exists) then run the probe
protocol of :func:`embedcache.probe.probe`; one leaderboard row per backbone. Include ``pixels``
to answer "does the pretrained backbone beat raw pixels here?".

``fewshot``: k labelled examples per class drawn from the cached train split for each seed,
a probe fitted on them with a FIXED penalty (:data:`FEWSHOT_PENALTY`; nothing is ever chosen by
looking at test, and k-shot sets are too small to hold out a validation split honestly), scored
on the full test split; mean ± std over seeds per k. No image is decoded; with the torch head the
seeds of one k are solved jointly (:func:`fit_many_torch`).
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from embedcache.errors import ConfigError

#: Penalty used by few-shot probes (standardised features; strong, as small k needs).
FEWSHOT_PENALTY = 0.1


def parse_backbone_item(item: str) -> dict[str, Any]:
    """``NAME[@SIZE][=WEIGHTS]`` → {backbone, image_size, weights}; e.g. ``resnet18=none``,
    ``pixels@28``, ``efficientnet_lite1@240``."""
    text = item.strip()
    weights = None
    if "=" in text:
        text, weights = text.split("=", 1)
    size = None
    if "@" in text:
        text, raw = text.rsplit("@", 1)
        try:
            size = int(raw)
        except ValueError:
            raise ConfigError(f"Backbone item {item!r}: the size after '@' must be an int.") from None
        if size < 1:
            raise ConfigError(f"Backbone item {item!r}: the size after '@' must be a positive int.")
    if not text:
        raise ConfigError(f"Backbone item {item!r} has no name.")
    return {"backbone": text, "image_size": size, "weights": weights, "label": item.strip()}


def bench(data: str | os.PathLike, backbones: list[str], *, head: str = "torch",
          image_size: int | None = None, cache_dir: str | os.PathLike | None = None,
          out: str | os.PathLike | None = None, batch_size: int = 64, workers: int | None = None,
          device: str = "auto", seed: int = 0,
          progress: Callable[[str], None] | None = None,
          extract_progress: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Leaderboard of linear probes across backbones on one dataset.

    Args:
        data: any DATA form accepted by :func:`embedcache.extract`.
        backbones: items ``NAME[@SIZE][=WEIGHTS]``; ``@SIZE`` overrides ``image_size``.
        head: probe head, ``torch`` or ``sklearn``.
        image_size: input size for backbones without their own ``@SIZE``.
        cache_dir: cache location.
        out: directory for leaderboard.json/.csv/.md (and .png with matplotlib).
        batch_size: extraction batch size.
        workers: extraction decoding workers.
        device: extraction device.
        seed: seed of the probe's validation hold-out.
        progress: called with one line per finished backbone.
        extract_progress: passed to :func:`embedcache.extract` as its progress callback.

    Returns:
        ``{"rows": [...], "data": ..., "head": ...}``, rows sorted by test accuracy.
    """
    from embedcache.extract import extract
    from embedcache.probe import probe

    if not backbones:
        raise ConfigError("The 'backbones' list is empty; name at least one (e.g. efficientnet_lite0,pixels).")
    rows = []
    for item in backbones:
        spec = parse_backbone_item(item)
        store = extract(data, backbone=spec["backbone"], weights=spec["weights"],
                        image_size=image_size if spec["image_size"] is None else spec["image_size"], cache_dir=cache_dir,
                        batch_size=batch_size, workers=workers, device=device, progress=extract_progress)
        result = probe(store, head=head, seed=seed)
        rate = store.attrs.get("extract_images_per_s")
        row = {
            "backbone": spec["label"],
            "test_top1": result.metrics["top1"],
            "test_balanced_accuracy": result.metrics["balanced_accuracy"],
            "penalty": result.penalty,
            "dim": int(store.attrs["dim"]),
            "image_size": int(store.attrs["preprocess"]["crop_size"]),
            "weights": store.backbone.get("weights"),
            "extract_images_per_s": None if rate is None else float(rate),
            "probe_seconds": result.total_seconds,
            "cache_hit": store.cache_hit,
            "cache": str(store.path),
            "n_train": result.split_sizes["train"] + result.split_sizes["val"],
            "n_test": result.split_sizes["test"],
        }
        rows.append(row)
        if progress:
            progress(f"{row['backbone']}: test top-1 {row['test_top1']:.4f} "
                     f"({'cache hit' if row['cache_hit'] else 'extracted'}, probe {row['probe_seconds']:.1f} s)")
    rows.sort(key=lambda r: -r["test_top1"])
    report = {"data": str(data), "head": head, "seed": seed, "rows": rows}
    if out is not None:
        write_leaderboard(report, Path(out))
    return report


LEADERBOARD_COLUMNS = [
    ("backbone", "backbone", "{}"), ("test_top1", "test top-1", "{:.4f}"), ("penalty", "penalty", "{:.3g}"),
    ("dim", "dim", "{}"), ("image_size", "px", "{}"), ("extract_images_per_s", "extract img/s", "{:.0f}"),
    ("probe_seconds", "probe s", "{:.1f}"), ("cache_hit", "cache hit", "{}"),
]


def leaderboard_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells of the leaderboard (shared by the CLI and Markdown)."""
    headers = [title for _, title, _ in LEADERBOARD_COLUMNS]
    cells = [[("-" if row[key] is None else fmt.format(row[key])) for key, _, fmt in LEADERBOARD_COLUMNS]
             for row in report["rows"]]
    return headers, cells


def write_leaderboard(report: dict[str, Any], out: Path) -> list[Path]:
    """leaderboard.json, .csv, .md, and .png when matplotlib is installed."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "leaderboard.json", out / "leaderboard.csv", out / "leaderboard.md"]
    written[0].write_text(json.dumps(report, indent=2))
    with open(written[1], "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(report["rows"][0]))
        writer.writeheader()
        writer.writerows(report["rows"])
    headers, cells = leaderboard_table(report)
    lines = [f"Linear-probe leaderboard on `{report['data']}` ({report['head']} head)", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    written[2].write_text("\n".join(lines) + "\n")
    if _bar_chart([r["backbone"] for r in report["rows"]], [r["test_top1"] for r in report["rows"]],
                  out / "leaderboard.png", "test top-1"):
        written.append(out / "leaderboard.png")
    return written


def _bar_chart(labels: list[str], values: list[float], path: Path, xlabel: str) -> bool:
    from embedcache.metrics import pyplot

    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(labels) + 1.2))
    ax.barh(labels[::-1], values[::-1], color="#4c72b0")
    for i, v in enumerate(values[::-1]):
        ax.text(v, i, f" {v:.3f}", va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_xlim(0, 1.08)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def draw_shots(labels: np.ndarray, candidates: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k rows per class from ``candidates`` (positions), seeded; refuses k above a class's size."""
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels[candidates]):
        members = candidates[labels[candidates] == cls]
        if k > len(members):
            raise ConfigError(
                f"--shots {k} is more than class {int(cls)} has in the train split ({len(members)} "
                f"images). Use shots <= {len(members)}."
            )
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen))


def fit_many_torch(features: np.ndarray, labels: np.ndarray, row_sets: list[np.ndarray], *,
                   penalty: float, max_iter: int = 200, tol: float = 1e-4
                   ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Fit one :class:`~embedcache.probe.TorchLinearProbe` problem per row set, all at once.

    Each set gets exactly the probe's objective (its own standardisation, mean cross-entropy +
    penalty/2 ||W||^2); the sum of independent problems is minimised jointly by one L-BFGS
    (:func:`embedcache.solver.minimize`, gradient written by hand), so every block reaches its own
    optimum while Python overhead is paid once, not once per seed. Row sets must have equal sizes
    and the same classes (k per class). Returns ``[(coef_, intercept_, classes_)]`` on raw features.
    """
    import torch

    from embedcache.solver import minimize

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


def fewshot(entry: str | os.PathLike | Any, *, shots: list[int] = (1, 2, 5, 10, 20), seeds: int = 10,
            head: str = "torch", penalty: float = FEWSHOT_PENALTY, cache_dir: str | os.PathLike | None = None,
            out: str | os.PathLike | None = None, fit_log: list | None = None) -> dict[str, Any]:
    """k-shot × seed grid on a cache entry's train split, scored on its full test split.

    Args:
        entry: a FeatureStore, an ``.h5`` path or a key prefix.
        shots: values of k (examples per class).
        seeds: number of seeds (0 .. seeds-1) per k.
        head: ``torch`` or ``sklearn``.
        penalty: the fixed penalty (see the module docstring).
        cache_dir: where to resolve a key prefix.
        out: directory for fewshot.json, fewshot.md and fewshot.png (matplotlib).
        fit_log: if given, receives the row positions of every fit (for leakage checks).

    Returns:
        ``{"results": [{k, mean, std, accuracies}], "penalty", "seeds", "n_test", "seconds"}``.
    """
    from embedcache.probe import make_head
    from embedcache.store import FeatureStore, default_cache_dir, resolve_entry

    started = time.perf_counter()
    shots = [int(k) for k in shots]
    if not shots or min(shots) < 1:
        raise ConfigError(f"The 'shots' parameter must be positive ints. Got {shots!r}.")
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"The 'seeds' parameter must be a positive int. Got {seeds!r}.")
    store = entry if isinstance(entry, FeatureStore) else FeatureStore.open(
        resolve_entry(entry, cache_dir or default_cache_dir()))
    from embedcache.probe import _check_features, predict_linear

    features = _check_features(store.features, name="cached features")  # validated once, here
    labels = store.labels
    train = np.flatnonzero((store.splits == 0) & (labels >= 0))
    test = np.flatnonzero((store.splits == 2) & (labels >= 0))
    if len(test) == 0 or len(train) == 0:
        raise ConfigError("Few-shot needs labelled train and test splits in the cache.")
    x_test, y_test = features[test], labels[test]
    results = []
    for k in shots:
        row_sets = [draw_shots(labels, train, k, seed) for seed in range(seeds)]
        for rows in row_sets:
            assert not np.intersect1d(rows, test).size, "few-shot rows overlap the test split"
            if fit_log is not None:
                fit_log.append(rows)
        if head == "torch":
            fitted = fit_many_torch(features, labels, row_sets, penalty=penalty)
        else:
            fitted = []
            for rows in row_sets:
                est = make_head(head, penalty=penalty).fit(features[rows], labels[rows])
                fitted.append((est.coef_, est.intercept_, np.asarray(est.classes_)))
        accuracies = []
        for coef, intercept, classes in fitted:
            # Score with the fitted linear map directly: x_test was validated above.
            predicted = predict_linear(x_test, coef, intercept, classes)
            accuracies.append(float(np.mean(predicted == y_test)))
        results.append({"k": k, "mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)),
                        "accuracies": accuracies})
    report = {"cache": str(store.path), "backbone": store.backbone.get("name"), "head": head,
              "penalty": penalty, "penalty_rule": "fixed (never chosen on test)", "seeds": seeds,
              "n_test": int(len(test)), "results": results, "seconds": time.perf_counter() - started}
    if out is not None:
        _write_fewshot(report, Path(out))
    return report


def _write_fewshot(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "fewshot.json").write_text(json.dumps(report, indent=2))
    lines = [f"Few-shot linear probe on `{report['cache']}` ({report['backbone']}, {report['head']} head, "
             f"penalty {report['penalty']:g} fixed, {report['seeds']} seeds, {report['n_test']} test images)",
             "", "| k per class | test top-1 mean | std |", "|---|---|---|"]
    lines += [f"| {r['k']} | {r['mean']:.4f} | {r['std']:.4f} |" for r in report["results"]]
    (out / "fewshot.md").write_text("\n".join(lines) + "\n")
    from embedcache.metrics import pyplot

    plt = pyplot()
    if plt is None:
        return
    ks = [r["k"] for r in report["results"]]
    means = np.array([r["mean"] for r in report["results"]])
    stds = np.array([r["std"] for r in report["results"]])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3)
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("examples per class (k)")
    ax.set_ylabel("test top-1 (mean ± std over seeds)")
    ax.set_title(f"{report['backbone']} few-shot")
    fig.tight_layout()
    fig.savefig(out / "fewshot.png", dpi=120)
    plt.close(fig)
