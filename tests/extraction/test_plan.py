"""Planning: the backbone's identity is remembered in the cache dir, so a cache hit builds no
model and hashes no weights; the memo can never make a key dishonest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import tests.tiny_backbone  # noqa: F401 - registers the tiny backbone
from embedcache.extraction import loop
from embedcache.extraction import plan as plan_module
from embedcache.extraction.extract import extract
from embedcache.extraction.plan import plan_extraction
from embedcache.models import build
from embedcache.models.build import get_backbone
from embedcache.runtime import GPU_DEVICE_FILES
from embedcache.store.memo import MEMO_NAME
from tests.tiny_backbone import TINY, TinyNet, make_image_folder


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "data", per_class=4)


def _forbid_building(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the backbone was built")

    monkeypatch.setattr(build, "get_backbone", boom)
    monkeypatch.setattr(loop, "run_batches", boom)


def test_a_cache_hit_builds_no_model(folder, tmp_path, monkeypatch):
    first = extract(folder, backbone=TINY, workers=0, cache_dir=tmp_path / "c")
    assert (tmp_path / "c" / MEMO_NAME).is_file()
    _forbid_building(monkeypatch)
    again = extract(folder, backbone=TINY, workers=0, cache_dir=tmp_path / "c")
    assert again.cache_hit and again.cache_key == first.cache_key


def test_the_remembered_identity_equals_the_built_one(folder, tmp_path):
    plan = plan_extraction(folder, backbone=TINY, cache_dir=tmp_path / "c")  # builds and remembers
    remembered = plan_extraction(folder, backbone=TINY, cache_dir=tmp_path / "c")
    assert plan.built is not None and remembered.built is None
    assert remembered.backbone == plan.backbone == get_backbone(TINY).identity()
    assert remembered.cache_key == plan.cache_key


def test_a_changed_weights_file_is_hashed_again(folder, tmp_path, monkeypatch):
    weights = tmp_path / "w.safetensors"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        save_file(TinyNet().state_dict(), str(weights))
    first = plan_extraction(folder, backbone=TINY, weights_path=weights, cache_dir=tmp_path / "c")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(6)
        save_file(TinyNet().state_dict(), str(weights))  # same size, new content and mtime
    os.utime(weights, ns=(os.stat(weights).st_atime_ns, os.stat(weights).st_mtime_ns + 10**9))
    second = plan_extraction(folder, backbone=TINY, weights_path=weights, cache_dir=tmp_path / "c")
    assert second.built is not None  # not served from the memo
    assert second.backbone.weights_sha256 != first.backbone.weights_sha256
    assert second.cache_key != first.cache_key


def test_a_stale_memo_is_corrected_before_anything_is_written(folder, tmp_path):
    cache = tmp_path / "c"
    true_key = extract(folder, backbone=TINY, workers=0, cache_dir=cache).cache_key
    memo = cache / MEMO_NAME
    data = json.loads(memo.read_text())
    for value in data.values():
        value["weights_sha256"] = "0" * 64  # as if the weights had changed behind the memo's back
    memo.write_text(json.dumps(data))
    for entry in cache.glob("*.h5"):
        entry.unlink()
    store = extract(folder, backbone=TINY, workers=0, cache_dir=cache)
    assert store.cache_key == true_key and store.backbone["weights_sha256"] != "0" * 64
    assert "0" * 64 not in memo.read_text()


@pytest.mark.parametrize("content", ["{not json", "[]", json.dumps({"x": {"name": 1}})])
def test_a_damaged_memo_is_ignored(folder, tmp_path, content):
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / MEMO_NAME).write_text(content)
    plan = plan_extraction(folder, backbone=TINY, cache_dir=cache)
    assert plan.backbone == get_backbone(TINY).identity()


def test_backbones_of_unknown_provenance_are_always_built(folder, tmp_path, monkeypatch):
    from embedcache.models import catalog

    monkeypatch.setattr(plan_module, "backbone_identity", lambda *a, **k: None)  # e.g. a plugin
    plan_extraction(folder, backbone=TINY, cache_dir=tmp_path / "c")
    again = plan_extraction(folder, backbone=TINY, cache_dir=tmp_path / "c")
    assert again.built is not None and not (tmp_path / "c" / MEMO_NAME).exists()
    assert catalog.backbone_identity("tests.tiny_backbone:tiny_factory") is None


@pytest.mark.skipif(any(os.path.exists(p) for p in GPU_DEVICE_FILES) or not sys.platform.startswith("linux"),
                    reason="a GPU driver is present: torch must be asked which device 'auto' means")
def test_a_cache_hit_of_a_registered_backbone_loads_no_torch(folder, tmp_path):
    code = textwrap.dedent("""
        import sys
        import embedcache
        store = embedcache.extract(sys.argv[1], backbone="pixels", cache_dir=sys.argv[2], workers=0)
        print(store.cache_hit, "torch" in sys.modules, "sklearn" in sys.modules)
    """)
    first = subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / "c")], capture_output=True,
                           text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["False", "True", "False"]  # computing rows needs torch
    second = subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / "c")], capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert second.stdout.split() == ["True", "False", "False"]


@pytest.mark.skipif(any(os.path.exists(p) for p in GPU_DEVICE_FILES) or not sys.platform.startswith("linux"),
                    reason="a GPU driver is present: torch must be asked which device 'auto' means")
def test_planning_a_torchvision_backbone_again_imports_neither_torch_nor_torchvision(folder, tmp_path):
    code = textwrap.dedent("""
        import sys
        from embedcache.extraction.plan import plan_extraction
        plan = plan_extraction(sys.argv[1], backbone="resnet18", weights="none", image_size=32,
                               cache_dir=sys.argv[2], runtime="torch")
        print(plan.cache_key, plan.built is None, "torch" in sys.modules, "torchvision" in sys.modules)
    """)
    runs = [subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / "c")], capture_output=True,
                           text=True, timeout=120) for _ in range(2)]
    assert all(run.returncode == 0 for run in runs), [run.stderr for run in runs]
    first, second = (run.stdout.split() for run in runs)
    assert first[1:] == ["False", "True", "True"]  # the first plan builds the model to learn its identity
    assert second == [first[0], "True", "False", "False"]  # the same key, from memory alone


def test_a_remembered_torchvision_identity_is_dropped_when_its_weights_file_changes(folder, tmp_path, monkeypatch):
    import torchvision

    weights = tmp_path / "w.safetensors"
    save_file(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), weights)
    calls = []
    original = plan_module.backbone_identity
    monkeypatch.setattr(plan_module, "backbone_identity", lambda *a, **k: calls.append(1) or original(*a, **k))

    def planned():
        return plan_extraction(folder, backbone="mobilenet_v3_small", weights_path=weights, image_size=32,
                               cache_dir=tmp_path / "c", runtime="torch")

    first, second = planned(), planned()
    assert len(calls) == 1 and second.cache_key == first.cache_key and second.built is None
    torch.manual_seed(1)
    save_file(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), weights)  # other weights
    os.utime(weights, ns=(1, 1))  # and a different mtime, whatever the clock's resolution
    third = planned()
    assert len(calls) == 2 and third.cache_key != first.cache_key and third.built is not None
