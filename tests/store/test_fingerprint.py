"""Tests for embedcache.store.fingerprint: the cache key."""

import pytest

from embedcache.store.fingerprint import NOT_IN_KEY, cache_key, config_key, sha256_json

BASE = dict(
    backbone={"name": "x", "weights": "w", "weights_sha256": "ab", "layer": None, "pool": None},
    preprocess={"crop_size": 224},
    precision="bf16",
    store_dtype="float16",
    decoder_version="1",
)


def test_canonical_json_ignores_key_order():
    assert sha256_json({"a": 1, "b": [1, 2]}) == sha256_json({"b": [1, 2], "a": 1})


@pytest.mark.parametrize(
    "change",
    [
        {"precision": "fp32"},
        {"store_dtype": "float32"},
        {"decoder_version": "2"},
        {"preprocess": {"crop_size": 112}},
        {"backbone": {**BASE["backbone"], "layer": "features.3"}},
        {"backbone": {**BASE["backbone"], "pool": "max"}},
        {"backbone": {**BASE["backbone"], "weights_sha256": "cd"}},
    ],
)
def test_every_ingredient_changes_the_key(change):
    assert config_key(**{**BASE, **change}) != config_key(**BASE)


def test_manifest_changes_the_entry_key():
    cfg = config_key(**BASE)
    assert cache_key(config=cfg, manifest_sha256="a") != cache_key(config=cfg, manifest_sha256="b")
    assert cache_key(config=cfg, manifest_sha256="a") == cache_key(config=cfg, manifest_sha256="a")


def test_not_in_key_is_documented():
    assert {"batch_size", "workers", "device", "cache_dir", "dataset_root"} <= set(NOT_IN_KEY)


@pytest.mark.parametrize("package", ["Pillow", "torch", "torchvision"])
def test_a_new_minor_version_of_a_decoding_or_compute_library_changes_the_key(package, monkeypatch):
    from embedcache.store import fingerprint

    real = fingerprint.package_version
    before = config_key(**BASE)
    monkeypatch.setattr(fingerprint, "package_version",
                        lambda name: "99.1.0" if name == package else real(name))
    assert config_key(**BASE) != before
    monkeypatch.setattr(fingerprint, "package_version",
                        lambda name: real(name) + "+local" if name == package else real(name))
    assert config_key(**BASE) == before  # a local build tag alone is the same numbers
