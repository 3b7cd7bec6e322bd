"""The heads of issue 13 side by side: k-NN, the ridge path and the L-BFGS probe, numeric targets
and label sets.

    python benchmarks/heads_speed.py --entry CACHE_ENTRY.h5          # full Fashion-MNIST lite0 features
    python benchmarks/heads_speed.py --synthetic-ridge [--rows 1280000 --dim 2048 --classes 1000]
    python benchmarks/heads_speed.py --targets-demo WORKDIR [--cache-dir DIR] [--n 4000]
    (any of them with --threads N: torch's intra-op threads)

--entry: on one cache entry (train/test splits; val = the protocol's 10% hold-out of train):
  * the torch, knn and ridge probe protocols (choice on val, refit, one test score): test top-1
    and seconds, side by side;
  * the blocked k-NN search alone: the test rows (10k) against the train rows (60k), top-200
    (the k grid's largest), bf16 products where native, and float32;
  * the ridge path alone: statistics of the 54k train rows, one eigendecomposition, 50 penalties
    scored on the 6k val rows, refit on train+val by Cholesky.
--synthetic-ridge: an ImageNet-sized one-hot ridge problem streamed in row blocks that are
  generated on the fly (class means in a 64-d subspace plus noise): statistics, eigendecomposition,
  50 penalties scored on 10,000 held-out rows, refit; seconds per phase and the peak RSS.
--targets-demo: Fashion-MNIST images written as PNGs with CSV manifests whose true targets are
  known: each image rotated counter-clockwise by a random angle in [0, 60] degrees and dimmed by a
  random factor (targets: the angle and the final mean brightness; one sign only, because
  features of a backbone trained with horizontal flips barely tell +a from -a on the many
  left-right symmetric garments: with angles in [-45, 45] the angle's test R² was 0.23), and 56x56 composites of two random items in two of
  four quadrants (label sets: the items' classes). Extracts them with efficientnet_lite0, probes
  (ridge: R² per target; sigmoid head: mAP), saves the probes and predicts the test rows again
  from the PNGs (predict must reproduce the test metric).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from embedcache.experiments.predict import predict
from embedcache.experiments.protocol import probe, probe_arrays
from embedcache.extraction.extract import extract
from embedcache.heads.knn import cosine_topk
from embedcache.heads.ridge import RidgePath, RidgeStatistics, solve
from embedcache.heads.ridge_probe import DEFAULT_RIDGE_PENALTIES, sweep_ridge
from embedcache.heads.validation import check_features
from embedcache.sources.open import open_source
from embedcache.store.reader import FeatureStore

FASHION = "torchvision:FashionMNIST:/usr/share/datasets/fashion-mnist"


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn, repeats: int):
    runs, out = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - started)
    return out, runs


def fmt(runs: list[float]) -> str:
    return f"{statistics.median(runs):.2f} s (runs {', '.join(f'{r:.2f}' for r in runs)})"


def entry_case(path: str, repeats: int) -> None:
    store = FeatureStore.open(path)
    X = check_features(store.features)
    keys, labels, splits = store.paths, store.labels, store.splits
    print(f"entry {path}: {X.shape[0]} x {X.shape[1]} ({store.backbone.get('name')}), load {load()}")
    print("\nprobe protocol (choice on a 10% val hold-out of train, refit on train+val, test once)")
    for head in ("torch", "knn", "ridge"):
        result, runs = timed(lambda h=head: probe_arrays(X, labels, splits, keys, head=h), repeats)
        chosen = ", ".join(f"{k} {v:.3g}" for k, v in result.chosen.items())
        print(f"  {head:6s} test top-1 {result.metrics['top1']:.4f}  ({chosen})  {fmt(runs)}")
    train, test = np.flatnonzero(splits == 0), np.flatnonzero(splits == 2)
    Q, R = X[test], X[train]
    print(f"\nk-NN search alone: {len(Q)} queries x {len(R)} references x {X.shape[1]}, top-200, load {load()}")
    for dtype in ("auto", "float32"):
        _, runs = timed(lambda d=dtype: cosine_topk(Q, R, 200, data_dtype=d), repeats)
        print(f"  data_dtype {dtype:8s} {fmt(runs)}")
    rng = np.random.default_rng(0)
    order = rng.permutation(train)
    rows = np.concatenate([order[6000:], order[:6000]])
    X_fit, y_fit = X[rows], labels[rows]
    (selection, estimator), runs = timed(lambda: sweep_ridge(X_fit, y_fit, len(rows) - 6000), repeats)
    print(f"\nridge path alone: {len(rows) - 6000} train x {X.shape[1]}, {len(selection.values)} penalties scored on "
          f"6000 val rows, refit on {len(rows)}: {fmt(runs)}; chosen {selection.best_value:.3g} "
          f"(val {selection.best_score:.4f}), test top-1 {np.mean(estimator.predict(X[test]) == labels[test]):.4f}")


def synthetic_blocks(rows: int, dim: int, classes: int, block: int, seed: int):
    """(features, labels) blocks of a synthetic problem: class means in a 64-d subspace + noise."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(64, dim, generator=torch.Generator().manual_seed(1)) / 64
    means = torch.randn(classes, 64, generator=torch.Generator().manual_seed(2)) @ basis
    for begin in range(0, rows, block):
        n = min(block, rows - begin)
        y = torch.randint(0, classes, (n,), generator=gen)
        X = means[y] + torch.randn(n, dim, generator=gen)
        yield X.numpy(), y.numpy()


def synthetic_ridge(rows: int, dim: int, classes: int, val_rows: int, block: int) -> None:
    print(f"synthetic one-hot ridge: {rows} x {dim}, {classes} classes, streamed in blocks of {block} rows; "
          f"load {load()}")
    started, generating = time.perf_counter(), 0.0
    train = RidgeStatistics(dim, classes)
    blocks = synthetic_blocks(rows, dim, classes, block, seed=3)
    while True:
        t = time.perf_counter()
        item = next(blocks, None)
        generating += time.perf_counter() - t
        if item is None:
            break
        train.update(item[0], labels=item[1])
    stats_seconds = time.perf_counter() - started - generating
    X_val, y_val = next(synthetic_blocks(val_rows, dim, classes, val_rows, seed=4))
    t = time.perf_counter()
    path = RidgePath(train)
    eigh_seconds = time.perf_counter() - t
    t = time.perf_counter()
    penalties = sorted(DEFAULT_RIDGE_PENALTIES, reverse=True)
    scores = [float(np.mean(np.argmax(p, axis=1) == y_val)) for p in path.predictions(X_val, penalties)]
    score_seconds = time.perf_counter() - t
    best = penalties[int(np.argmax(scores))]
    t = time.perf_counter()
    solve(train + train.sibling().update(X_val, labels=y_val), best)
    refit_seconds = time.perf_counter() - t
    print(f"  statistics (X^T X, per-class sums) {stats_seconds:.1f} s (+ {generating:.1f} s generating the blocks)")
    print(f"  eigendecomposition {eigh_seconds:.2f} s; 50 penalties scored on {val_rows} val rows {score_seconds:.1f} s; "
          f"refit (Cholesky) {refit_seconds:.2f} s")
    print(f"  total {time.perf_counter() - started:.1f} s; best penalty {best:.3g}, val top-1 {max(scores):.4f}; "
          f"peak RSS {peak_rss_gib():.2f} GiB (the rows alone would be {rows * dim * 4 / 2**30:.1f} GiB in float32)")


def _fashion() -> tuple[np.ndarray, np.ndarray, list[str]]:
    source = open_source(FASHION)
    return source.images, np.array([s.label for s in source.samples]), source.class_names


def _write_manifest(folder: Path, name: str, lines: list[str]) -> Path:
    """``name.csv`` and ``name_test.csv`` (the test rows only, for predict)."""
    (folder / f"{name}.csv").write_text("\n".join(lines) + "\n")
    test = [lines[0]] + [line for line in lines[1:] if line.endswith(",test")]
    (folder / f"{name}_test.csv").write_text("\n".join(test) + "\n")
    return folder / f"{name}.csv"


def write_rotation(folder: Path, n: int, seed: int = 0) -> Path:
    """``path,angle,brightness,split``: rotated, dimmed Fashion-MNIST images (1 in 4 is test)."""
    from PIL import Image

    images, _, _ = _fashion()
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["path,angle,brightness,split"]
    for i, pick in enumerate(rng.choice(len(images), size=n, replace=False)):
        angle, dim = rng.uniform(0, 60), rng.uniform(0.35, 1.0)  # one sign: see the module docstring
        rotated = Image.fromarray(images[pick]).rotate(angle, resample=Image.BILINEAR)
        pixels = (np.asarray(rotated, np.float32) * dim).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:05d}.png")
        lines.append(f"img{i:05d}.png,{angle:.3f},{pixels.mean() / 255:.5f},{'test' if i % 4 == 0 else 'train'}")
    return _write_manifest(folder, "rotation", lines)


def write_pairs(folder: Path, n: int, seed: int = 1) -> Path:
    """``path,labels,split``: two random items in two of the four quadrants of a 56x56 image."""
    from PIL import Image

    images, labels, names = _fashion()
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["path,labels,split"]
    picks = rng.choice(len(images), size=(n, 2), replace=False)
    for i, items in enumerate(picks):
        canvas = np.zeros((56, 56), np.uint8)
        for item, quadrant in zip(items, rng.choice(4, size=2, replace=False), strict=True):
            r, c = divmod(int(quadrant), 2)
            canvas[28 * r:28 * r + 28, 28 * c:28 * c + 28] = images[item]
        Image.fromarray(canvas).save(folder / f"img{i:05d}.png")
        classes = ";".join(sorted({names[labels[j]] for j in items}))
        lines.append(f"img{i:05d}.png,{classes},{'test' if i % 4 == 0 else 'train'}")
    return _write_manifest(folder, "pairs", lines)


def targets_demo(work: Path, cache_dir: Path, n: int) -> None:
    reg_csv, ml_csv = work / "rotation" / "rotation.csv", work / "pairs" / "pairs.csv"
    for csv_path, write in ((reg_csv, write_rotation), (ml_csv, write_pairs)):
        if not csv_path.exists():
            t = time.perf_counter()
            write(csv_path.parent, n)
            print(f"wrote {n} images and {csv_path} in {time.perf_counter() - t:.1f} s")
    for csv_path, targets, kind in ((reg_csv, ["angle", "brightness"], "regression"), (ml_csv, None, "label sets")):
        t = time.perf_counter()
        store = extract(csv_path, cache_dir=cache_dir, targets=targets)
        rate = store.stats.images_per_s
        print(f"\n{kind}: {csv_path} -> {store.path} ({'cache hit' if store.cache_hit else 'extracted'}, "
              f"{time.perf_counter() - t:.1f} s{f', {rate:.0f} img/s' if rate else ''}), load {load()}")
        out = work / f"probe-{csv_path.stem}"
        result = probe(store, out=out)
        sel = result.selection
        print(f"  probe ({result.head}): {sel.parameter} {sel.best_value:.3g} chosen on val ({sel.metric} "
              f"{sel.best_score:.4f}) in {result.total_seconds:.2f} s; split {result.split_sizes}")
        m = result.metrics
        if result.task == "regression":
            for name, v in m["per_target"].items():
                print(f"  test {name:10s} R² {v['r2']:.4f}  MAE {v['mae']:.4g}  RMSE {v['rmse']:.4g}")
        else:
            print(f"  test mAP {m['mAP']:.4f}  micro-F1 {m['micro_f1']:.4f}  macro-F1 {m['macro_f1']:.4f} "
                  f"(threshold {m['threshold']:.2f} chosen on val)")
        t = time.perf_counter()
        again = predict(out, [str(csv_path.with_name(csv_path.stem + "_test.csv"))])
        key = "r2" if result.task == "regression" else "mAP"
        print(f"  predict on the {again.n_scored} test PNGs ({time.perf_counter() - t:.1f} s): {key} "
              f"{again.metrics[key]:.4f} (probe: {m[key]:.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entry", help="a cache entry with train/test splits")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--synthetic-ridge", action="store_true")
    parser.add_argument("--rows", type=int, default=1_280_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--val-rows", type=int, default=10_000)
    parser.add_argument("--block", type=int, default=16_384)
    parser.add_argument("--targets-demo", type=Path, default=None, help="work directory for the PNGs and probes")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--n", type=int, default=4000, help="images per targets-demo manifest")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {load()}")
    if args.entry:
        entry_case(args.entry, args.repeats)
    if args.synthetic_ridge:
        synthetic_ridge(args.rows, args.dim, args.classes, args.val_rows, args.block)
    if args.targets_demo:
        targets_demo(args.targets_demo, args.cache_dir or args.targets_demo / "cache", args.n)


if __name__ == "__main__":
    main()
