"""The ONNX Runtime runtime: resolution rules (auto, the missing package, precisions), the cache
key, and (in their own process, tests/extraction/onnxruntime_cases.py) the real runs. The real
runs are skipped, saying why, where onnxruntime is not installed; the rest needs no onnxruntime."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from embedcache.errors import ConfigError
from embedcache.models import runtimes
from embedcache.models.runtimes import resolve_runtime, resolve_runtime_precision
from embedcache.store.fingerprint import config_key
from tests.extraction.runtime_helpers import run_cases
from tests.tiny_backbone import TINY, make_image_folder

needs_onnxruntime = pytest.mark.skipif(not runtimes.onnxruntime_installed(),
                                       reason='onnxruntime is not installed (pip install "embedcache[onnx]")')


def installed(monkeypatch, *, openvino: bool, onnxruntime: bool) -> None:
    monkeypatch.setattr(runtimes, "openvino_installed", lambda: openvino)
    monkeypatch.setattr(runtimes, "onnxruntime_installed", lambda: onnxruntime)


# ------------------------------------------------------------------ resolution (no onnxruntime needed)
def test_auto_prefers_openvino_then_onnxruntime_then_torch_on_the_cpu(monkeypatch):
    installed(monkeypatch, openvino=True, onnxruntime=True)
    assert resolve_runtime("auto", "cpu", backbone_name="resnet50") == "openvino"
    installed(monkeypatch, openvino=False, onnxruntime=True)
    assert resolve_runtime("auto", "cpu", backbone_name="resnet50") == "onnxruntime"
    assert resolve_runtime("auto", "cpu", backbone_name="resnet50", precision="fp32") == "onnxruntime"
    assert resolve_runtime("auto", "cpu", backbone_name="resnet50", precision="bf16") == "torch"  # not fp32
    assert resolve_runtime("auto", "cuda", backbone_name="resnet50") == "torch"
    assert resolve_runtime("auto", "cpu", backbone_name="pixels") == "torch"  # no network to run
    installed(monkeypatch, openvino=False, onnxruntime=False)
    assert resolve_runtime("auto", "cpu", backbone_name="resnet50") == "torch"


def test_onnxruntime_asked_for_but_missing_or_on_a_gpu_is_a_named_error(monkeypatch):
    installed(monkeypatch, openvino=False, onnxruntime=False)
    with pytest.raises(ConfigError, match=r'onnxruntime package: pip install "embedcache\[onnx\]"'):
        resolve_runtime("onnxruntime", "cpu")
    installed(monkeypatch, openvino=False, onnxruntime=True)
    assert resolve_runtime("onnxruntime", "cpu") == "onnxruntime"
    with pytest.raises(ConfigError, match="CPU only.*--runtime torch"):
        resolve_runtime("onnxruntime", "cuda")
    monkeypatch.setenv("EMBEDCACHE_RUNTIME", "onnxruntime")
    assert resolve_runtime(None, "cpu") == "onnxruntime"


def test_onnxruntime_runs_fp32_and_refuses_bf16_and_fp16_by_name():
    assert resolve_runtime_precision("onnxruntime", "auto", "cpu") == "fp32"
    assert resolve_runtime_precision("onnxruntime", "fp32", "cpu") == "fp32"
    for precision in ("bf16", "fp16"):
        with pytest.raises(ConfigError, match=f"--precision {precision} cannot run.*Pass --precision fp32"):
            resolve_runtime_precision("onnxruntime", precision, "cpu")
    with pytest.raises(ConfigError, match="'precision' parameter must be one of"):
        resolve_runtime_precision("onnxruntime", "int8", "cpu")
    assert resolve_runtime_precision("torch", "bf16", "cpu") == "bf16"  # the other runtimes: as asked


def test_the_key_records_the_runtime_and_its_version(monkeypatch):
    monkeypatch.setattr(runtimes, "package_version", lambda name: {"onnxruntime": "1.31.1"}.get(name, "2026.4.1"))
    assert runtimes.key_payload("onnxruntime") == {"name": "onnxruntime", "version": "1.31"}
    base = dict(backbone={"name": "x"}, preprocess={"crop_size": 224}, precision="fp32", store_dtype="float16",
                decoder_version="1")
    onnx = config_key(**base, runtime=runtimes.key_payload("onnxruntime"))
    assert onnx not in (config_key(**base), config_key(**base, runtime=runtimes.key_payload("openvino")))
    monkeypatch.setattr(runtimes, "package_version", lambda name: "1.32.0")
    assert config_key(**base, runtime=runtimes.key_payload("onnxruntime")) != onnx  # its version too


# ------------------------------------------------------------------ failing fast, before any model runs
@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "data", per_class=3)


def test_extract_fails_fast_without_the_package_or_at_bf16(folder, tmp_path, monkeypatch):
    from embedcache.extraction.extract import extract

    installed(monkeypatch, openvino=False, onnxruntime=False)
    with pytest.raises(ConfigError, match=r'pip install "embedcache\[onnx\]"'):
        extract(folder, backbone=TINY, workers=0, runtime="onnxruntime", cache_dir=tmp_path / "c")
    installed(monkeypatch, openvino=False, onnxruntime=True)
    with pytest.raises(ConfigError, match="--precision bf16"):
        extract(folder, backbone=TINY, workers=0, runtime="onnxruntime", precision="bf16", cache_dir=tmp_path / "c")
    assert not list((tmp_path / "c").glob("*.h5")) and not (tmp_path / "c" / "exports").exists()


def test_the_cli_names_the_install_command_and_the_precision_fix(folder, tmp_path, monkeypatch):
    from embedcache.cli import main

    runner = CliRunner()
    base = ["extract", str(folder), "-b", TINY, "--workers", "0", "--cache-dir", str(tmp_path / "c"),
            "--runtime", "onnxruntime"]
    installed(monkeypatch, openvino=False, onnxruntime=False)
    missing = runner.invoke(main, base)
    assert missing.exit_code == 1 and 'pip install "embedcache[onnx]"' in missing.output
    installed(monkeypatch, openvino=False, onnxruntime=True)
    bf16 = runner.invoke(main, [*base, "--precision", "bf16"])
    assert bf16.exit_code == 1 and "--precision fp32 (or auto)" in bf16.output


def test_building_the_session_without_the_package_is_a_named_error(monkeypatch, tmp_path):
    from embedcache.models.build import get_backbone
    from embedcache.models.onnx_backbone import onnx_backbone

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(ConfigError, match=r'pip install "embedcache\[onnx\]"'):
        onnx_backbone(get_backbone(TINY), precision="fp32", exports_dir=tmp_path / "exports")


def test_predict_falls_back_to_torch_where_the_recorded_runtime_is_missing(monkeypatch):
    from embedcache.experiments import predict as predict_mod

    monkeypatch.delenv("EMBEDCACHE_RUNTIME", raising=False)
    installed(monkeypatch, openvino=False, onnxruntime=False)
    recorded = {"runtime": "onnxruntime", "precision": "fp32"}
    assert predict_mod._runtime_and_precision(None, recorded, "cpu", TINY) == ("torch", "fp32")
    installed(monkeypatch, openvino=False, onnxruntime=True)
    assert predict_mod._runtime_and_precision(None, recorded, "cpu", TINY) == ("onnxruntime", "fp32")
    torch_bf16 = {"runtime": "torch", "precision": "bf16"}  # asked to run a torch bf16 probe's backbone in fp32
    assert predict_mod._runtime_and_precision("onnxruntime", torch_bf16, "cpu", TINY) == ("onnxruntime", "auto")


# ------------------------------------------------------------------ the real runtime, in its own process
@needs_onnxruntime
def test_onnxruntime_runs_in_its_own_process():
    """tests/extraction/onnxruntime_cases.py: agreement with torch (tiny backbone, and
    efficientnet_lite0 on the demo data: cosine >= 0.999, probe accuracy within 0.3 points), the
    cached export (reused by a second extraction, a flipped byte or a planted symlink rebuilt),
    the session's options (threads, no spinning, any batch size), forking after a session, the
    CLI and predict's recorded runtime."""
    run_cases("onnxruntime_cases.py")
