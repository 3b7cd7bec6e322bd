"""One hyper-parameter chosen on validation rows: the table of values tried and the winner.

The k-NN head chooses ``k``, the ridge and sigmoid heads a penalty; each fills a
:class:`Selection`, which reports print as a table and write as JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Selection:
    """Validation scores along a grid and the chosen value.

    Attributes:
        parameter: what was chosen (``k`` or ``penalty``).
        metric: the validation score (``top1``, ``r2`` (mean over targets) or ``mAP``).
        values: the grid, in the order it was scored.
        val_scores: the score of each value on the validation rows.
        seconds: time of the whole selection (one pass serves every value).
        best_value, best_score: the winner and its score.
        extra: anything else chosen on validation (the multi-label threshold).
    """

    parameter: str
    metric: str
    values: list[float] | list[int]
    val_scores: list[float]
    seconds: float
    best_value: float | int
    best_score: float
    extra: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The table as plain data (for reports)."""
        return {"parameter": self.parameter, "metric": self.metric, "values": self.values,
                "val_scores": self.val_scores, "seconds": self.seconds, "best_value": self.best_value,
                "best_score": self.best_score, **({"extra": self.extra} if self.extra else {})}


def best_index(scores: Sequence[float], *, ties: str = "first") -> int:
    """Position of the best score; ``ties="first"`` keeps the earliest of equal scores, ``"last"``
    the latest (grids are ordered so that the preferred value of a tie is the simpler model)."""
    values = np.asarray(scores, dtype=np.float64)
    values = np.where(np.isnan(values), -np.inf, values)
    hits = np.flatnonzero(values == values.max())
    return int(hits[0] if ties == "first" else hits[-1])
