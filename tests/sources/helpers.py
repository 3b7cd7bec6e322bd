"""Small image files and arrays for the source, decode and loop tests."""

from __future__ import annotations

import numpy as np
from PIL import Image


def save(image: Image.Image, path, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def solid(color=(200, 30, 30), size=(12, 10)) -> Image.Image:
    return Image.new("RGB", size, color)


def truncated_jpeg(p):
    rng = np.random.default_rng(0)
    save(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), p, format="JPEG")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def make_class_folder(root, layout: dict[str, int], split: str | None = None):
    """root[/split]/<class>/<i>.png with `layout[class]` images each (distinct pixel values)."""
    for c, (name, count) in enumerate(layout.items()):
        for i in range(count):
            parts = [split] if split else []
            save(solid((c * 40, i * 10 % 256, 5)), root.joinpath(*parts, name, f"{i:03d}.png"))


def tiny_arrays(n_per_class=6, classes=("T-shirt/top", "Trouser", "Bag")):
    rng = np.random.default_rng(0)
    n = n_per_class * len(classes)
    images = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
    labels = np.arange(n) % len(classes)
    return images, labels, list(classes)
