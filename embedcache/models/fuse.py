"""Folding BatchNorm into the convolution before it, for inference: the one BatchNorm folder.

Measured on EfficientNet-Lite0 with channels_last on a 2-core CPU: about 1.5x faster under bf16
autocast (36 -> 58 images/s in fp32, 75 -> 115 under bf16, before the other speed-ups).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

#: Largest relative difference between the folded and the original outputs that is accepted.
FOLD_TOLERANCE = 1e-3


def fold_batchnorms(module: nn.Module, *, input_size: int) -> nn.Module:
    """A copy of a frozen module with BatchNorm folded into the preceding convolutions.

    Inference-only (running statistics are baked in). Tries torch.fx's conv-bn fusion first
    (ResNets and most torchvision models), then folds conv->bn pairs by structure: consecutive
    children of an ``nn.Sequential``, and blocks holding ``conv`` and ``bn`` attributes
    (EfficientNet-Lite's ``ConvBNAct``, timm's ``ConvNormAct``). The result is checked against
    the original on a random fp32 batch; if they disagree, the original is returned unchanged.

    Args:
        module: the frozen feature extractor.
        input_size: side of the square input used for the check.
    """
    from torch.fx.experimental.optimization import fuse as fx_fuse

    module = module.eval()
    try:
        fused = fx_fuse(module, inplace=False)
    except Exception:  # noqa: BLE001 - not traceable by torch.fx (Python-side shape logic)
        # eval() again: a deep copy of torch.fx's feature extractor (``--layer``/``--layers``) comes back in train mode
        fused = _fold_by_structure(copy.deepcopy(module).eval())
    fused = fused.eval().requires_grad_(False)
    with torch.inference_mode(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sample = torch.randn(2, 3, input_size, input_size)
        reference, candidate = module(sample).float(), fused(sample).float()
    scale = reference.abs().max().clamp_min(1e-6)
    if reference.shape != candidate.shape or not ((reference - candidate).abs().max() <= FOLD_TOLERANCE * scale):
        return module
    return fused


def _fold_by_structure(model: nn.Module) -> nn.Module:
    for parent in list(model.modules()):
        if isinstance(parent, nn.Sequential):
            names = [name for name, _ in parent.named_children()]
            pairs = list(zip(names[:-1], names[1:], strict=True))
        elif hasattr(parent, "conv") and hasattr(parent, "bn"):
            pairs = [("conv", "bn")]
        else:
            continue
        for conv_name, bn_name in pairs:
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            if (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                    and bn.track_running_stats and bn.num_features == conv.out_channels):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(parent, bn_name, nn.Identity())
    return model
