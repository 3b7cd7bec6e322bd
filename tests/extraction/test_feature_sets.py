"""Several feature sets from one forward pass (``extract --layers``): storage, keys, addressing, integrity."""

import json
import zlib

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import tests.tiny_backbone  # noqa: F401
from embedcache.cli import main
from embedcache.errors import ConfigError, CorruptEntryError
from embedcache.experiments.predict import predict
from embedcache.experiments.protocol import probe
from embedcache.extraction import compute as compute_mod
from embedcache.extraction import loop as loop_mod
from embedcache.extraction.extract import extract
from embedcache.models.backbone import BackboneParts
from embedcache.models.build import get_backbone
from embedcache.models.preprocess import PreprocessSpec
from embedcache.sources.decode import DECODER_VERSION
from embedcache.store.fingerprint import cache_key, config_key
from embedcache.store.reader import FeatureStore
from embedcache.store.verify import verify_entry
from tests.tiny_backbone import TINY, make_image_folder

LAYERS = "features.1,features.4"
SETS = ["features.1:avg", "features.1:max", "features.4:avg", "features.4:max"]


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "data", per_class=10, split_dirs=True)


def run(data, cache, **kw):
    kw.setdefault("backbone", TINY)
    kw.setdefault("workers", 0)
    kw.setdefault("batch_size", 4)
    kw.setdefault("precision", "fp32")
    return extract(data, cache_dir=cache, **kw)


@pytest.fixture
def entry(folder, tmp_path):
    return run(folder, tmp_path / "c", layers=LAYERS, pools="avg,max")


def test_the_model_runs_once_per_image_for_every_set(folder, tmp_path, monkeypatch):
    seen = []
    real = loop_mod.inference_module

    def counting(bb, device, **kw):
        module = real(bb, device, **kw)
        for sub in module.modules():  # the stem: every image passes it once per forward pass
            if isinstance(sub, nn.Conv2d) and sub.in_channels == 3:
                sub.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
        return module

    monkeypatch.setattr(loop_mod, "inference_module", counting)
    store = run(folder, tmp_path / "c", layers=LAYERS, pools="avg,max")
    assert sum(seen) == len(store) == 40
    assert store.feature_set_names == ["penultimate", *SETS]


def test_each_set_is_what_a_single_layer_extraction_gives(entry, folder, tmp_path):
    plain = run(folder, tmp_path / "c")
    np.testing.assert_allclose(entry.features, plain.features, rtol=1e-3, atol=1e-4)
    for name in SETS:
        layer, pool = name.split(":")
        single = run(folder, tmp_path / "c", layer=layer, pool=pool)
        np.testing.assert_allclose(entry.feature_sets[name], single.features, rtol=1e-3, atol=1e-4)


def test_a_plain_extract_keeps_its_documented_key(folder, tmp_path):
    plain = run(folder, tmp_path / "c")
    bb = plain.backbone
    assert "feature_sets" not in bb and "feature_sets" not in plain.attrs
    # docs/schema.md's formula, written out: nothing about feature sets in it
    cfg = config_key(backbone={k: bb[k] for k in ("name", "weights", "weights_sha256", "layer", "pool")},
                     preprocess=plain.attrs["preprocess"], precision="fp32", store_dtype="float16",
                     decoder_version=DECODER_VERSION)
    assert plain.cache_key == cache_key(config=cfg, manifest_sha256=plain.attrs["manifest_sha256"])


@pytest.mark.parametrize("other", [{"layers": "features.1"}, {"layers": LAYERS, "pools": "avg"},
                                   {"layers": "features.4,features.1", "pools": "avg,max"}])
def test_the_sets_are_in_the_key(entry, folder, tmp_path, other):
    again = run(folder, tmp_path / "c", layers=LAYERS, pools="avg,max")
    assert again.cache_hit and again.cache_key == entry.cache_key
    changed = run(folder, tmp_path / "c", **other)
    assert not changed.cache_hit and changed.cache_key != entry.cache_key
    assert changed.cache_key != run(folder, tmp_path / "c").cache_key


def test_sets_and_concatenations_are_addressable(entry):
    np.testing.assert_array_equal(entry.select_features("penultimate"), entry.features)
    np.testing.assert_array_equal(entry.select_features(None), entry.features)
    joined = entry.select_features("features.4:max+penultimate")
    assert joined.shape == (40, 16)
    np.testing.assert_array_equal(joined[:, :8], entry.feature_sets["features.4:max"])
    np.testing.assert_array_equal(joined[:, 8:], entry.features)


@pytest.mark.parametrize("features", ["layer3:avg", "features.1:avg+nope", "features.1"])
def test_a_missing_set_is_named_with_those_available(entry, features):
    with pytest.raises(ConfigError, match=r"^The 'features' parameter names a feature set this entry does not "
                                          r"hold: .*Available: penultimate, features.1:avg, features.1:max"):
        entry.select_features(features)
    with pytest.raises(ConfigError, match="does not hold"):
        probe(entry, features=features)


def test_each_set_reads_with_plain_h5py(entry):
    with h5py.File(entry.path, "r") as f:
        listed = json.loads(f.attrs["feature_sets"])
        assert [s["name"] for s in listed] == SETS and all(s["dim"] == 8 for s in listed)
        np.testing.assert_array_equal(f["features"][...], entry.features)
        for name in SETS:
            values = f[f"feature_sets/{name}"][...]
            np.testing.assert_array_equal(values, entry.feature_sets[name])
            for b, crc in enumerate(f[f"checksums/feature_sets/{name}"][...]):
                assert zlib.crc32(np.ascontiguousarray(values[b * 256:(b + 1) * 256]).view(np.uint8)) == crc


def _flip_byte_in_chunk(path, dataset):
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(0)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 5)
        byte = fh.read(1)
        fh.seek(info.byte_offset + 5)
        fh.write(bytes([byte[0] ^ 0x10]))


def test_a_flipped_byte_in_a_set_is_refused(entry):
    _flip_byte_in_chunk(entry.path, "feature_sets/features.4:avg")
    with pytest.raises(CorruptEntryError, match="features.4:avg"):
        FeatureStore.open(entry.path)
    assert any("features.4:avg" in p for p in verify_entry(entry.path).problems)


def test_a_rewritten_set_value_fails_its_block_checksum(entry):
    with h5py.File(entry.path, "r+") as f:  # valid HDF5 checksums, wrong numbers
        f["feature_sets/features.1:max"][3, 2] = 123.0
    with pytest.raises(CorruptEntryError, match=r"/feature_sets/features.1:max \(rows 0-255\)"):
        FeatureStore.open(entry.path)
    assert any("/feature_sets/features.1:max rows 0-39" in p for p in verify_entry(entry.path).problems)


def test_an_interrupted_run_resumes_every_set(folder, tmp_path, monkeypatch):
    reference = run(folder, tmp_path / "ref", layers=LAYERS)
    monkeypatch.setattr(compute_mod, "COMMIT_EVERY_SECONDS", 0.0)  # after every batch
    calls = []

    def interrupt(progress):
        calls.append(progress)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(folder, tmp_path / "c", layers=LAYERS, progress=interrupt)
    resumed = run(folder, tmp_path / "c", layers=LAYERS)
    assert resumed.stats.resumed_rows == 12 and resumed.stats.computed_rows == 28
    for name in ("features.1:avg", "features.4:avg"):
        np.testing.assert_array_equal(resumed.feature_sets[name], reference.feature_sets[name])


def test_added_images_reuse_every_set(folder, tmp_path):
    first = run(folder, tmp_path / "c", layers=LAYERS)
    make_image_folder(folder / "train", classes=("c",), per_class=4, seed=3)
    second = run(folder, tmp_path / "c", layers=LAYERS)
    assert second.stats.reused_rows == len(first) and second.stats.computed_rows == 4
    old = {p: i for i, p in enumerate(first.paths)}
    rows = [i for i, p in enumerate(second.paths) if p in old]
    np.testing.assert_array_equal(second.feature_sets["features.4:avg"][rows],
                                  first.feature_sets["features.4:avg"][[old[second.paths[i]] for i in rows]])


@pytest.mark.parametrize("kwargs, match", [
    ({"layers": "features.1", "layer": "features.4"}, "'layers' parameter cannot be combined with 'layer'"),
    ({"pools": "avg,max"}, "applies to --layers only"),
    ({"layers": "features.1", "pools": "mean"}, "'pool' parameter must be one or more of"),
    ({"layers": "featurs.1"}, "'layer' parameter must name a node.*Did you mean"),
    ({"layers": "last4"}, "'last4' preset needs a ViT"),
    ({"layers": " , "}, "'layers' parameter names no node"),
])
def test_bad_set_requests_are_named(folder, tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        run(folder, tmp_path / "c", **kwargs)


def test_stage_presets_follow_the_architecture():
    lite = get_backbone("efficientnet_lite0", weights="none", layers="stages")
    assert [name for name, _ in lite.feature_sets] == [
        f"features.{i}:avg" for i in (0, 1, 3, 5, 8, 11, 15, 16, 17)]
    assert [dim for _, dim in lite.feature_sets] == [32, 16, 24, 40, 80, 112, 192, 320, 1280]
    resnet = get_backbone("resnet18", weights="none", layers="stages", pools="avg,max", image_size=64)
    assert [name for name, _ in resnet.feature_sets] == [
        f"layer{i}:{p}" for i in range(1, 5) for p in ("avg", "max")]


def tiny_vit_factory(*, weights, weights_path):
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=8, num_layers=5, num_heads=2, hidden_dim=8, mlp_dim=16,
                              num_classes=3)
    spec = PreprocessSpec(resize_size=16, crop_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    return BackboneParts(model=model, preprocess=spec, weights_tag="seed0")


def test_last4_reads_the_last_vit_blocks_class_token_and_average():
    bb = get_backbone(f"{__name__}:tiny_vit_factory", layers="last4")
    assert [name for name, _ in bb.feature_sets] == [
        f"encoder.layers.encoder_layer_{i}:{p}" for i in range(1, 5) for p in ("cls", "avg")]
    x = torch.randn(2, 3, 16, 16)
    plain = get_backbone(f"{__name__}:tiny_vit_factory")
    single = get_backbone(f"{__name__}:tiny_vit_factory", layer="encoder.layers.encoder_layer_3", pool="cls")
    with torch.inference_mode():
        out = bb.module(x)
        torch.testing.assert_close(out[:, :8], plain.module(x))
        torch.testing.assert_close(out[:, 8 + 4 * 8:8 + 5 * 8], single.module(x))


def test_a_probe_saved_on_a_set_predicts_with_that_set(entry, folder, tmp_path):
    result = probe(entry, features="features.4:avg", out=tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert meta["feature_set"] == "features.4:avg"
    assert (meta["backbone"]["layer"], meta["backbone"]["pool"]) == ("features.4", "avg")
    assert "feature_sets" not in meta["backbone"]
    predicted = predict(tmp_path / "p", [str(folder / "test")], workers=0)
    assert predicted.accuracy is not None and result.features == "features.4:avg"
    with pytest.raises(ConfigError, match="concatenation of feature sets .* cannot be saved"):
        probe(entry, features="features.1:avg+features.4:avg", out=tmp_path / "q")


def test_probe_all_chooses_on_val_and_scores_test_once(entry, monkeypatch, tmp_path):
    import embedcache.experiments.feature_sweep as sweep_mod

    scored = []
    real = sweep_mod.classification_report
    monkeypatch.setattr(sweep_mod, "classification_report", lambda *a, **k: scored.append(1) or real(*a, **k))
    result = sweep_mod.probe_all_sets(entry, penalties=[1e-3, 1e-1])
    assert scored == [1]
    names = list(dict.fromkeys(row["features"] for row in result.feature_sweep))
    # each set (the tiny backbone's features.4:avg is its penultimate set again: swept once), then
    # the concatenation of the distinct ones
    assert names[:-1] == ["penultimate", "features.1:avg", "features.1:max", "features.4:max"]
    assert any("'features.4:avg' holds the same features as 'penultimate'" in note for note in result.notes)
    assert names[-1].split("+")[0] == "penultimate" and set(names[-1].split("+")) <= {"penultimate", *SETS}
    assert len(names[-1].split("+")) >= 2
    assert len(result.feature_sweep) == 2 * len(names) and result.features in names
    best = max(r["val_top1"] for r in result.feature_sweep)
    assert max(r["val_top1"] for r in result.feature_sweep if r["features"] == result.features) == best
    saved = sweep_mod.probe_all_sets(entry, penalties=[1e-3], out=tmp_path / "p")  # a saved probe: one set
    assert {row["features"] for row in saved.feature_sweep} == {"penultimate", *SETS} - {"features.4:avg"}
    assert any("concatenation of every set is not a candidate" in note for note in saved.notes)
    with pytest.raises(ConfigError, match="--features all chooses the penalty on val itself; drop --penalty"):
        sweep_mod.probe_all_sets(entry, penalty=0.1)
    with pytest.raises(ConfigError, match=r"features='all' .* call embedcache.probe_all_sets"):
        probe(entry, features="all")


def test_cli_layers_features_and_errors(folder, tmp_path):
    runner = CliRunner()
    cache = str(tmp_path / "c")
    out = runner.invoke(main, ["extract", str(folder), "-b", TINY, "--workers", "0", "--cache-dir", cache,
                               "--layers", LAYERS, "--pool", "avg,max"])
    assert out.exit_code == 0, out.output
    assert "feature sets: penultimate (8), features.1:avg (8)" in out.output
    path = out.output.split("-> ")[1].split()[0]
    info = runner.invoke(main, ["info", path])
    assert "features   5 sets: penultimate (8), features.1:avg (8), features.1:max (8)" in info.output
    ok = runner.invoke(main, ["probe", path, "--features", "features.1:avg+features.4:max", "--penalty", "0.01"])
    assert ok.exit_code == 0 and "features   features.1:avg+features.4:max" in ok.output
    bad = runner.invoke(main, ["probe", path, "--features", "layer3:avg"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output
    assert bad.output.strip().splitlines() == [bad.output.strip()]
    assert "does not hold: 'layer3:avg'. Available: penultimate, features.1:avg" in bad.output
    swept = runner.invoke(main, ["probe", path, "--features", "all", "--penalties", "0.001,0.1"])
    assert swept.exit_code == 0 and "feature set" in swept.output and "<- chosen" in swept.output
    knn = runner.invoke(main, ["probe", path, "--features", "all", "--head", "knn"])
    assert knn.exit_code != 0 and "--features all sweeps the linear heads" in knn.output
    few = runner.invoke(main, ["fewshot", path, "--features", "features.4:avg", "--shots", "1", "--seeds", "2"])
    assert few.exit_code == 0, few.output
    pools = runner.invoke(main, ["extract", str(folder), "-b", TINY, "--cache-dir", cache, "--pool", "avg,max"])
    assert pools.exit_code != 0 and "--layers NODES" in pools.output


def _count_convs(monkeypatch):
    """Images through the stem conv and through the second conv, per forward pass."""
    seen = {"stem": 0, "second": 0}
    real = loop_mod.inference_module

    def counting(bb, device, **kw):
        module = real(bb, device, **kw)
        for sub in module.modules():
            if isinstance(sub, nn.Conv2d):
                which = "stem" if sub.in_channels == 3 else "second"
                sub.register_forward_pre_hook(lambda _m, args, w=which: seen.__setitem__(w, seen[w] + args[0].shape[0]))
        return module

    monkeypatch.setattr(loop_mod, "inference_module", counting)
    return seen


def test_a_set_asked_for_later_computes_only_that_one(folder, tmp_path, monkeypatch):
    plain = run(folder, tmp_path / "c")
    seen = _count_convs(monkeypatch)
    later = run(folder, tmp_path / "c", layers="features.1")
    # one pass of the network cut at features.1: the stem runs, the second conv never does
    assert seen == {"stem": 40, "second": 0}
    assert later.attrs["extract_loop"] == "composed" and not later.cache_hit
    assert later.stats.computed_rows == 40 and later.stats.reused_rows == 40
    assert later.attrs["composed_from"]["penultimate"] == plain.cache_key
    np.testing.assert_array_equal(later.features, plain.features)
    one_pass = run(folder, tmp_path / "one", layers="features.1")
    assert one_pass.cache_key == later.cache_key and one_pass.attrs.get("extract_loop") != "composed"
    np.testing.assert_allclose(later.feature_sets["features.1:avg"], one_pass.feature_sets["features.1:avg"],
                               rtol=1e-3, atol=1e-4)
    assert verify_entry(later.path).ok
    assert run(folder, tmp_path / "c", layers="features.1").cache_hit


def test_sets_an_entry_already_holds_are_copied_without_running_the_model(entry, folder, tmp_path, monkeypatch):
    seen = _count_convs(monkeypatch)
    fewer = run(folder, tmp_path / "c", layers="features.4", pools="max")
    assert seen == {"stem": 0, "second": 0} and fewer.stats.computed_rows == 0
    assert fewer.feature_set_names == ["penultimate", "features.4:max"]
    np.testing.assert_array_equal(fewer.feature_sets["features.4:max"], entry.feature_sets["features.4:max"])


def test_more_than_one_missing_set_runs_in_one_pass(folder, tmp_path, monkeypatch):
    run(folder, tmp_path / "c")
    seen = _count_convs(monkeypatch)
    store = run(folder, tmp_path / "c", layers=LAYERS, pools="avg,max")
    assert store.attrs["extract_loop"] != "composed" and seen == {"stem": 40, "second": 40}


@pytest.mark.parametrize("other", [{"store_dtype": "float32"}, {"weights": "other"}])
def test_an_entry_of_another_configuration_is_never_a_donor(folder, tmp_path, other):
    run(folder, tmp_path / "c", **other)
    store = run(folder, tmp_path / "c", layers="features.1")
    assert store.attrs["extract_loop"] != "composed" and store.stats.reused_rows == 0


def test_a_damaged_donor_is_passed_over_with_a_warning(folder, tmp_path):
    plain = run(folder, tmp_path / "c")
    with h5py.File(plain.path, "r+") as f:
        f["features"][3] = f["features"][3] + 1  # the block checksum no longer matches
    store = run(folder, tmp_path / "c", layers="features.1")
    assert store.attrs["extract_loop"] != "composed"
    assert any("could not be read" in w for w in store.stats.warnings)
    np.testing.assert_allclose(store.features[4:], plain.features[4:], rtol=1e-3, atol=1e-4)


def test_views_line_up_in_a_composed_entry(folder, tmp_path):
    plain = run(folder, tmp_path / "c", views=2)
    later = run(folder, tmp_path / "c", views=2, layers="features.1")
    assert later.attrs["extract_loop"] == "composed"
    np.testing.assert_array_equal(later.views.select_features(), plain.views.select_features())
    assert later.views.select_features("features.1:avg").shape[0] == len(plain.views)


def test_probe_all_sweeps_a_set_equal_to_an_earlier_one_once(entry):
    import embedcache.experiments.feature_sweep as sweep_mod

    store = FeatureStore.open(entry.path)
    twin = store.feature_sets["features.1:avg"]
    store.feature_sets["features.1:max"] = (twin.astype(np.float32) * (1 + 1e-3)).astype(twin.dtype)  # rounding apart
    result = sweep_mod.probe_all_sets(store, penalties=[1e-3])
    names = list(dict.fromkeys(row["features"] for row in result.feature_sweep))
    assert names[:-1] == ["penultimate", "features.1:avg", "features.4:max"]
    assert set(names[-1].split("+")) == {"penultimate", "features.1:avg", "features.4:max"}
    assert any("'features.1:max' holds the same features as 'features.1:avg'" in note for note in result.notes)
