"""Line-oriented event log files: ``.jsonl``, ``.jsonl.gz``, ``.tsv``, ``.tsv.gz``.

One event per line. Line numbers are 0-based and every line counts, blank ones
included, so a file's line numbers are its offsets (``streams.replay``) and a resumed
read skips exactly the lines already consumed. The line terminator (``\\n`` or
``\\r\\n``) is stripped; a final line without a terminator still counts.
"""

from __future__ import annotations

import enum
import gzip
import os
import zlib
from typing import IO, Iterator

from streams.errors import SourceError

__all__ = ["LogFormat", "log_format", "open_log", "iter_lines"]


class LogFormat(enum.Enum):
    JSONL = "jsonl"
    TSV = "tsv"


_SUFFIXES = {
    ".jsonl": (LogFormat.JSONL, False),
    ".jsonl.gz": (LogFormat.JSONL, True),
    ".tsv": (LogFormat.TSV, False),
    ".tsv.gz": (LogFormat.TSV, True),
}


def _suffix(path: str) -> tuple[LogFormat, bool]:
    lowered = path.lower()
    for suffix, info in sorted(_SUFFIXES.items(), key=lambda kv: -len(kv[0])):
        if lowered.endswith(suffix):
            return info
    raise SourceError(
        f"log file {path!r}: unknown extension; expected one of {sorted(_SUFFIXES)}",
        retriable=False,
    )


def log_format(path: str) -> LogFormat:
    """The format implied by the file name; ``SourceError`` for other extensions."""
    return _suffix(path)[0]


def open_log(path: str) -> IO[bytes]:
    """Open a log file for binary line reading (transparently gunzipping ``.gz``)."""
    gzipped = _suffix(path)[1]
    try:
        return gzip.open(path, "rb") if gzipped else open(path, "rb")
    except OSError as exc:
        raise SourceError(f"log file {path!r}: cannot open: {exc.strerror}", retriable=False) from exc


def iter_lines(path: str, *, skip_lines: int = 0) -> Iterator[bytes]:
    """Yield the lines of ``path`` from line number ``skip_lines`` on, terminators stripped.

    Raises ``SourceError`` on a corrupt gzip stream (naming the file), not retriable.
    """
    if skip_lines < 0:
        raise ValueError(f"skip_lines must be >= 0, got {skip_lines}")
    path = os.fspath(path)
    number = 0
    f = open_log(path)
    try:
        for line in f:
            if number >= skip_lines:
                if line.endswith(b"\n"):
                    line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
                yield line
            number += 1
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise SourceError(f"log file {path!r}: unreadable after line {number}: {exc}", retriable=False) from exc
    finally:
        f.close()
