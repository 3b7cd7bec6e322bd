"""The registry refuses to replace a backbone by accident."""

from __future__ import annotations

import pytest

import tests.tiny_backbone  # noqa: F401 - registers the tiny backbone
from embedcache.errors import ConfigError
from embedcache.models.registry import register_backbone, registration, unregister_backbone
from tests.tiny_backbone import TINY, tiny_factory


def test_an_existing_name_is_refused_unless_override():
    with pytest.raises(ConfigError, match="'tiny-test' is registered already.*override=True"):
        register_backbone(TINY)(tiny_factory)
    with pytest.raises(ConfigError, match="registered already"):
        register_backbone("efficientnet_lite0")(tiny_factory)


def test_override_replaces_and_unregister_removes():
    original = registration(TINY)
    try:
        register_backbone(TINY, description="replaced", override=True)(tiny_factory)
        assert registration(TINY).description == "replaced"
    finally:
        register_backbone(TINY, description=original.description, dim=original.dim,
                          input_size=original.input_size, offline_ready=original.offline_ready,
                          weights_files=original.weights_files, override=True)(original.factory)
    register_backbone("tmp-test-name")(tiny_factory)
    unregister_backbone("tmp-test-name")
    assert registration("tmp-test-name") is None
