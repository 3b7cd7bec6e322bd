"""Augmented views of the train images (``extract --views K --augment NAME``): rows, key,
determinism, and that no view of a val or test image ever becomes a training row."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from embedcache.cli import main
from embedcache.errors import ConfigError
from embedcache.experiments.head_artifacts import load_head
from embedcache.experiments.protocol import ProbeSplit, probe
from embedcache.experiments.train_views import TrainViews, add_train_views
from embedcache.extraction.extract import extract
from embedcache.sources.views import augment_image, check_views, view_seed
from embedcache.splits import Split
from embedcache.store.reader import FeatureStore
from tests.tiny_backbone import TINY, make_image_folder


def _three_split_folder(root, per_class=8):
    make_image_folder(root, per_class=per_class, split_dirs=True)
    make_image_folder(root / "_val", per_class=4, seed=5)
    (root / "val").mkdir()
    for cls in ("a", "b"):
        (root / "_val" / cls).rename(root / "val" / cls)
    (root / "_val").rmdir()
    return root


def _extract(folder, cache, **kw):
    return extract(folder, backbone=TINY, workers=0, cache_dir=cache, precision="fp32", store_dtype="float32", **kw)


@pytest.mark.parametrize(("views", "augment", "fragment"), [
    (0, None, "'views'"), (65, "crop", "'views'"), (True, None, "'views'"), (2.0, None, "'views'"),
    (1, "crop", "needs --views"), (3, "flip", "--views must be 2"), (4, "rotate", "'augment'"),
])
def test_bad_view_options_name_the_parameter(views, augment, fragment):
    with pytest.raises(ConfigError, match=fragment):
        check_views(views, augment)


def test_check_views_defaults():
    assert check_views(1, None) == (1, None)
    assert check_views(4, None) == (4, "standard")
    assert check_views(2, "flip") == (2, "flip")


def test_views_are_rows_of_train_images_only(tmp_path):
    folder = _three_split_folder(tmp_path / "d")
    store = _extract(folder, tmp_path / "c", views=4, augment="crop")
    train, val, test = (np.flatnonzero(store.splits == s) for s in (Split.TRAIN, Split.VAL, Split.TEST))
    assert (len(train), len(val), len(test)) == (16, 8, 16)
    assert len(store) == 40  # one row per image
    assert len(store.views) == 16 * 3
    assert set(store.views.origin.tolist()) == set(train.tolist())
    assert sorted(store.views.index.tolist()) == sorted([1, 2, 3] * 16)
    # the centre views are the plain entry's features, bit for bit; the key differs
    plain = _extract(folder, tmp_path / "c")
    assert plain.cache_key != store.cache_key
    np.testing.assert_array_equal(plain.features, store.features)
    assert not np.allclose(store.views.features, store.features[store.views.origin])  # crops differ
    with h5py.File(store.path, "r") as handle:  # plain h5py: docs/schema.md
        view = handle["view"][...]
        paths = handle["paths"][...].astype(str)
        assert json.loads(handle["view"].attrs["names"]) == ["origin", "view"]
    assert store.attrs["views"] == 4 and store.attrs["augment"] == "crop"
    assert len(view) == 40 + 48 and (view[:40, 1] == 0).all()
    first = 40
    assert paths[first] == f"{paths[view[first, 0]]}//view{view[first, 1]}"


def test_views_are_deterministic_and_in_the_key(tmp_path):
    folder = make_image_folder(tmp_path / "d", per_class=6, split_dirs=True)
    a = _extract(folder, tmp_path / "c1", views=3, augment="standard")
    b = _extract(folder, tmp_path / "c2", views=3, augment="standard")
    assert a.cache_key == b.cache_key
    np.testing.assert_array_equal(a.views.features, b.views.features)
    assert _extract(folder, tmp_path / "c1", views=3, augment="standard").cache_hit
    other = {_extract(folder, tmp_path / "c1", views=3, augment="crop").cache_key,
             _extract(folder, tmp_path / "c1", views=2, augment="standard").cache_key}
    assert a.cache_key not in other and len(other) == 2


def test_augmentation_depends_on_path_and_view_only():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    one = np.asarray(augment_image(image, "crop", view_seed("a/x.png", 1, "crop")))
    again = np.asarray(augment_image(image, "crop", view_seed("a/x.png", 1, "crop")))
    other = np.asarray(augment_image(image, "crop", view_seed("a/x.png", 2, "crop")))
    np.testing.assert_array_equal(one, again)
    assert one.shape != other.shape or not np.array_equal(one, other)
    flipped = np.asarray(augment_image(image, "flip", 0))
    np.testing.assert_array_equal(flipped, np.asarray(image)[:, ::-1])


def test_add_train_views_never_trains_on_val_or_test_views():
    # views of every image, including val and test ones (as a hold-out of train makes them)
    features = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    labels = np.arange(10) % 2
    parts = ProbeSplit(np.array([0, 1, 2, 3]), np.array([4, 5, 6]), np.array([7, 8, 9]), "cache", 0.0, 0)
    origin = np.repeat(np.arange(10), 2)
    views = TrainViews(features[origin] + 0.5, origin)
    train, merged, (merged_labels,), used = add_train_views(parts.train, np.concatenate([parts.val, parts.test]),
                                                            views, features, labels)
    assert used == 8
    assert len(merged) == 10 + 20
    view_positions = train[train >= 10]
    assert set(origin[view_positions - 10].tolist()) == {0, 1, 2, 3}
    np.testing.assert_array_equal(merged_labels[view_positions], labels[origin[view_positions - 10]])
    assert np.array_equal(train[:4], parts.train)
    # nothing of images 4..9 among the training rows' features
    assert not np.isin(np.floor(merged[train, 0]), np.arange(4, 10)).any()


def test_probe_trains_on_views_of_train_images_only(tmp_path, monkeypatch):
    """End to end: with the val split held out of train, the held-out images' views stay out."""
    folder = make_image_folder(tmp_path / "d", per_class=10, split_dirs=True)
    store = _extract(folder, tmp_path / "c", views=3, augment="crop")
    seen = {}
    import embedcache.experiments.protocol as protocol

    original = protocol.sweep_and_refit

    def spy(X, y, n_train, **kw):
        seen["X"], seen["n_train"] = X, n_train
        return original(X, y, n_train, **kw)

    monkeypatch.setattr(protocol, "sweep_and_refit", spy)
    result = probe(store, val_fraction=0.25)
    sizes = result.split_sizes
    assert sizes["train_views"] == 2 * sizes["train"]
    assert seen["n_train"] == sizes["train"] + sizes["train_views"]
    # every training row is a train image or one of its views: never a val (held-out) image's view
    held_out = [p for p in store.paths[store.splits == Split.TRAIN]]
    val_views = store.views.features[np.isin(store.views.origin, np.flatnonzero(store.splits == Split.TRAIN))]
    train_rows = seen["X"][: seen["n_train"]]
    val_images = seen["X"][seen["n_train"]:]
    assert len(val_images) == sizes["val"] and len(held_out) == sizes["train"] + sizes["val"]
    val_positions = [int(np.flatnonzero((store.features == row).all(1))[0]) for row in val_images]
    forbidden = store.views.features[np.isin(store.views.origin, val_positions)]
    assert len(forbidden) == 2 * sizes["val"] and len(val_views) > len(forbidden)
    for row in forbidden:
        assert not (train_rows == row).all(1).any()


def test_knn_probe_on_views_saves_and_loads(tmp_path):
    folder = make_image_folder(tmp_path / "d", per_class=8, split_dirs=True)
    store = _extract(folder, tmp_path / "c", views=2, augment="flip")
    result = probe(store, head="knn", ks=[1, 3], out=tmp_path / "knn")
    assert (np.asarray(result.reference_positions) >= len(store)).any()  # views among the references
    meta = json.loads((tmp_path / "knn" / "probe.json").read_text())
    loaded = load_head(meta, tmp_path / "knn")
    test = store.split_indices("test")
    np.testing.assert_array_equal(loaded.predict(store.features[test]), result.estimator.predict(store.features[test]))


def test_knn_probe_on_fewer_views_saves_the_rows_it_used(tmp_path):
    """probe --views 2 on a --views 3 entry: the saved references are exactly the rows fitted
    (a view keeps its place, so its position still names its own file row)."""
    folder = make_image_folder(tmp_path / "d", per_class=8, split_dirs=True)
    store = _extract(folder, tmp_path / "c", views=3, augment="crop")
    result = probe(store, head="knn", ks=[1, 3], views=2, out=tmp_path / "knn")
    positions = np.asarray(result.reference_positions)
    used_views = positions[positions >= len(store)] - len(store)
    assert len(used_views) and (store.views.index[used_views] == 1).all()  # only view 1 trained
    meta = json.loads((tmp_path / "knn" / "probe.json").read_text())
    loaded = load_head(meta, tmp_path / "knn")
    test = store.split_indices("test")
    np.testing.assert_array_equal(loaded.predict(store.features[test]), result.estimator.predict(store.features[test]))
    from safetensors.numpy import load_file

    saved_rows = load_file(str(tmp_path / "knn" / "probe.safetensors"))["reference_rows"]
    saved_views = saved_rows[saved_rows >= store.attrs["n_images"]]
    np.testing.assert_array_equal(np.sort(saved_views), np.sort(store.views.rows[used_views]))
    index_of_row = dict(zip(store.views.rows.tolist(), store.views.index.tolist(), strict=True))
    assert {index_of_row[r] for r in saved_views.tolist()} == {1}


def test_views_cli_and_info(tmp_path):
    folder = make_image_folder(tmp_path / "d", per_class=6, split_dirs=True)
    runner = CliRunner()
    out = runner.invoke(main, ["extract", str(folder), "-b", TINY, "--workers", "0", "--views", "3",
                               "--cache-dir", str(tmp_path / "c")])
    assert out.exit_code == 0, out.output
    assert "views: 3 per train image (standard): 24 augmented rows besides the 24 images" in out.output
    entry = FeatureStore.open(next((tmp_path / "c").glob("*.h5")))
    info = runner.invoke(main, ["info", str(entry.path)])
    assert "views      3 per train image (standard)" in info.output and "rows 48/48" in info.output
    bad = runner.invoke(main, ["extract", str(folder), "-b", TINY, "--views", "3", "--augment", "flip",
                               "--cache-dir", str(tmp_path / "c")])
    assert bad.exit_code != 0 and "--views must be 2" in bad.output and "Traceback" not in bad.output
    probed = runner.invoke(main, ["probe", str(entry.path), "--json"])
    assert probed.exit_code == 0, probed.output
    assert json.loads(probed.stdout)["split_sizes"]["train_views"] > 0


def test_probe_can_use_fewer_views_than_the_entry_holds(tmp_path):
    folder = make_image_folder(tmp_path / "d", per_class=8, split_dirs=True)
    store = _extract(folder, tmp_path / "c", views=3, augment="crop")
    full = probe(store, penalty=1e-3)
    two = probe(store, penalty=1e-3, views=2)
    one = probe(store, penalty=1e-3, views=1)
    n_train = full.split_sizes["train"]
    assert full.split_sizes["train_views"] == 2 * n_train
    assert two.split_sizes["train_views"] == n_train
    assert "train_views" not in one.split_sizes
    plain = probe(_extract(folder, tmp_path / "c"), penalty=1e-3)
    assert one.metrics["top1"] == plain.metrics["top1"]
    np.testing.assert_allclose(one.estimator.coef_, plain.estimator.coef_)
    for bad in (0, 4, 1.5):
        with pytest.raises(ConfigError, match="'views'"):
            probe(store, penalty=1e-3, views=bad)


def test_views_with_layers_store_every_set_of_every_view(tmp_path):
    folder = make_image_folder(tmp_path / "d", per_class=6, split_dirs=True)
    store = _extract(folder, tmp_path / "c", views=2, augment="flip", layers="stages")
    assert store.feature_sets and set(store.views.feature_sets) == set(store.feature_sets)
    for name, values in store.feature_sets.items():
        assert store.views.feature_sets[name].shape == (len(store.views), values.shape[1])
    from embedcache.experiments.feature_sweep import probe_all_sets

    result = probe_all_sets(store)
    assert result.split_sizes["train_views"] == result.split_sizes["train"]


def test_view_source_gives_the_model_gray_views_with_the_pixels_of_the_rgb_ones():
    from embedcache.sources.arrays import ArraySource
    from embedcache.sources.views import ViewSource

    rng = np.random.default_rng(3)
    base = ArraySource(rng.integers(0, 256, (4, 12, 12), dtype=np.uint8), np.array([0, 1, 0, 1]),
                       np.full(4, Split.TRAIN, np.uint8), ["a", "b"], "gray")
    for augment, count in (("flip", 2), ("crop", 3), ("standard", 3)):
        views = ViewSource(base, count, augment)
        assert np.array_equal(np.asarray(views.load_pixels(0)), np.asarray(base.load_pixels(0)))
        for row in range(len(views)):
            gray, rgb = views.load_pixels(row), views.load_image(row)
            assert gray.mode == "L" and rgb.mode == "RGB"
            assert np.array_equal(np.asarray(gray.convert("RGB")), np.asarray(rgb))
