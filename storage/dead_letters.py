"""Byte layout of a stored dead letter, and its retention (no LMDB import: the store
functions run inside the batch cache's write transaction).

The key (``cache_keys.dead_letter_key``) is the record's source position, so writing the
same dead letter twice stores it once. The value keeps everything needed to replay the
record after a fix: stage, reason code, human-readable detail, timestamp and raw bytes.

Layout: ``>q timestamp_ms, >H len(stage), >H len(reason), >I len(detail), >I len(raw)``
then stage, reason, detail (UTF-8) and raw, back to back.

Retention (``[cache] dead_letter_max_bytes``): every stored dead letter is also numbered in
write order in ``dead_letter_order`` (``>Q n`` -> its key), so ``expire_dead_letters``
deletes the oldest first, whatever their topic or offset, until the stored bytes (key +
value) fit the budget. Only the records go: the lifetime counters (``dead_letters``,
``dead:<reason>``) stay, so ``read == cached_rows + filtered + dead_letters`` still holds.
"""

from __future__ import annotations

import dataclasses
import struct
import contextlib
from typing import Any, Callable, Iterable, Iterator

from storage.cache_keys import Counter, add_i64, dead_letter_key, encode_u64, get_i64, parse_dead_letter_key
from storage.errors import CacheError
from transforms.elements import DeadLetter, Reason, Stage

__all__ = ["encode_dead_letter", "decode_dead_letter", "reason_of", "DeadLetterDbs",
           "store_dead_letters", "expire_dead_letters", "index_stored_dead_letters", "iter_dead_letters"]

_HEAD = struct.Struct(">qHHII")
_CHUNK = 512  # dead letters read per read transaction by iter_dead_letters


def encode_dead_letter(dl: DeadLetter) -> bytes:
    stage = dl.stage.value.encode()
    reason = dl.reason.value.encode()
    detail = dl.detail.encode("utf-8", errors="replace")
    raw = bytes(dl.raw)
    return _HEAD.pack(dl.timestamp_ms, len(stage), len(reason), len(detail), len(raw)) + stage + reason + detail + raw


def _fields(value: bytes | memoryview) -> tuple[int, bytes, bytes, bytes, bytes]:
    value = bytes(value)
    if len(value) < _HEAD.size:
        raise CacheError(f"dead-letter record has {len(value)} bytes, expected at least {_HEAD.size}: the cache is corrupt")
    ts, n_stage, n_reason, n_detail, n_raw = _HEAD.unpack_from(value)
    pos = _HEAD.size
    parts = []
    for n in (n_stage, n_reason, n_detail, n_raw):
        parts.append(value[pos:pos + n])
        pos += n
    if pos != len(value):
        raise CacheError(f"dead-letter record length {len(value)} does not match its header ({pos}): the cache is corrupt")
    return ts, parts[0], parts[1], parts[2], parts[3]


def reason_of(value: bytes | memoryview) -> str:
    """The reason code of a stored dead letter, without building the whole object."""
    return _fields(value)[2].decode()


def decode_dead_letter(key: bytes | memoryview, value: bytes | memoryview) -> DeadLetter:
    topic, partition, offset = parse_dead_letter_key(key)
    ts, stage, reason, detail, raw = _fields(value)
    try:
        stage_enum = Stage(stage.decode())
        reason_enum = Reason(reason.decode())
    except ValueError as exc:
        raise CacheError(
            f"dead letter at {topic}[{partition}]@{offset} has an unknown code ({exc}); it was written by a "
            "newer headrace: upgrade this one to read it"
        ) from None
    return DeadLetter(
        topic=topic, partition=partition, offset=offset, timestamp_ms=ts,
        stage=stage_enum, reason=reason_enum, detail=detail.decode("utf-8", errors="replace"), raw=raw,
    )


@dataclasses.dataclass(frozen=True)
class DeadLetterDbs:
    """Sub-database handles of one cache: the records, their write order, the counters."""

    records: Any
    order: Any
    counters: Any


def _index(txn, dbs: DeadLetterDbs, key: bytes, nbytes: int) -> None:
    n = get_i64(txn, dbs.counters, Counter.DEAD_NEXT_SEQ.key)
    txn.put(encode_u64(n), key, db=dbs.order, append=True)
    add_i64(txn, dbs.counters, Counter.DEAD_NEXT_SEQ.key, 1)
    add_i64(txn, dbs.counters, Counter.DEAD_STORED.key, 1)
    add_i64(txn, dbs.counters, Counter.DEAD_STORED_BYTES.key, nbytes)


def store_dead_letters(txn, dbs: DeadLetterDbs, dead_letters: Iterable[DeadLetter]) -> None:
    """Store each dead letter at its source position (once: a position already stored keeps
    its record) and number it in write order."""
    for dl in dead_letters:
        key = dead_letter_key(dl.topic, dl.partition, dl.offset)
        value = encode_dead_letter(dl)
        if txn.put(key, value, db=dbs.records, overwrite=False):
            _index(txn, dbs, key, len(key) + len(value))


def expire_dead_letters(txn, dbs: DeadLetterDbs, max_bytes: int) -> int:
    """Delete the oldest stored dead letters until their bytes fit ``max_bytes`` (0: keep
    all); returns how many went."""
    if max_bytes <= 0:
        return 0
    stored = get_i64(txn, dbs.counters, Counter.DEAD_STORED_BYTES.key)
    expired = freed = 0
    cur = txn.cursor(db=dbs.order)
    ok = cur.first()
    while ok and stored - freed > max_bytes:
        key = bytes(cur.value())
        value = txn.get(key, db=dbs.records)
        if value is not None:
            freed += len(key) + len(value)
            txn.delete(key, db=dbs.records)
            expired += 1
        ok = cur.delete() and bool(cur.key())  # moves to the next entry (none after the last)
    add_i64(txn, dbs.counters, Counter.DEAD_STORED.key, -expired)
    add_i64(txn, dbs.counters, Counter.DEAD_STORED_BYTES.key, -freed)
    add_i64(txn, dbs.counters, Counter.DEAD_EXPIRED.key, expired)
    return expired


def index_stored_dead_letters(txn, dbs: DeadLetterDbs) -> int:
    """Number dead letters stored before the write-order index existed (a cache written by
    an earlier headrace), in position order; returns how many. Run once, before new ones."""
    count = 0
    for key, value in txn.cursor(db=dbs.records):
        key = bytes(key)
        _index(txn, dbs, key, len(key) + len(value))
        count += 1
    return count


def iter_dead_letters(read_txn: Callable[[], contextlib.AbstractContextManager[Any]], db, *,
                      reason: Reason | str | None = None, limit: int | None = None) -> Iterator[DeadLetter]:
    """``BatchCache.dead_letters`` (which documents it): the dead letters of ``db`` read in
    chunks, each in its own transaction from ``read_txn()``."""
    want = reason.value if isinstance(reason, Reason) else reason
    if want is not None and want not in {r.value for r in Reason}:
        raise CacheError(f"unknown dead-letter reason {want!r}; expected one of {[r.value for r in Reason]}")
    if limit is not None and limit < 0:
        raise CacheError(f"limit must be >= 0, got {limit}")
    produced = 0
    after: bytes | None = None
    while limit is None or produced < limit:
        chunk: list[DeadLetter] = []
        with read_txn() as txn:
            cur = txn.cursor(db=db)
            ok = cur.first() if after is None else cur.set_range(after)
            if ok and after is not None and bytes(cur.key()) == after:
                ok = cur.next()
            while ok and len(chunk) < _CHUNK:
                key, value = cur.item()
                after = bytes(key)
                if want is None or reason_of(value) == want:
                    chunk.append(decode_dead_letter(key, value))
                ok = cur.next()
        for dl in chunk:
            if limit is not None and produced >= limit:
                return
            yield dl
            produced += 1
        if not ok:
            return
