"""A small JSON memo kept in the cache directory (``<cache_dir>/backbone-specs.json``).

Extraction remembers each backbone configuration's identity there (weights hash, feature dim,
preprocessing), keyed by what determines it, so that a cache hit needs neither to build the model
nor to hash its weights again. The memo is only ever a shortcut: a missing, unreadable or foreign
file is ignored (and rewritten), and the file is replaced atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..fileio import new_file_mode

MEMO_NAME = "backbone-specs.json"
#: Entries kept at most (oldest dropped first).
MAX_ENTRIES = 256


class JsonMemo:
    """``get``/``put`` of JSON values by string key, persisted in one file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def _load(self) -> dict[str, Any]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return {}
        try:
            with os.fdopen(fd, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> Any:
        """The value stored under ``key``, or None."""
        return self._load().get(key)

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key`` (best effort: a read-only cache dir just keeps no memo)."""
        data = self._load()
        data.pop(key, None)
        data[key] = value
        while len(data) > MAX_ENTRIES:
            data.pop(next(iter(data)))
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            try:
                os.fchmod(fd, new_file_mode())
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump(data, fh, sort_keys=True)
                os.replace(tmp, self.path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
