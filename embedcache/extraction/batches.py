"""What every inference loop shares, with no torch: the batches it runs and hands back, progress,
one row's decoding."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedcache.errors import DecodeError


@dataclass
class Progress:
    """What a progress callback receives after every batch."""

    done: int  # rows attempted so far in this run (including reused/resumed)
    total: int
    failed: int
    images_per_s: float


@dataclass
class Batch:
    """One batch out of the loop: ``outputs`` is ``(len(rows), D)`` float32, None when every
    image of the batch failed; ``decode_wait``: seconds the loop, its model built, waited for
    this batch's decoded images (0 when decoding kept ahead of the model); ``decoders``: the
    decoding threads running by then (0: decoded elsewhere, by DataLoader workers or inline)."""

    rows: np.ndarray
    outputs: np.ndarray | None
    failures: list[tuple[int, str]]
    decode_wait: float = 0.0
    decoders: int = 0


def decode_row(load: Callable[..., Any], index: int, *args: Any) -> tuple[int, Any, str | None]:
    """``(index, load(index, *args), None)``, or ``(index, None, message)`` for a bad image: one
    bad image never stops a loop."""
    try:
        return index, load(index, *args), None
    except DecodeError as exc:
        return index, None, str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad image must never stop the loop
        return index, None, f"{type(exc).__name__}: {exc}"


def row_batches(attempted: np.ndarray, batch_size: int) -> list[list[int]]:
    """Index ranges ``[k*B, (k+1)*B)`` minus attempted rows; whole-batch commits keep a resumed
    run's batches identical to an uninterrupted run's."""
    out = []
    n = len(attempted)
    for start in range(0, n, batch_size):
        rows = [i for i in range(start, min(n, start + batch_size)) if not attempted[i]]
        if rows:
            out.append(rows)
    return out
