"""A tiny registered backbone and image helpers so most tests run in milliseconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from embedcache.models.backbone import BackboneParts
from embedcache.models.preprocess import PreprocessSpec
from embedcache.models.registry import register_backbone

TINY = "tiny-test"
TINY_SPEC = PreprocessSpec(resize_size=16, crop_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


class TinyNet(nn.Module):
    """conv → BN → ReLU → pool → Linear(8, 4): the classifier input (8-d) is the feature."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


# weights_files: the model is a seeded random init (no file), so a cache hit need not build it
@register_backbone(TINY, description="8-d test backbone", dim=8, input_size=16, offline_ready=True,
                   weights_files=lambda weights, weights_path: [])
def tiny_factory(*, weights: str | None, weights_path: str | None) -> BackboneParts:
    seed = 1 if weights == "other" else 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyNet()
    return BackboneParts(model=model, preprocess=TINY_SPEC, weights_tag=weights or f"seed{seed}")


def make_image_folder(root: Path, *, classes=("a", "b"), per_class: int = 6, size: int = 20,
                      split_dirs: bool = False, seed: int = 0) -> Path:
    """Class folders of small random RGB PNGs (optionally under train/ and test/)."""
    rng = np.random.default_rng(seed)
    splits = ("train", "test") if split_dirs else (None,)
    for split in splits:
        for ci, cls in enumerate(classes):
            folder = root / split / cls if split else root / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                base[..., ci % 3] = 255 - (7 * i) % 120  # make classes separable
                Image.fromarray(base).save(folder / f"img{i:03d}.png")
    return root


class SlowTinyNet(TinyNet):
    """TinyNet that sleeps per batch, so a test can kill a run in the middle."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        if x.shape[0] > 0:  # data-dependent Python branch: torch.fx cannot trace the sleep away
            time.sleep(0.25)
        return super().forward(x)


def slow_factory(*, weights: str | None, weights_path: str | None) -> BackboneParts:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SlowTinyNet()
    return BackboneParts(model=model, preprocess=TINY_SPEC, weights_tag="seed0")
