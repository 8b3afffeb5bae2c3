"""What the transform graph emits per source batch: cached rows plus the full accounting.

Contract: for every ``SourceBatch`` the graph emits exactly one ``ProcessedBatch`` with the
same topic/partition/offset range (also when every record was filtered or dead), so
``read == batch.num_rows + len(dead_letters) + len(filtered_offsets)`` always holds and
the cache can advance the partition's offset past the whole range.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np
import pyarrow as pa

__all__ = ["Stage", "Reason", "DeadLetter", "ProcessedBatch", "OFFSET_COLUMN", "EVENT_TIME_COLUMN", "id_column"]

#: Source offset of each cached row (int64).
OFFSET_COLUMN = "_offset"
#: Event time of each cached row, ms since the epoch (int64).
EVENT_TIME_COLUMN = "_event_time_ms"


def id_column(feature: str) -> str:
    """Column holding the raw 64-bit ids of a sparse feature (the feature's own column
    holds the mapped table rows)."""
    return f"{feature}.id"


class Stage(enum.Enum):
    SOURCE = "source"
    DECODE = "decode"
    VALIDATE = "validate"
    PLUGIN = "plugin"


class Reason(enum.Enum):
    """Stable dead-letter reason codes (never renumber or rename: they are stored)."""

    EMPTY_MESSAGE = "empty_message"
    OVERSIZE = "oversize"
    NOT_UTF8 = "not_utf8"
    MALFORMED_JSON = "malformed_json"
    NOT_AN_OBJECT = "not_an_object"
    BAD_TSV_ROW = "bad_tsv_row"
    MISSING_LABEL = "missing_label"
    BAD_LABEL = "bad_label"
    WRONG_TYPE = "wrong_type"
    NON_FINITE = "non_finite"
    TOO_MANY_VALUES = "too_many_values"
    BAD_EVENT_TIME = "bad_event_time"
    PLUGIN_ERROR = "plugin_error"
    BAD_CSV_ROW = "bad_csv_row"


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    stage: Stage
    reason: Reason
    detail: str  # human-readable: which field, what value, what was expected
    raw: bytes


@dataclasses.dataclass(frozen=True)
class ProcessedBatch:
    topic: str
    partition: int
    start_offset: int
    end_offset: int
    partition_start: int
    batch: pa.RecordBatch  # rows kept; includes OFFSET_COLUMN and EVENT_TIME_COLUMN
    dead_letters: tuple[DeadLetter, ...]
    filtered_offsets: np.ndarray  # int64 source offsets dropped by the filter
    read: int  # records read in [start_offset, end_offset)
    mapping_version: int = 0  # id-mapping version the sparse rows were produced with
