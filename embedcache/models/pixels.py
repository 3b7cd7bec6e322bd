"""The ``pixels`` baseline as a module: grey pixels in [0, 1], flattened."""

from __future__ import annotations

import torch
from torch import nn


class PixelFeatures(nn.Module):
    """The preprocessed image, averaged over RGB, flattened ``(N, S*S)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1).flatten(1)
