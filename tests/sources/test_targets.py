"""Tests for numeric targets and label sets of CSV manifests (embedcache.sources.targets, read by
embedcache.sources.files and opened by embedcache.sources.open)."""

from __future__ import annotations

import numpy as np
import pytest

from embedcache.errors import ConfigError, DataSourceError
from embedcache.sources.open import open_source
from embedcache.splits import Split
from tests.sources.helpers import save, solid


def manifest(tmp_path, text, n=6):
    for i in range(n):
        save(solid((i * 20, 0, 0)), tmp_path / f"{i}.png")
    path = tmp_path / "m.csv"
    path.write_text(text)
    return path


def test_numeric_targets_follow_their_rows(tmp_path):
    csv_path = manifest(tmp_path, "path,Age,x1,split\n1.png,30,0.5,train\n0.png,20.5,-1,test\n2.png,1e2,3,val\n")
    source = open_source(csv_path, targets=["age", "X1"])
    assert source.task == "regression" and source.target_names == ["age", "X1"]
    assert [s.path for s in source.samples] == ["0.png", "1.png", "2.png"]
    np.testing.assert_array_equal(source.target_array(), np.array([[20.5, -1], [30, 0.5], [100, 3]], np.float32))
    assert [s.split for s in source.samples] == [Split.TEST, Split.TRAIN, Split.VAL]
    assert source.to_dict()["target_names"] == ["age", "X1"]


def test_numeric_targets_without_splits_get_an_unstratified_holdout(tmp_path):
    rows = "".join(f"{i}.png,{i * 1.5}\n" for i in range(10))
    source = open_source(manifest(tmp_path, "path,age\n" + rows, n=10), targets=["age"], test_fraction=0.2,
                         val_fraction=0.1)
    assert source.split_counts() == {"train": 7, "val": 1, "test": 2}


def test_label_sets(tmp_path):
    csv_path = manifest(tmp_path, "path,labels\n0.png,top;clothing\n1.png,clothing\n2.png,\n3.png, shoe ;shoe\n")
    source = open_source(csv_path)
    assert source.task == "multilabel" and source.class_names == ["clothing", "shoe", "top"]
    np.testing.assert_array_equal(source.label_set_array(), [[1, 0, 1], [1, 0, 0], [0, 0, 0], [0, 1, 0]])
    assert {s.label for s in source.samples} == {-1} and source.split_counts().keys() <= {"train", "test"}
    fixed = open_source(csv_path, label_vocabulary=["top", "shoe", "clothing", "bag"])
    np.testing.assert_array_equal(fixed.label_set_array()[0], [1, 0, 1, 0])


def test_targets_enter_the_manifest_hash(tmp_path):
    csv_path = manifest(tmp_path, "path,age,label\n0.png,1,a\n1.png,2,b\n")
    plain = open_source(csv_path).manifest_sha256()
    with_targets = open_source(csv_path, targets=["age"]).manifest_sha256()
    csv_path.write_text("path,age,label\n0.png,1,a\n1.png,3,b\n")
    assert open_source(csv_path).manifest_sha256() == plain  # unused columns do not matter
    assert len({plain, with_targets, open_source(csv_path, targets=["age"]).manifest_sha256()}) == 3


def test_label_sets_enter_the_manifest_hash(tmp_path):
    csv_path = manifest(tmp_path, "path,labels\n0.png,a;b\n1.png,b\n")
    first = open_source(csv_path).manifest_sha256()
    csv_path.write_text("path,labels\n0.png,a\n1.png,b\n")
    assert open_source(csv_path).manifest_sha256() != first


@pytest.mark.parametrize(
    ("text", "targets", "message"),
    [
        ("path,age\n0.png,old\n", ["age"], r"row 2, column 'age': 'old' is not a number"),
        ("path,age\n0.png,1\n1.png,\n", ["age"], r"row 3, column 'age': the target is missing"),
        ("path,age,x\n0.png,1,2\n1.png\n", ["age"], r"row 3, column 'age': the target is missing"),
        ("path,age\n0.png,nan\n", ["age"], r"row 2, column 'age': 'nan' is not a finite number"),
        ("path,age\n0.png,-inf\n", ["age"], r"row 2, column 'age': '-inf' is not a finite number"),
        ("path,age\n0.png,1\n", ["height"], r"no column 'height' .* available: \['age'\]"),
        ("path,age\n0.png,1\n", ["split"], r"'split' cannot be a numeric target"),
        ("path,age\n0.png,1\n", ["age", "AGE"], r"'age' is named twice"),
        ("path,age,labels\n0.png,1,a\n", ["age"], r"cannot also have a 'labels' column"),
        ("path,label,labels\n0.png,a,a\n", None, r"both a 'label' and a 'labels' column"),
        ("path,labels\n0.png,a\n1.png,a;;b\n", None, r"row 3, column 'labels': empty class name in 'a;;b'"),
    ],
)
def test_malformed_targets_name_row_and_column(tmp_path, text, targets, message):
    with pytest.raises(DataSourceError, match=message):
        open_source(manifest(tmp_path, text), targets=targets)


def test_unknown_class_in_a_label_set_names_row_and_column(tmp_path):
    csv_path = manifest(tmp_path, "path,labels\n0.png,top\n1.png,top;hat\n")
    with pytest.raises(DataSourceError, match=r"row 3, column 'labels': unknown class 'hat'; the classes are \['top'"):
        open_source(csv_path, label_vocabulary=["top", "shoe"])


def test_targets_need_a_csv(tmp_path):
    save(solid(), tmp_path / "cat" / "0.png")
    with pytest.raises(ConfigError, match=r"DATA must be a .csv file"):
        open_source(tmp_path, targets=["age"])
