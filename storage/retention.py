"""Which batches retention deletes (``plan_retention``, pure), and deleting them inside the
batch cache's write transaction (``apply_retention``; no LMDB import: it takes the
caller's transaction and sub-database handles).

Rule: while stored batch bytes exceed ``max_bytes``, delete the oldest batch, except

- a batch at or after the lowest reader cursor (a registered reader has not consumed
  it yet: ``reader at seq s`` means it consumed everything below ``s``), and
- the newest batch (so a follower that is not registered can always read the tail and
  ``last_seq()`` stays meaningful).

Deletion stops at the first batch it may not delete: it never punches holes, so the
stored seqs stay one contiguous run.

Example:
    >>> plan = plan_retention([(0, 10), (1, 10), (2, 10)], stored_bytes=30, max_bytes=15,
    ...                       newest_seq=2, lowest_reader=("trainer", 1))
    >>> plan.delete_seqs, plan.over_budget_bytes, plan.blocked_by_reader
    ([0], 5, 'trainer')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, Mapping

from storage.cache_keys import (
    BatchMeta, Counter, StateKey, SubDb, add_i64, decode_u64, encode_i64, get_i64, parse_cut_key, seq_from_key,
    seq_key,
)

__all__ = ["RetentionPlan", "plan_retention", "apply_retention"]


@dataclasses.dataclass(frozen=True)
class RetentionPlan:
    delete_seqs: list[int]  # oldest first
    freed_bytes: int
    over_budget_bytes: int  # stored bytes above the budget after the deletions
    blocked_by_reader: str | None  # the reader whose cursor kept batches over budget


def plan_retention(
    oldest_first: Iterable[tuple[int, int]],
    *,
    stored_bytes: int,
    max_bytes: int,
    newest_seq: int | None,
    lowest_reader: tuple[str, int] | None,
) -> RetentionPlan:
    """Plan deletions. ``oldest_first`` yields ``(seq, nbytes)`` of stored batches in seq
    order and is consumed only as far as needed; ``max_bytes <= 0`` means no budget."""
    if max_bytes <= 0 or stored_bytes <= max_bytes:
        return RetentionPlan([], 0, 0, None)
    remaining = stored_bytes
    delete: list[int] = []
    blocked: str | None = None
    for seq, nbytes in oldest_first:
        if remaining <= max_bytes:
            break
        if newest_seq is not None and seq >= newest_seq:
            break
        if lowest_reader is not None and seq >= lowest_reader[1]:
            blocked = lowest_reader[0]
            break
        delete.append(seq)
        remaining -= nbytes
    over = max(0, remaining - max_bytes)
    return RetentionPlan(delete, stored_bytes - remaining, over, blocked if over else None)


def apply_retention(txn, dbs: Mapping[SubDb, Any], cuts, max_bytes: int) -> RetentionPlan:
    """Apply retention inside the write transaction ``txn`` (deleting the batches, their
    metadata and the training cuts below them; ``cuts``: that sub-database or None) and
    record its outcome in ``state``."""
    d = dbs
    counters, state = d[SubDb.COUNTERS], d[SubDb.STATE]
    stored_bytes = get_i64(txn, counters, Counter.STORED_BYTES.key)
    plan = RetentionPlan([], 0, 0, None)
    if max_bytes > 0 and stored_bytes > max_bytes:
        mcur = txn.cursor(db=d[SubDb.META])
        newest = seq_from_key(mcur.key()) if mcur.last() else None
        lowest = None
        for name, raw in txn.cursor(db=d[SubDb.READERS]):
            pos = decode_u64(raw)
            if lowest is None or pos < lowest[1]:
                lowest = (bytes(name).decode(), pos)
        rows_of: dict[int, int] = {}

        def oldest_first():
            for key, raw in txn.cursor(db=d[SubDb.META]):
                meta = BatchMeta.decode(raw)
                seq = seq_from_key(key)
                rows_of[seq] = meta.rows
                yield seq, meta.nbytes

        plan = plan_retention(
            oldest_first(), stored_bytes=stored_bytes, max_bytes=max_bytes, newest_seq=newest, lowest_reader=lowest
        )
        for seq in plan.delete_seqs:
            txn.delete(seq_key(seq), db=d[SubDb.BATCHES])
            txn.delete(seq_key(seq), db=d[SubDb.META])
        if plan.delete_seqs and cuts is not None:
            _delete_cuts_below(txn, cuts, max(plan.delete_seqs) + 1)
        add_i64(txn, counters, Counter.STORED_BATCHES.key, -len(plan.delete_seqs))
        add_i64(txn, counters, Counter.STORED_ROWS.key, -sum(rows_of[s] for s in plan.delete_seqs))
        add_i64(txn, counters, Counter.STORED_BYTES.key, -plan.freed_bytes)
    if get_i64(txn, state, StateKey.OVER_BUDGET_BYTES.key) != plan.over_budget_bytes:
        txn.put(StateKey.OVER_BUDGET_BYTES.key, encode_i64(plan.over_budget_bytes), db=state)
    blocked = (plan.blocked_by_reader or "").encode()
    if (txn.get(StateKey.BLOCKED_BY_READER.key, db=state) or b"") != blocked:
        txn.put(StateKey.BLOCKED_BY_READER.key, blocked, db=state)
    return plan


def _delete_cuts_below(txn, cuts, seq: int) -> None:
    cur = txn.cursor(db=cuts)
    ok = cur.first()
    while ok and parse_cut_key(cur.key())[0] < seq:
        ok = cur.delete() and bool(cur.key())  # moves to the next entry (none after the last)
