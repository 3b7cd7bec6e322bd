"""The OpenVINO runtime's real runs (collected by tests/extraction/test_openvino.py, which runs
this file in its own pytest process: a process that has run OpenVINO is not safe to fork, and
the rest of the suite forks DataLoader workers and subprocesses)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

import tests.tiny_backbone  # noqa: F401 - registers the tiny backbone
from embedcache.extraction.extract import extract
from tests.tiny_backbone import TINY, make_image_folder


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ------------------------------------------------------------------ the real runtime
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ov") / "data", per_class=10, split_dirs=True)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def case_openvino_features_agree_with_torch(folder, tmp_path, precision):
    kw = dict(backbone=TINY, workers=0, batch_size=8, store_dtype="float32", precision=precision,
              cache_dir=tmp_path / "c")
    torch_store = extract(folder, runtime="torch", **kw)
    ov_store = extract(folder, runtime="openvino", **kw)
    assert ov_store.cache_key != torch_store.cache_key
    assert ov_store.attrs["runtime"] == "openvino" and torch_store.attrs["runtime"] == "torch"
    assert ov_store.stats.runtime == "openvino"
    np.testing.assert_array_equal(ov_store.paths, torch_store.paths)
    assert cosines(ov_store.features, torch_store.features).min() >= 0.999
    again = extract(folder, runtime="openvino", **kw)
    assert again.cache_hit and again.cache_key == ov_store.cache_key


def case_the_export_is_cached_and_a_damaged_or_planted_one_is_rebuilt(folder, tmp_path):
    from embedcache.models.build import get_backbone
    from embedcache.models.openvino_backbone import openvino_backbone

    bb = get_backbone(TINY)
    exports = tmp_path / "exports"
    first = openvino_backbone(bb, precision="fp32", exports_dir=exports)
    assert first.exported
    [directory] = exports.iterdir()
    assert directory == first.directory and sorted(p.name for p in directory.iterdir()) == [
        "export.json", "model.bin", "model.xml"]
    assert os.stat(directory).st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's 0o700
    assert not openvino_backbone(bb, precision="fp32", exports_dir=exports).exported

    weights = directory / "model.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    rebuilt = openvino_backbone(bb, precision="fp32", exports_dir=exports)
    assert rebuilt.exported  # a flipped byte fails export.json's sha256
    assert json.loads((directory / "export.json").read_text())["identity"]["backbone"]["name"] == TINY

    elsewhere = tmp_path / "elsewhere"
    os.rename(directory, elsewhere)
    directory.symlink_to(elsewhere, target_is_directory=True)
    before = {p.name: p.read_bytes() for p in elsewhere.iterdir()}
    assert openvino_backbone(bb, precision="fp32", exports_dir=exports).exported
    assert not directory.is_symlink() and directory.is_dir()
    assert {p.name: p.read_bytes() for p in elsewhere.iterdir()} == before  # never written through


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def case_cli_extract_names_the_runtime_and_predict_uses_the_recorded_one(folder, tmp_path, monkeypatch):
    from embedcache.cli import main
    from embedcache.experiments import predict as predict_mod

    monkeypatch.delenv("EMBEDCACHE_RUNTIME", raising=False)
    monkeypatch.setenv("EMBEDCACHE_DIR", str(tmp_path / "c"))
    runner = CliRunner()
    made = runner.invoke(main, ["extract", str(folder), "-b", TINY, "--workers", "0", "--runtime", "openvino",
                                "--precision", "fp32", "--store-dtype", "float32"], catch_exceptions=False)
    assert made.exit_code == 0, made.output
    assert "cpu/fp32/openvino" in made.output
    [entry] = (tmp_path / "c").glob("*.h5")
    probed = runner.invoke(main, ["probe", str(entry), "--penalty", "0.01", "--out", str(tmp_path / "p")],
                           catch_exceptions=False)
    assert probed.exit_code == 0, probed.output
    assert json.loads((tmp_path / "p" / "probe.json").read_text())["runtime"] == "openvino"

    used = []
    real = predict_mod.compute_features
    monkeypatch.setattr(predict_mod, "compute_features", lambda *a, **kw: used.append(kw["runtime"]) or real(*a, **kw))
    for extra in ([], ["--runtime", "torch"]):
        out = runner.invoke(main, ["predict", str(tmp_path / "p"), str(folder / "test"), *extra],
                            catch_exceptions=False)
        assert out.exit_code == 0, out.output
    assert used == ["openvino", "torch"]


def case_openvino_matches_torch_on_the_demo_data_with_real_weights(tmp_path):
    """The issue's agreement bar on real data: per-row cosine >= 0.999 to torch's features and the
    probe's test accuracy within 0.3 points (1,500 of the demo's training images, all 1,000 test
    images, efficientnet_lite0 at 112 px to keep it under a minute)."""
    import importlib.resources

    from embedcache.experiments.protocol import probe
    from embedcache.sources.arrays import DEMO_FILE

    with importlib.resources.as_file(importlib.resources.files("embedcache").joinpath("demo_data", DEMO_FILE)) as f:
        demo = dict(np.load(f))
    data = tmp_path / "demo1500.npz"
    np.savez(data, train_images=demo["train_images"][:1500], train_labels=demo["train_labels"][:1500],
             test_images=demo["test_images"], test_labels=demo["test_labels"], class_names=demo["class_names"])
    kw = dict(backbone="efficientnet_lite0", image_size=112, workers=0, cache_dir=tmp_path / "c")
    stores = {runtime: extract(data, runtime=runtime, **kw) for runtime in ("torch", "openvino")}
    assert cosines(stores["openvino"].features, stores["torch"].features).min() >= 0.999
    top1 = {runtime: probe(store, penalty=0.03).metrics["top1"] for runtime, store in stores.items()}
    assert abs(top1["openvino"] - top1["torch"]) <= 0.003, top1
