"""Which batches retention deletes (pure: no LMDB import).

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

__all__ = ["RetentionPlan", "plan_retention"]


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
