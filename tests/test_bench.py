import json

import numpy as np
import pytest
from click.testing import CliRunner

import tests.tiny_backbone  # noqa: F401
from embedcache import bench, extract, fewshot
from embedcache.backbones import get_backbone
from embedcache.bench import draw_shots, parse_backbone_item
from embedcache.cli import main
from embedcache.errors import ConfigError
from embedcache.probe import TorchLinearProbe
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
    assert {k: parsed[k] for k in expected} == expected


def test_pixels_baseline_is_flattened_grey_pixels():
    bb = get_backbone("pixels", image_size=8)
    assert bb.dim == 64
    x = np.random.default_rng(0).random((2, 3, 8, 8)).astype(np.float32)
    import torch

    out = bb.module(torch.from_numpy(x))
    np.testing.assert_allclose(out.numpy(), x.mean(axis=1).reshape(2, -1), rtol=1e-6)


def test_bench_leaderboard_and_rerun_only_trains_probes(folder, tmp_path):
    cache = tmp_path / "c"
    first = bench(folder, [TINY, "pixels@8"], cache_dir=cache, out=tmp_path / "out", workers=0)
    assert {r["backbone"] for r in first["rows"]} == {TINY, "pixels@8"}
    assert not any(r["cache_hit"] for r in first["rows"])
    row = next(r for r in first["rows"] if r["backbone"] == "pixels@8")
    assert row["dim"] == 64 and row["image_size"] == 8 and row["extract_images_per_s"] > 0
    for name in ("leaderboard.json", "leaderboard.csv", "leaderboard.md"):
        assert (tmp_path / "out" / name).exists()
    assert json.loads((tmp_path / "out" / "leaderboard.json").read_text())["rows"] == first["rows"]
    second = bench(folder, [TINY, "pixels@8"], cache_dir=cache, workers=0)
    assert all(r["cache_hit"] for r in second["rows"])


def test_bench_cli_prints_the_table(folder, tmp_path):
    result = CliRunner().invoke(main, ["bench", str(folder), "--backbones", f"{TINY},pixels@8",
                                       "--workers", "0", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "test top-1" in result.stdout and "pixels@8" in result.stdout


def test_fewshot_grid_and_no_test_leakage(folder, tmp_path, monkeypatch):
    store = extract(folder, backbone=TINY, workers=0, cache_dir=tmp_path / "c")
    test_rows = set(np.flatnonzero(store.splits == 2).tolist())
    fitted = []
    original = TorchLinearProbe.fit

    def spy(self, X, y):
        fitted.append(X.copy())
        return original(self, X, y)

    monkeypatch.setattr(TorchLinearProbe, "fit", spy)
    log = []
    report = fewshot(store, shots=[1, 3], seeds=4, fit_log=log, out=tmp_path / "fs")
    assert [r["k"] for r in report["results"]] == [1, 3]
    assert all(len(r["accuracies"]) == 4 for r in report["results"])
    assert len(log) == 8 and all(not (set(rows.tolist()) & test_rows) for rows in log)
    assert all(set(store.splits[rows].tolist()) == {0} for rows in log)
    test_features = {row.tobytes() for row in store.features[sorted(test_rows)].astype(np.float32)}
    assert all(not ({row.tobytes() for row in X} & test_features) for X in fitted)
    assert (tmp_path / "fs" / "fewshot.md").exists() and (tmp_path / "fs" / "fewshot.json").exists()


def test_fewshot_seeds_differ_and_repeat(folder, tmp_path):
    store = extract(folder, backbone=TINY, workers=0, cache_dir=tmp_path / "c")
    train = np.flatnonzero(store.splits == 0)
    a, b = draw_shots(store.labels, train, 3, seed=0), draw_shots(store.labels, train, 3, seed=1)
    assert not np.array_equal(a, b) and np.array_equal(a, draw_shots(store.labels, train, 3, seed=0))


def test_too_many_shots_is_refused(folder, tmp_path):
    store = extract(folder, backbone=TINY, workers=0, cache_dir=tmp_path / "c")
    with pytest.raises(ConfigError, match="--shots 50 is more than class 0 has in the train split"):
        fewshot(store, shots=[50], seeds=1)


def test_fewshot_cli(folder, tmp_path):
    store = extract(folder, backbone=TINY, workers=0, cache_dir=tmp_path)
    result = CliRunner().invoke(main, ["fewshot", str(store.path), "--shots", "1,2", "--seeds", "3"])
    assert result.exit_code == 0, result.output
    assert "k per class" in result.stdout and "3 seeds" in result.stdout


def test_joint_fewshot_solver_matches_one_probe_per_seed():
    from embedcache.bench import fit_many_torch

    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 16)).astype(np.float32) + np.repeat(np.eye(3, 16) * 2, 100, axis=0).astype(np.float32)
    labels = np.repeat(np.arange(3), 100)
    row_sets = [draw_shots(labels, np.arange(300), 5, seed) for seed in range(3)]
    joint = fit_many_torch(features, labels, row_sets, penalty=0.1, tol=1e-7, max_iter=1000)
    for rows, (coef, intercept, classes) in zip(row_sets, joint, strict=True):
        single = TorchLinearProbe(penalty=0.1, tol=1e-7, max_iter=1000).fit(features[rows], labels[rows])
        np.testing.assert_allclose(coef, single.coef_, atol=2e-3)
        np.testing.assert_allclose(intercept, single.intercept_, atol=2e-3)
        assert list(classes) == list(single.classes_)


def test_zero_size_backbone_item_is_refused():
    with pytest.raises(ConfigError, match="positive int"):
        parse_backbone_item("pixels@0")
