"""The cached exports' checks (embedcache.models.export_cache.valid_export): every file hashed,
and a check that hashed them remembered while no file's size, times, inode or device change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from embedcache.models import export_cache
from embedcache.models.export_cache import VERIFIED, publish_export, valid_export

IDENTITY = {"backbone": {"name": "fake"}, "export_version": 1}
FILES = ["model.xml", "model.bin"]


def _publish(tmp_path: Path) -> Path:
    def write(staging: Path) -> None:
        (staging / "model.xml").write_text("<net/>")
        (staging / "model.bin").write_bytes(bytes(range(256)) * 64)

    target = tmp_path / "exports" / "abc.openvino"
    publish_export(target, IDENTITY, FILES, write)
    return target


def _no_hashing(*_args):
    raise AssertionError("hashed although the check was remembered")


def test_a_check_is_remembered_only_for_files_older_than_the_margin(tmp_path, monkeypatch):
    directory = _publish(tmp_path)
    assert valid_export(directory, IDENTITY, FILES)
    assert not (directory / VERIFIED).exists()  # just written: within the timestamps' granularity
    monkeypatch.setattr(export_cache, "VERIFIED_MARGIN_SECONDS", 0.0)
    assert valid_export(directory, IDENTITY, FILES)
    assert (directory / VERIFIED).exists()
    monkeypatch.setattr(export_cache, "sha256_file", _no_hashing)
    assert valid_export(directory, IDENTITY, FILES)  # remembered: nothing hashed
    assert not valid_export(directory, {**IDENTITY, "export_version": 2}, FILES)  # the identity is still read


def test_a_changed_byte_is_found_even_with_its_mtime_put_back(tmp_path, monkeypatch):
    monkeypatch.setattr(export_cache, "VERIFIED_MARGIN_SECONDS", 0.0)
    directory = _publish(tmp_path)
    assert valid_export(directory, IDENTITY, FILES) and (directory / VERIFIED).exists()
    weights = directory / "model.bin"
    before = os.stat(weights)
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    with open(weights, "r+b") as handle:  # same inode, same size
        handle.write(bytes(data))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(weights).st_mtime_ns == before.st_mtime_ns
    assert not valid_export(directory, IDENTITY, FILES)  # the ctime moved: hashed again, and it fails


@pytest.mark.parametrize("damage", ["forged", "symlink"])
def test_a_forged_memo_or_a_planted_link_is_not_trusted(tmp_path, monkeypatch, damage):
    monkeypatch.setattr(export_cache, "VERIFIED_MARGIN_SECONDS", 0.0)
    directory = _publish(tmp_path)
    assert valid_export(directory, IDENTITY, FILES)
    weights = directory / "model.bin"
    if damage == "forged":  # a memo that does not describe the files: they are hashed
        (directory / VERIFIED).write_text('{"model.bin": [1, 2, 3, 4, 5]}')
        weights.write_bytes(b"not the weights")
    else:  # a file replaced by a link to an identical copy: refused whatever the memo says
        copy = tmp_path / "copy.bin"
        copy.write_bytes(weights.read_bytes())
        weights.unlink()
        weights.symlink_to(copy)
    assert not valid_export(directory, IDENTITY, FILES)


def test_an_export_that_cannot_be_written_is_hashed_every_time(tmp_path, monkeypatch):
    monkeypatch.setattr(export_cache, "VERIFIED_MARGIN_SECONDS", 0.0)
    directory = _publish(tmp_path)

    def read_only(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(export_cache.tempfile, "mkstemp", read_only)  # as in another user's cache
    assert valid_export(directory, IDENTITY, FILES) and not (directory / VERIFIED).exists()
    assert sorted(p.name for p in directory.iterdir()) == sorted(["export.json", *FILES])
