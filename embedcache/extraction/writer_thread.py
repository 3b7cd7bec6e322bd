"""Writing off the model's critical path: one thread drains a bounded queue of finished batches
into a :class:`~embedcache.store.writer.StoreWriter`.

The inference loop hands each batch over (:meth:`WriterThread.put`) and goes on to the next
forward pass while the thread writes the rows, records the failures and commits. The queue holds
at most :data:`QUEUE_BATCHES` batches, so a slow disk slows the loop down instead of filling the
memory; ``wait_seconds`` is how long the loop waited on a full queue (the model waiting on a
write: about zero unless the disk is slower than the model). Only the thread touches the writer
until :meth:`WriterThread.close` has returned. A write error is raised in the loop's thread at
its next ``put`` or at ``close``, and nothing more is written after it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from types import TracebackType

import numpy as np

from embedcache.store.writer import StoreWriter

#: Finished batches waiting to be written at most (then the loop waits).
QUEUE_BATCHES = 4


class WriterThread:
    """A writer thread for ``writer`` (use as a context manager; see the module docstring).

    Attributes:
        write_seconds: time the thread spent writing and committing.
        wait_seconds: time :meth:`put` waited for room in the queue.
    """

    def __init__(self, writer: StoreWriter, *, depth: int = QUEUE_BATCHES) -> None:
        self.writer = writer
        self.write_seconds = 0.0
        self.wait_seconds = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._drain, name="embedcache-writer", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # after a failure nothing more is written; the loop learns at its next put
            rows, outputs, failures, commit = item
            started = time.perf_counter()
            try:
                if outputs is not None:
                    self.writer.write_rows(rows, outputs)
                self.writer.record_errors(failures)
                if commit:
                    self.writer.commit()
            except BaseException as exc:  # noqa: BLE001 - handed to the loop's thread, raised there
                self._error = exc
            self.write_seconds += time.perf_counter() - started

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def put(self, rows: np.ndarray, outputs: np.ndarray | None, failures: list[tuple[int, str]], *,
            commit: bool = False) -> None:
        """Queue one batch (its arrays must not be changed afterwards); ``commit`` after it."""
        self._raise_error()
        if self._closed:
            raise RuntimeError("This WriterThread is closed; nothing more can be queued.")
        started = time.perf_counter()
        self._queue.put((rows, outputs, failures, commit))
        self.wait_seconds += time.perf_counter() - started

    def close(self) -> None:
        """Write what is queued, stop the thread, and raise a write error if one happened."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
        self._raise_error()

    def __enter__(self) -> WriterThread:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
            return
        # the loop failed (or was interrupted): what was queued is still written; the loop's own
        # exception is the one that propagates
        with contextlib.suppress(Exception):
            self.close()
