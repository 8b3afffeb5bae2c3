"""What the batch cache reports about itself, read inside one of its transactions (no LMDB
import: the caller passes its transaction and its sub-database handles by ``SubDb``).

* ``counts``: lifetime totals, ``read == cached_rows + filtered + dead_letters``;
* ``sizes``: what is stored now and was ever written, from counters (constant time);
* ``summary``: everything ``headrace cache stat`` prints (a scan of the batch metadata,
  offsets and readers besides the counters).
"""

from __future__ import annotations

from typing import Any, Mapping

from storage.cache_keys import (
    DEAD_REASON_PREFIX,
    BatchMeta,
    Counter,
    StateKey,
    SubDb,
    decode_i64,
    decode_u64,
    get_i64,
    parse_partition_key,
)
from storage.cache_reader import CacheReader

__all__ = ["counts", "sizes", "summary"]

_COUNTS = (("read", Counter.READ), ("cached_rows", Counter.CACHED_ROWS),
           ("filtered", Counter.FILTERED), ("dead_letters", Counter.DEAD_LETTERS))
_SIZES = (("batches", Counter.STORED_BATCHES), ("rows", Counter.STORED_ROWS), ("bytes", Counter.STORED_BYTES),
          ("written_bytes", Counter.WRITTEN_BYTES), ("written_batches", Counter.NEXT_SEQ),
          ("dead_letters_expired", Counter.DEAD_EXPIRED))


def counts(txn, dbs: Mapping[SubDb, Any]) -> dict[str, int]:
    c = dbs[SubDb.COUNTERS]
    return {name: get_i64(txn, c, counter.key) for name, counter in _COUNTS}


def sizes(txn, dbs: Mapping[SubDb, Any]) -> dict[str, int]:
    c = dbs[SubDb.COUNTERS]
    return {name: get_i64(txn, c, counter.key) for name, counter in _SIZES}


def _dead_by_reason(txn, counters) -> dict[str, int]:
    out: dict[str, int] = {}
    cur = txn.cursor(db=counters)
    if cur.set_range(DEAD_REASON_PREFIX):
        for key, raw in cur:
            key = bytes(key)
            if not key.startswith(DEAD_REASON_PREFIX):
                break
            out[key[len(DEAD_REASON_PREFIX):].decode()] = decode_i64(raw)
    return out


def summary(txn, dbs: Mapping[SubDb, Any], cuts) -> dict[str, Any]:
    """A JSON-ready summary (string keys throughout; partitions as strings). ``cuts``: the
    ``train_cuts`` sub-database, or None where it does not exist yet."""
    c, state = dbs[SubDb.COUNTERS], dbs[SubDb.STATE]
    tmin = tmax = None
    versions: dict[str, int] = {}
    for _, raw in txn.cursor(db=dbs[SubDb.META]):
        meta = BatchMeta.decode(raw)
        versions[str(meta.mapping_version)] = versions.get(str(meta.mapping_version), 0) + 1
        if meta.event_time_min_ms is not None:
            tmin = meta.event_time_min_ms if tmin is None else min(tmin, meta.event_time_min_ms)
            tmax = meta.event_time_max_ms if tmax is None else max(tmax, meta.event_time_max_ms)
    offsets: dict[str, dict[str, int]] = {}
    for key, raw in txn.cursor(db=dbs[SubDb.OFFSETS]):
        topic, partition = parse_partition_key(key)
        offsets.setdefault(topic, {})[str(partition)] = decode_u64(raw)
    r = CacheReader(txn, dbs[SubDb.BATCHES], dbs[SubDb.META])
    blocked = bytes(txn.get(StateKey.BLOCKED_BY_READER.key, db=state) or b"").decode()

    def counter(k: Counter) -> int:
        return get_i64(txn, c, k.key)

    def setting(k: StateKey) -> int:
        return get_i64(txn, state, k.key)

    return {
        "batches": counter(Counter.STORED_BATCHES),
        "rows": counter(Counter.STORED_ROWS),
        "bytes": counter(Counter.STORED_BYTES),
        "written_bytes": counter(Counter.WRITTEN_BYTES),
        "offsets": offsets,
        "dead_letters": _dead_by_reason(txn, c),
        "event_time": None if tmin is None else [tmin, tmax],
        **{name if name != "dead_letters" else "dead_letters_total": counter(k) for name, k in _COUNTS},
        "first_seq": r.first_seq(),
        "last_seq": r.last_seq(),
        "readers": {bytes(k).decode(): decode_u64(v) for k, v in txn.cursor(db=dbs[SubDb.READERS])},
        "mapping_versions": versions,
        "max_bytes": setting(StateKey.MAX_BYTES),
        "over_budget_bytes": setting(StateKey.OVER_BUDGET_BYTES),
        "blocked_by_reader": blocked or None,
        "dead_letters_stored": counter(Counter.DEAD_STORED),
        "dead_letter_bytes": counter(Counter.DEAD_STORED_BYTES),
        "dead_letters_expired": counter(Counter.DEAD_EXPIRED),
        "dead_letter_max_bytes": setting(StateKey.DEAD_LETTER_MAX_BYTES),
        "train_cuts": 0 if cuts is None else int(txn.stat(cuts)["entries"]),
    }
