"""Small CSV manifests with numeric targets and label sets, for the tiny backbone's tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CHANNELS = ("red", "green", "blue")


def make_regression_csv(root: Path, *, n: int = 60, seed: int = 0, splits: bool = True) -> Path:
    """``path,brightness,contrast[,split]``: random images whose true mean brightness (and spread)
    is known; 3 of 5 rows train, 1 val, 1 test."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = ["path,brightness,contrast" + (",split" if splits else "")]
    for i in range(n):
        level, spread = rng.uniform(20, 230), rng.uniform(2, 25)
        pixels = np.clip(level + rng.normal(size=(20, 20, 3)) * spread, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"img{i:03d}.png")
        split = ("train", "train", "train", "val", "test")[i % 5]
        lines.append(f"img{i:03d}.png,{pixels.mean() / 255:.6f},{spread:.4f}" + (f",{split}" if splits else ""))
    (root / "targets.csv").write_text("\n".join(lines) + "\n")
    return root / "targets.csv"


def make_multilabel_csv(root: Path, *, n: int = 60, seed: int = 0) -> Path:
    """``path,labels,split``: each image carries a random set of the colour channels that are
    bright in it (``red;blue``), possibly none."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = ["path,labels,split"]
    for i in range(n):
        on = rng.random(3) < 0.5
        pixels = rng.integers(0, 60, size=(20, 20, 3)).astype(np.uint8)
        pixels[..., on] += 180
        Image.fromarray(pixels).save(root / f"img{i:03d}.png")
        names = ";".join(c for c, flag in zip(CHANNELS, on, strict=True) if flag)
        lines.append(f"img{i:03d}.png,{names},{('train', 'train', 'train', 'val', 'test')[i % 5]}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"
