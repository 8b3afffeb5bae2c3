"""Byte layout of a stored dead letter (pure, no LMDB import).

The key (``cache_keys.dead_letter_key``) is the record's source position, so writing the
same dead letter twice stores it once. The value keeps everything needed to replay the
record after a fix: stage, reason code, human-readable detail, timestamp and raw bytes.

Layout: ``>q timestamp_ms, >H len(stage), >H len(reason), >I len(detail), >I len(raw)``
then stage, reason, detail (UTF-8) and raw, back to back.
"""

from __future__ import annotations

import struct

from storage.cache_keys import parse_dead_letter_key
from storage.errors import CacheError
from transforms.elements import DeadLetter, Reason, Stage

__all__ = ["encode_dead_letter", "decode_dead_letter", "reason_of"]

_HEAD = struct.Struct(">qHHII")


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
