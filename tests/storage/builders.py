"""Builders of ProcessedBatch values for the storage tests (no tests here)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from transforms.elements import EVENT_TIME_COLUMN, OFFSET_COLUMN, DeadLetter, ProcessedBatch, Reason, Stage

__all__ = ["make_pb", "SCHEMA_METADATA", "row_offsets"]

#: Kept by the cache; ``headrace.*`` keys are transient and stripped.
SCHEMA_METADATA = {b"owner": b"storage-tests", b"headrace.read": b"123"}


def make_pb(
    topic: str,
    partition: int,
    start: int,
    end: int,
    *,
    partition_start: int | None = None,
    dead: tuple[int, ...] = (),
    filtered: tuple[int, ...] = (),
    reason: Reason = Reason.MALFORMED_JSON,
    mapping_version: int = 0,
    width: int = 1,
) -> ProcessedBatch:
    """Offsets [start, end): ``dead`` ones become dead letters, ``filtered`` ones are
    dropped, the rest are rows whose values derive from the offset (so a test can check
    them). ``width`` repeats the payload column to make bigger batches."""
    dead_set, filt_set = set(dead), set(filtered)
    offs = np.array([o for o in range(start, end) if o not in dead_set and o not in filt_set], dtype=np.int64)
    cols = {
        "label": pa.array((offs % 2).astype(np.float32)),
        "x": pa.array(offs.astype(np.float32) * 0.5),
        "cat": pa.array(offs % 7),
        "cat.id": pa.array(offs * 1_000_003),
        "tags": pa.array([[int(o), int(o) + 1] for o in offs], pa.list_(pa.int64())),
        OFFSET_COLUMN: pa.array(offs),
        EVENT_TIME_COLUMN: pa.array(1_700_000_000_000 + offs * 10),
    }
    for i in range(1, width):
        cols[f"pad{i}"] = pa.array(offs.astype(np.float64))
    batch = pa.RecordBatch.from_pydict(cols)
    batch = batch.replace_schema_metadata(SCHEMA_METADATA)
    dls = tuple(
        DeadLetter(topic, partition, o, 1_700_000_000_000 + o, Stage.DECODE, reason, f"offset {o} is bad", b"raw-%d" % o)
        for o in sorted(dead_set)
    )
    return ProcessedBatch(
        topic=topic, partition=partition, start_offset=start, end_offset=end,
        partition_start=start if partition_start is None else partition_start,
        batch=batch, dead_letters=dls, filtered_offsets=np.array(sorted(filt_set), dtype=np.int64),
        read=end - start, mapping_version=mapping_version,
    )


def row_offsets(batch: pa.RecordBatch) -> list[int]:
    return batch.column(OFFSET_COLUMN).to_pylist()
