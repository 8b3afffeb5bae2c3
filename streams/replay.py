"""Bounded sources for backfill, feeding the same transform graph as ``serve``.

``ReadLogFiles``: each file is one partition (``topic = "file:" + absolute path``,
partition 0); a record's offset is the 0-based number of its (first) line, blank lines
included (they come through as empty values and are dead-lettered downstream, so the
accounting of every line holds); ``timestamp_ms = -1``. A CSV file's header record is
not an event: no batch holds it, every batch of the file carries it as metadata. One element per file (a gzip stream cannot be
split without reading it), read sequentially into batches of ``max_batch_records`` lines
that tile ``[start, number of lines)``. Resuming with ``start_offsets`` skips exactly
the lines already consumed.

``ReadKafkaRange``: a bounded read of one topic between two offsets or two times.

Time ranges and exact accounting (the explicit choice): the offset range of a partition
is ``[first offset with timestamp >= from_time_ms, first offset with timestamp >=
to_time_ms)`` (the end of the log at launch when no record reaches ``to_time_ms``), both
confirmed by reading (``streams.offsets``), so with ascending timestamps the range holds
exactly the window's records. Producer timestamps can be out of order, so a record
inside the offset range can lie outside the window: such records are REMOVED from the
batch while the batch still covers their offsets (like compacted-away offsets), and are
counted in the Beam counter ``headrace.replay:outside_time_range`` and logged per batch.
Records outside the offset range are never read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Iterator, Mapping, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streams.admin import list_partitions
from streams.config import SourceConfig
from streams.errors import SourceConfigError, SourceError
from streams.kafka_client import watermark_offsets
from streams.kafka_source import ReadKafkaBatches
from streams.logfiles import LogFormat, iter_line_blocks, iter_lines, iter_records, log_format
from streams.offsets import exact_offsets_for_times, log_end_offsets
from streams.records import CSV_HEADER_KEY, RAW_SCHEMA, SourceBatch

__all__ = [
    "ReadLogFiles",
    "ReadKafkaRange",
    "file_topic",
    "read_log_file",
    "filter_time_window",
    "plan_kafka_range",
    "OffsetBound",
]

log = logging.getLogger(__name__)

FILE_TOPIC_PREFIX = "file:"


def file_topic(path: str) -> str:
    """The partition name of a log file: ``"file:" + absolute path``."""
    return FILE_TOPIC_PREFIX + os.path.abspath(os.fspath(path))


def read_log_file(path: str, start_line: int, max_batch_records: int, *,
                  csv_header: bool = True) -> Iterator[SourceBatch]:
    """Batches of one log file from line ``start_line`` on (pure I/O, no Beam).

    Records come from ``logfiles.iter_records`` (``.csv``) or, one per line, in bulk from
    ``logfiles.iter_line_blocks``; a record's offset is its first line, and consecutive
    batches tile the lines (a batch ends after its last record's lines). With
    ``csv_header`` a ``.csv`` file's first record is its header: it is in no batch (the
    first batch still covers its lines, like a compacted-away offset, so it is never read
    nor counted) and every batch of the file carries it in its schema metadata
    (``records.CSV_HEADER_KEY``), also when resuming past it.

    Raises ``SourceError`` when the file has fewer than ``start_line`` lines (the file
    was replaced or truncated since the cache consumed it).
    """
    if max_batch_records < 1:
        raise ValueError(f"max_batch_records must be >= 1, got {max_batch_records}")
    topic = file_topic(path)
    if log_format(path) is LogFormat.CSV:
        batches = _csv_batches(path, topic, start_line, max_batch_records, csv_header)
    else:
        batches = _line_batches(path, topic, start_line, max_batch_records)
    end = start_line
    for batch in batches:
        end = batch.end_offset
        yield batch
    if end == start_line and start_line > 0:
        _check_not_truncated(path, start_line)


def _line_batches(path: str, topic: str, start_line: int, max_batch_records: int) -> Iterator[SourceBatch]:
    """One record per line (``.jsonl``, ``.tsv``): the lines in bulk, a block per batch."""
    for first, values in iter_line_blocks(path, max_lines=max_batch_records, skip_lines=start_line):
        end = first + len(values)
        yield _file_batch(topic, first, end, start_line, pa.array(np.arange(first, end, dtype=np.int64)), values,
                          RAW_SCHEMA)


def _csv_batches(path: str, topic: str, start_line: int, max_batch_records: int,
                 csv_header: bool) -> Iterator[SourceBatch]:
    """``.csv`` records (a quoted field may hold line breaks), the header kept aside."""
    schema = RAW_SCHEMA
    records = iter_records(path, skip_lines=start_line)
    try:
        if csv_header:
            if start_line == 0:
                first = next(records, None)
            else:
                with contextlib.closing(iter_records(path)) as from_top:
                    first = next(from_top, None)
            if first is None:  # an empty file: nothing to read, and no header either
                return
            schema = RAW_SCHEMA.with_metadata({CSV_HEADER_KEY: first[2]})
        offset, values, lines = start_line, [], []
        for number, next_line, value in records:
            values.append(value)
            lines.append(number)
            if len(values) == max_batch_records:
                yield _listed_batch(topic, offset, next_line, start_line, lines, values, schema)
                offset, values, lines = next_line, [], []
        if values:
            yield _listed_batch(topic, offset, next_line, start_line, lines, values, schema)
    finally:
        records.close()


def _check_not_truncated(path: str, start_line: int) -> None:
    lines = sum(1 for _ in iter_lines(path))
    if lines < start_line:
        raise SourceError(
            f"log file {path!r} has {lines} line(s) but the cache resumes it at line {start_line}: "
            f"the file was truncated or replaced; use a fresh cache or restore the file",
            retriable=False,
        )


def _listed_batch(topic: str, start: int, end: int, partition_start: int, lines: list[int], values: list[bytes],
                  schema: pa.Schema) -> SourceBatch:
    return _file_batch(topic, start, end, partition_start, pa.array(np.asarray(lines, dtype=np.int64)),
                       pa.array(values, pa.binary()), schema)


def _file_batch(topic: str, start: int, end: int, partition_start: int, lines: pa.Array, values: pa.Array,
                schema: pa.Schema) -> SourceBatch:
    """The batch of lines ``[start, end)`` of a file: each record's (first) line number as
    its offset, no timestamp (-1) and its bytes."""
    records = pa.RecordBatch.from_arrays(
        [lines, pa.array(np.full(len(values), -1, dtype=np.int64)), values], schema=schema)
    return SourceBatch(topic, 0, start, end, partition_start, records)


class _ReadLogFileFn(beam.DoFn):
    def __init__(self, max_batch_records: int, csv_header: bool):
        self._max_batch_records = max_batch_records
        self._csv_header = csv_header
        self._lines = beam.metrics.Metrics.counter("headrace.replay", "file_lines")

    def process(self, element: tuple[str, int]) -> Iterator[SourceBatch]:
        path, start_line = element
        for batch in read_log_file(path, start_line, self._max_batch_records, csv_header=self._csv_header):
            self._lines.inc(batch.records.num_rows)
            yield batch


class ReadLogFiles(beam.PTransform):
    """PBegin -> PCollection[SourceBatch] of every line of ``paths``.

    ``start_offsets``: ``{(file_topic(path), 0): next line}`` from the cache. Paths are
    checked at construction: a missing file, an unknown extension or the same file
    twice is an error naming the path. ``csv_header``: ``.csv`` files start with a header
    record (``read_log_file``).
    """

    def __init__(
        self,
        paths: Sequence[str],
        max_batch_records: int = 4096,
        start_offsets: Mapping[tuple[str, int], int] | None = None,
        *,
        csv_header: bool = True,
    ):
        super().__init__()
        if max_batch_records < 1:
            raise SourceConfigError(f"max_batch_records must be >= 1, got {max_batch_records}")
        if not paths:
            raise SourceConfigError("ReadLogFiles needs at least one file path")
        start_offsets = dict(start_offsets or {})
        self._elements: list[tuple[str, int]] = []
        seen: set[str] = set()
        for path in paths:
            absolute = os.path.abspath(os.fspath(path))
            log_format(absolute)  # raises for an unknown extension
            if not os.path.isfile(absolute):
                raise SourceError(f"log file {absolute!r} does not exist", retriable=False)
            if absolute in seen:
                raise SourceConfigError(f"log file {absolute!r} is listed twice; each file is read once")
            seen.add(absolute)
            start = int(start_offsets.get((file_topic(absolute), 0), 0))
            if start < 0:
                raise SourceError(f"log file {absolute!r}: start line {start} < 0", retriable=False)
            self._elements.append((absolute, start))
        self._max_batch_records = max_batch_records
        self._csv_header = csv_header

    def expand(self, pbegin):
        return (
            pbegin
            | "Files" >> beam.Create(self._elements, reshuffle=False)
            # One file per worker at a time; reshuffle spreads files over workers.
            | "Spread" >> beam.Reshuffle()
            | "ReadLines" >> beam.ParDo(_ReadLogFileFn(self._max_batch_records, self._csv_header))
            .with_output_types(SourceBatch)
        )


def filter_time_window(batch: SourceBatch, from_time_ms: int | None, to_time_ms: int | None) -> tuple[SourceBatch, int]:
    """``batch`` without records outside ``[from_time_ms, to_time_ms)``, same offset
    range; also returns how many were removed (pure)."""
    ts = batch.records.column(1)
    mask = None
    if from_time_ms is not None:
        mask = pc.greater_equal(ts, from_time_ms)
    if to_time_ms is not None:
        upper = pc.less(ts, to_time_ms)
        mask = upper if mask is None else pc.and_(mask, upper)
    if mask is None:
        return batch, 0
    kept = batch.records.filter(mask)
    removed = batch.records.num_rows - kept.num_rows
    if not removed:
        return batch, 0
    return dataclasses.replace(batch, records=kept), removed


class _TimeWindowFn(beam.DoFn):
    def __init__(self, from_time_ms: int | None, to_time_ms: int | None):
        self._from = from_time_ms
        self._to = to_time_ms
        self._outside = beam.metrics.Metrics.counter("headrace.replay", "outside_time_range")

    def process(self, batch: SourceBatch):
        kept, removed = filter_time_window(batch, self._from, self._to)
        if removed:
            self._outside.inc(removed)
            log.info("%s[%d] [%d, %d): %d record(s) outside the time range removed",
                     batch.topic, batch.partition, batch.start_offset, batch.end_offset, removed)
        yield kept


OffsetBound = Mapping[int, int] | int | None


def plan_kafka_range(
    source_cfg: SourceConfig,
    topic: str,
    *,
    from_offsets: OffsetBound = None,
    to_offsets: OffsetBound = None,
    from_time_ms: int | None = None,
    to_time_ms: int | None = None,
) -> dict[int, tuple[int, int]]:
    """``{partition: (start, end)}`` for a bounded read (I/O: metadata and probe reads).

    Offsets mode: ``from_offsets``/``to_offsets`` are ``{partition: offset}`` (only the
    partitions named in either are read) or one int for every partition; a missing
    start is the log start, a missing end the log end at launch, and an end past the
    log end at launch is clamped to it (a backfill never waits for data). Time mode: see
    the module docstring; a partition with no record at/after ``from_time_ms`` gets an
    empty range. Raises ``SourceConfigError`` for mixed modes, unknown partitions, negative
    offsets or a start after its end.
    """
    time_mode = from_time_ms is not None or to_time_ms is not None
    if time_mode and (from_offsets is not None or to_offsets is not None):
        raise SourceConfigError("give either offsets (from_offsets/to_offsets) or times (from_time_ms/to_time_ms), not both")
    if from_time_ms is not None and to_time_ms is not None and to_time_ms < from_time_ms:
        raise SourceConfigError(f"to_time_ms {to_time_ms} is before from_time_ms {from_time_ms}")
    partitions = list_partitions(source_cfg.bootstrap, topic, client_options=source_cfg.client_options)
    froms = _per_partition(from_offsets, partitions)
    tos = _per_partition(to_offsets, partitions)
    if froms or tos:
        named = set(froms) | set(tos)
        unknown = sorted(named - set(partitions))
        if unknown:
            raise SourceConfigError(f"topic {topic!r} has partitions {partitions}; no partition(s) {unknown}")
        partitions = sorted(named)
    for p in partitions:
        lo, hi = froms.get(p, 0), tos.get(p)
        if lo < 0 or (hi is not None and hi < lo):
            raise SourceConfigError(f"{topic}[{p}]: offset range [{lo}, {hi}) is invalid (need 0 <= from <= to)")
    lows = {p: lo for p, (lo, _) in watermark_offsets(source_cfg, topic, partitions).items()}
    ends = log_end_offsets(source_cfg, topic, partitions, enough=tos)
    ranges: dict[int, tuple[int, int]] = {}
    if time_mode:
        starts = (exact_offsets_for_times(source_cfg, topic, {p: from_time_ms for p in partitions})
                  if from_time_ms is not None else {p: lows[p] for p in partitions})
        stops = (exact_offsets_for_times(source_cfg, topic, {p: to_time_ms for p in partitions})
                 if to_time_ms is not None else {})
        for p in partitions:
            end = stops.get(p)
            end = ends[p] if end is None else end
            start = starts[p]
            ranges[p] = (end if start is None else min(start, end), end)
        return ranges
    for p in partitions:
        end = min(tos.get(p, ends[p]), ends[p])
        start = max(froms.get(p, lows[p]), 0)
        ranges[p] = (min(start, end), end)
    return ranges


def _per_partition(bound: OffsetBound, partitions: list[int]) -> dict[int, int]:
    if bound is None:
        return {}
    if isinstance(bound, int):
        return {p: bound for p in partitions}
    return {int(p): int(o) for p, o in bound.items()}


class ReadKafkaRange(beam.PTransform):
    """PBegin -> PCollection[SourceBatch]: a bounded read of ``topic`` (see module doc).

    The range is resolved at pipeline construction (``plan_kafka_range``).
    ``start_offsets`` (the cache's next offsets) resume inside the range: a partition
    starts at ``max(range start, cached next)`` and is skipped once that reaches the
    range end. Batches carry ``partition_start`` = where this run started the partition.
    """

    def __init__(
        self,
        source_cfg: SourceConfig,
        topic: str,
        *,
        from_offsets: OffsetBound = None,
        to_offsets: OffsetBound = None,
        from_time_ms: int | None = None,
        to_time_ms: int | None = None,
        start_offsets: Mapping[tuple[str, int], int] | None = None,
    ):
        super().__init__()
        if from_offsets is None and to_offsets is None and from_time_ms is None and to_time_ms is None:
            raise SourceConfigError("ReadKafkaRange needs from_offsets/to_offsets or from_time_ms/to_time_ms")
        self._cfg = dataclasses.replace(source_cfg, topics=(topic,))
        self._topic = topic
        self._range_args = dict(from_offsets=from_offsets, to_offsets=to_offsets,
                                from_time_ms=from_time_ms, to_time_ms=to_time_ms)
        self._from_time_ms = from_time_ms
        self._to_time_ms = to_time_ms
        self._start_offsets = dict(start_offsets or {})

    def expand(self, pbegin):
        ranges = plan_kafka_range(self._cfg, self._topic, **self._range_args)
        starts: dict[tuple[str, int], int] = {}
        ends: dict[tuple[str, int], int] = {}
        for p, (start, end) in ranges.items():
            key = (self._topic, p)
            start = max(start, int(self._start_offsets.get(key, start)))
            if start >= end:
                continue  # nothing left in this partition's range
            starts[key] = start
            ends[key] = end
        batches = pbegin | "Read" >> ReadKafkaBatches(self._cfg, starts, end_offsets=ends)
        if self._from_time_ms is None and self._to_time_ms is None:
            return batches
        return batches | "TimeWindow" >> beam.ParDo(
            _TimeWindowFn(self._from_time_ms, self._to_time_ms)).with_output_types(SourceBatch)
