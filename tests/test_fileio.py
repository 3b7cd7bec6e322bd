"""fileio: atomic writes, staged writes, permission bits, plain-file checks."""
from __future__ import annotations

import errno
import os
import stat

import pytest

from embedcache import fileio
from embedcache.errors import CacheError


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    fileio._NEW_FILE_MODE = None
    yield
    os.umask(old)
    fileio._NEW_FILE_MODE = None


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_files_get_the_umask_mode_not_mkstemps_0600(tmp_path, umask_027):
    assert fileio.new_file_mode() == 0o640
    assert _mode(fileio.atomic_write(tmp_path / "a.json", b"{}")) == 0o640
    staged = fileio.stage_write(tmp_path / "b.json", b"{}")
    assert _mode(staged) == 0o640
    fileio.publish([(staged, tmp_path / "b.json")])
    assert _mode(tmp_path / "b.json") == 0o640
    assert _mode(fileio.new_temporary_path(tmp_path, prefix=".x.")) == 0o640


def test_an_explicit_mode_wins(tmp_path):
    assert _mode(fileio.atomic_write(tmp_path / "a", b"x", mode=0o600)) == 0o600


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "report.json"
    target.write_bytes(b"old")

    def broken(fh):
        fh.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CacheError, match="report.json"):
        fileio.atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary left behind


def test_publish_moves_every_staged_file_and_leaves_no_temporaries(tmp_path):
    staged = [(fileio.stage_write(tmp_path / n, n.encode()), tmp_path / n) for n in ("a", "b")]
    fileio.publish(staged)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    assert (tmp_path / "b").read_bytes() == b"b"


def test_is_plain_file_refuses_links_and_hard_links(tmp_path):
    real = tmp_path / "real"
    real.write_bytes(b"x")
    assert fileio.is_plain_file(real)
    (tmp_path / "sym").symlink_to(real)
    assert not fileio.is_plain_file(tmp_path / "sym")
    os.link(real, tmp_path / "hard")
    assert not fileio.is_plain_file(real)
    assert not fileio.is_plain_file(tmp_path / "missing")
