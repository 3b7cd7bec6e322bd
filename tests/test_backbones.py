import pytest
import torch
from safetensors.torch import save_file

import tests.tiny_backbone  # noqa: F401  (registers the tiny backbone)
from embedcache import backbones as bbm
from embedcache.errors import ConfigError, UnknownBackboneError, WeightsError
from tests.tiny_backbone import TINY


def test_tiny_backbone_truncates_before_the_final_linear():
    bb = bbm.get_backbone(TINY)
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
    bb = bbm.get_backbone(name, weights="none")
    assert bb.dim == dim
    assert bb.weights_tag == "none"


def test_random_init_is_reproducible():
    a = bbm.get_backbone("resnet18", weights="none")
    b = bbm.get_backbone("resnet18", weights="none")
    assert a.weights_sha256 == b.weights_sha256


def test_torchvision_preprocessing_comes_from_the_weights():
    bb = bbm.get_backbone("efficientnet_b0", weights="none")
    assert (bb.preprocess.resize_size, bb.preprocess.crop_size) == (256, 224)
    assert bb.preprocess.interpolation == "bicubic"
    small = bbm.get_backbone("efficientnet_b0", weights="none", image_size=112)
    assert small.preprocess.crop_size == 112 and small.preprocess.resize_size == 128


@pytest.mark.parametrize(
    "name, match",
    [("resnet5", r"Did you mean 'resnet50'|Did you mean .*resnet"), ("nonsense_model_xyz", "embedcache backbones")],
)
def test_unknown_backbone_names_close_matches(name, match):
    with pytest.raises(UnknownBackboneError, match=match):
        bbm.get_backbone(name)


def test_bad_weights_tag_lists_valid_tags():
    with pytest.raises(WeightsError, match="IMAGENET1K_V1"):
        bbm.get_backbone("resnet18", weights="IMAGENET9K")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_weights_file_loads_and_changes_identity(tmp_path, suffix):
    torch.manual_seed(3)
    state = torchvision_resnet18_state()
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    bb = bbm.get_backbone("resnet18", weights_path=path)
    assert bb.weights_tag == f"file:w{suffix}"
    assert bb.weights_sha256 != bbm.get_backbone("resnet18", weights="none").weights_sha256


def test_weights_file_with_a_different_head_is_accepted(tmp_path):
    state = torchvision_resnet18_state()
    state["fc.weight"] = torch.zeros(3, 512)
    state["fc.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "ft.pt")
    assert bbm.get_backbone("resnet18", weights_path=tmp_path / "ft.pt").dim == 512


def test_weights_file_for_another_architecture_is_refused(tmp_path):
    torch.save(torchvision_resnet18_state(), tmp_path / "r18.pt")
    with pytest.raises(WeightsError, match="does not fit this architecture"):
        bbm.get_backbone("resnet34", weights_path=tmp_path / "r18.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_objects_are_never_loaded(tmp_path):
    torch.save({"x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="weights_only"):
        bbm.get_backbone("resnet18", weights_path=tmp_path / "evil.pt")


@pytest.mark.parametrize("pool, dim", [("avg", 256), ("max", 256), ("avgmax", 512)])
def test_intermediate_layer_with_pooling(pool, dim):
    bb = bbm.get_backbone("resnet18", weights="none", layer="layer3", pool=pool)
    assert bb.dim == dim
    assert bb.spec()["layer"] == "layer3" and bb.spec()["pool"] == pool


def test_cls_pool_on_vit_tokens():
    bb = bbm.get_backbone("vit_b_16", weights="none", layer="encoder.ln", pool="cls")
    assert bb.dim == 768


def test_unknown_layer_suggests_nodes():
    with pytest.raises(ConfigError, match="Did you mean 'layer3'"):
        bbm.get_backbone("resnet18", weights="none", layer="layer33")


def test_bad_pool_names_the_parameter():
    with pytest.raises(ConfigError, match="'pool' parameter"):
        bbm.get_backbone(TINY, pool="median")


def test_module_path_factory_string():
    bb = bbm.get_backbone("tests.tiny_backbone:tiny_factory")
    assert bb.dim == 8


def test_list_backbones_includes_builtins_and_torchvision():
    rows = {r.name: r for r in bbm.list_backbones(with_torchvision_dims=False)}
    assert rows["efficientnet_lite0"].offline_ready
    assert rows["efficientnet_lite0"].dim == 1280
    assert "resnet50" in rows and "IMAGENET1K_V2" in rows["resnet50"].weights


def torchvision_resnet18_state():
    from torchvision.models import resnet18

    return resnet18(weights=None).state_dict()


def test_timm_backbone_when_installed():
    pytest.importorskip("timm")
    bb = bbm.get_backbone("timm:resnet18", weights="none")
    assert bb.dim == 512 and bb.weights_tag == "none"
    assert bb.preprocess.crop_size == 224


def test_entry_point_plugins_are_found(monkeypatch):
    class FakeEntryPoint:
        name = "plugin-tiny"

        def load(self):
            from tests.tiny_backbone import tiny_factory

            return tiny_factory

    monkeypatch.setattr(bbm.metadata, "entry_points", lambda group: [FakeEntryPoint()] if group == bbm.ENTRY_POINT_GROUP else [])
    assert bbm.get_backbone("plugin-tiny").dim == 8
    assert "plugin-tiny" in {r.name for r in bbm.list_backbones(with_torchvision_dims=False)}


def test_pool_without_layer_is_refused():
    with pytest.raises(ConfigError, match="only applies with 'layer'"):
        bbm.get_backbone(TINY, pool="max")
