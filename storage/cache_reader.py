"""Reading stored batches inside one LMDB read transaction.

``CacheReader`` is what ``BatchCache.reader()`` yields: one read transaction, i.e. one
consistent snapshot of the cache. Its batches are **zero-copy**: their Arrow buffers
point straight into LMDB's memory map and are valid only until the ``reader()`` block
ends. Afterwards the pages may be reused by the writer (the batch silently changes) or
unmapped by a map resize or ``close()`` (reading it crashes the process). Convert what
you need (e.g. to tensors, which copies) inside the block, or use the copying paths
(``BatchCache.read``, ``BatchCache.iter_batches(zero_copy=False)``) for batches you keep.

Keep reader blocks short: an open read transaction pins the pages of its snapshot (the
file cannot reuse them) and holds back map growth in this process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator

import pyarrow as pa

from storage.admission import decode_batch
from storage.cache_keys import BatchMeta, seq_from_key, seq_key
from storage.errors import CacheError
from transforms.elements import OFFSET_COLUMN

__all__ = ["CachedBatch", "CacheReader", "follow_batches"]


@dataclasses.dataclass(frozen=True)
class CachedBatch:
    """One stored batch and its source range.

    ``skipped_batches`` > 0 says retention deleted that many batches between the seq the
    caller asked for and ``seq`` (the reader fell behind a retention budget): those rows
    were never delivered to this caller.
    """

    seq: int
    batch: pa.RecordBatch
    topic: str
    partition: int
    start_offset: int
    end_offset: int
    mapping_version: int
    event_time_min_ms: int | None
    event_time_max_ms: int | None
    skipped_batches: int = 0
    nbytes: int = 0  # stored Arrow IPC bytes

    @property
    def num_rows(self) -> int:
        return self.batch.num_rows


class CacheReader:
    """Zero-copy reads within one read transaction (see module docstring).

    Do not construct directly: use ``with cache.reader() as r``.
    """

    def __init__(self, txn, batches_db, meta_db):
        self._txn = txn
        self._batches = batches_db
        self._meta = meta_db

    @property
    def txn(self):
        """The read transaction (an ``lmdb.Transaction``, ``buffers=True``: values are
        memoryviews into the map) for reading cache extensions' sub-databases
        (``BatchCache.open_db``) in the same snapshot. Valid only inside the block."""
        return self._txn

    def first_seq(self) -> int | None:
        cur = self._txn.cursor(db=self._batches)
        return seq_from_key(cur.key()) if cur.first() else None

    def last_seq(self) -> int | None:
        cur = self._txn.cursor(db=self._batches)
        return seq_from_key(cur.key()) if cur.last() else None

    def read_at_or_after(self, seq: int, *, copy: bool) -> CachedBatch | None:
        """The first stored batch with seq >= ``seq`` (None if there is none in this
        snapshot). ``copy`` decides whether the batch owns its memory."""
        if seq < 0:
            raise CacheError(f"seq must be >= 0, got {seq}")
        cur = self._txn.cursor(db=self._batches)
        if not cur.set_range(seq_key(seq)):
            return None
        key, value = cur.item()
        actual = seq_from_key(key)
        raw_meta = self._txn.get(key, db=self._meta)
        if raw_meta is None:
            raise CacheError(f"batch {actual} has no metadata record: the cache is corrupt")
        meta = BatchMeta.decode(raw_meta)
        batch = decode_batch(bytes(value) if copy else value)
        return CachedBatch(
            seq=actual, batch=batch, topic=meta.topic, partition=meta.partition,
            start_offset=meta.start_offset, end_offset=meta.end_offset,
            mapping_version=meta.mapping_version,
            event_time_min_ms=meta.event_time_min_ms, event_time_max_ms=meta.event_time_max_ms,
            skipped_batches=actual - seq, nbytes=len(value),
        )

    def read(self, seq: int) -> CachedBatch:
        """Zero-copy batch ``seq``, or the next stored one if retention deleted it
        (``skipped_batches`` says how many). Raises CacheError (retriable) if no batch at
        or after ``seq`` exists in this snapshot."""
        cb = self.read_at_or_after(seq, copy=False)
        if cb is None:
            raise CacheError(f"no batch at or after seq {seq} yet (last seq {self.last_seq()})", retriable=True)
        return cb

    def iter_batches(self, start_seq: int = 0, end_seq: int | None = None) -> Iterator[CachedBatch]:
        """Zero-copy batches with ``start_seq <= seq < end_seq`` of this snapshot, in seq
        order. The first one's ``skipped_batches`` counts deleted batches from
        ``start_seq``; seqs are contiguous after that (retention never punches holes)."""
        expected = start_seq
        while True:
            cb = self.read_at_or_after(expected, copy=False)
            if cb is None or (end_seq is not None and cb.seq >= end_seq):
                return
            yield cb
            expected = cb.seq + 1

    def offsets_before(self, seq: int, row: int = 0, partitions: set[tuple[str, int]] | None = None
                       ) -> dict[str, dict[int, int]]:
        """topic -> partition -> the offset after the last event of that partition stored
        before row ``row`` of batch ``seq`` (a reader's cursor): how far into each source a
        reader at that cursor has read. Walks the batches' metadata backwards from the
        cursor (no Arrow decoding except batch ``seq`` when ``row`` > 0); stops early once
        every one of ``partitions`` was seen. Partitions whose batches before the cursor
        retention deleted are absent."""
        out: dict[str, dict[int, int]] = {}
        seen: set[tuple[str, int]] = set()

        def note(topic: str, partition: int, offset: int) -> None:
            if (topic, partition) not in seen:
                seen.add((topic, partition))
                out.setdefault(topic, {})[partition] = offset

        if row > 0:
            cb = self.read_at_or_after(seq, copy=False)
            if cb is not None and cb.seq == seq:
                done = row >= cb.num_rows  # the whole batch: up to its end (dead and filtered ones too)
                note(cb.topic, cb.partition,
                     cb.end_offset if done else int(cb.batch.column(OFFSET_COLUMN)[row - 1].as_py()) + 1)
        cur = self._txn.cursor(db=self._meta)
        # on the last record before the cursor's batch
        found = cur.prev() if cur.set_range(seq_key(seq)) else cur.last()
        while found:
            meta = BatchMeta.decode(cur.value())
            note(meta.topic, meta.partition, meta.end_offset)
            if partitions is not None and partitions <= seen:
                break
            found = cur.prev()
        return out


def _last_seq(reader: Callable[[], contextlib.AbstractContextManager[CacheReader]]) -> int | None:
    with reader() as r:
        return r.last_seq()


def follow_batches(reader: Callable[[], contextlib.AbstractContextManager[CacheReader]], start_seq: int,
                   follow: bool, stop: Callable[[], bool] | None, poll_interval_s: float,
                   max_wait_s: float | None, zero_copy: bool) -> Iterator[CachedBatch]:
    """``BatchCache.iter_batches`` (which documents the options) over ``reader``, a callable
    that opens one short read transaction (``BatchCache.reader``)."""
    if poll_interval_s <= 0:
        raise CacheError(f"poll_interval_s must be > 0, got {poll_interval_s}")
    expected = start_seq
    waited_since: float | None = None
    sleep_s = min(0.001, poll_interval_s)
    while True:
        if stop is not None and stop():
            return
        with reader() as r:
            cb = r.read_at_or_after(expected, copy=not zero_copy)
            if cb is not None and zero_copy:
                yield cb  # inside the transaction: its memory is valid until we resume
        if cb is not None:
            if not zero_copy:
                yield cb  # owns its memory: the transaction has ended already
            expected = cb.seq + 1
            waited_since = None
            sleep_s = min(0.001, poll_interval_s)
            continue
        if not follow:
            return
        now = time.monotonic()
        if waited_since is None:
            waited_since = now
        elif max_wait_s is not None and now - waited_since >= max_wait_s:
            return
        while True:
            if stop is not None and stop():
                return
            time.sleep(sleep_s)
            sleep_s = min(sleep_s * 2, poll_interval_s)
            last = _last_seq(reader)
            if last is not None and last >= expected:
                break
            if max_wait_s is not None and time.monotonic() - waited_since >= max_wait_s:
                return
