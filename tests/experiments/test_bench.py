"""Tests for embedcache.experiments.bench: backbone items and the leaderboard."""

import json

import pytest

import tests.tiny_backbone  # noqa: F401
from embedcache.errors import ConfigError
from embedcache.experiments.bench import bench, parse_backbone_item
from tests.tiny_backbone import TINY, make_image_folder


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "data", per_class=12, split_dirs=True)


@pytest.mark.parametrize(
    "item, expected",
    [
        ("resnet18=none", {"backbone": "resnet18", "image_size": None, "weights": "none"}),
        ("pixels@28", {"backbone": "pixels", "image_size": 28, "weights": None}),
        ("efficientnet_lite1@240=imagenet", {"backbone": "efficientnet_lite1", "image_size": 240, "weights": "imagenet"}),
    ],
)
def test_parse_backbone_item(item, expected):
    parsed = parse_backbone_item(item)
    assert {k: getattr(parsed, k) for k in expected} == expected


def test_bench_leaderboard_and_rerun_only_trains_probes(folder, tmp_path):
    cache = tmp_path / "c"
    first = bench(folder, [TINY, "pixels@8"], cache_dir=cache, out=tmp_path / "out", workers=0)
    assert {r.backbone for r in first.rows} == {TINY, "pixels@8"}
    assert not any(r.cache_hit for r in first.rows)
    row = next(r for r in first.rows if r.backbone == "pixels@8")
    assert row.dim == 64 and row.image_size == 8 and row.extract_images_per_s > 0
    for name in ("leaderboard.json", "leaderboard.csv", "leaderboard.md"):
        assert (tmp_path / "out" / name).exists()
    assert json.loads((tmp_path / "out" / "leaderboard.json").read_text())["rows"] == first.to_dict()["rows"]
    second = bench(folder, [TINY, "pixels@8"], cache_dir=cache, workers=0)
    assert all(r.cache_hit for r in second.rows)


def test_zero_size_backbone_item_is_refused():
    with pytest.raises(ConfigError, match="positive int"):
        parse_backbone_item("pixels@0")


def test_bench_features_all_picks_a_set_per_backbone_on_val(folder, tmp_path):
    result = bench(folder, [TINY], cache_dir=tmp_path / "c", workers=0, layers="stages", features="all",
                   out=tmp_path / "out")
    (row,) = result.rows
    from embedcache.store.reader import FeatureStore

    store = FeatureStore.open(row.cache)
    assert store.feature_sets  # the entry holds the stages
    candidates = set(store.feature_set_names)
    assert row.features in candidates or set(row.features.split("+")) <= candidates
    assert row.dim == store.select_features(row.features).shape[1]
    assert "features" in (tmp_path / "out" / "leaderboard.md").read_text()
    one = bench(folder, [TINY], cache_dir=tmp_path / "c", workers=0, layers="stages",
                features=store.feature_set_names[1], heads=["torch", "knn"])
    assert {r.features for r in one.rows} == {store.feature_set_names[1]} and all(r.cache_hit for r in one.rows)
    with pytest.raises(ConfigError, match="--features all sweeps the linear heads"):
        bench(folder, [TINY], cache_dir=tmp_path / "c", workers=0, features="all", heads=["knn"])
