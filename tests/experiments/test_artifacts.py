"""Tests for embedcache.experiments.artifacts (probe directories written by the protocol and
loaded back) and embedcache.experiments.predict (classifying images with them)."""

import json

import numpy as np
import pytest

import tests.tiny_backbone  # noqa: F401
from embedcache.errors import ConfigError
from embedcache.experiments import artifacts
from embedcache.experiments.artifacts import load_probe
from embedcache.experiments.predict import predict
from embedcache.experiments.protocol import probe
from embedcache.extraction.extract import extract
from tests.tiny_backbone import TINY, make_image_folder


@pytest.fixture
def cached(tmp_path):
    folder = make_image_folder(tmp_path / "data", per_class=15, split_dirs=True)
    return folder, extract(folder, backbone=TINY, workers=0, cache_dir=tmp_path / "c", precision="fp32")


@pytest.mark.parametrize("head", ["torch", "sklearn"])
def test_probe_artifact_round_trip_and_predict(cached, tmp_path, head):
    folder, store = cached
    result = probe(store, head=head, out=tmp_path / "p")
    assert result.swept and result.split_sizes == {"train": 26, "val": 4, "test": 30}
    meta = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert meta["backbone"]["name"] == TINY and meta["cache_key"] == store.cache_key
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["test"]["top1"] == result.metrics["top1"]
    assert {"top1", "balanced_accuracy", "macro_f1", "per_class_accuracy", "confusion_matrix"} <= set(report["test"])
    loaded = load_probe(tmp_path / "p")
    np.testing.assert_allclose(loaded.predict_proba(store.features.astype(np.float32)),
                               result.estimator.predict_proba(store.features.astype(np.float32)), atol=1e-6)
    out = predict(tmp_path / "p", [str(folder / "test")], workers=0)
    assert out.n_scored == 30 and out.accuracy == pytest.approx(result.metrics["top1"])
    single = predict(tmp_path / "p", [str(folder / "test" / "a" / "img000.png")], workers=0, top_k=2)
    assert single.rows[0].true is None and len(single.rows[0].pred) == 2


def test_probe_from_another_backbone_is_refused(cached, tmp_path):
    _, store = cached
    probe(store, out=tmp_path / "p", penalty=1e-3)
    loaded = load_probe(tmp_path / "p")
    with pytest.raises(ConfigError, match="another backbone setup: weights_sha256"):
        loaded.check_compatible({**store.backbone, "weights_sha256": "0" * 64})


def test_failed_save_leaves_no_half_written_probe(cached, tmp_path, monkeypatch):
    _, store = cached
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(artifacts.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        probe(store, out=tmp_path / "p", penalty=1e-3)
    assert not (tmp_path / "p" / "probe.json").exists()


@pytest.mark.parametrize("content, match", [(None, "probe.safetensors is missing"), ("{bad", "Cannot read probe metadata")])
def test_broken_probe_directories_get_a_named_error(tmp_path, content, match):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "probe.json").write_text(content or json.dumps({"head": "torch", "penalty": 1.0}))
    with pytest.raises(ConfigError, match=match):
        load_probe(tmp_path / "p")
