"""The per-entry writer lock: an exclusive, non-blocking advisory lock on ``<entry>.h5.lock``."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import ClassVar

from embedcache.errors import CacheLockedError


class EntryLock:
    """An exclusive, non-blocking advisory lock on ``<entry>.h5.lock``, released by the OS when
    the holding process dies (so a killed run never leaves a stale lock)."""

    #: Lock files held by this process: POSIX locks do not conflict within one process.
    _held: ClassVar[set[str]] = set()

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.path)
        if key in EntryLock._held:
            raise CacheLockedError(
                f"This process is already writing this cache entry ({str(self.path)!r})."
            )
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # A POSIX record lock, not flock(): DataLoader workers are forked and would inherit
            # an flock, keeping the entry locked after the main process is killed.
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = ""
                with contextlib.suppress(OSError):
                    holder = self.path.read_text().strip()
                raise CacheLockedError(
                    f"Another process{f' (pid {holder})' if holder else ''} is writing this cache "
                    f"entry ({str(self.path)!r}). Wait for it to finish, then rerun: the result "
                    f"will be a cache hit."
                ) from exc
            raise
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        EntryLock._held.add(key)

    def release(self, *, unlink: bool = False) -> None:
        if self._fd is None:
            return
        EntryLock._held.discard(os.path.realpath(self.path))
        if unlink:
            with contextlib.suppress(OSError):
                self.path.unlink()
        fcntl.lockf(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
