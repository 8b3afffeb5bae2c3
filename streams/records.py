"""The raw payload batch every source emits: records of ONE partition, contiguous offsets."""

from __future__ import annotations

import dataclasses

import pyarrow as pa

__all__ = ["RAW_SCHEMA", "SourceBatch", "CSV_HEADER_KEY", "csv_header_of"]

#: Columns of ``SourceBatch.records``. ``timestamp_ms`` is the broker/log timestamp
#: (-1 when the source has none); ``offset`` is the Kafka offset, or the 0-based line
#: number for files.
RAW_SCHEMA = pa.schema(
    [
        ("offset", pa.int64()),
        ("timestamp_ms", pa.int64()),
        ("value", pa.binary()),
    ]
)

#: Schema-metadata key of ``SourceBatch.records`` holding the raw header record of the CSV
#: file the batch comes from (the header itself is not a record of any batch).
CSV_HEADER_KEY = b"headrace.csv_header"


def csv_header_of(records: pa.RecordBatch) -> bytes | None:
    """The CSV header record a file batch carries (``CSV_HEADER_KEY``); None otherwise."""
    meta = records.schema.metadata
    return None if not meta else meta.get(CSV_HEADER_KEY)


@dataclasses.dataclass(frozen=True)
class SourceBatch:
    """Records read from one source partition, covering offsets ``[start_offset, end_offset)``.

    ``end_offset`` is the next offset to read (the consumer position after the batch), so it
    can exceed the last record's offset + 1 when the log has gaps (compaction, transaction
    markers). ``partition_start`` is the offset this run of the source started the partition
    at; the cache uses it as the resume point of a partition it has never seen.
    Files use ``topic = "file:" + path`` and ``partition = 0``.
    """

    topic: str
    partition: int
    start_offset: int
    end_offset: int
    partition_start: int
    records: pa.RecordBatch  # RAW_SCHEMA

    def __post_init__(self):
        if self.end_offset < self.start_offset:
            raise ValueError(f"end_offset {self.end_offset} < start_offset {self.start_offset}")
