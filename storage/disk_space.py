"""Free space of the file systems headrace writes to: the ingest reserve and one clear
disk-full error for every store (cache, id statistics, mappings, row store, checkpoints).

Why a reserve: LMDB, ``torch.save`` and a memory-mapped row file all fail badly on a full
disk (LMDB reports ``Input/output error`` from a short write, a write into a row-file hole
is a SIGBUS). Ingest is the one writer that grows without a bound set by the model, so the
cache stops taking batches while the free space of its file system is below the reserve;
checkpoints and mappings, which the trainer still writes, keep that room.

``disk_usage`` reads ``os.statvfs`` (a few microseconds): free bytes are ``f_bavail`` (what
a non-root writer may still use), so a root-reserved ext4 margin counts as full.

Example:
    >>> effective_reserve_bytes(None, total_bytes=10 << 30) == 512 << 20  # 5% of 10 GiB
    True
    >>> effective_reserve_bytes(None, total_bytes=1 << 40) == 1 << 30     # capped at 1 GiB
    True
    >>> effective_reserve_bytes(0, total_bytes=1 << 40)                   # off
    0
"""

from __future__ import annotations

import dataclasses
import errno
import os

from storage.errors import DiskFullError, DiskReserveError

__all__ = [
    "DiskUsage", "disk_usage", "effective_reserve_bytes", "is_disk_full_errno",
    "disk_full_error", "check_free", "DEFAULT_RESERVE_BYTES", "DEFAULT_RESERVE_FRACTION",
]

#: ``[cache] disk_reserve_bytes`` when unset: 1 GiB, but at most 5% of the file system.
DEFAULT_RESERVE_BYTES = 1 << 30
DEFAULT_RESERVE_FRACTION = 0.05

_ADVICE = ("free space on that file system, lower [cache] max_bytes (batch retention) or "
           "[cache] dead_letter_max_bytes, or move the store to a bigger disk ([cache] path, "
           "[trainer] checkpoint_dir, [row_cache] path)")


@dataclasses.dataclass(frozen=True)
class DiskUsage:
    """The file system holding ``path``: bytes a writer may still use, and its size."""

    path: str
    free_bytes: int
    total_bytes: int


def _existing(path: str) -> str:
    """``path`` or its nearest existing parent (a store's directory may not exist yet)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def disk_usage(path: str | os.PathLike[str]) -> DiskUsage:
    """Free and total bytes of the file system holding ``path`` (or its nearest existing
    parent)."""
    path = os.fspath(path)
    st = os.statvfs(_existing(path))
    return DiskUsage(path, int(st.f_bavail) * int(st.f_frsize), int(st.f_blocks) * int(st.f_frsize))


def effective_reserve_bytes(configured: int | None, *, total_bytes: int) -> int:
    """The reserve in force: ``configured`` bytes when set (0 = no reserve), else 1 GiB
    capped at 5% of the file system (so a small disk is not all reserve)."""
    if configured is not None:
        return int(configured)
    return min(DEFAULT_RESERVE_BYTES, int(total_bytes * DEFAULT_RESERVE_FRACTION))


def is_disk_full_errno(exc: BaseException) -> bool:
    """Whether ``exc`` is the OS saying the file system (or a quota) is full."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _fmt(n: int) -> str:
    return f"{n:,} bytes ({n / (1 << 20):,.1f} MiB)"


def disk_full_error(path: str | os.PathLike[str], *, what: str, needed_bytes: int,
                    usage: DiskUsage | None = None, at_least: bool = False) -> DiskFullError:
    """The error for a write of about ``needed_bytes`` (``at_least``: more than that) to
    ``path`` (``what``: "cache write", "writing ckpt-....pt", ...) that the file system could
    not hold."""
    path = os.fspath(path)
    usage = usage or disk_usage(path)
    return DiskFullError(
        f"{what}: the file system holding {path} is full: {_fmt(usage.free_bytes)} free of "
        f"{_fmt(usage.total_bytes)}, the write needed {'more than' if at_least else 'about'} {_fmt(needed_bytes)}. Nothing of it was "
        f"stored. What to do: {_ADVICE}; then start again (it resumes where it stopped).",
        path=path, free_bytes=usage.free_bytes, needed_bytes=needed_bytes, retriable=False,
    )


def check_free(path: str | os.PathLike[str], *, what: str, needed_bytes: int,
               configured_reserve: int | None) -> DiskUsage:
    """Raise ``DiskReserveError`` when writing ``needed_bytes`` to ``path`` would leave less
    free than the reserve (``effective_reserve_bytes(configured_reserve)``; with no reserve,
    ``DiskFullError`` when it does not fit at all); otherwise return the usage measured."""
    path = os.fspath(path)
    usage = disk_usage(path)
    reserve_bytes = effective_reserve_bytes(configured_reserve, total_bytes=usage.total_bytes)
    if usage.free_bytes - needed_bytes >= reserve_bytes:
        return usage
    if reserve_bytes <= 0:
        raise disk_full_error(path, what=what, needed_bytes=needed_bytes, usage=usage)
    raise DiskReserveError(
        f"{what}: the file system holding {path} has {_fmt(usage.free_bytes)} free of "
        f"{_fmt(usage.total_bytes)}; the next write needs about {_fmt(needed_bytes)} and would go "
        f"into the reserve of {_fmt(reserve_bytes)} ([cache] disk_reserve_bytes) kept for "
        f"checkpoints and mappings, so ingest stops here (nothing is lost: the source resumes "
        f"from the cache's offsets). What to do: {_ADVICE}.",
        path=path, free_bytes=usage.free_bytes, needed_bytes=needed_bytes,
        reserve_bytes=reserve_bytes, retriable=False,
    )
