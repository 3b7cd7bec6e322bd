"""Tests for embedcache.experiments.fewshot: the k-shot x seed grid, never fitted on test."""

import numpy as np
import pytest

import tests.tiny_backbone  # noqa: F401
from embedcache.errors import ConfigError
from embedcache.experiments import fewshot as fewshot_module
from embedcache.experiments.fewshot import draw_shots, fewshot
from embedcache.extraction.extract import extract
from tests.tiny_backbone import TINY, make_image_folder


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "data", per_class=12, split_dirs=True)


def test_fewshot_grid_and_no_test_leakage(folder, tmp_path, monkeypatch):
    store = extract(folder, backbone=TINY, workers=0, cache_dir=tmp_path / "c")
    test_rows = set(np.flatnonzero(store.splits == 2).tolist())
    fitted = []
    original = fewshot_module.fit_many_torch

    def spy(features, labels, row_sets, **kwargs):  # the torch head solves each k's seeds jointly
        fitted.extend(features[rows].copy() for rows in row_sets)
        return original(features, labels, row_sets, **kwargs)

    monkeypatch.setattr(fewshot_module, "fit_many_torch", spy)
    log = []
    report = fewshot(store, shots=[1, 3], seeds=4, fit_log=log, out=tmp_path / "fs")
    assert [r.k for r in report.results] == [1, 3]
    assert all(len(r.accuracies) == 4 for r in report.results)
    assert len(log) == 8 and all(not (set(rows.tolist()) & test_rows) for rows in log)
    assert all(set(store.splits[rows].tolist()) == {0} for rows in log)
    test_features = {row.tobytes() for row in store.features[sorted(test_rows)].astype(np.float32)}
    assert len(fitted) == 8 and all(not ({row.tobytes() for row in X} & test_features) for X in fitted)
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
