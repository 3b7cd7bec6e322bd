"""Write a Fashion-MNIST subset with train/val/test splits as one .npz (a DATA source).

    python scripts/make_fmnist_subset.py /tmp/fm5k.npz [--train 5000 --val 1000 --test 2000]

Stratified and deterministic: per class, the first train/10 training images go to train, the
next val/10 to val, and the first test/10 images of the official test set to test. Used for the
fine-tuning numbers in docs/benchmarks.md; needs the Debian package dataset-fashion-mnist.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from embedcache.sources.arrays import read_idx

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--root", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--test", type=int, default=2000)
    args = parser.parse_args()
    k = len(CLASS_NAMES)
    train_x = read_idx(args.root / "train-images-idx3-ubyte.gz")
    train_y = read_idx(args.root / "train-labels-idx1-ubyte.gz").astype(np.int64)
    test_x = read_idx(args.root / "t10k-images-idx3-ubyte.gz")
    test_y = read_idx(args.root / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    per_train, per_val, per_test = args.train // k, args.val // k, args.test // k
    by_class = [np.flatnonzero(train_y == c) for c in range(k)]
    train = np.sort(np.concatenate([rows[:per_train] for rows in by_class]))
    val = np.sort(np.concatenate([rows[per_train:per_train + per_val] for rows in by_class]))
    test = np.sort(np.concatenate([np.flatnonzero(test_y == c)[:per_test] for c in range(k)]))
    np.savez_compressed(args.out, train_images=train_x[train], train_labels=train_y[train],
                        val_images=train_x[val], val_labels=train_y[val],
                        test_images=test_x[test], test_labels=test_y[test],
                        class_names=np.array(CLASS_NAMES))
    print(f"wrote {args.out}: {len(train)} train, {len(val)} val, {len(test)} test")


if __name__ == "__main__":
    main()
