"""One exception hierarchy for the whole package.

Every error derives from :class:`EmbedcacheError` and also from the builtin it refines, so callers
can catch either ``EmbedcacheError`` or e.g. ``ValueError``. The CLI translates these into a clean
message and a non-zero exit; the library itself never prints or exits.
"""

from __future__ import annotations


class EmbedcacheError(Exception):
    """Base class of every error raised on purpose by embedcache."""


class ConfigError(EmbedcacheError, ValueError):
    """A parameter has a value that is not allowed (the message names it and the fix)."""


class UnknownBackboneError(EmbedcacheError, ValueError):
    """A backbone name is not registered; the message lists close matches."""


class WeightsError(EmbedcacheError, ValueError):
    """Weights could not be found, loaded, or do not fit the architecture."""


class DataSourceError(EmbedcacheError, ValueError):
    """An image source (folder, CSV, dataset) is missing, empty or malformed."""


class DecodeError(EmbedcacheError, ValueError):
    """One image could not be decoded safely (corrupt, truncated, not an image, too large)."""


class TooManyErrorsError(EmbedcacheError, RuntimeError):
    """More images failed to decode than ``max_errors`` allows."""


class CacheError(EmbedcacheError, OSError):
    """A cache entry is missing, unreadable, incomplete or not an embedcache file."""


class CacheLockedError(CacheError):
    """Another process is writing the same cache entry."""


class CorruptEntryError(CacheError):
    """A cache entry's bytes no longer match their checksums, or its layout is damaged."""


class StorageError(CacheError):
    """A file could not be written: a full disk, a file-size limit, read-only media, an I/O error.

    Attributes:
        process_unsafe: an HDF5 file was being written when it failed; HDF5 then cannot shut
            down cleanly (it can crash at interpreter exit), so the CLI exits at once.
    """

    def __init__(self, message: str, *, process_unsafe: bool = False) -> None:
        super().__init__(message)
        self.process_unsafe = process_unsafe
