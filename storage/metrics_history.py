"""The trainer's metrics history: an append-only JSON-lines file with a size bound.

One record (a JSON object) per line, in the order written. The trainer appends one every
``[trainer] history_every_s`` (``trainer.history``); ``headrace report`` reads them all, so
plots cover the whole life of a model across restarts.

Crash safety, without fsync per record: each record is one ``write`` of ``line + "\\n"`` to a
file opened ``O_APPEND``. A process killed at any instant leaves whole lines plus at most
one torn last line; a machine crash may also lose the last records. Readers skip any line
that is not a whole JSON object and count it (``HistoryRead.skipped_lines``), never fail on
it. A writer opening the file cuts a torn tail off first, so the next record starts on a
fresh line.

The bound (``max_bytes``): when an append takes the file past it, the file is rewritten
(atomically, fsynced: ``storage.atomic``) to at most ``COMPACT_FRACTION`` of it by
*thinning the oldest records first*: the older half loses every other record, repeatedly,
so recent history keeps full resolution, old history keeps a coarser sampling, and the very
first record (the start of the model's life) stays. Rewrites are rare: one per
``(1 - COMPACT_FRACTION) * max_bytes`` of appended records.

Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "h.jsonl")
    >>> with MetricsHistory(path, max_bytes=1 << 16) as h:
    ...     h.append({"samples": 128, "auc": 0.71})
    >>> read_history(path).records
    [{'samples': 128, 'auc': 0.71}]
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import orjson

from storage.atomic import atomic_write_bytes
from storage.disk_space import disk_full_error, is_disk_full_errno
from storage.errors import HistoryError

__all__ = ["MetricsHistory", "HistoryRead", "read_history", "thin_oldest", "COMPACT_FRACTION",
           "MIN_MAX_BYTES"]

log = logging.getLogger(__name__)

#: A compaction leaves the file at most this fraction of ``max_bytes``.
COMPACT_FRACTION = 0.75
#: The smallest bound accepted: room for a few hundred records.
MIN_MAX_BYTES = 64 << 10


@dataclasses.dataclass(frozen=True)
class HistoryRead:
    """What a read found: the records in write order, and how many lines were skipped
    (torn by a crash, or not a JSON object)."""

    records: list[dict[str, Any]]
    skipped_lines: int


def _parse(lines: list[bytes]) -> tuple[list[tuple[bytes, dict[str, Any]]], int]:
    good, skipped = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(rec, dict):
            good.append((line, rec))
        else:
            skipped += 1
    return good, skipped


def read_history(path: str | os.PathLike[str]) -> HistoryRead:
    """Every whole record of the history at ``path``. A missing file is a ``HistoryError``
    (nothing was ever recorded there)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise HistoryError(f"no metrics history at {os.fspath(path)}: train first (headrace train or "
                           "serve write it beside their checkpoints, [trainer] checkpoint_dir)") from None
    good, skipped = _parse(data.split(b"\n"))
    return HistoryRead([rec for _, rec in good], skipped)


def thin_oldest(sizes: list[int], target_bytes: int) -> list[int]:
    """Indices of the records to keep so that their sizes sum to at most ``target_bytes``:
    while over, the older half (by position) keeps every other record, its first included.
    When two records are left and still over, the first (oldest) goes, then the other.

    Example:
        >>> thin_oldest([10] * 8, 80)
        [0, 1, 2, 3, 4, 5, 6, 7]
        >>> thin_oldest([10] * 8, 70)
        [0, 2, 4, 5, 6, 7]
    """
    keep = list(range(len(sizes)))
    total = sum(sizes)
    while keep and total > target_bytes:
        if len(keep) <= 2:
            total -= sizes[keep.pop(0)]
            continue
        half = len(keep) // 2
        older = keep[:half]
        keep = older[::2] + keep[half:]
        total -= sum(sizes[i] for i in older[1::2])
    return keep


class MetricsHistory:
    """Appends records to the history at ``path`` (created with its directory on first use),
    keeping the file at most ``max_bytes``. One writer per file; readers may read at any
    time (``read_history``) and see whole records only. Not thread-safe."""

    def __init__(self, path: str | os.PathLike[str], max_bytes: int):
        if max_bytes < MIN_MAX_BYTES:
            raise ValueError(f"max_bytes must be >= {MIN_MAX_BYTES} (64 KiB), got {max_bytes}")
        self.path = os.fspath(path)
        self.max_bytes = int(max_bytes)
        self.compactions = 0
        self.torn_bytes_cut = 0
        self._fd: int | None = None
        self._size = 0

    def _open(self) -> int:
        if self._fd is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._cut_torn_tail()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._size = os.fstat(self._fd).st_size
        return self._fd

    def _cut_torn_tail(self) -> None:
        """A last line without its newline was torn by a crash: cut it off before appending."""
        try:
            with open(self.path, "rb+") as fh:
                size = fh.seek(0, os.SEEK_END)
                if size == 0:
                    return
                fh.seek(size - 1)
                if fh.read(1) == b"\n":
                    return
                keep = _last_newline_end(fh, size)
                fh.truncate(keep)
                self.torn_bytes_cut += size - keep
                log.warning("metrics history %s: cut a torn last record (%d bytes) left by a crash",
                            self.path, size - keep)
        except FileNotFoundError:
            return

    def append(self, record: dict[str, Any]) -> None:
        """Append one record (a JSON-ready dict; numpy scalars allowed). A full file system
        raises ``DiskFullError`` and leaves the file as it was (a partial write is cut)."""
        data = orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
        fd = self._open()
        try:
            written = os.write(fd, data)
        except OSError as exc:
            if is_disk_full_errno(exc):
                raise disk_full_error(self.path, what="appending to the metrics history",
                                      needed_bytes=len(data)) from exc
            raise
        if written != len(data):  # a short write happens on a full disk: undo the torn line
            os.ftruncate(fd, self._size)
            raise disk_full_error(self.path, what="appending to the metrics history", needed_bytes=len(data))
        self._size += len(data)
        if self._size > self.max_bytes:
            self.compact()

    def compact(self) -> int:
        """Thin the oldest records until the file is at most ``COMPACT_FRACTION * max_bytes``;
        returns how many records went. Unparseable lines go too."""
        self.close()
        with open(self.path, "rb") as fh:
            good, skipped = _parse(fh.read().split(b"\n"))
        lines = [line + b"\n" for line, _ in good]
        keep = thin_oldest([len(x) for x in lines], int(self.max_bytes * COMPACT_FRACTION))
        atomic_write_bytes(self.path, b"".join(lines[i] for i in keep))
        self.compactions += 1
        return len(lines) - len(keep) + skipped

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "MetricsHistory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _last_newline_end(fh, size: int) -> int:
    """Offset just after the last ``\\n`` before ``size`` (0 when there is none)."""
    pos = size
    while pos > 0:
        step = min(pos, 1 << 16)
        fh.seek(pos - step)
        chunk = fh.read(step)
        at = chunk.rfind(b"\n")
        if at >= 0:
            return pos - step + at + 1
        pos -= step
    return 0
