"""Fixtures shared by several test folders."""

from __future__ import annotations

import os

import pytest

# The suite runs the torch runtime unless a test asks for another (tests/extraction/test_openvino.py):
# `auto` would pick OpenVINO wherever it is installed, and export every tiny test model.
os.environ.setdefault("EMBEDCACHE_RUNTIME", "torch")

import tests.tiny_backbone  # noqa: F401 - registers the tiny backbone
from embedcache.experiments.protocol import probe
from embedcache.extraction.extract import extract
from tests.tiny_backbone import TINY, make_image_folder


@pytest.fixture
def probed(tmp_path):
    """A tiny-backbone probe on a train/test folder (features stored in float32)."""
    folder = make_image_folder(tmp_path / "data", per_class=15, split_dirs=True)
    store = extract(folder, backbone=TINY, workers=0, cache_dir=tmp_path / "c", precision="fp32",
                    store_dtype="float32")
    result = probe(store, out=tmp_path / "p", penalty=1e-3)
    return folder, tmp_path / "p", result
