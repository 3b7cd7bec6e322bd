"""The probe protocol with the k-NN and ridge heads, numeric targets and label sets
(embedcache.experiments.head_fits through protocol.probe), their artifacts
(embedcache.experiments.head_artifacts) and predict (embedcache.experiments.predict_targets)."""

import json

import numpy as np
import pytest

import tests.tiny_backbone  # noqa: F401
from embedcache import fileio
from embedcache.errors import CacheError, ConfigError
from embedcache.experiments.artifacts import load_probe
from embedcache.experiments.finetune.setup import rebuild_backbone
from embedcache.experiments.predict import predict
from embedcache.experiments.protocol import probe, probe_arrays
from embedcache.extraction.extract import extract
from embedcache.heads import knn as knn_module
from embedcache.heads import ridge as ridge_module
from tests.heads.helpers import blobs
from tests.targets_data import make_multilabel_csv, make_regression_csv
from tests.tiny_backbone import TINY, make_image_folder

STORE = {"workers": 0, "precision": "fp32", "store_dtype": "float32"}


@pytest.fixture
def cached(tmp_path):
    folder = make_image_folder(tmp_path / "data", per_class=15, split_dirs=True)
    return folder, extract(folder, backbone=TINY, cache_dir=tmp_path / "c", **STORE)


def test_split_rows_reach_knn_and_ridge_as_train_then_val(monkeypatch):
    X, y = blobs(n=200, k=3)
    splits = np.array([0] * 150 + [2] * 50, np.uint8)
    test_rows = {r.tobytes() for r in X[150:]}
    seen = []
    original_topk = knn_module.cosine_topk

    def topk_spy(queries, references, k, **kw):
        seen.append(("knn", {r.tobytes() for r in np.asarray(references)}))
        return original_topk(queries, references, k, **kw)

    original_update = ridge_module.RidgeStatistics.update

    def update_spy(self, X_block, **kw):
        seen.append(("ridge", {r.tobytes() for r in np.asarray(X_block)}))
        return original_update(self, X_block, **kw)

    monkeypatch.setattr(knn_module, "cosine_topk", topk_spy)
    monkeypatch.setattr(ridge_module.RidgeStatistics, "update", update_spy)
    knn = probe_arrays(X, y, splits, np.arange(200).astype(str), head="knn", ks=[1, 5])
    ridge = probe_arrays(X, y, splits, np.arange(200).astype(str), head="ridge", penalties=[1e-3, 1.0])
    assert knn.selection.parameter == "k" and knn.penalty is None and knn.chosen["k"] in (1, 5)
    assert ridge.selection.parameter == "penalty" and ridge.penalty in (1e-3, 1.0)
    references = [rows for kind, rows in seen if kind == "knn"]
    assert len(references) == 2 and all(not (rows & test_rows) for rows in references)  # val search, then test
    assert all(not (rows & test_rows) for kind, rows in seen if kind == "ridge")
    assert knn.metrics["top1"] > 0.9 and ridge.metrics["top1"] > 0.9


@pytest.mark.parametrize("head", ["knn", "ridge", "sklearn"])
def test_class_heads_round_trip_without_pickle_and_predict(cached, tmp_path, head):
    folder, store = cached
    result = probe(store, head=head, out=tmp_path / "p")
    files = {p.name for p in (tmp_path / "p").iterdir()}
    assert "probe.joblib" not in files and {"probe.safetensors", "probe.json", "report.json"} <= files
    meta = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert meta["head"] == head and meta["task"] == "classes"
    assert len(meta["files"]["probe.safetensors"]["sha256"]) == 64 and meta["tensor_shapes"]
    if head == "knn":
        assert meta["references"]["cache_key"] == store.cache_key and meta["references"]["n"] == 30
    loaded = load_probe(tmp_path / "p")
    np.testing.assert_array_equal(loaded.estimator.predict(store.features), result.estimator.predict(store.features))
    out = predict(tmp_path / "p", [str(folder / "test")], workers=0)
    assert out.n_scored == 30 and out.accuracy == pytest.approx(result.metrics["top1"])
    assert out.score_name == ("score" if head == "ridge" else "prob")


def test_sklearn_probes_saved_with_joblib_still_load(cached, tmp_path):
    import joblib

    _, store = cached
    result = probe(store, head="sklearn", penalty=1e-3, out=tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "probe.json").read_text())
    old = tmp_path / "old"
    old.mkdir()
    joblib.dump(result.estimator, old / "probe.joblib")  # what earlier versions wrote
    (old / "probe.json").write_text(json.dumps({k: v for k, v in meta.items() if k not in ("files", "tensor_shapes", "task")}))
    loaded = load_probe(old)
    np.testing.assert_array_equal(loaded.estimator.predict(store.features), result.estimator.predict(store.features))


def test_knn_artifact_needs_its_cache_entry(cached, tmp_path):
    _, store = cached
    probe(store, head="knn", k=3, out=tmp_path / "p")
    store.path.rename(tmp_path / "moved.h5")
    with pytest.raises(CacheError, match="reference features are cache entry .* no longer exists"):
        load_probe(tmp_path / "p")


def test_tampered_tensors_are_refused(cached, tmp_path):
    _, store = cached
    probe(store, head="ridge", penalty=0.1, out=tmp_path / "p")
    blob = bytearray((tmp_path / "p" / "probe.safetensors").read_bytes())
    blob[-1] ^= 1
    (tmp_path / "p" / "probe.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ConfigError, match="does not match probe.json"):
        load_probe(tmp_path / "p")


def test_a_failed_write_leaves_no_probe_json(cached, tmp_path, monkeypatch):
    _, store = cached
    original = fileio.os.replace

    def replace(src, dst):
        if str(dst).endswith("probe.json"):
            raise OSError(28, "No space left on device")
        return original(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(CacheError, match="No room to write"):
        probe(store, head="knn", k=3, out=tmp_path / "p")
    assert not (tmp_path / "p" / "probe.json").exists()
    assert not [p for p in (tmp_path / "p").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("options, match", [({"head": "knn", "penalty": 0.1}, "k-NN head has no penalty"),
                                            ({"head": "ridge", "k": 3}, "only apply to the k-NN head"),
                                            ({"head": "knn", "temperature": 0.0}, "'temperature'")])
def test_options_that_do_not_apply_are_refused(cached, options, match):
    with pytest.raises(ConfigError, match=match):
        probe(cached[1], **options)


def write_test_csv(csv_path):
    lines = csv_path.read_text().splitlines()
    test_csv = csv_path.with_name("test.csv")
    test_csv.write_text("\n".join([lines[0]] + [line for line in lines[1:] if line.endswith(",test")]) + "\n")
    return test_csv


def test_regression_probe_reports_r2_and_predict_reproduces_it(tmp_path):
    csv_path = make_regression_csv(tmp_path / "d", n=150)
    store = extract(csv_path, backbone=TINY, cache_dir=tmp_path / "c", targets=["brightness", "contrast"], **STORE)
    with pytest.raises(ConfigError, match=r"one of \['ridge'\] for regression targets \(numeric targets"):
        probe(store, head="torch")
    result = probe(store, out=tmp_path / "p")
    assert result.task == "regression" and result.head == "ridge" and result.selection.metric == "r2"
    assert result.split_sizes == {"train": 90, "val": 30, "test": 30}
    per_target = result.metrics["per_target"]
    assert set(per_target) == {"brightness", "contrast"} and per_target["brightness"]["r2"] > 0.8
    assert {"mae", "rmse", "r2"} <= set(result.metrics)
    out = predict(tmp_path / "p", [str(write_test_csv(csv_path))], workers=0)
    assert out.task == "regression" and out.names == ["brightness", "contrast"] and out.n_scored == 30
    assert out.metrics["r2"] == pytest.approx(result.metrics["r2"], abs=1e-4)
    assert out.rows[0].true_values is not None and len(out.rows[0].values) == 2
    unlabelled = predict(tmp_path / "p", [str(tmp_path / "d" / "img000.png")], workers=0)
    assert unlabelled.metrics is None and unlabelled.rows[0].true_values is None
    with pytest.raises(ConfigError, match="fits regression targets; fine-tuning trains a class head"):
        rebuild_backbone(load_probe(tmp_path / "p"), None)


def test_multilabel_probe_reports_map_and_predict_reproduces_it(tmp_path):
    csv_path = make_multilabel_csv(tmp_path / "d", n=150)
    store = extract(csv_path, backbone=TINY, cache_dir=tmp_path / "c", **STORE)
    result = probe(store, out=tmp_path / "p", penalties=[1e-1, 1e-3])
    assert result.task == "multilabel" and result.head == "torch" and result.selection.metric == "mAP"
    assert result.metrics["mAP"] > 0.7 and 0 < result.chosen["threshold"] < 1
    assert set(result.metrics["per_class_ap"]) == {"red", "green", "blue"}
    loaded = load_probe(tmp_path / "p")
    np.testing.assert_allclose(loaded.estimator.predict_proba(store.features),
                               result.estimator.predict_proba(store.features), atol=1e-6)
    out = predict(tmp_path / "p", [str(write_test_csv(csv_path))], workers=0)
    assert out.task == "multilabel" and out.metrics["mAP"] == pytest.approx(result.metrics["mAP"], abs=1e-4)
    assert out.metrics["micro_f1"] == pytest.approx(result.metrics["micro_f1"], abs=1e-4)
    row = out.rows[0]
    assert len(row.values) == 3 and all(p >= result.chosen["threshold"] for p in row.prob)


def test_unknown_class_at_predict_names_row_and_column(tmp_path):
    csv_path = make_multilabel_csv(tmp_path / "d", n=40)
    store = extract(csv_path, backbone=TINY, cache_dir=tmp_path / "c", **STORE)
    probe(store, out=tmp_path / "p", penalty=1e-2)
    bad = tmp_path / "d" / "bad.csv"
    bad.write_text("path,labels\nimg000.png,red\nimg001.png,red;purple\n")
    with pytest.raises(Exception, match=r"row 3, column 'labels': unknown class 'purple'"):
        predict(tmp_path / "p", [str(bad)], workers=0)
