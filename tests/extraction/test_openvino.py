"""The OpenVINO runtime (issue 15): resolution rules, the cache key, the cached export, and
agreement with torch. Skipped, saying why, where openvino is not installed."""

from __future__ import annotations

import pytest

from embedcache.errors import ConfigError
from embedcache.models import runtimes
from embedcache.models.runtimes import resolve_runtime
from embedcache.store.fingerprint import config_key
from tests.extraction.runtime_helpers import run_cases

needs_openvino = pytest.mark.skipif(not runtimes.openvino_installed(),
                                    reason='openvino is not installed (pip install "embedcache[openvino]")')


# ------------------------------------------------------------------ resolution (no openvino needed)
def test_auto_is_openvino_on_a_cpu_when_installed_and_torch_otherwise(monkeypatch):
    monkeypatch.setattr(runtimes, "onnxruntime_installed", lambda: False)  # tests/extraction/test_onnxruntime.py
    monkeypatch.setattr(runtimes, "openvino_installed", lambda: True)
    assert resolve_runtime("auto", "cpu", backbone_name="resnet50") == "openvino"
    assert resolve_runtime("auto", "cuda", backbone_name="resnet50") == "torch"
    assert resolve_runtime("auto", "cpu", backbone_name="pixels") == "torch"  # no network to run
    assert resolve_runtime("torch", "cpu") == "torch"
    monkeypatch.setattr(runtimes, "openvino_installed", lambda: False)
    assert resolve_runtime("auto", "cpu", backbone_name="resnet50") == "torch"


def test_openvino_asked_for_but_missing_or_on_a_gpu_is_a_named_error(monkeypatch):
    monkeypatch.setattr(runtimes, "openvino_installed", lambda: False)
    with pytest.raises(ConfigError, match=r'pip install "embedcache\[openvino\]"'):
        resolve_runtime("openvino", "cpu")
    monkeypatch.setattr(runtimes, "openvino_installed", lambda: True)
    with pytest.raises(ConfigError, match="CPU only.*--runtime torch"):
        resolve_runtime("openvino", "cuda")
    with pytest.raises(ConfigError, match="'runtime' parameter must be one of"):
        resolve_runtime("tensorrt", "cpu")


def test_the_environment_variable_sets_the_default_and_is_validated(monkeypatch):
    monkeypatch.setattr(runtimes, "openvino_installed", lambda: True)
    monkeypatch.setenv("EMBEDCACHE_RUNTIME", "torch")
    assert resolve_runtime(None, "cpu", backbone_name="resnet50") == "torch"
    monkeypatch.setenv("EMBEDCACHE_RUNTIME", "auto")
    assert resolve_runtime(None, "cpu", backbone_name="resnet50") == "openvino"
    monkeypatch.setenv("EMBEDCACHE_RUNTIME", "fast")
    with pytest.raises(ConfigError, match="EMBEDCACHE_RUNTIME environment variable"):
        resolve_runtime(None, "cpu")


def test_the_runtime_is_in_the_key_except_torch_which_keeps_the_old_keys(monkeypatch):
    monkeypatch.setattr(runtimes, "package_version", lambda name: "2026.4.1")
    base = dict(backbone={"name": "x"}, preprocess={"crop_size": 224}, precision="bf16", store_dtype="float16",
                decoder_version="1")
    assert config_key(**base, runtime=runtimes.key_payload("torch")) == config_key(**base)
    openvino = config_key(**base, runtime=runtimes.key_payload("openvino"))
    assert openvino != config_key(**base)
    monkeypatch.setattr(runtimes, "package_version", lambda name: "2027.0.0")
    assert config_key(**base, runtime=runtimes.key_payload("openvino")) != openvino  # its version too


# ------------------------------------------------------------------ the real runtime, in its own process
@needs_openvino
def test_openvino_runs_in_its_own_process(tmp_path):
    """tests/extraction/openvino_cases.py: agreement with torch (tiny backbone at fp32 and bf16,
    and efficientnet_lite0 on the demo data: cosine >= 0.999, probe accuracy within 0.3 points),
    the cached export (reused, a flipped byte or a planted symlink rebuilt), the CLI and predict's
    recorded runtime."""
    run_cases("openvino_cases.py")
