"""Errors raised by ``storage``: the LMDB batch cache, dead letters, id statistics, the
mapping store, the SSD row store and checkpoint files.

Every error carries ``retriable`` (True: the same call may succeed later, e.g. a full LMDB
map being grown). Exit codes are decided by ``engine.errors``.
"""

from __future__ import annotations

__all__ = ["StorageError", "CacheError", "CheckpointError"]


class StorageError(Exception):
    """Base of the errors ``storage`` raises on purpose."""

    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None):
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


class CacheError(StorageError):
    """The LMDB batch cache, dead-letter, id-stats or mapping store is unusable or inconsistent."""


class CheckpointError(StorageError):
    """A checkpoint or row-store file cannot be written, or does not match the model being
    restored. Declared here because ``storage`` owns every file on disk; ``trainer`` raises
    it too (re-exported as ``trainer.errors.CheckpointError``)."""
