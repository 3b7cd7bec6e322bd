"""The ONNX Runtime runtime's real runs (collected by tests/extraction/test_onnxruntime.py, which
runs this file in its own pytest process; see runtime_helpers.py). Skipped where onnxruntime
cannot be imported."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason='onnxruntime is not installed (pip install "embedcache[onnx]")')

import tests.tiny_backbone  # noqa: E402,F401 - registers the tiny backbone
from embedcache.extraction.extract import extract  # noqa: E402
from tests.extraction.runtime_helpers import (  # noqa: E402
    check_cached_export_runs_without_torch,
    check_cli_round_trip,
    check_demo_agreement,
    check_export_cache,
    cosines,
)
from tests.tiny_backbone import TINY, make_image_folder  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ort") / "data", per_class=10, split_dirs=True)


def case_onnxruntime_features_agree_with_torch_and_auto_precision_is_fp32(folder, tmp_path):
    kw = dict(backbone=TINY, workers=0, batch_size=8, store_dtype="float32", cache_dir=tmp_path / "c")
    torch_store = extract(folder, runtime="torch", precision="fp32", **kw)
    ort_store = extract(folder, runtime="onnxruntime", **kw)  # precision auto: fp32 for this runtime
    assert ort_store.cache_key != torch_store.cache_key
    assert ort_store.attrs["runtime"] == "onnxruntime" and torch_store.attrs["runtime"] == "torch"
    assert ort_store.attrs["precision"] == "fp32" and ort_store.stats.runtime == "onnxruntime"
    np.testing.assert_array_equal(ort_store.paths, torch_store.paths)
    assert cosines(ort_store.features, torch_store.features).min() >= 0.999
    again = extract(folder, runtime="onnxruntime", precision="fp32", **kw)  # auto and fp32: one entry
    assert again.cache_hit and again.cache_key == ort_store.cache_key


def case_the_export_is_cached_and_a_damaged_or_planted_one_is_rebuilt(tmp_path):
    from embedcache.models.build import get_backbone
    from embedcache.models.onnx_backbone import onnx_backbone

    bb = get_backbone(TINY)
    check_export_cache(lambda exports: onnx_backbone(bb, precision="fp32", exports_dir=exports),
                       tmp_path / "exports", files=["model.onnx"], weights="model.onnx", backbone=TINY)


def case_a_second_extraction_reuses_the_export(folder, tmp_path, monkeypatch):
    from embedcache.models import onnx_backbone as module

    exports = []
    real = module._export
    monkeypatch.setattr(module, "_export", lambda bb, directory: exports.append(directory) or real(bb, directory))
    kw = dict(backbone=TINY, workers=0, runtime="onnxruntime", cache_dir=tmp_path / "c")
    first = extract(folder, store_dtype="float32", **kw)
    second = extract(folder, store_dtype="float16", **kw)  # another entry, the same export
    assert not second.cache_hit and second.cache_key != first.cache_key
    [published] = (tmp_path / "c" / "exports").iterdir()
    assert len(exports) == 1 and exports[0].name.startswith(f".{published.name}.")  # written staged, then renamed


def case_the_session_follows_the_thread_policy_and_takes_any_batch(tmp_path):
    from embedcache.models.build import get_backbone
    from embedcache.models.onnx_backbone import ALLOW_SPINNING, onnx_backbone
    from embedcache.runtime import torch_threads

    bb = get_backbone(TINY)
    with torch_threads(1):
        model = onnx_backbone(bb, precision="fp32", exports_dir=tmp_path / "exports")
    options = model.session.get_session_options()
    assert model.threads == options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry(ALLOW_SPINNING) == "0"
    assert model.session.get_providers() == ["CPUExecutionProvider"]
    images = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8).permute(0, 3, 1, 2)  # channels-last
    with torch.inference_mode():
        expected = bb.module.eval()((images.float() / 255 - 0.5) / 0.5).numpy()
    for n in (1, 3, 5):  # the batch dimension is dynamic
        out = model(images[:n])
        assert out.dtype == np.float32 and out.shape == (n, bb.dim)
        np.testing.assert_allclose(out, expected[:n], rtol=1e-4, atol=1e-5)
    model.close()
    assert model.session is None


def case_efficientnet_lites_padded_kernels_load_and_agree(tmp_path):
    """At 64 px EfficientNet-Lite0 pads a large depthwise kernel asymmetrically (TF SAME), a graph
    that ONNX Runtime refused to load until such pads were folded at export."""
    from embedcache.extraction.loop import inference_module, model_input
    from embedcache.models.build import get_backbone
    from embedcache.models.onnx_backbone import onnx_backbone

    bb = get_backbone("efficientnet_lite0", image_size=64)
    model = onnx_backbone(bb, precision="fp32", exports_dir=tmp_path / "exports")
    images = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    with torch.inference_mode():
        expected = inference_module(bb, torch.device("cpu"))(model_input(images, torch.device("cpu"), bb.preprocess))
    assert cosines(model(images), expected.numpy()).min() >= 0.9999


def case_decoding_workers_fork_after_a_session_ran(folder, tmp_path):
    """Unlike OpenVINO's, a process that has run ONNX Runtime still forks decoding workers: a
    second extraction in this process decodes in two workers and gets the same rows."""
    assert "openvino" not in sys.modules  # which would make run_batches decode in-process
    kw = dict(backbone=TINY, runtime="onnxruntime", store_dtype="float32")
    first = extract(folder, workers=0, cache_dir=tmp_path / "a", **kw)
    second = extract(folder, workers=2, cache_dir=tmp_path / "b", **kw)
    np.testing.assert_array_equal(first.features, second.features)


def case_cli_extract_names_the_runtime_and_predict_uses_the_recorded_one(folder, tmp_path, monkeypatch):
    check_cli_round_trip(folder, tmp_path, monkeypatch, "onnxruntime", [], shown="cpu/fp32/onnxruntime")


def case_onnxruntime_matches_torch_on_the_demo_data_with_real_weights(tmp_path):
    """Cosine >= 0.999 and probe accuracy within 0.3 points on the demo data (both fp32)."""
    check_demo_agreement(tmp_path, "onnxruntime", precision="fp32")


def case_a_cached_export_runs_without_torch_and_gives_the_same_features(tmp_path):
    check_cached_export_runs_without_torch(tmp_path, "onnxruntime")
