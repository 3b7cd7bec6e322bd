"""Extracting a CSV manifest with numeric targets or label sets: they reach the entry and its key;
malformed targets stop the extraction before anything is written."""

import numpy as np
import pytest

import tests.tiny_backbone  # noqa: F401
from embedcache.errors import ConfigError, DataSourceError
from embedcache.extraction.extract import extract
from tests.targets_data import make_multilabel_csv, make_regression_csv
from tests.tiny_backbone import TINY, make_image_folder


def test_numeric_targets_reach_the_entry_and_its_key(tmp_path):
    csv_path = make_regression_csv(tmp_path / "d", n=20)
    cache = tmp_path / "c"
    store = extract(csv_path, backbone=TINY, workers=0, cache_dir=cache, targets=["brightness"])
    assert store.task == "regression" and store.target_names == ["brightness"] and store.targets.shape == (20, 1)
    both = extract(csv_path, backbone=TINY, workers=0, cache_dir=cache, targets=["brightness", "contrast"])
    plain = extract(csv_path, backbone=TINY, workers=0, cache_dir=cache)
    assert len({store.cache_key, both.cache_key, plain.cache_key}) == 3 and plain.task == "classes"
    assert both.stats.reused_rows == 20  # the features themselves are reused
    again = extract(csv_path, backbone=TINY, workers=0, cache_dir=cache, targets=["brightness"])
    assert again.cache_hit and np.array_equal(again.targets, store.targets)


def test_label_sets_reach_the_entry(tmp_path):
    store = extract(make_multilabel_csv(tmp_path / "d", n=20), backbone=TINY, workers=0, cache_dir=tmp_path / "c")
    assert store.task == "multilabel" and store.class_names == ["blue", "green", "red"]
    assert store.label_sets.shape == (20, 3) and set(np.unique(store.label_sets)) <= {0, 1}


def test_malformed_targets_write_nothing(tmp_path):
    csv_path = make_regression_csv(tmp_path / "d", n=10)
    lines = csv_path.read_text().splitlines()
    lines[5] = lines[5].replace(lines[5].split(",")[1], "n/a", 1)
    csv_path.write_text("\n".join(lines) + "\n")
    cache = tmp_path / "c"
    with pytest.raises(DataSourceError, match=r"row 6, column 'brightness': 'n/a' is not a number"):
        extract(csv_path, backbone=TINY, workers=0, cache_dir=cache, targets=["brightness"])
    assert not cache.exists() or not [p for p in cache.iterdir() if p.name != "backbone-specs.json"]


def test_targets_from_a_folder_are_refused(tmp_path):
    folder = make_image_folder(tmp_path / "d")
    with pytest.raises(ConfigError, match="DATA must be a .csv file"):
        extract(folder, backbone=TINY, workers=0, cache_dir=tmp_path / "c", targets=["age"])
