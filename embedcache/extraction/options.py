"""What an extraction run is asked (:class:`RunOptions`: nothing of it is in the cache key) and
what it reports (:class:`ExtractStats`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedcache.errors import ConfigError, TooManyErrorsError


@dataclass
class ExtractStats:
    """What one ``extract`` call did.

    Attributes:
        n: rows of the entry; failed: images recorded as undecodable.
        seconds: the whole call; model_seconds: the inference loop (None on a cache hit).
        computed_rows / reused_rows / resumed_rows: rows run through the model in this call,
            copied from an older entry, found done in a ``.partial``.
        images_per_s: computed rows per second of the loop (None when nothing was computed).
        device, precision, runtime: where and how the model ran (or would have run).
        threads: intra-op threads the model ran with (None on a cache hit: no model ran).
        warnings: notes such as a discarded unreadable ``.partial``.
    """

    n: int
    failed: int
    seconds: float
    device: str
    precision: str
    runtime: str = "torch"
    model_seconds: float | None = None
    computed_rows: int = 0
    reused_rows: int = 0
    resumed_rows: int = 0
    images_per_s: float | None = None
    threads: int | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RunOptions:
    """How the rows are computed (none of it is in the cache key)."""

    batch_size: int
    workers: int
    threads: int  # intra-op threads of the model (resolve_threads: every available core)
    max_errors: int | None
    max_errors_text: Any
    incremental: bool


def parse_max_errors(max_errors: float | int | str | None, n: int) -> int | None:
    """A count, or a fraction in (0, 1) of ``n``; None = unlimited."""
    if max_errors is None:
        return None
    try:
        value = float(max_errors)
    except (TypeError, ValueError):
        raise ConfigError(
            f"The 'max_errors' parameter must be a count (e.g. 10) or a fraction in (0, 1) "
            f"(e.g. 0.01). Got {max_errors!r}."
        ) from None
    if not np.isfinite(value) or value < 0:
        raise ConfigError(f"The 'max_errors' parameter must be a finite number >= 0. Got {max_errors!r}.")
    if 0 < value < 1:
        return int(np.floor(value * n))
    if value != int(value):
        raise ConfigError(
            f"The 'max_errors' parameter must be a whole count or a fraction below 1. Got {max_errors!r}."
        )
    return int(value)


def check_max_errors(n_failed: int, options: RunOptions, failures: list[tuple[int, str]], source: Any) -> None:
    """Raise when more images failed than ``max_errors`` allows (also on a rerun or a cache hit:
    the entry's recorded failures count)."""
    if options.max_errors is None or n_failed <= options.max_errors:
        return
    shown = "; ".join(f"{source.samples[i].path}: {m}" for i, m in failures[:3])
    raise TooManyErrorsError(
        f"{n_failed} images failed to decode, more than max_errors={options.max_errors_text} allows. "
        f"First failures: {shown}. Progress is kept: fix or remove the files and rerun, or raise --max-errors."
    )
