"""Byte layouts of the batch cache's LMDB keys and values (no LMDB import; the counter
helpers take the caller's transaction).

Every integer key is big-endian so LMDB's byte-wise key order is numeric order:
cursor order over ``batches`` is write order, over ``dead_letters`` it is
(topic, partition, offset) order.

Layouts (stored on disk: never change one without a format version bump):

- batch key: ``>Q seq``.
- partition key: ``topic (UTF-8) 0x00 >I partition``. Topics never contain NUL (Kafka
  topic names are ``[A-Za-z0-9._-]``; file topics are ``file:<path>`` and paths cannot
  hold NUL), so the separator is unambiguous and sorts a topic before its extensions.
- dead-letter key: partition key ``+ >Q offset``.
- offsets value: ``>Q next_offset``; counter and state values: ``>q``.
- batch meta value: ``BatchMeta`` packed by ``_META`` followed by the topic in UTF-8.
- dead-letter order key: ``>Q n`` (write order); value: the dead-letter key.
- training cut key: ``>Q seq >Q row`` (a cursor); empty value.
"""

from __future__ import annotations

import dataclasses
import enum
import struct

from storage.errors import CacheError

__all__ = [
    "SubDb", "BatchMeta", "Counter", "StateKey",
    "seq_key", "seq_from_key", "partition_key", "parse_partition_key",
    "dead_letter_key", "parse_dead_letter_key", "cut_key", "parse_cut_key", "encode_u64", "decode_u64",
    "encode_i64", "decode_i64", "get_i64", "add_i64", "dead_reason_key", "DEAD_REASON_PREFIX",
    "validate_topic", "validate_partition",
]

class SubDb(enum.Enum):
    """The batch cache's named LMDB sub-databases (module docstring of ``storage.batch_cache``)."""

    BATCHES = "batches"
    META = "batch_meta"
    OFFSETS = "offsets"
    DEAD_LETTERS = "dead_letters"
    COUNTERS = "counters"
    READERS = "readers"
    STATE = "state"


_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_U32 = struct.Struct(">I")
_SEP = b"\x00"
_MAX_PARTITION = (1 << 31) - 1
# partition, start, end, rows, nbytes, mapping_version, ev_min, ev_max, has_event_time
_META = struct.Struct(">iqqqqqqqB")


class Counter(enum.Enum):
    """Keys of the ``counters`` sub-database (all ``>q``).

    Totals over the cache's life: READ, CACHED_ROWS, FILTERED, DEAD_LETTERS, WRITTEN_BYTES
    (they never decrease; ``READ == CACHED_ROWS + FILTERED + DEAD_LETTERS`` after every
    committed write). Current contents: STORED_BATCHES, STORED_ROWS, STORED_BYTES (they
    drop when retention deletes batches). NEXT_SEQ: the seq the next stored batch gets
    (seqs are never reused, even when retention emptied the cache).

    Dead letters kept (``[cache] dead_letter_max_bytes``): DEAD_STORED and
    DEAD_STORED_BYTES count the stored ones (key + value bytes) and drop when retention
    deletes the oldest; DEAD_EXPIRED counts those deleted (never decreases); DEAD_NEXT_SEQ
    numbers them in write order (``dead_letter_order``). DEAD_LETTERS and the ``dead:<reason>``
    counters are lifetime totals, so ``READ == CACHED_ROWS + FILTERED + DEAD_LETTERS`` holds
    whatever retention removed.
    """

    READ = "read"
    CACHED_ROWS = "cached_rows"
    FILTERED = "filtered"
    DEAD_LETTERS = "dead_letters"
    WRITTEN_BYTES = "written_bytes"
    STORED_BATCHES = "stored_batches"
    STORED_ROWS = "stored_rows"
    STORED_BYTES = "stored_bytes"
    NEXT_SEQ = "next_seq"
    DEAD_STORED = "dead_stored"
    DEAD_STORED_BYTES = "dead_stored_bytes"
    DEAD_EXPIRED = "dead_expired"
    DEAD_NEXT_SEQ = "dead_next_seq"

    @property
    def key(self) -> bytes:
        return self.value.encode()


#: Per-reason dead-letter counters live in ``counters`` under this prefix + reason code.
DEAD_REASON_PREFIX = b"dead:"


def dead_reason_key(reason_code: str) -> bytes:
    return DEAD_REASON_PREFIX + reason_code.encode()


class StateKey(enum.Enum):
    """Keys of the ``state`` sub-database: the writer's retention budget and outcome, so
    any process (a reader advancing its cursor, ``cache stat``) sees the same numbers."""

    MAX_BYTES = "max_bytes"  # >q, the retention budget of the last writer (0 = none)
    OVER_BUDGET_BYTES = "over_budget_bytes"  # >q, stored bytes above the budget
    BLOCKED_BY_READER = "blocked_by_reader"  # UTF-8 reader name; empty = not blocked
    DEAD_LETTER_MAX_BYTES = "dead_letter_max_bytes"  # >q, the writer's dead-letter budget (0 = none)
    DEAD_ORDER_INDEXED = "dead_order_indexed"  # present once dead letters stored before the index are in it

    @property
    def key(self) -> bytes:
        return self.value.encode()


@dataclasses.dataclass(frozen=True)
class BatchMeta:
    """What the cache knows about one stored batch without decoding its Arrow bytes.

    ``[start_offset, end_offset)`` is the source range the batch's write covered (after
    trimming an overlap, ``start_offset`` is the stored next offset it resumed from).
    ``event_time_*_ms`` are None when the batch has no ``_event_time_ms`` column.
    """

    topic: str
    partition: int
    start_offset: int
    end_offset: int
    rows: int
    nbytes: int
    mapping_version: int
    event_time_min_ms: int | None
    event_time_max_ms: int | None

    def encode(self) -> bytes:
        has_time = self.event_time_min_ms is not None
        return _META.pack(
            self.partition, self.start_offset, self.end_offset, self.rows, self.nbytes,
            self.mapping_version,
            self.event_time_min_ms if has_time else 0,
            self.event_time_max_ms if has_time else 0,
            1 if has_time else 0,
        ) + self.topic.encode()

    @classmethod
    def decode(cls, data: bytes | memoryview) -> "BatchMeta":
        if len(data) < _META.size:
            raise CacheError(f"batch meta record has {len(data)} bytes, expected at least {_META.size}: the cache is corrupt")
        part, start, end, rows, nbytes, version, tmin, tmax, has_time = _META.unpack_from(data)
        return cls(
            topic=bytes(data[_META.size:]).decode(),
            partition=part, start_offset=start, end_offset=end, rows=rows, nbytes=nbytes,
            mapping_version=version,
            event_time_min_ms=tmin if has_time else None,
            event_time_max_ms=tmax if has_time else None,
        )


def seq_key(seq: int) -> bytes:
    return _U64.pack(seq)


def seq_from_key(key: bytes | memoryview) -> int:
    return _U64.unpack(key)[0]


def validate_topic(topic: str) -> None:
    if not isinstance(topic, str) or not topic:
        raise CacheError(f"topic must be a non-empty str, got {topic!r}")
    if "\x00" in topic:
        raise CacheError(f"topic {topic!r} contains a NUL character; topics cannot hold NUL")
    try:
        topic.encode()
    except UnicodeEncodeError:
        raise CacheError(f"topic {topic!r} is not encodable as UTF-8 (lone surrogate)") from None


def validate_partition(partition: int) -> None:
    if not isinstance(partition, int) or not 0 <= partition <= _MAX_PARTITION:
        raise CacheError(f"partition must be an int in [0, {_MAX_PARTITION}], got {partition!r}")


def partition_key(topic: str, partition: int) -> bytes:
    return topic.encode() + _SEP + _U32.pack(partition)


def parse_partition_key(key: bytes | memoryview) -> tuple[str, int]:
    key = bytes(key)
    return key[:-5].decode(), _U32.unpack(key[-4:])[0]


def dead_letter_key(topic: str, partition: int, offset: int) -> bytes:
    return partition_key(topic, partition) + _U64.pack(offset)


def parse_dead_letter_key(key: bytes | memoryview) -> tuple[str, int, int]:
    key = bytes(key)
    topic, partition = parse_partition_key(key[:-8])
    return topic, partition, _U64.unpack(key[-8:])[0]


def cut_key(seq: int, row: int) -> bytes:
    return _U64.pack(seq) + _U64.pack(row)


def parse_cut_key(key: bytes | memoryview) -> tuple[int, int]:
    key = bytes(key)
    return _U64.unpack(key[:8])[0], _U64.unpack(key[8:16])[0]


def encode_u64(value: int) -> bytes:
    return _U64.pack(value)


def decode_u64(data: bytes | memoryview) -> int:
    return _U64.unpack(data)[0]


def get_i64(txn, db, key: bytes) -> int:
    """A ``>q`` counter read inside ``txn`` (0 when absent)."""
    raw = txn.get(key, db=db)
    return 0 if raw is None else decode_i64(raw)


def add_i64(txn, db, key: bytes, delta: int) -> None:
    """Add ``delta`` to a ``>q`` counter inside write transaction ``txn``."""
    if delta:
        txn.put(key, encode_i64(get_i64(txn, db, key) + delta), db=db)


def encode_i64(value: int) -> bytes:
    return _I64.pack(value)


def decode_i64(data: bytes | memoryview) -> int:
    return _I64.unpack(data)[0]
