"""Whether and how a ``ProcessedBatch`` enters the cache (pure: no LMDB import).

Given the partition's stored next offset ``next`` (or ``pb.partition_start`` when the
partition has none):

- ``pb.end_offset <= next``  -> DUPLICATE: everything in the range is already stored.
- ``pb.start_offset > next`` -> GAP: the batch covering ``[next, pb.start_offset)`` has
  not arrived; the caller holds this one until it has.
- otherwise -> WRITTEN: the part of the batch at or after ``next`` is stored (rows by
  their ``_offset``, dead letters and filtered offsets by their offset) and the
  partition's next offset becomes ``pb.end_offset``.

``admit`` also validates the batch (the accounting identity, offsets inside the range,
no offset accounted twice) because a batch that breaks them would corrupt the counters
for good once committed.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.cache_keys import validate_partition, validate_topic
from storage.errors import CacheError
from transforms.elements import EVENT_TIME_COLUMN, OFFSET_COLUMN, DeadLetter, ProcessedBatch

__all__ = [
    "WriteStatus", "Checked", "Admitted", "classify", "check", "admit", "encode_batch", "decode_batch",
    "strip_transient_metadata", "TRANSIENT_METADATA_PREFIX",
]

#: Schema metadata keys with this prefix carry in-flight accounting between pipeline
#: steps (around user plugins); they are meaningless once the batch is stored.
TRANSIENT_METADATA_PREFIX = b"headrace."


class WriteStatus(enum.Enum):
    WRITTEN = "written"  # committed (rows, dead letters, counters, next offset)
    DUPLICATE = "duplicate"  # the whole range was already stored; nothing changed
    GAP = "gap"  # starts after the stored next offset; nothing changed, retry later


@dataclasses.dataclass(frozen=True)
class Admitted:
    """The part of a batch that gets stored, with its accounting."""

    pb: ProcessedBatch  # trimmed: rows, dead letters and filtered offsets >= next
    start_offset: int  # max(pb.start_offset, next)
    read: int  # records accounted by this write (= rows + dead + filtered)
    event_time_min_ms: int | None
    event_time_max_ms: int | None


@dataclasses.dataclass(frozen=True)
class Checked:
    """A batch that passed ``check``, with its row offsets (int64)."""

    pb: ProcessedBatch
    row_offsets: np.ndarray


def classify(pb: ProcessedBatch, stored_next: int | None) -> WriteStatus:
    """The write rule above; ``stored_next`` None means the partition is new."""
    nxt = pb.partition_start if stored_next is None else stored_next
    if pb.end_offset <= nxt:
        return WriteStatus.DUPLICATE
    if pb.start_offset > nxt:
        return WriteStatus.GAP
    return WriteStatus.WRITTEN


def _where(pb: ProcessedBatch) -> str:
    return f"batch {pb.topic}[{pb.partition}] [{pb.start_offset}, {pb.end_offset})"


def check(pb: ProcessedBatch) -> Checked:
    """Check the batch's own consistency (independent of what is stored): raises
    CacheError naming the batch and the broken rule."""
    validate_topic(pb.topic)
    validate_partition(pb.partition)
    if not 0 <= pb.start_offset <= pb.end_offset:
        raise CacheError(f"{_where(pb)}: need 0 <= start_offset <= end_offset")
    if pb.partition_start < 0:
        raise CacheError(f"{_where(pb)}: partition_start {pb.partition_start} is negative")
    if not isinstance(pb.batch, pa.RecordBatch):
        raise CacheError(f"{_where(pb)}: batch must be a pyarrow.RecordBatch, got {type(pb.batch).__name__}")
    if pb.batch.num_rows:
        idx = pb.batch.schema.get_field_index(OFFSET_COLUMN)
        if idx < 0:
            raise CacheError(f"{_where(pb)}: rows have no {OFFSET_COLUMN!r} column; the transforms must keep it")
        col = pb.batch.column(idx)
        if not pa.types.is_integer(col.type) or col.null_count:
            raise CacheError(f"{_where(pb)}: column {OFFSET_COLUMN!r} must be non-null integers, got {col.type}")
        row_offsets = col.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    else:
        row_offsets = np.empty(0, dtype=np.int64)
    filtered = np.asarray(pb.filtered_offsets, dtype=np.int64).reshape(-1)
    dead = np.fromiter((d.offset for d in pb.dead_letters), dtype=np.int64, count=len(pb.dead_letters))
    for d in pb.dead_letters:
        if (d.topic, d.partition) != (pb.topic, pb.partition):
            raise CacheError(f"{_where(pb)}: holds a dead letter of {d.topic}[{d.partition}]@{d.offset}")
    total = row_offsets.size + filtered.size + dead.size
    if pb.read != total:
        raise CacheError(
            f"{_where(pb)}: read={pb.read} but rows {row_offsets.size} + dead letters {dead.size} + filtered "
            f"{filtered.size} = {total}; every record read must be accounted exactly once"
        )
    if total:
        allo = np.concatenate([row_offsets, dead, filtered])
        lo, hi = int(allo.min()), int(allo.max())
        if lo < pb.start_offset or hi >= pb.end_offset:
            raise CacheError(f"{_where(pb)}: holds offsets in [{lo}, {hi}], outside the batch's range")
        uniq, counts = np.unique(allo, return_counts=True)
        if uniq.size != allo.size:
            raise CacheError(f"{_where(pb)}: offsets accounted more than once: {uniq[counts > 1][:10].tolist()}")
    return Checked(pb, row_offsets)


def admit(checked: Checked, stored_next: int | None) -> Admitted:
    """Trim a checked batch to the offsets at or after the partition's next offset.

    Precondition: ``classify(checked.pb, stored_next) is WriteStatus.WRITTEN``.
    """
    pb, row_offsets = checked.pb, checked.row_offsets
    nxt = pb.partition_start if stored_next is None else stored_next
    batch = pb.batch
    dead: tuple[DeadLetter, ...] = pb.dead_letters
    filtered = np.asarray(pb.filtered_offsets, dtype=np.int64).reshape(-1)
    if pb.start_offset < nxt:
        keep = row_offsets >= nxt
        if not keep.all():
            batch = batch.filter(pa.array(keep))
        dead = tuple(d for d in dead if d.offset >= nxt)
        filtered = filtered[filtered >= nxt]
    read = batch.num_rows + len(dead) + filtered.size
    tmin = tmax = None
    idx = batch.schema.get_field_index(EVENT_TIME_COLUMN)
    if batch.num_rows and idx >= 0:
        mm = pc.min_max(batch.column(idx))
        if mm["min"].is_valid:
            tmin, tmax = int(mm["min"].as_py()), int(mm["max"].as_py())
    trimmed = dataclasses.replace(pb, batch=batch, dead_letters=dead, filtered_offsets=filtered, read=read)
    return Admitted(trimmed, max(pb.start_offset, nxt), read, tmin, tmax)


def strip_transient_metadata(batch: pa.RecordBatch) -> pa.RecordBatch:
    meta = batch.schema.metadata
    if not meta or not any(k.startswith(TRANSIENT_METADATA_PREFIX) for k in meta):
        return batch
    kept = {k: v for k, v in meta.items() if not k.startswith(TRANSIENT_METADATA_PREFIX)}
    return batch.replace_schema_metadata(kept or None)


def encode_batch(batch: pa.RecordBatch) -> bytes:
    """Arrow IPC stream bytes of ``batch`` (schema + one record batch), without the
    transient ``headrace.*`` schema metadata."""
    batch = strip_transient_metadata(batch)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def decode_batch(data: bytes | memoryview | pa.Buffer) -> pa.RecordBatch:
    """Decode ``encode_batch`` output. Zero-copy: the returned batch's buffers point into
    ``data`` (which must outlive it and not change); pass ``bytes`` for an owned batch."""
    buf = data if isinstance(data, pa.Buffer) else pa.py_buffer(data)
    reader = pa.ipc.open_stream(buf)
    batch = reader.read_next_batch()
    return batch
