"""Tests for embedcache.models.catalog: names to frozen, truncated backbones (built-ins,
torchvision, timm, plugins, module:factory), intermediate layers and pooling, listings."""

import numpy as np
import pytest
import torch

import tests.tiny_backbone  # noqa: F401  (registers the tiny backbone)
from embedcache.errors import ConfigError, UnknownBackboneError, WeightsError
from embedcache.models import build, catalog
from tests.tiny_backbone import TINY


def test_tiny_backbone_truncates_before_the_final_linear():
    bb = build.get_backbone(TINY)
    assert bb.dim == 8
    assert not any(p.requires_grad for p in bb.module.parameters())
    assert not bb.module.training
    out = bb.module(torch.zeros(2, 3, 16, 16))
    assert out.shape == (2, 8)


@pytest.mark.parametrize(
    "name, dim",
    [("resnet50", 2048), ("efficientnet_b0", 1280), ("vgg16", 4096), ("vit_b_16", 768), ("squeezenet1_1", 512)],
)
def test_torchvision_default_truncation_dims(name, dim):
    bb = build.get_backbone(name, weights="none")
    assert bb.dim == dim
    assert bb.weights_tag == "none"


def test_random_init_is_reproducible():
    a = build.get_backbone("resnet18", weights="none")
    b = build.get_backbone("resnet18", weights="none")
    assert a.weights_sha256 == b.weights_sha256


def test_torchvision_preprocessing_comes_from_the_weights():
    bb = build.get_backbone("efficientnet_b0", weights="none")
    assert (bb.preprocess.resize_size, bb.preprocess.crop_size) == (256, 224)
    assert bb.preprocess.interpolation == "bicubic"
    small = build.get_backbone("efficientnet_b0", weights="none", image_size=112)
    assert small.preprocess.crop_size == 112 and small.preprocess.resize_size == 128


@pytest.mark.parametrize(
    "name, match",
    [("resnet5", r"Did you mean 'resnet50'|Did you mean .*resnet"), ("nonsense_model_xyz", "embedcache backbones")],
)
def test_unknown_backbone_names_close_matches(name, match):
    with pytest.raises(UnknownBackboneError, match=match):
        build.get_backbone(name)


def test_bad_weights_tag_lists_valid_tags():
    with pytest.raises(WeightsError, match="IMAGENET1K_V1"):
        build.get_backbone("resnet18", weights="IMAGENET9K")


@pytest.mark.parametrize("pool, dim", [("avg", 256), ("max", 256), ("avgmax", 512)])
def test_intermediate_layer_with_pooling(pool, dim):
    bb = build.get_backbone("resnet18", weights="none", layer="layer3", pool=pool)
    assert bb.dim == dim
    assert bb.spec()["layer"] == "layer3" and bb.spec()["pool"] == pool


def test_cls_pool_on_vit_tokens():
    bb = build.get_backbone("vit_b_16", weights="none", layer="encoder.ln", pool="cls")
    assert bb.dim == 768


def test_unknown_layer_suggests_nodes():
    with pytest.raises(ConfigError, match="Did you mean 'layer3'"):
        build.get_backbone("resnet18", weights="none", layer="layer33")


def test_bad_pool_names_the_parameter():
    with pytest.raises(ConfigError, match="'pool' parameter"):
        build.get_backbone(TINY, pool="median")


def test_module_path_factory_string():
    bb = build.get_backbone("tests.tiny_backbone:tiny_factory")
    assert bb.dim == 8


def test_list_backbones_includes_builtins_and_torchvision():
    rows = {r.name: r for r in catalog.list_backbones(with_torchvision_dims=False)}
    assert rows["efficientnet_lite0"].offline_ready
    assert rows["efficientnet_lite0"].dim == 1280
    assert "resnet50" in rows and "IMAGENET1K_V2" in rows["resnet50"].weights


def test_timm_backbone_when_installed():
    pytest.importorskip("timm")
    bb = build.get_backbone("timm:resnet18", weights="none")
    assert bb.dim == 512 and bb.weights_tag == "none"
    assert bb.preprocess.crop_size == 224


def test_entry_point_plugins_are_found(monkeypatch):
    class FakeEntryPoint:
        name = "plugin-tiny"

        def load(self):
            from tests.tiny_backbone import tiny_factory

            return tiny_factory

    from importlib import metadata

    monkeypatch.setattr(metadata, "entry_points", lambda group: [FakeEntryPoint()] if group == catalog.ENTRY_POINT_GROUP else [])
    assert build.get_backbone("plugin-tiny").dim == 8
    assert "plugin-tiny" in {r.name for r in catalog.list_backbones(with_torchvision_dims=False)}


def test_pool_without_layer_is_refused():
    with pytest.raises(ConfigError, match="only applies with 'layer'"):
        build.get_backbone(TINY, pool="max")


def test_pixels_baseline_is_flattened_grey_pixels():
    bb = build.get_backbone("pixels", image_size=8)
    assert bb.dim == 64
    x = np.random.default_rng(0).random((2, 3, 8, 8)).astype(np.float32)
    out = bb.module(torch.from_numpy(x))
    np.testing.assert_allclose(out.numpy(), x.mean(axis=1).reshape(2, -1), rtol=1e-6)
