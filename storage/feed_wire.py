"""How cached batches travel in an Arrow Flight feed (``headrace feed``): the ticket a reader
sends, the metadata beside each batch, and the feed's actions. Pure byte layouts: no Flight,
no LMDB import; the server (``engine.feed_server``) and the reader (``trainer.feed_reader``)
both use this module, so the two ends cannot drift apart.

A ``DoGet`` ticket (``FeedTicket``, JSON) names where the stream starts: the first cached
batch with ``seq >= start_seq`` comes first, then every later one in seq order. A bounded
stream (``follow=False``) ends at the cache's end when the server gets there, or after
``end_seq`` when given; a follow stream waits for new batches and sends a heartbeat (a
zero-row batch whose metadata is ``HEARTBEAT``) after ``heartbeat_ms`` without one, so the
reader can check its stop flag and the server notices a reader that went away.

Each data message carries ``encode_batch_meta(cb)`` as its ``app_metadata``: the kind byte
``b"B"``, the batch's seq and skipped-batch count (``>QQ``) and its ``cache_keys.BatchMeta``.
A reader resumes a broken stream with a new ticket at the last seq it received plus one.

A stream has one Arrow schema. When the next batch's schema differs from the stream's (or
the stream was opened on an empty cache), the server ends the stream and the reader reopens
it at that seq; the new stream carries the new schema.

Example:
    >>> FeedTicket.decode(FeedTicket(7, follow=True).encode())
    FeedTicket(start_seq=7, end_seq=None, follow=True, heartbeat_ms=200)
"""

from __future__ import annotations

import dataclasses
import enum
import struct

import orjson
import pyarrow as pa

from storage.cache_keys import BatchMeta
from storage.cache_reader import CachedBatch
from storage.errors import CacheError

__all__ = [
    "FEED_PROTOCOL_VERSION", "FeedTicket", "FeedAction", "HEARTBEAT",
    "encode_batch_meta", "decode_batch_meta", "heartbeat_batch",
]

#: Bumped when a ticket, the batch metadata or an action's body changes incompatibly.
FEED_PROTOCOL_VERSION = 1
#: ``app_metadata`` of a heartbeat (a zero-row batch of the stream's schema).
HEARTBEAT = b"H"
_BATCH_KIND = b"B"
_SEQS = struct.Struct(">QQ")  # seq, skipped batches


class FeedAction(enum.Enum):
    """``DoAction`` types a feed answers (bodies and results are JSON)."""

    #: -> ``{"protocol", "first_seq", "last_seq", "cache"}`` (seqs are None on an empty cache).
    STATUS = "status"
    #: ``{"name", "seq"}`` -> ``{}``: register a remote reader's position for retention.
    READER_POSITION = "reader-position"


@dataclasses.dataclass(frozen=True)
class FeedTicket:
    """What a ``DoGet`` asks for (see the module docstring)."""

    start_seq: int
    end_seq: int | None = None
    follow: bool = False
    heartbeat_ms: int = 200

    def __post_init__(self):
        for name in ("start_seq", "heartbeat_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CacheError(f"feed ticket: {name} must be an int >= 0, got {value!r}")
        if self.end_seq is not None and (isinstance(self.end_seq, bool) or not isinstance(self.end_seq, int)):
            raise CacheError(f"feed ticket: end_seq must be an int or null, got {self.end_seq!r}")
        if not isinstance(self.follow, bool):
            raise CacheError(f"feed ticket: follow must be true or false, got {self.follow!r}")
        if self.heartbeat_ms == 0:
            raise CacheError("feed ticket: heartbeat_ms must be > 0")

    def encode(self) -> bytes:
        return orjson.dumps({"v": FEED_PROTOCOL_VERSION, **dataclasses.asdict(self)})

    @classmethod
    def decode(cls, data: bytes) -> "FeedTicket":
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise CacheError(f"feed ticket is not JSON ({exc}); the reader is not a headrace feed reader") from None
        if not isinstance(doc, dict):
            raise CacheError(f"feed ticket must be a JSON object, got {type(doc).__name__}")
        version = doc.pop("v", None)
        if version != FEED_PROTOCOL_VERSION:
            raise CacheError(f"feed ticket has protocol version {version!r}, this feed speaks "
                             f"{FEED_PROTOCOL_VERSION}: run the same headrace version on both hosts")
        unknown = set(doc) - {f.name for f in dataclasses.fields(cls)}
        if unknown or "start_seq" not in doc:
            raise CacheError(f"feed ticket fields {sorted(doc)}: expected start_seq and optionally "
                             "end_seq, follow, heartbeat_ms")
        return cls(**doc)


def encode_batch_meta(cb: CachedBatch) -> bytes:
    """The ``app_metadata`` sent beside cached batch ``cb``."""
    meta = BatchMeta(cb.topic, cb.partition, cb.start_offset, cb.end_offset, cb.num_rows, cb.nbytes,
                     cb.mapping_version, cb.event_time_min_ms, cb.event_time_max_ms)
    return _BATCH_KIND + _SEQS.pack(cb.seq, cb.skipped_batches) + meta.encode()


def decode_batch_meta(data: bytes | memoryview | pa.Buffer | None, batch: pa.RecordBatch) -> CachedBatch | None:
    """The cached batch a data message carries (``batch`` is its record batch), or None for a
    heartbeat. Raises CacheError for metadata no feed writes."""
    raw = b"" if data is None else memoryview(data)
    if bytes(raw[:1]) == HEARTBEAT:
        return None
    if bytes(raw[:1]) != _BATCH_KIND or len(raw) < 1 + _SEQS.size:
        raise CacheError(f"feed message metadata of {len(raw)} bytes is neither a batch nor a heartbeat: "
                         "the server is not a headrace feed of this version")
    seq, skipped = _SEQS.unpack_from(raw, 1)
    meta = BatchMeta.decode(raw[1 + _SEQS.size:])
    return CachedBatch(
        seq=seq, batch=batch, topic=meta.topic, partition=meta.partition,
        start_offset=meta.start_offset, end_offset=meta.end_offset, mapping_version=meta.mapping_version,
        event_time_min_ms=meta.event_time_min_ms, event_time_max_ms=meta.event_time_max_ms,
        skipped_batches=skipped, nbytes=meta.nbytes,
    )


def heartbeat_batch(schema: pa.Schema) -> pa.RecordBatch:
    """A zero-row batch of ``schema``: what a heartbeat message carries."""
    return pa.RecordBatch.from_arrays([pa.array([], type=f.type) for f in schema], schema=schema)
