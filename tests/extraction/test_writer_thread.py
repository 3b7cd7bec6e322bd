"""The writer thread: order, commits, a bounded queue, errors raised in the loop's thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from embedcache.errors import CacheError
from embedcache.extraction.writer_thread import WriterThread


class FakeWriter:
    """Records what the thread does; ``fail_at`` makes that write raise; ``gate`` holds writes."""

    def __init__(self, fail_at: int | None = None, gate: threading.Event | None = None) -> None:
        self.calls: list[tuple] = []
        self.fail_at, self.gate = fail_at, gate
        self.thread_names: set[str] = set()

    def write_rows(self, rows: np.ndarray, outputs: np.ndarray) -> None:
        self.thread_names.add(threading.current_thread().name)
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail_at is not None and int(rows[0]) == self.fail_at:
            raise CacheError("disk full (injected)")
        self.calls.append(("rows", rows.tolist()))

    def record_errors(self, failures: list[tuple[int, str]]) -> None:
        if failures:
            self.calls.append(("errors", failures))

    def commit(self) -> None:
        self.calls.append(("commit",))


def batch(start: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.arange(start, start + 2)
    return rows, np.zeros((2, 3), np.float32)


def test_batches_are_written_in_order_off_the_calling_thread_with_their_commits():
    writer = FakeWriter()
    with WriterThread(writer) as thread:
        thread.put(*batch(0), [(2, "bad")])
        thread.put(*batch(3), [], commit=True)
        thread.put(None, None, [(5, "bad too")])
    assert writer.calls == [("rows", [0, 1]), ("errors", [(2, "bad")]), ("rows", [3, 4]), ("commit",),
                            ("errors", [(5, "bad too")])]
    assert writer.thread_names == {"embedcache-writer"}
    assert thread.write_seconds >= 0.0


def test_a_write_error_is_raised_in_the_loop_and_nothing_is_written_after_it():
    writer = FakeWriter(fail_at=2)
    thread = WriterThread(writer)
    thread.put(*batch(0), [])
    thread.put(*batch(2), [])
    thread.put(*batch(4), [])
    with pytest.raises(CacheError, match="disk full"):
        thread.close()
    assert writer.calls == [("rows", [0, 1])]
    with pytest.raises(RuntimeError, match="closed"):
        thread.put(*batch(6), [])


def test_the_queue_is_bounded_the_loop_waits_when_the_writer_is_behind():
    gate = threading.Event()
    writer = FakeWriter(gate=gate)
    thread = WriterThread(writer, depth=1)
    thread.put(*batch(0), [])  # taken by the thread, which then waits on the gate
    thread.put(*batch(2), [])  # fills the queue (the thread may not have taken the first yet)
    third = threading.Thread(target=lambda: thread.put(*batch(4), []))
    third.start()
    third.join(0.3)
    blocked = third.is_alive()
    gate.set()
    third.join(10)
    thread.close()
    assert blocked, "a third batch was queued while the writer held one and the queue was full"
    assert [c[1][0] for c in writer.calls] == [0, 2, 4]
    assert thread.wait_seconds > 0.0


def test_an_interrupted_loop_still_writes_what_it_queued_and_raises_its_own_error():
    writer = FakeWriter(fail_at=2)
    with pytest.raises(KeyboardInterrupt), WriterThread(writer) as thread:
        thread.put(*batch(0), [])
        thread.put(*batch(2), [])  # fails in the thread: the interrupt, not this, propagates
        raise KeyboardInterrupt
    assert writer.calls == [("rows", [0, 1])]
