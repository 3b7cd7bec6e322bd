"""The per-entry lock: an exclusive, non-blocking advisory lock on ``<entry>.h5.lock``.

Writers hold it while they build an entry; ``rm`` takes it before deleting one, so it never
removes the files of an entry another process is writing. The lock file is opened without
following a symlink and refused when it is not a plain file, so a planted link cannot make us
write elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import ClassVar

from embedcache.errors import CacheLockedError
from embedcache.fileio import named_write_errors, open_lock_file


class EntryLock:
    """The lock of one entry, released by the OS when the holding process dies (a killed run
    never leaves a stale lock).

    Attributes:
        path: the lock file.
    """

    #: Lock files held by this process: POSIX locks do not conflict within one process.
    _held: ClassVar[set[str]] = set()

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, *, purpose: str = "writing") -> None:
        """Take the lock or fail at once.

        Args:
            purpose: what we want it for, in the message when another process holds it.

        Raises:
            CacheLockedError: another process (named by pid when known), or this one, holds it.
            CacheError: the lock file is a symlink or not a plain file, or cannot be created.
        """
        with named_write_errors(self.path.parent):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.path)
        if key in EntryLock._held:
            raise CacheLockedError(f"This process is already writing this cache entry ({str(self.path)!r}).")
        fd = open_lock_file(self.path)
        try:
            # A POSIX record lock, not flock(): DataLoader workers are forked and would inherit
            # an flock, keeping the entry locked after the main process is killed.
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f" (pid {holder})" if holder.isdigit() else ""
                if purpose == "writing":
                    hint = "Wait for it to finish, then rerun: the result will be a cache hit."
                else:
                    hint = f"Not {purpose} it; wait for it to finish (or stop it), then try again."
                raise CacheLockedError(f"Another process{who} is writing this cache entry ({str(self.path)!r}). "
                                       f"{hint}") from exc
            raise
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        EntryLock._held.add(key)

    def release(self, *, unlink: bool = False) -> None:
        """Release the lock (and remove the lock file with ``unlink``, while still holding it)."""
        if self._fd is None:
            return
        EntryLock._held.discard(os.path.realpath(self.path))
        if unlink:
            with contextlib.suppress(OSError):
                self.path.unlink()
        fcntl.lockf(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
