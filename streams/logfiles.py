"""Line-oriented event log files: ``.jsonl``, ``.tsv``, ``.csv``, each optionally ``.gz``.

One event per line, except that a CSV record whose quoted field holds a line break spans
several lines (``iter_records``). Line numbers are 0-based and every line counts, blank
ones included, so a file's line numbers are its offsets (``streams.replay``: a record's
offset is the number of its first line) and a resumed read skips exactly the lines
already consumed. The line terminator (``\\n`` or ``\\r\\n``) is stripped; a final line
without a terminator still counts.

``iter_line_blocks`` yields the same lines as Arrow arrays of many lines each, split from
large reads with vectorised scans: what backfill reads one-record-per-line files with.

CSV records (RFC 4180): a line that leaves a quoted field open (a ``"`` at the start of a
field, not yet closed; ``""`` inside is a quote, a ``"`` inside an unquoted field is just a
byte) continues on the next line, up to ``MAX_CSV_RECORD_LINES`` lines; the lines are
joined with ``\\n``. If the quoted field is not closed within that many lines (or by the
end of the file), the first line is a record on its own (the decoder dead-letters it:
unbalanced quote) and the next line starts afresh, so an unclosed quote costs at most
that many lines' worth of events, never the rest of the file. The split depends only on the bytes from the record's first
line on, so a resumed read (which starts at a record boundary) splits the same way.
"""

from __future__ import annotations

import collections
import enum
import gzip
import itertools
import os
import zlib
from typing import IO, Iterator

import numba
import numpy as np
import pyarrow as pa

from streams.errors import SourceError

__all__ = ["LogFormat", "log_format", "open_log", "iter_lines", "iter_line_blocks", "iter_records",
           "MAX_CSV_RECORD_LINES", "MAX_LINE_BYTES", "READ_BYTES"]

#: The most lines one CSV record (a quoted field with line breaks) may span.
MAX_CSV_RECORD_LINES = 100

#: Bytes ``iter_line_blocks`` reads from a file at a time.
READ_BYTES = 4 << 20

#: The longest line ``iter_line_blocks`` reads (an Arrow binary array holds under 2 GiB).
MAX_LINE_BYTES = 1 << 30


class LogFormat(enum.Enum):
    JSONL = "jsonl"
    TSV = "tsv"
    CSV = "csv"


_SUFFIXES = {
    ".jsonl": (LogFormat.JSONL, False),
    ".jsonl.gz": (LogFormat.JSONL, True),
    ".tsv": (LogFormat.TSV, False),
    ".tsv.gz": (LogFormat.TSV, True),
    ".csv": (LogFormat.CSV, False),
    ".csv.gz": (LogFormat.CSV, True),
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


def iter_line_blocks(path: str, *, max_lines: int, skip_lines: int = 0,
                     read_bytes: int = READ_BYTES) -> Iterator[tuple[int, pa.BinaryArray]]:
    """The lines ``iter_lines`` yields, as ``(first line number, lines)`` blocks of
    ``max_lines`` consecutive lines (the last one shorter): Arrow binary arrays cut from
    ``read_bytes`` reads of the file with vectorised scans, no Python object per line (the
    per-line loop cost about as much CPU as decoding the JSON). Raises like ``iter_lines``."""
    if skip_lines < 0:
        raise ValueError(f"skip_lines must be >= 0, got {skip_lines}")
    if max_lines < 1:
        raise ValueError(f"max_lines must be >= 1, got {max_lines}")
    path = os.fspath(path)
    number = 0  # complete lines read so far
    held: list[pa.BinaryArray] = []  # lines at or past skip_lines, not yet yielded
    held_lines = 0
    tail: list[bytes] = []  # the bytes of a line whose terminator is not read yet
    f = open_log(path)
    try:
        while True:
            chunk = f.read(read_bytes)
            if not chunk:
                break
            if chunk.rfind(b"\n") < 0:
                tail.append(chunk)
                if sum(map(len, tail)) > MAX_LINE_BYTES:
                    raise SourceError(f"log file {path!r}: line {number} is longer than {MAX_LINE_BYTES} bytes",
                                      retriable=False)
                continue
            buf = b"".join(tail + [chunk]) if tail else chunk
            lines, rest = _split_lines(buf)
            tail = [rest] if rest else []
            first, number = number, number + len(lines)
            if number <= skip_lines:
                continue
            held.append(lines.slice(max(0, skip_lines - first)))
            held_lines += len(held[-1])
            while held_lines >= max_lines:
                block, held = _take(held, max_lines)
                held_lines -= max_lines
                yield number - held_lines - max_lines, block
        if tail:  # a final line without a terminator
            number += 1
            if number > skip_lines:
                held.append(pa.array([b"".join(tail)], pa.binary()))
                held_lines += 1
        if held_lines:
            yield number - held_lines, _take(held, held_lines)[0]
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise SourceError(f"log file {path!r}: unreadable after line {number}: {exc}", retriable=False) from exc
    finally:
        f.close()


def _split_lines(buf: bytes) -> tuple[pa.BinaryArray, bytes]:
    """The complete lines of ``buf`` (up to its last ``\\n``), ``\\n`` or ``\\r\\n``
    stripped, and the bytes after the last ``\\n``."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    ends = np.flatnonzero(raw == 10)
    data, offsets = _compact_lines(raw, ends)
    lines = pa.BinaryArray.from_buffers(pa.binary(), ends.shape[0],
                                        [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    return lines, buf[int(ends[-1]) + 1:]


@numba.njit(cache=True, nogil=True)
def _compact_lines(raw, ends):
    """The bytes of the lines ending at the ``\\n`` positions ``ends`` without their
    terminators (a ``\\r`` right before a ``\\n`` is part of it), and their Arrow offsets."""
    n = ends.shape[0]
    offsets = np.empty(n + 1, dtype=np.int32)
    data = np.empty(ends[n - 1] + 1 - n, dtype=np.uint8)
    offsets[0] = 0
    start = 0
    at = 0
    for i in range(n):
        stop = ends[i]
        if stop > start and raw[stop - 1] == 13:
            stop -= 1
        size = stop - start
        data[at:at + size] = raw[start:stop]
        at += size
        offsets[i + 1] = at
        start = ends[i] + 1
    return data[:at], offsets


def _take(arrays: list[pa.BinaryArray], n: int) -> tuple[pa.BinaryArray, list[pa.BinaryArray]]:
    """The first ``n`` lines of ``arrays`` as one array, and the arrays of the rest."""
    out, rest, need = [], list(arrays), n
    while need:
        head = rest.pop(0)
        if len(head) > need:
            rest.insert(0, head.slice(need))
            head = head.slice(0, need)
        out.append(head)
        need -= len(head)
    return (out[0] if len(out) == 1 else pa.concat_arrays(out)), rest


def iter_records(path: str, *, skip_lines: int = 0) -> Iterator[tuple[int, int, bytes]]:
    """Yield ``(first line, next line, record)`` of ``path`` from line ``skip_lines`` on:
    one line per record, or for ``.csv`` files the lines of a record with quoted line
    breaks joined by ``\\n`` (see the module docstring). ``skip_lines`` must be a record
    boundary. Raises like ``iter_lines``."""
    lines = iter_lines(path, skip_lines=skip_lines)
    try:
        if log_format(os.fspath(path)) is LogFormat.CSV:
            yield from _csv_records(lines, skip_lines)
        else:
            for number, line in enumerate(lines, start=skip_lines):
                yield number, number + 1, line
    finally:
        lines.close()


@numba.njit(cache=True, nogil=True)
def _quote_state(data, state):
    """The RFC 4180 quote state after the bytes ``data`` of one line given the state before
    it (0 at a field's start, 1 in an unquoted field, 2 inside quotes, 3 after a quote
    inside quotes): a ``"`` opens a quoted field only at a field's start, and inside one
    ``""`` is a quote. Only 2 means the record goes on past the line."""
    for k in range(data.shape[0]):
        b = data[k]
        if state == 2:
            if b == 34:
                state = 3
        elif state == 3:  # a closing quote, or the first of ""
            if b == 34:
                state = 2
            elif b == 44:
                state = 0
            else:
                state = 1
        elif b == 44:
            state = 0
        elif b == 34:
            if state == 0:
                state = 2
        else:
            state = 1
    return state


@numba.njit(cache=True, nogil=True)
def _open_after_lines(data, offsets):
    """Per line ``data[offsets[i]:offsets[i + 1]]``: whether a quoted field is open after it
    when it starts a record, and when it starts inside a quoted field."""
    n = offsets.shape[0] - 1
    from_start = np.empty(n, dtype=np.bool_)
    from_quoted = np.empty(n, dtype=np.bool_)
    for i in range(n):
        line = data[offsets[i]:offsets[i + 1]]
        from_start[i] = _quote_state(line, 0) == 2
        from_quoted[i] = _quote_state(line, 2) == 2
    return from_start, from_quoted


_CHUNK_LINES = 4096


def _with_quote_states(lines: Iterator[bytes]) -> Iterator[tuple[bytes, bool, bool]]:
    """``(line, open after it from a record start, open after it from inside quotes)``,
    computed by one kernel call per chunk of lines that has a quote at all."""
    while chunk := list(itertools.islice(lines, _CHUNK_LINES)):
        if not any(b'"' in line for line in chunk):
            yield from ((line, False, True) for line in chunk)
            continue
        offsets = np.zeros(len(chunk) + 1, dtype=np.int64)
        np.cumsum([len(line) for line in chunk], out=offsets[1:])
        data = np.frombuffer(b"".join(chunk) or b"\0", dtype=np.uint8)
        from_start, from_quoted = _open_after_lines(data, offsets)
        yield from zip(chunk, from_start.tolist(), from_quoted.tolist())


def _csv_records(lines: Iterator[bytes], number: int) -> Iterator[tuple[int, int, bytes]]:
    annotated = _with_quote_states(lines)
    pending: collections.deque = collections.deque()  # annotated lines read ahead, not yet used
    while True:
        item = pending.popleft() if pending else next(annotated, None)
        if item is None:
            return
        line, opens, _ = item
        if not opens:
            yield number, number + 1, line
            number += 1
            continue
        parts, closed = [item], False
        while not closed and len(parts) < MAX_CSV_RECORD_LINES:
            more = pending.popleft() if pending else next(annotated, None)
            if more is None:
                break
            parts.append(more)
            closed = not more[2]  # the line break before it was inside the quotes
        if not closed:  # never closed: the first line alone (a bad record), the rest afresh
            pending.extendleft(reversed(parts[1:]))
            yield number, number + 1, line
            number += 1
            continue
        yield number, number + len(parts), b"\n".join(p[0] for p in parts)
        number += len(parts)
