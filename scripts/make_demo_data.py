"""Build embedcache/demo_data/ from the Debian package dataset-fashion-mnist.

    apt-get install dataset-fashion-mnist
    python scripts/make_demo_data.py [--root /usr/share/datasets/fashion-mnist]

Takes the first TRAIN_PER_CLASS training images and TEST_PER_CLASS test images of every class
(in file order, so the result is deterministic), stores them as uint8 arrays in one compressed
.npz, and copies the dataset's licence notice next to it. Fashion-MNIST is MIT-licensed
(Copyright (c) 2017 Zalando SE).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

import numpy as np

from embedcache.sources.arrays import read_idx

TRAIN_PER_CLASS = 300
TEST_PER_CLASS = 100
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
OUT_DIR = Path(__file__).resolve().parent.parent / "embedcache" / "demo_data"
COPYRIGHT = Path("/usr/share/doc/dataset-fashion-mnist/copyright")


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    picks = [np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASS_NAMES))]
    return np.sort(np.concatenate(picks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    args = parser.parse_args()
    arrays = {}
    for split, prefix, per_class in (("train", "train", TRAIN_PER_CLASS), ("test", "t10k", TEST_PER_CLASS)):
        images = read_idx(args.root / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(args.root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        keep = first_per_class(labels, per_class)
        arrays[f"{split}_images"] = np.ascontiguousarray(images[keep])
        arrays[f"{split}_labels"] = labels[keep]
    arrays["class_names"] = np.array(CLASS_NAMES)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / "fashion_mnist_demo.npz"
    np.savez_compressed(out, **arrays)
    if COPYRIGHT.exists():
        shutil.copyfile(COPYRIGHT, OUT_DIR / "LICENSE-fashion-mnist.txt")
    digest = hashlib.sha256(out.read_bytes()).hexdigest()[:16]
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, sha256 {digest}): "
          f"{len(arrays['train_labels'])} train, {len(arrays['test_labels'])} test")


if __name__ == "__main__":
    main()
