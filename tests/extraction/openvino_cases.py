"""The OpenVINO runtime's real runs (collected by tests/extraction/test_openvino.py, which runs
this file in its own pytest process: a process that has run OpenVINO is not safe to fork, and
the rest of the suite forks DataLoader workers and subprocesses; see runtime_helpers.py)."""

from __future__ import annotations

import numpy as np
import pytest

import tests.tiny_backbone  # noqa: F401 - registers the tiny backbone
from embedcache.extraction.extract import extract
from tests.extraction.runtime_helpers import (
    check_cached_export_runs_without_torch,
    check_cli_round_trip,
    check_demo_agreement,
    check_export_cache,
    cosines,
)
from tests.tiny_backbone import TINY, make_image_folder


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


def case_the_export_is_cached_and_a_damaged_or_planted_one_is_rebuilt(tmp_path):
    from embedcache.models.build import get_backbone
    from embedcache.models.openvino_backbone import openvino_backbone

    bb = get_backbone(TINY)
    check_export_cache(lambda exports: openvino_backbone(bb, precision="fp32", exports_dir=exports),
                       tmp_path / "exports", files=["model.bin", "model.xml"], weights="model.bin", backbone=TINY)


def case_cli_extract_names_the_runtime_and_predict_uses_the_recorded_one(folder, tmp_path, monkeypatch):
    check_cli_round_trip(folder, tmp_path, monkeypatch, "openvino", ["--precision", "fp32"], shown="cpu/fp32/openvino")


def case_openvino_matches_torch_on_the_demo_data_with_real_weights(tmp_path):
    """Cosine >= 0.999 and probe accuracy within 0.3 points on the demo data (both at auto: bf16
    on CPUs with native bf16)."""
    check_demo_agreement(tmp_path, "openvino")


def case_a_cached_export_runs_without_torch_and_gives_the_same_features(tmp_path):
    check_cached_export_runs_without_torch(tmp_path, "openvino")


def case_throughput_mode_splits_each_batch_over_the_streams_with_the_same_features(tmp_path):
    """A model compiled for throughput runs every batch in one part per stream (so the last
    batch of a run does not leave streams idle); the features equal one-request inference. The
    requests read each batch in place, and the handle keeps it alive until it is waited for."""
    import gc

    from embedcache.models.build import get_backbone
    from embedcache.models.openvino_backbone import OpenVINOBackbone, openvino_backbone

    bb = get_backbone(TINY)
    single = openvino_backbone(bb, precision="fp32", exports_dir=tmp_path / "exports", threads=2)
    # two streams' worth of requests, whatever OpenVINO would choose on this machine
    split = OpenVINOBackbone(single.compiled, bb.dim, exported=False, directory=single.directory, threads=2,
                             requests=2)
    rng = np.random.default_rng(0)
    size = bb.preprocess.crop_size
    batches = [rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8) for n in (8, 8, 5, 1)]
    expected = [single.infer(images) for images in batches]
    handles = [split.start(batches[0]), split.start(batches[1])]
    assert [len(h[0]) for h in handles] == [2, 2]  # each batch in two parts
    assert handles[0][1] is batches[0]  # no copy
    batches[0] = None  # the caller's last reference gone: the running requests still read it
    gc.collect()
    got = [split.wait(handles[0])]
    handles.append(split.start(batches[2]))
    got.append(split.wait(handles[1]))
    handles.append(split.start(batches[3]))
    assert len(handles[3][0]) == 1  # one row: one part
    got += [split.wait(handles[2]), split.wait(handles[3])]
    for want, features in zip(expected, got, strict=True):
        assert features.dtype == np.float32 and features.shape == want.shape
        np.testing.assert_array_equal(features, want)
    split.close()
    single.close()


def case_the_real_package_is_imported_without_its_converter_or_telemetry(tmp_path):
    """A new interpreter (HOME in tmp_path: OpenVINO's telemetry keeps its counter and client id
    under ~/intel) imports openvino through embedcache: no converter, no telemetry module, nothing
    written under HOME, a working Core; and convert_model is still there (looking it up imports
    the converter, telemetry included: exporting is OpenVINO's own business)."""
    import json
    import os
    import subprocess
    import sys

    script = """
import json, os, sys
from embedcache.models.openvino_backbone import _import_ov
ov = _import_ov()
held = {"ovc": "openvino.tools.ovc" in sys.modules, "telemetry": "openvino_telemetry" in sys.modules,
        "devices": "CPU" in ov.Core().available_devices, "home": os.listdir(os.environ["HOME"])}
print(json.dumps({**held, "convert_model": ov.convert_model.__module__}))
"""
    env = {**os.environ, "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got == {"ovc": False, "telemetry": False, "devices": True, "home": [],
                   "convert_model": "openvino.tools.ovc.convert"}
