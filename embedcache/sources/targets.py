"""Targets of a CSV manifest beyond one class per image: numeric columns and label sets.

- Numeric targets: columns named with ``--target age`` / ``--targets x1,y1,...`` (case-insensitive
  header match); every row needs a finite number in each of them.
- Label sets: a ``labels`` column of ``;``-separated class names (``top;clothing``); an empty cell
  is the empty set (the image carries none of the classes).

Every malformed cell is a :class:`~embedcache.errors.DataSourceError` naming the CSV row (numbered
like a spreadsheet, header = row 1) and column; they are raised while the manifest is read, so
nothing is extracted or written.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence

from embedcache.errors import DataSourceError

#: The column of ``;``-separated class names.
LABELS_COLUMN = "labels"
#: Separator of the names in a ``labels`` cell.
LABEL_SEPARATOR = ";"
#: Columns with a meaning of their own, which cannot be numeric targets.
RESERVED_COLUMNS = ("path", "label", "split", LABELS_COLUMN)


def target_columns(header: list[str], targets: Sequence[str] | None, where: str) -> list[tuple[str, int]]:
    """``[(name as given, column index)]`` of the requested numeric targets; refuses unknown,
    reserved or repeated names and combinations with a ``labels`` column."""
    if not targets:
        return []
    names = [str(t).strip() for t in targets]
    lowered = [n.lower() for n in names]
    available = [h for h in header if h and h not in RESERVED_COLUMNS]
    for name, low in zip(names, lowered, strict=True):
        if not name:
            raise DataSourceError(f"{where}: a target column name is empty; name the columns, e.g. --targets x1,y1.")
        if low in RESERVED_COLUMNS:
            raise DataSourceError(f"{where}: {name!r} cannot be a numeric target (the columns "
                                  f"{list(RESERVED_COLUMNS)} have a meaning of their own).")
        if low not in header:
            raise DataSourceError(f"{where}: there is no column {name!r} for --target/--targets. "
                                  f"Numeric columns available: {available or 'none'}.")
        if lowered.count(low) > 1:
            raise DataSourceError(f"{where}: target column {name!r} is named twice; name each column once.")
    if LABELS_COLUMN in header:
        raise DataSourceError(f"{where}: a manifest with numeric targets cannot also have a '{LABELS_COLUMN}' column; "
                              f"fit label sets and numeric targets from separate manifests.")
    return [(name, header.index(low)) for name, low in zip(names, lowered, strict=True)]


def parse_targets(row: list[str], columns: list[tuple[str, int]], where: str) -> tuple[float, ...]:
    """The finite float in each target column of one CSV row."""
    values = []
    for name, index in columns:
        cell = row[index].strip() if index < len(row) else ""
        if not cell:
            raise DataSourceError(f"{where}, column {name!r}: the target is missing; every row needs a number "
                                  f"in each target column (fill the cell or drop the row).")
        try:
            value = float(cell)
        except ValueError:
            raise DataSourceError(f"{where}, column {name!r}: {cell!r} is not a number; targets must be numeric "
                                  f"(e.g. 31 or 0.25).") from None
        if not math.isfinite(value):
            raise DataSourceError(f"{where}, column {name!r}: {cell!r} is not a finite number; NaN and infinite "
                                  f"targets are refused (fill the cell or drop the row).")
        values.append(value)
    return tuple(values)


def parse_label_set(cell: str, where: str) -> tuple[str, ...]:
    """The class names of one ``labels`` cell (sorted, duplicates dropped; empty cell: none)."""
    if not cell.strip():
        return ()
    names = [part.strip() for part in cell.split(LABEL_SEPARATOR)]
    if any(not name for name in names):
        raise DataSourceError(f"{where}, column '{LABELS_COLUMN}': empty class name in {cell!r}; separate "
                              f"names with single '{LABEL_SEPARATOR}' (e.g. top;clothing).")
    return tuple(sorted(set(names)))


def label_set_indices(sets: list[tuple[int, tuple[str, ...]]], vocabulary: Sequence[str] | None,
                      csv_path: str) -> tuple[list[str], dict[int, tuple[int, ...]]]:
    """Class names and, per CSV row number, the class positions of its set. With ``vocabulary``
    (a probe's classes) the names are those, in that order, and any other name is refused."""
    names = list(vocabulary) if vocabulary is not None else sorted({n for _, s in sets for n in s})
    position = {name: i for i, name in enumerate(names)}
    out = {}
    for number, label_set in sets:
        unknown = [n for n in label_set if n not in position]
        if unknown:
            raise DataSourceError(f"CSV manifest {csv_path!r} row {number}, column '{LABELS_COLUMN}': unknown class "
                                  f"{unknown[0]!r}; the classes are {names}. Fix the name or drop the row.")
        out[number] = tuple(position[n] for n in label_set)
    return names, out


def csv_columns(csv_path: str) -> list[str]:
    """A CSV manifest's header, lower-cased (empty when it cannot be read: reading it properly
    reports the problem)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            return [h.strip().lower() for h in next(csv.reader(handle), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
