"""The error hierarchy.

Every error a user can cause derives from :class:`LogitCacheError`; the CLI turns those into a
one-line message and a non-zero exit, while anything else keeps its traceback (it is our bug).
Classes also inherit the matching builtin where one fits (``CacheNotFoundError`` is a
``FileNotFoundError``) so callers can catch either.

Messages say what is wrong, where, what was expected versus found, and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "CacheCorruptError",
    "CacheIncompleteError",
    "CacheLockedError",
    "CacheNotFoundError",
    "ChecksumMismatchError",
    "CodecError",
    "ConfigError",
    "FormatVersionError",
    "InputError",
    "InputNotFoundError",
    "LoaderError",
    "LogitCacheError",
    "ManifestCorruptError",
    "ManifestError",
    "NonFiniteLogitsError",
    "ShardMissingError",
    "StorageError",
    "TeacherError",
    "UnsafePathError",
    "WriterError",
]


class LogitCacheError(Exception):
    """Base of every error logitcache raises on purpose."""


class ConfigError(LogitCacheError, ValueError):
    """Invalid options or arguments (bad k, vocab size, temperature, ...)."""


class CodecError(LogitCacheError, ValueError):
    """Targets that a codec cannot encode or bytes it cannot decode."""


class CacheNotFoundError(LogitCacheError, FileNotFoundError):
    """Nothing that looks like a cache at the given location."""


class CacheIncompleteError(LogitCacheError):
    """A cache directory without a committed manifest: a dump that crashed or is still running."""


class ManifestError(LogitCacheError, ValueError):
    """``manifest.json`` is unreadable, inconsistent, or has invalid fields."""


class FormatVersionError(ManifestError):
    """The manifest's format version is one this logitcache cannot read."""


class UnsafePathError(ManifestError):
    """A manifest names a file outside the cache (absolute path, ``..``, URL)."""


class CacheCorruptError(LogitCacheError):
    """A shard's bytes are damaged or do not match what the manifest promises."""


class ManifestCorruptError(ManifestError, CacheCorruptError):
    """``manifest.json`` is not a manifest at all: not JSON, larger than the cap, nested deeper
    than any manifest is."""


class ChecksumMismatchError(CacheCorruptError):
    """A shard file's checksum or size differs from the manifest's record."""


class ShardMissingError(CacheCorruptError, FileNotFoundError):
    """A shard file the manifest lists does not exist."""


class WriterError(LogitCacheError):
    """A cache writer was used wrongly or failed; the cache it was writing is not committed."""


class InputError(LogitCacheError, ValueError):
    """Input data that cannot be read or tokenised (unknown column, empty, no chat template)."""


class InputNotFoundError(InputError, FileNotFoundError):
    """The input data path or URL does not exist."""


class TeacherError(LogitCacheError):
    """A teacher that cannot be loaded or run as asked."""


class NonFiniteLogitsError(TeacherError):
    """The teacher produced NaN or infinite logits; the message names the rows."""


class LoaderError(LogitCacheError):
    """The data loader was used wrongly or failed (a step past the epoch, a dead worker)."""


class CacheLockedError(WriterError):
    """Another writer holds the cache's lock object (or a stale lock of a crashed one remains)."""


class StorageError(LogitCacheError, OSError):
    """The storage behind a cache kept failing (network, 5xx) after every retry."""
