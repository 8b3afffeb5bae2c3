"""The partition-reader contract both Kafka backends implement, and its batch arithmetic.

A ``PartitionReader`` reads ONE partition by manual assignment (no group membership, no
rebalancing): the caller says where to start, because positions come from the batch
cache; nothing is committed to the consumer group. Each ``poll`` returns a
``SourceBatch`` whose offsets ``[start_offset, end_offset)`` continue exactly where the
previous batch ended (``start_offset`` = the reader's position before the poll,
``end_offset`` = its position after), so consecutive batches tile the partition without
gaps or overlaps. Offsets inside a batch's range with no record (compaction,
transaction markers, data deleted by retention before we got there) simply have no row.

A backend supplies only ``_poll`` / ``_seek`` / ``watermarks`` / ``close``; the tiling and
the truncation check live here, once, with no client code (unit-tested with a scripted
``_poll``).
"""

from __future__ import annotations

import abc

import pyarrow as pa

from streams.config import SourceConfig
from streams.errors import SourceError
from streams.records import RAW_SCHEMA, SourceBatch

__all__ = ["PartitionReader", "build_records", "tombstones_to_empty", "fetch_bytes", "FETCH_OVERHEAD_BYTES"]

#: Headroom above max_message_bytes for record-batch and fetch-response framing.
FETCH_OVERHEAD_BYTES = 64 * 1024
_DEFAULT_PARTITION_FETCH_BYTES = 1 << 20
_DEFAULT_FETCH_MAX_BYTES = 50 << 20


def fetch_bytes(cfg: SourceConfig) -> tuple[int, int]:
    """``(per-partition, per-fetch)`` byte limits large enough for one ``max_message_bytes``
    message (oversize messages are fetched, then dead-lettered downstream)."""
    partition_bytes = max(_DEFAULT_PARTITION_FETCH_BYTES, cfg.max_message_bytes + FETCH_OVERHEAD_BYTES)
    return partition_bytes, max(_DEFAULT_FETCH_MAX_BYTES, partition_bytes)


def tombstones_to_empty(values: list) -> list:
    """Null values (tombstones) become b"" in place (dead-lettered downstream)."""
    if None in values:
        for i, v in enumerate(values):
            if v is None:
                values[i] = b""
    return values


def build_records(offsets: list[int], timestamps_ms: list[int], values: list[bytes]) -> pa.RecordBatch:
    """A ``RAW_SCHEMA`` record batch from three equally long lists (values already bytes)."""
    return pa.RecordBatch.from_arrays(
        [pa.array(offsets, pa.int64()), pa.array(timestamps_ms, pa.int64()), pa.array(values, pa.binary())],
        schema=RAW_SCHEMA,
    )


class PartitionReader(abc.ABC):
    """Reads one partition from a position; see the module docstring for the contract.

    Not thread-safe. ``poll`` blocks up to ``timeout_ms``; returns None when nothing was
    read and the position did not move, else a batch (possibly with zero rows when the
    position skipped offsets that hold no records).
    """

    def __init__(self, topic: str, partition: int, start_offset: int, partition_start: int):
        if start_offset < 0:
            raise SourceError(f"{topic}[{partition}]: start offset must be >= 0, got {start_offset}", retriable=False)
        self.topic = topic
        self.partition = partition
        self.partition_start = partition_start
        self._position = start_offset

    def position(self) -> int:
        """The next offset this reader will return (the end of the last batch)."""
        return self._position

    def seek(self, offset: int) -> None:
        """Continue reading at ``offset`` (the next batch starts there)."""
        if offset < 0:
            raise SourceError(f"{self.topic}[{self.partition}]: seek offset must be >= 0, got {offset}", retriable=False)
        self._seek(offset)
        self._position = offset

    def poll(self, max_records: int, timeout_ms: int) -> SourceBatch | None:
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        offsets, timestamps_ms, values, next_position = self._poll(max_records, timeout_ms)
        if not offsets and next_position <= self._position:
            return None
        if offsets and offsets[0] < self._position:
            # The client reset to an earlier offset: our position lay beyond the log end,
            # so the log was truncated or the topic recreated. Continuing would re-read
            # or mislabel records; the stored offsets no longer describe this partition.
            raise SourceError(
                f"{self.topic}[{self.partition}]: broker returned offset {offsets[0]} below the read "
                f"position {self._position}: the partition was truncated or the topic recreated; "
                f"the cached offsets no longer match it (use a fresh cache or another topic)",
                retriable=False,
            )
        if offsets:
            next_position = max(next_position, offsets[-1] + 1)
        batch = SourceBatch(
            topic=self.topic,
            partition=self.partition,
            start_offset=self._position,
            end_offset=next_position,
            partition_start=self.partition_start,
            records=build_records(offsets, timestamps_ms, values),
        )
        self._position = next_position
        return batch

    @abc.abstractmethod
    def _poll(self, max_records: int, timeout_ms: int) -> tuple[list[int], list[int], list[bytes], int]:
        """Fetch up to ``max_records``; return offsets, timestamps, values, client position.

        Returns ``([], [], [], self._position)`` when nothing was read; raises
        ``SourceError`` on a fatal client error without moving the position.
        """

    @abc.abstractmethod
    def _seek(self, offset: int) -> None: ...

    @abc.abstractmethod
    def watermarks(self) -> tuple[int, int]:
        """``(low, high)`` offsets as the broker reports them (high is approximate on Tansu)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> "PartitionReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
