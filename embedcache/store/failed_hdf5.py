"""HDF5 files whose writes failed: what the process does with them until it ends.

After a write error (a full disk, a vanished device) HDF5 cannot flush or close the file: closing
errors, and freeing its objects later can crash the interpreter. The writer hands such a handle to
:func:`keep_unclosable` (it stays referenced, nothing more is written) and the CLI ends the process
at once after reporting the error (see ``StorageError.process_unsafe``).
"""

from __future__ import annotations

import sys
from typing import Any

import h5py

#: Handles whose writes failed, referenced until the process ends.
_UNCLOSABLE: list[h5py.File] = []


def keep_unclosable(handle: h5py.File) -> None:
    """Keep ``handle`` referenced until the process ends; never flush or close it."""
    _UNCLOSABLE.append(handle)


def quiet_failed_hdf5_objects() -> None:
    """After a failed write HDF5 cannot release the file's objects, and h5py reports each one
    while the error unwinds (Cython prints the traceback through ``sys.excepthook``, then passes
    it to ``sys.unraisablehook``); the failure is already reported once, as a StorageError naming
    the file. Installed once per process; every other exception passes through untouched."""
    if getattr(sys.unraisablehook, "embedcache_quiet", False):
        return
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

    def from_failed_hdf5(value: BaseException | None) -> bool:
        text = str(value)
        return isinstance(value, RuntimeError) and (
            "file write failed" in text or "decrement id ref count" in text)

    def unraisable_hook(unraisable: Any) -> None:
        if not from_failed_hdf5(unraisable.exc_value):
            previous_unraisable(unraisable)

    def except_hook(kind: type, value: BaseException, traceback: Any) -> None:
        if not from_failed_hdf5(value):
            previous_except(kind, value, traceback)

    unraisable_hook.embedcache_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook
