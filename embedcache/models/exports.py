"""Exporting a backbone for the compiled runtimes (the cache of exports and the runtimes'
common interface are :mod:`embedcache.models.export_cache`, which needs no torch).

The exported graph takes the DataLoader's uint8 batch as it is in memory, ``(N, H, W, 3)``
(channels-last), and does the normalisation itself (:class:`UInt8Input`), so nothing is
converted in Python per batch. BatchNorm is folded first (as for torch), and the input size is
fixed at export (only the batch dimension is dynamic), which turns shape-dependent Python (TF
"SAME" padding) into constants.
"""

from __future__ import annotations

import torch

from embedcache.models.backbone import Backbone
from embedcache.models.fuse import fold_batchnorms


class UInt8Input(torch.nn.Module):
    """uint8 ``(N, H, W, 3)`` -> normalised float ``(N, 3, H, W)`` -> the backbone."""

    def __init__(self, module: torch.nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.module = module
        self.register_buffer("scale", torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, 3, 1, 1))
        self.register_buffer("shift", torch.tensor([-m / s for m, s in zip(mean, std, strict=True)]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32)
        return self.module(x * self.scale + self.shift).float()


def exportable(bb: Backbone) -> tuple[torch.nn.Module, torch.Tensor]:
    """The module every runtime exports (BatchNorm folded, :class:`UInt8Input` around it) and an
    example uint8 batch of two (two, not one, so that no exporter specialises the batch to 1)."""
    size = bb.preprocess.crop_size
    folded = fold_batchnorms(bb.module, input_size=size).eval()
    wrapped = UInt8Input(folded, tuple(bb.preprocess.mean), tuple(bb.preprocess.std)).eval()
    return wrapped, torch.zeros((2, size, size, 3), dtype=torch.uint8)
