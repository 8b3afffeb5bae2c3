"""Exact offsets from brokers whose answers are approximate, checked by reading.

Kafka answers ListOffsets exactly; the embedded Tansu broker does not (its end offset
can be far below the real one, and a time lookup returns the base offset of the record
batch that contains the match). These functions take the broker's answer as a hint and
confirm it by fetching from there, which costs one or two polls on Kafka and fixes the
answer on Tansu. They block (network reads); call them at pipeline construction.

Built directly on ``streams.kafka_backend`` (``streams.kafka_client.open_reader`` uses
``log_end_offsets`` to resolve ``StartPosition.LATEST``, so this module must not import it).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping

from streams.config import SourceConfig
from streams.kafka_backend import backend_for
from streams.partition_reader import PartitionReader
from streams.records import SourceBatch

__all__ = ["log_end_offsets", "exact_offsets_for_times", "PROBE_POLL_TIMEOUT_MS", "MAX_PROBE_POLLS"]

#: Timeout of the first probe poll: long enough for a first fetch on a busy machine. It
#: asks for one record, so it returns as soon as the fetch lands (confluent's consume
#: otherwise waits out the timeout unless the batch fills); later polls use
#: ``poll_timeout_ms``.
PROBE_POLL_TIMEOUT_MS = 1000
#: A partition that keeps growing while we probe ends where the last probe poll ended.
MAX_PROBE_POLLS = 20


def log_end_offsets(cfg: SourceConfig, topic: str, partitions: Iterable[int],
                    enough: Mapping[int, int] | None = None) -> dict[int, int]:
    """``{partition: offset after the last record}``, confirmed by reading from the
    broker's reported end.

    A partition written to while probing gets the end reached after ``MAX_PROBE_POLLS``
    polls (every offset before it holds data that exists). Never below the reported end.
    ``enough``: ``{partition: offset}`` the caller only needs to know whether the end lies
    at or past (a bounded read's requested end); such a partition stops probing once it
    gets there, and its value is then that offset or more, not necessarily the end.
    Confirming the end costs a poll that waits out ``poll_timeout_ms``; this skips it.
    """
    backend = backend_for(cfg.client)
    marks = backend.watermark_offsets(cfg, topic, list(partitions))
    ends: dict[int, int] = {}
    for partition, (low, high) in marks.items():
        end = int(high)
        want = None if enough is None else enough.get(partition)
        if want is not None and want <= end:
            ends[partition] = end
            continue
        # Re-read the last reported record: the fetch reaches past it if the broker
        # under-reported the end.
        start = max(int(low), end - 1)
        with backend.open_reader(cfg, topic, partition, start, start) as reader:
            for batch in _probe_polls(reader, cfg, MAX_PROBE_POLLS, want):
                end = max(end, batch.end_offset)
        ends[partition] = end
    return ends


def exact_offsets_for_times(cfg: SourceConfig, topic: str, times_ms: Mapping[int, int]) -> dict[int, int | None]:
    """``{partition: offset of the first record at or after the broker's hint whose
    timestamp >= time}``, None when the partition has no such record.

    With Kafka the hint is already exact and one record is read to confirm it. Records
    before the hint are not examined (Kafka's time index guarantees none qualify when
    timestamps ascend; with out-of-order producer timestamps "first" is Kafka's notion).
    """
    backend = backend_for(cfg.client)
    hints = backend.offsets_for_times(cfg, topic, times_ms)
    exact: dict[int, int | None] = {}
    for partition, hint in hints.items():
        if hint is None:
            exact[partition] = None
            continue
        target_ms = times_ms[partition]
        exact[partition] = None
        with backend.open_reader(cfg, topic, partition, hint, hint) as reader:
            for batch in _probe_polls(reader, cfg, None):
                ts = batch.records.column(1).to_numpy()
                hits = (ts >= target_ms).nonzero()[0]
                if len(hits):
                    exact[partition] = int(batch.records.column(0)[int(hits[0])].as_py())
                    break
    return exact


def _probe_polls(reader: PartitionReader, cfg: SourceConfig, max_polls: int | None,
                 stop_at: int | None = None) -> Iterator[SourceBatch]:
    """Batches from ``reader`` until a poll returns nothing (or ``max_polls`` polls, or the
    reader reaches ``stop_at``; polls then ask for no more than the records up to it, so
    a full batch returns without waiting out the timeout)."""
    polls = 0
    batch = reader.poll(1, max(PROBE_POLL_TIMEOUT_MS, cfg.poll_timeout_ms))
    while batch is not None:
        yield batch
        polls += 1
        if max_polls is not None and polls >= max_polls:
            return
        wanted = cfg.max_batch_records
        if stop_at is not None:
            if reader.position() >= stop_at:
                return
            wanted = min(wanted, stop_at - reader.position())
        batch = reader.poll(wanted, cfg.poll_timeout_ms)
