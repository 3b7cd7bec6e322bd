"""Writing files safely: never through a planted link, never half-written, errors that say why.

- :func:`atomic_write` writes bytes to a new temporary file (``mkstemp`` in the target's own
  directory, so nobody else's file is ever opened), fsyncs it and renames it over the target:
  a crash leaves the old file or the new one, and a symlink planted at the target's name is
  replaced, not followed.
- :func:`new_temporary_path` makes a new file nobody could have planted (``mkstemp``);
  :func:`is_plain_file` tells whether an existing file may be written in place (a regular file
  with one link, not a symlink); :func:`open_lock_file` opens a lock file with ``O_NOFOLLOW``.
- :func:`write_error` turns an ``OSError`` into a :class:`~embedcache.errors.CacheError` that names
  the path and, when the disk is full, the free space and what was needed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from embedcache.errors import CacheError, StorageError

#: errno values that mean "no room": a full disk, a quota, a file-size limit.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free space on the file system holding ``path`` (or its nearest existing parent)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


_ERRNO = re.compile(r"errno = (\d+)")


def os_errno(exc: Exception) -> int | None:
    """The OS error number of an exception, also when a library (HDF5) only quotes it in its message."""
    if getattr(exc, "errno", None) is not None:
        return exc.errno
    match = _ERRNO.search(str(exc))
    return int(match.group(1)) if match else None


def write_error(path: str | os.PathLike, exc: Exception, *, needed: int | None = None, kept: str = "",
                hdf5: bool = False) -> StorageError:
    """A named error for a failed write of ``path``.

    Args:
        path: what was being written.
        exc: the error the OS (or h5py, with the errno in its message) gave.
        needed: bytes the write still needed, if known (quoted when the disk is full).
        kept: what survives the failure (e.g. "Committed progress is kept").
        hdf5: an HDF5 file was being written (see :class:`~embedcache.errors.StorageError`).
    """
    number = os_errno(exc)
    strerror = getattr(exc, "strerror", None)
    reason = strerror or (os.strerror(number) if number is not None else str(exc))
    if number == errno.EFBIG:
        message = (f"No room to write {str(path)!r} ({reason}): the file reached this process's file-size limit "
                   f"(ulimit -f) or the file system's largest file. Raise the limit or use another directory.")
    elif number in NO_SPACE:
        free = free_bytes(path)
        room = f"{_human(free)} free" if free is not None else "no space left"
        need = f", about {_human(needed)} needed" if needed else ""
        message = f"No room to write {str(path)!r} ({reason}: {room}{need}). Free some space or use another directory."
    elif number in (errno.EROFS, errno.EACCES, errno.EPERM):
        message = f"Cannot write {str(path)!r} ({reason}): the location is read-only or not yours. Use another directory."
    else:
        message = f"Cannot write {str(path)!r} ({reason})."
    return StorageError(f"{message}{' ' + kept if kept else ''}", process_unsafe=hdf5)


@contextlib.contextmanager
def named_write_errors(path: str | os.PathLike, *, needed: int | None = None, kept: str = "",
                       hdf5: bool = False) -> Iterator[None]:
    """Re-raise any ``OSError`` of the block (and, writing HDF5, the ``RuntimeError`` h5py raises
    for failed flushes) as :func:`write_error`."""
    failures = (OSError, RuntimeError) if hdf5 else (OSError,)
    try:
        yield
    except CacheError:
        raise
    except failures as exc:
        raise write_error(path, exc, needed=needed, kept=kept, hdf5=hdf5) from exc


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable (best effort: not every file system supports it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def new_file_mode() -> int:
    """The permission bits ``open()`` would give a new file here: 0o666 less the umask (``mkstemp``
    alone makes 0o600 files, which would lock a shared cache away from its other users)."""
    global _NEW_FILE_MODE
    if _NEW_FILE_MODE is None:
        umask = None
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("Umask:"):
                    umask = int(line.split()[1], 8)
        if umask is None:  # no /proc: read it the old way (set and restore)
            umask = os.umask(0o022)
            os.umask(umask)
        _NEW_FILE_MODE = 0o666 & ~umask
    return _NEW_FILE_MODE


_NEW_FILE_MODE: int | None = None


def stage_write(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` to a new temporary file beside ``path`` (``mkstemp``, fsync) and return its
    name; :func:`publish` moves staged files into place once all of them are written."""
    path = Path(path)
    with named_write_errors(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, new_file_mode() if mode is None else mode)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return Path(tmp)


def publish(staged: list[tuple[Path, Path]]) -> None:
    """Rename staged files over their targets, in order (renames need no space: a full disk
    cannot stop them half-way); a failure removes the temporaries not yet moved."""
    try:
        with named_write_errors(staged[0][1] if staged else "."):
            for tmp, final in staged:
                os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    if staged:
        fsync_dir(staged[0][1].parent)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None] | bytes, *, mode: int | None = None) -> Path:
    """Write ``path`` as a unit: a temporary file in the same directory, fsync, rename over ``path``.

    Args:
        path: the target (its directory must exist).
        write: the bytes, or ``f(binary_file)`` writing them.
        mode: permission bits of the new file (default: what ``open()`` would give it).

    Raises:
        CacheError: the write failed (disk full, read-only, ...); the old file, if any, is intact.
    """
    path = Path(path)
    with named_write_errors(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                if isinstance(write, (bytes, bytearray, memoryview)):
                    fh.write(write)
                else:
                    write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, new_file_mode() if mode is None else mode)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    fsync_dir(path.parent)
    return path


def new_temporary_path(directory: str | os.PathLike, *, prefix: str, suffix: str = "") -> Path:
    """A new, empty regular file in ``directory`` (created with ``mkstemp``: a name nobody planted)."""
    with named_write_errors(directory):
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
        try:
            os.fchmod(fd, new_file_mode())
        finally:
            os.close(fd)
    return Path(name)


def is_plain_file(path: str | os.PathLike) -> bool:
    """A regular file, not a symlink, with one hard link (so writing it writes nothing else)."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_nlink == 1


def open_lock_file(path: str | os.PathLike) -> int:
    """A descriptor of ``path`` for locking: created if missing, never followed if a symlink,
    refused if it is not a plain file (another link to it would be written through)."""
    path = Path(path)
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CacheError(f"{str(path)!r} is a symlink; refusing to write through it. Remove it and rerun.") from None
        raise write_error(path, exc) from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise CacheError(f"{str(path)!r} is not a plain file (a hard link or a device); refusing to write it. "
                         f"Remove it and rerun.")
    return fd


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
