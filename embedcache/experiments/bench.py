"""``bench``: a leaderboard of probes across backbones (and heads) on one data set.

Per backbone: extract (a cache hit when the entry exists), then the probe protocol with each
head (``heads``: e.g. torch, knn, ridge), one leaderboard row per (backbone, head). A second run
of the same command only trains probes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedcache.errors import ConfigError
from embedcache.experiments.feature_sweep import probe_all_sets
from embedcache.experiments.protocol import ALL_SETS, probe
from embedcache.experiments.reports import write_leaderboard
from embedcache.extraction.extract import extract
from embedcache.heads.registry import LINEAR_HEADS, check_head
from embedcache.store.feature_sets import CONCAT


@dataclass(frozen=True)
class BackboneItem:
    """One ``NAME[@SIZE][=WEIGHTS]`` item of ``--backbones``."""

    label: str
    backbone: str
    image_size: int | None
    weights: str | None


def parse_backbone_item(item: str) -> BackboneItem:
    """``NAME[@SIZE][=WEIGHTS]``, e.g. ``resnet18=none``, ``pixels@28``, ``efficientnet_lite1@240``."""
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
    return BackboneItem(label=item.strip(), backbone=text, image_size=size, weights=weights)


@dataclass
class BenchRow:
    """One (backbone, head) line of the leaderboard (``penalty`` None for k-NN, ``k`` its k)."""

    backbone: str
    head: str
    test_top1: float
    test_balanced_accuracy: float
    penalty: float | None
    k: int | None
    dim: int
    image_size: int
    weights: str | None
    extract_images_per_s: float | None
    probe_seconds: float
    cache_hit: bool
    cache: str
    n_train: int
    n_test: int
    extract_threads: int | None = None  # intra-op threads of the extraction (None: recorded by none)
    probe_threads: int | None = None
    features: str = "penultimate"  # the feature set probed (with --features all: the one chosen on val)


@dataclass
class BenchResult:
    """The leaderboard, rows sorted by test accuracy."""

    data: str
    head: str
    seed: int
    rows: list[BenchRow]
    heads: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "head": self.head, "heads": self.heads or [self.head], "seed": self.seed,
                "rows": [dataclasses.asdict(r) for r in self.rows]}


def bench(data: str | os.PathLike, backbones: list[str], *, head: str = "torch",
          heads: list[str] | None = None, image_size: int | None = None, cache_dir: str | os.PathLike | None = None,
          out: str | os.PathLike | None = None, batch_size: int = 64, workers: int | None = None,
          device: str = "auto", runtime: str | None = None, seed: int = 0, threads: int | None = None,
          progress: Callable[[str], None] | None = None,
          extract_progress: Callable[[Any], None] | None = None, layers: str | list[str] | None = None,
          pools: str | list[str] | None = None, features: str | None = None) -> BenchResult:
    """Leaderboard of probes across backbones (and heads) on one dataset.

    Args:
        data: any DATA form accepted by :func:`embedcache.extract`.
        backbones: items ``NAME[@SIZE][=WEIGHTS]``; ``@SIZE`` overrides ``image_size``.
        head: probe head, ``torch``, ``sklearn``, ``knn`` or ``ridge`` (when ``heads`` is not given).
        heads: several heads, each probed on every backbone's entry (one row per pair).
        image_size: input size for backbones without their own ``@SIZE``.
        cache_dir: cache location.
        out: directory for leaderboard.json/.csv/.md (and .png with matplotlib).
        batch_size: extraction batch size.
        workers: extraction decoding workers.
        device: extraction device.
        runtime: extraction runtime (auto, torch, openvino, onnxruntime; see ``extract``).
        seed: seed of the probe's validation hold-out.
        threads: torch's intra-op threads for extraction and probes (default ``$EMBEDCACHE_THREADS``,
            else every core available); recorded in each row.
        progress: called with one line per finished (backbone, head).
        extract_progress: passed to :func:`embedcache.extract` as its progress callback.
        layers, pools: extra feature sets stored by every extraction (as ``extract --layers``,
            ``--pool``; presets ``stages``/``last4`` resolve per backbone).
        features: the set each probe trains on (a name, ``A+B``), or ``all``: every set and
            their concatenation swept on val per backbone (linear heads), the winner in the row.
    """
    if not backbones:
        raise ConfigError("The 'backbones' list is empty; name at least one (e.g. efficientnet_lite0,pixels).")
    items = [parse_backbone_item(b) for b in backbones]  # all checked before any extraction
    names = list(dict.fromkeys(heads)) if heads else [head]
    for name in names:
        check_head(name)
    if features == ALL_SETS and any(name not in LINEAR_HEADS for name in names):
        raise ConfigError(f"--features all sweeps the linear heads ({', '.join(LINEAR_HEADS)}); got --heads "
                          f"{','.join(names)}. Name one feature set with --features for the k-NN and ridge heads.")
    rows = []
    for item in items:
        store = extract(data, backbone=item.backbone, weights=item.weights,
                        image_size=image_size if item.image_size is None else item.image_size, cache_dir=cache_dir,
                        batch_size=batch_size, workers=workers, threads=threads, device=device, runtime=runtime,
                        progress=extract_progress, layers=layers, pools=pools)
        if store.task != "classes":
            raise ConfigError(f"bench ranks class labels by test top-1; {data!s} carries {store.task} targets. "
                              f"Use `embedcache probe ENTRY` for them.")
        for name in names:
            if features == ALL_SETS:
                result = probe_all_sets(store, head=name, seed=seed, threads=threads)
            else:
                result = probe(store, head=name, seed=seed, threads=threads, features=features)
            rows.append(_row(item, store, result))
            if progress:
                row = rows[-1]
                progress(f"{row.backbone} + {row.head} on {row.features}: test top-1 {row.test_top1:.4f} "
                         f"({'cache hit' if row.cache_hit else 'extracted'}, probe {row.probe_seconds:.1f} s)")
    rows.sort(key=lambda r: -r.test_top1)
    result = BenchResult(str(data), ",".join(names), seed, rows, names)
    if out is not None:
        write_leaderboard(result.to_dict(), Path(out))
    return result


def _dim(store: Any, features: str) -> int:
    """Columns of a feature set or of a ``+`` concatenation (without forming it)."""
    return sum(int(store.select_features(name).shape[1]) for name in features.split(CONCAT))


def _row(item: BackboneItem, store: Any, result: Any) -> BenchRow:
    rate = store.attrs.get("extract_images_per_s")
    return BenchRow(
        backbone=item.label, head=result.head, test_top1=result.metrics["top1"],
        test_balanced_accuracy=result.metrics["balanced_accuracy"], penalty=result.penalty,
        k=result.chosen.get("k"), dim=_dim(store, result.features), image_size=int(store.attrs["preprocess"]["crop_size"]),
        weights=store.backbone.get("weights"), extract_images_per_s=None if not rate else float(rate),
        probe_seconds=result.total_seconds, cache_hit=store.cache_hit, cache=str(store.path),
        n_train=result.split_sizes["train"] + result.split_sizes["val"], n_test=result.split_sizes["test"],
        extract_threads=store.attrs.get("extract_threads"), probe_threads=result.threads, features=result.features)
