"""``ReadKafkaBatches``: the pure-Python Kafka read for Beam, as a splittable DoFn.

One element per (topic, partition), listed from the topics at pipeline construction. Its
restriction is an ``OffsetRange`` of Kafka offsets: ``[start, 2**63 - 1)`` for ``serve``
(unbounded per element) or ``[start, end)`` when ``end_offsets`` bounds the read. Each
poll of the partition becomes one ``SourceBatch`` (at most
``source_cfg.max_batch_records`` records); the DoFn claims the batch's last offset
before emitting it, so a runner checkpoint/split between two batches resumes exactly at
the next batch's start: batches of one partition tile its offsets without gap or overlap,
in order. A batch whose claim fails (the runner split the restriction meanwhile) is not
emitted: it is kept in the DoFn instance and emitted by the residual, which starts at
that batch's start (re-read from Kafka if the residual runs elsewhere).

Retriable client errors (broker unreachable, leader moving) do not fail the pipeline:
the partition drops its reader and defers for ``RETRY_DEFER_S``, then retries from the
same offset (counter ``headrace.source:retriable_errors``). Non-retriable ones (a
truncated/recreated partition, bad client options) raise.

Watermarks are event time: a ``ManualWatermarkEstimator`` advanced to the largest record
timestamp seen (never backwards), and each batch is timestamped with the larger of its
largest record timestamp and the current watermark, so no batch is late by
construction. An idle partition holds the watermark where it is. (The Python
DirectRunner ignores SDF watermark holds; portable runners honour them.)

Stopping: when ``stop_file`` exists, each partition's DoFn claims the rest of its
restriction without reading and returns, so an unbounded pipeline can finish and flush
(``serve`` creates the file on SIGTERM). The file is checked before every poll.

Start offsets: ``start_offsets[(topic, partition)]`` (the cache's next offsets) wins;
other partitions start at ``source_cfg.start`` resolved per partition at construction.
Every batch carries ``partition_start`` = the offset this run started the partition at.
Partitions added to a topic after construction are not read until the pipeline is
rebuilt (restart ``serve``).

Shares: with ``share`` (a ``streams.assignment.Share``) only the partitions it owns are
read, so several processes (``[pipeline] workers``) and hosts (``[source] member``) split
the topics with each partition read by exactly one of them; ``expand`` logs the share's
partitions.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator, Mapping

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.utils.timestamp import Duration, Timestamp

from streams.admin import list_partitions
from streams.assignment import Share
from streams.config import SourceConfig, StartPosition
from streams.errors import SourceError
from streams.kafka_client import PartitionReader, open_reader, resolve_start_offsets
from streams.offsets import log_end_offsets
from streams.records import SourceBatch

__all__ = ["ReadKafkaBatches", "PartitionSpec", "plan_partitions", "assigned_partitions", "format_partitions",
           "UNBOUNDED_STOP", "IDLE_DEFER_S", "RETRY_DEFER_S"]

log = logging.getLogger(__name__)

#: Restriction stop of an unbounded partition read.
UNBOUNDED_STOP = 2**63 - 1
#: How long a partition with no new data waits before polling again (on runners that
#: honour deferral; each poll also blocks up to ``poll_timeout_ms``).
IDLE_DEFER_S = 0.5
#: How long a partition waits after a retriable error (broker away) before retrying.
RETRY_DEFER_S = 2.0

#: ``(topic, partition, start_offset, stop_offset)``; stop = UNBOUNDED_STOP for serve.
PartitionSpec = tuple


def assigned_partitions(source_cfg: SourceConfig, share: Share | None = None) -> list[tuple[str, int]]:
    """``(topic, partition)`` of every partition of ``source_cfg.topics`` that ``share`` owns
    (all of them without a share), topic by topic in partition order (I/O: metadata)."""
    out = []
    for topic in source_cfg.topics:
        partitions = list_partitions(source_cfg.bootstrap, topic, client_options=source_cfg.client_options)
        out += [(topic, p) for p in partitions if share is None or share.owns(p)]
    return out


def plan_partitions(
    source_cfg: SourceConfig,
    start_offsets: Mapping[tuple[str, int], int],
    end_offsets: Mapping[tuple[str, int], int] | None = None,
    share: Share | None = None,
) -> list[PartitionSpec]:
    """List every partition of ``source_cfg.topics`` (that ``share`` owns) with its offset
    range (I/O: metadata).

    Bounded (``end_offsets`` given): only the partitions in ``end_offsets`` are read,
    each ``[start, end)``; a start beyond its end is a ``SourceError``. Unbounded: every
    partition, to ``UNBOUNDED_STOP``.
    """
    specs: list[PartitionSpec] = []
    assigned = assigned_partitions(source_cfg, share)
    for topic in source_cfg.topics:
        partitions = [p for t, p in assigned if t == topic]
        if end_offsets is not None:
            partitions = [p for p in partitions if (topic, p) in end_offsets]
        missing = [p for p in partitions if (topic, p) not in start_offsets]
        resolved = _resolve_starts(source_cfg, topic, missing) if missing else {}
        for p in partitions:
            start = int(start_offsets[(topic, p)]) if (topic, p) in start_offsets else resolved[p]
            stop = UNBOUNDED_STOP if end_offsets is None else int(end_offsets[(topic, p)])
            if stop < start:
                raise SourceError(
                    f"{topic}[{p}]: start offset {start} is past the end offset {stop}; "
                    f"the cache is ahead of the requested range",
                    retriable=False,
                )
            specs.append((topic, p, start, stop))
    if end_offsets is not None:
        known = {(t, p) for t, p, _, _ in specs}
        unknown = sorted(k for k in set(end_offsets) - known if share is None or share.owns(k[1]))
        if unknown:
            raise SourceError(f"end_offsets name partitions that do not exist: {unknown}", retriable=False)
    return specs


def _resolve_starts(source_cfg: SourceConfig, topic: str, partitions: list[int]) -> dict[int, int]:
    if source_cfg.start is StartPosition.LATEST:
        # Confirmed by reading: the embedded broker under-reports end offsets.
        return log_end_offsets(source_cfg, topic, partitions)
    return resolve_start_offsets(source_cfg, topic, partitions, StartPosition.EARLIEST)


class _PartitionRestrictionProvider(RestrictionProvider):
    """One unsplit offset range per partition (a partition is read by one reader)."""

    def initial_restriction(self, element: PartitionSpec) -> OffsetRange:
        _, _, start, stop = element
        return OffsetRange(start, stop)

    def create_tracker(self, restriction: OffsetRange) -> OffsetRestrictionTracker:
        return OffsetRestrictionTracker(restriction)

    def split(self, element, restriction):
        yield restriction

    def restriction_size(self, element, restriction: OffsetRange) -> int:
        # Unbounded ranges would report ~2**63; the size only steers initial splitting,
        # which we do not do, so a nominal size keeps runners' arithmetic sane.
        if restriction.stop == UNBOUNDED_STOP:
            return 1
        return restriction.size()

    def truncate(self, element, restriction: OffsetRange):
        # On drain, an unbounded read stops; a bounded range is finished.
        if restriction.stop == UNBOUNDED_STOP:
            return None
        return restriction


_PROVIDER = _PartitionRestrictionProvider()
_WATERMARKS = ManualWatermarkEstimator.default_provider()


class _ReadPartitionFn(beam.DoFn):
    """Bounded reads. Readers are kept per partition across bundles (one per DoFn
    instance) and re-positioned when a restriction does not start where they stand."""

    def __init__(self, source_cfg: SourceConfig, stop_file: str | None):
        self._cfg = source_cfg
        self._stop_file = stop_file
        self._readers: dict[tuple[str, int], PartitionReader] = {}
        # A polled batch whose claim failed because the runner split the restriction.
        self._pending: dict[tuple[str, int], SourceBatch] = {}
        self._batches = beam.metrics.Metrics.counter("headrace.source", "batches")
        self._records = beam.metrics.Metrics.counter("headrace.source", "records")
        self._retries = beam.metrics.Metrics.counter("headrace.source", "retriable_errors")

    def setup(self):
        self._readers = {}
        self._pending = {}

    def teardown(self):
        readers, self._readers = self._readers, {}
        for reader in readers.values():
            try:
                reader.close()
            except Exception:  # a failed close must not hide the others; log it
                log.exception("closing Kafka reader %s[%d] failed", reader.topic, reader.partition)

    def _reader(self, topic: str, partition: int, position: int, partition_start: int) -> PartitionReader:
        reader = self._readers.get((topic, partition))
        if reader is None:
            reader = open_reader(self._cfg, topic, partition, position, partition_start=partition_start)
            self._readers[(topic, partition)] = reader
        elif reader.position() != position:
            reader.seek(position)
        return reader

    def _take_pending(self, topic: str, partition: int, position: int) -> SourceBatch | None:
        batch = self._pending.pop((topic, partition), None)
        return batch if batch is not None and batch.start_offset == position else None

    def _drop_reader(self, topic: str, partition: int) -> None:
        reader = self._readers.pop((topic, partition), None)
        if reader is not None:
            try:
                reader.close()
            except Exception:  # the reader is being discarded after a failure anyway
                log.exception("closing failed Kafka reader %s[%d]", topic, partition)

    def _stop_requested(self) -> bool:
        return self._stop_file is not None and os.path.exists(self._stop_file)

    def process(
        self,
        element: PartitionSpec,
        tracker=beam.DoFn.RestrictionParam(_PROVIDER),
        watermark_estimator=beam.DoFn.WatermarkEstimatorParam(_WATERMARKS),
    ) -> Iterator[beam.window.TimestampedValue]:
        yield from self._read(element, tracker, watermark_estimator)

    def _read(self, element, tracker, watermark_estimator):
        topic, partition, partition_start, _ = element
        # The tracker's range keeps its start while we claim; the read position is ours.
        position = tracker.current_restriction().start
        while True:
            stop = tracker.current_restriction().stop  # shrinks when the runner splits
            if position >= stop:
                return
            if self._stop_requested():
                # Give up the rest of the range so the runner sees this element done.
                tracker.try_claim(stop - 1)
                return
            try:
                batch = self._take_pending(topic, partition, position)
                if batch is None:
                    reader = self._reader(topic, partition, position, partition_start)
                    batch = reader.poll(self._cfg.max_batch_records, self._cfg.poll_timeout_ms)
            except SourceError as exc:
                if not exc.retriable:
                    raise
                # Broker unreachable, leader moving, ...: drop the reader (a fresh one
                # reconnects) and retry this same position later instead of failing.
                log.warning("%s[%d] at offset %d: %s; retrying in %.1f s", topic, partition, position, exc,
                            RETRY_DEFER_S)
                self._drop_reader(topic, partition)
                self._retries.inc()
                tracker.defer_remainder(Duration.of(RETRY_DEFER_S))
                return
            if batch is None:
                tracker.defer_remainder(Duration.of(IDLE_DEFER_S))
                return
            if batch.end_offset > stop:
                # The reader now stands past ``stop``; _reader() re-positions it if a
                # later restriction of this partition starts elsewhere.
                batch = _truncate(batch, stop)
            if not tracker.try_claim(batch.end_offset - 1):
                # The runner checkpointed meanwhile: keep the batch for the residual,
                # which starts exactly here, instead of fetching it again.
                self._pending[(topic, partition)] = batch
                return
            position = batch.end_offset
            self._batches.inc()
            self._records.inc(batch.records.num_rows)
            yield _timestamped(batch, watermark_estimator)


class _ReadPartitionUnboundedFn(_ReadPartitionFn):
    """Serve mode: the same read, unbounded per element."""

    @beam.DoFn.unbounded_per_element()
    def process(
        self,
        element: PartitionSpec,
        tracker=beam.DoFn.RestrictionParam(_PROVIDER),
        watermark_estimator=beam.DoFn.WatermarkEstimatorParam(_WATERMARKS),
    ):
        yield from self._read(element, tracker, watermark_estimator)


def format_partitions(partitions) -> str:
    """``events[0,2] clicks[0,2]``: ``(topic, partition)`` pairs, for logs; "nothing" if none."""
    by_topic: dict[str, list[int]] = {}
    for topic, p in partitions:
        by_topic.setdefault(topic, []).append(p)
    return " ".join(f"{t}[{','.join(map(str, ps))}]" for t, ps in by_topic.items()) or "nothing"


def _truncate(batch: SourceBatch, stop: int) -> SourceBatch:
    """The part of ``batch`` before offset ``stop`` (a bounded range ends mid-batch)."""
    offsets = batch.records.column(0).to_numpy()
    keep = int((offsets < stop).sum())  # offsets ascend within a partition
    return SourceBatch(batch.topic, batch.partition, batch.start_offset, stop, batch.partition_start,
                       batch.records.slice(0, keep))


def _timestamped(batch: SourceBatch, watermark_estimator) -> beam.window.TimestampedValue:
    current = watermark_estimator.current_watermark()
    ts_col = batch.records.column(1)
    max_ms = ts_col.to_numpy().max() if len(ts_col) else -1
    if max_ms >= 0:
        candidate = Timestamp(micros=int(max_ms) * 1000)
        if current is None or candidate > current:
            watermark_estimator.set_watermark(candidate)
            current = candidate
    return beam.window.TimestampedValue(batch, current if current is not None else Timestamp(0))


class ReadKafkaBatches(beam.PTransform):
    """PBegin -> PCollection[SourceBatch] from every partition of ``source_cfg.topics``.

    ``start_offsets``: ``{(topic, partition): next offset}`` from the cache.
    ``end_offsets``: bounded read of exactly those partitions up to (excluding) these
    offsets; None = unbounded (run with ``streaming=True``). ``stop_file`` and ``share``
    (read only the partitions it owns): see the module docstring. Partition listing and
    start resolution happen in ``expand`` (pipeline construction) and need the brokers
    reachable.

    Example::

        with beam.Pipeline(runner="DirectRunner", options=PipelineOptions(streaming=True)) as p:
            _ = p | ReadKafkaBatches(cfg, cache.next_offsets(), stop_file="/run/stop") | ...
    """

    def __init__(
        self,
        source_cfg: SourceConfig,
        start_offsets: Mapping[tuple[str, int], int],
        *,
        stop_file: str | None = None,
        end_offsets: Mapping[tuple[str, int], int] | None = None,
        share: Share | None = None,
    ):
        super().__init__()
        self._cfg = source_cfg
        self._share = share
        self._start_offsets = dict(start_offsets)
        self._end_offsets = dict(end_offsets) if end_offsets is not None else None
        self._stop_file = os.fspath(stop_file) if stop_file is not None else None

    def expand(self, pbegin):
        specs = plan_partitions(self._cfg, self._start_offsets, self._end_offsets, self._share)
        if self._share is not None:
            log.info("kafka source, %s: reads %s", self._share, format_partitions((t, p) for t, p, _, _ in specs))
        if self._end_offsets is None:
            fn = _ReadPartitionUnboundedFn(self._cfg, self._stop_file)
        else:
            fn = _ReadPartitionFn(self._cfg, self._stop_file)
        return (
            pbegin
            | "Partitions" >> beam.Create(specs, reshuffle=False)
            | "Read" >> beam.ParDo(fn).with_output_types(SourceBatch)
        )
