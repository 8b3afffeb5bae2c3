"""Errors raised by ``storage``: the LMDB batch cache, dead letters, id statistics, the
mapping store, the SSD row store and checkpoint files.

Every error carries ``retriable`` (True: the same call may succeed later, e.g. a full LMDB
map being grown). Exit codes are decided by ``engine.errors``.
"""

from __future__ import annotations

__all__ = ["StorageError", "CacheError", "CheckpointError", "DiskFullError", "DiskReserveError", "HistoryError",
           "ModelPackageError"]


class StorageError(Exception):
    """Base of the errors ``storage`` raises on purpose."""

    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None):
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


class CacheError(StorageError):
    """The LMDB batch cache, dead-letter, id-stats or mapping store is unusable or inconsistent."""


class HistoryError(StorageError):
    """The trainer's metrics history (``storage.metrics_history``) is missing or unreadable."""


class CheckpointError(StorageError):
    """A checkpoint or row-store file cannot be written, or does not match the model being
    restored. Declared here because ``storage`` owns every file on disk; ``trainer`` raises
    it too (re-exported as ``trainer.errors.CheckpointError``)."""


class DiskFullError(StorageError):
    """A file system headrace writes to is full: the write did not happen (nothing of it is
    stored; a cache write keeps exactly-once, the source re-reads its range). Not retriable:
    someone must free space, lower a budget or move the store first. The message names the
    path, its file system's free bytes, what the write needed and what to do."""

    def __init__(self, message: str, *, path: str = "", free_bytes: int = 0, needed_bytes: int = 0,
                 reserve_bytes: int = 0, retriable: bool | None = None):
        super().__init__(message, retriable=retriable)
        self.path = path
        self.free_bytes = free_bytes
        self.needed_bytes = needed_bytes
        self.reserve_bytes = reserve_bytes


class DiskReserveError(DiskFullError):
    """A cache write would have left less than ``[cache] disk_reserve_bytes`` free, so it was
    not attempted: ingest stops here while the disk still has room for checkpoints and
    mappings (``serve`` pauses ingest and resumes once space is back)."""


class ModelPackageError(StorageError):
    """A model package (``headrace export``) is missing, incomplete, damaged, or does not fit
    what it is applied to (a delta whose parent is not the loaded package)."""
