"""Cached Arrow batches -> fixed-size training batches, with an exact resumable cursor.

Three layers, pure logic first:

- ``BatchLayout`` + ``BatchBuilder`` (``assemble`` for a list of pieces) — copy row ranges
  of cached Arrow batches into one ``TrainBatch``. Arrow buffers are read as numpy views (no
  copy) and copied once, straight into the destination tensors (pinned host memory when
  training on CUDA), piece by piece as they arrive. That copy is deliberate: a training
  batch concatenates rows of several cached batches, and a zero-copy LMDB read is valid only
  while its read transaction is open, so tensors must own their memory.
- ``rebatch`` — cut the stream of variable-size cached batches into training batches of
  ``batch_size`` rows in cache order. A training batch never mixes id-mapping versions: a
  version change ends the current batch early. A cached batch with zero rows is skipped.
- ``TrainingStream`` — runs ``rebatch`` on a background thread through
  ``torchdata.nodes`` (a ``BaseNode`` whose state is the cursor, under a ``Prefetcher`` of
  ``prefetch_batches``), so conversion overlaps the training step.

Cursor: ``Cursor(seq, row)`` names the next unread row, row ``row`` of cached batch ``seq``.
``row`` may equal that batch's row count (the batch is fully read). Every ``TrainItem``
carries the cursor *after* its rows; resuming at that cursor yields exactly the batches an
uninterrupted run would have yielded next, provided batch boundaries are the same — they are,
because a batch is cut only when full, at a mapping-version change, at the end of a bounded
stream, or at a *recorded* cut. In follow mode a partly filled batch waits for more rows; when
the stream is stopped it is dropped (its rows stay unread and are read again on resume).

Timed cuts (``[trainer] max_batch_wait_ms``, ``TimedCuts``): following the cache, a partial
batch whose first row has waited that long is cut where the rows end. The decision depends on
the clock, so before the item is handed out the cut is recorded durably in the cache
(``BatchCache.record_train_cut``); every later reading with timed cuts on (a resume, a replay
from scratch, a bounded ``train``) cuts at the recorded cursors too, so batch boundaries — and
with them the trained parameters — are the same as in the run that made the cuts.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np
import pyarrow as pa
import torch
from torchdata.nodes import BaseNode, Loader, Prefetcher

from trainer.batch import Jagged, TrainBatch
from trainer.config import TrainSpec
from trainer.errors import TrainerError
from transforms.elements import EVENT_TIME_COLUMN

__all__ = [
    "Cursor", "CachedBatchLike", "BatchLayout", "Piece", "TrainItem", "BatchBuilder",
    "assemble", "rebatch", "TrainingStream", "OpenBatches", "CutLog", "TimedCuts", "WAIT_EXPIRED",
]


@dataclasses.dataclass(frozen=True, order=True)
class Cursor:
    """The next unread row: row ``row`` of cached batch ``seq`` (0-based)."""

    seq: int = 0
    row: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"seq": self.seq, "row": self.row}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Cursor":
        return cls(int(d["seq"]), int(d["row"]))


class CachedBatchLike(Protocol):
    """What ``storage.batch_cache.CachedBatch`` provides that the trainer reads."""

    seq: int
    batch: pa.RecordBatch
    mapping_version: int


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """Which Arrow columns feed which training tensor, and the table sizes for row checks."""

    label: str
    dense: tuple[str, ...]
    sparse: tuple[str, ...]
    sparse_rows: tuple[int, ...]

    @classmethod
    def from_config(cls, cfg: TrainSpec) -> "BatchLayout":
        return cls(
            label=cfg.schema.label,
            dense=tuple(d.name for d in cfg.schema.dense),
            sparse=tuple(s.name for s in cfg.schema.sparse),
            sparse_rows=tuple(s.rows for s in cfg.schema.sparse),
        )


@dataclasses.dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of one cached batch."""

    cached: CachedBatchLike
    start: int
    stop: int

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


@dataclasses.dataclass
class TrainItem:
    """One training batch with where it came from. ``cursor`` is the position after it."""

    batch: TrainBatch
    cursor: Cursor
    first_seq: int
    last_seq: int
    # Cached batches retention deleted before this reader got to them (rows never delivered),
    # counted since the previous item.
    skipped_batches: int = 0
    # Event time (ms since the epoch) of each row, host memory; None when a cached batch had
    # no ``_event_time_ms`` column. For freshness (trainer.live_metrics), not for training.
    event_time_ms: np.ndarray | None = None

    @property
    def mapping_version(self) -> int:
        return self.batch.mapping_version


def _column(cached: CachedBatchLike, name: str) -> pa.Array:
    idx = cached.batch.schema.get_field_index(name)
    if idx < 0:
        raise TrainerError(
            f"cached batch seq {cached.seq} has no column {name!r} (columns: "
            f"{cached.batch.schema.names}); the cache was written with a different schema — "
            "point the trainer at a cache built from the same config"
        )
    col = cached.batch.column(idx)
    if col.null_count:
        raise TrainerError(
            f"cached batch seq {cached.seq} column {name!r} has {col.null_count} nulls; "
            "the pipeline must fill defaults before caching"
        )
    return col


def _numeric(cached: CachedBatchLike, name: str, dtype: np.dtype) -> np.ndarray:
    col = _column(cached, name)
    if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
        raise TrainerError(
            f"cached batch seq {cached.seq} column {name!r} has type {col.type}, expected a "
            f"numeric column"
        )
    arr = col.to_numpy(zero_copy_only=False)  # a view for primitive columns without nulls
    return arr if arr.dtype == dtype else arr.astype(dtype)


def _sparse_slices(cached: CachedBatchLike, name: str, start: int, stop: int
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """(values, per-row counts or None when single-valued) of rows [start, stop)."""
    col = _column(cached, name)
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        if not pa.types.is_integer(col.type.value_type):
            raise TrainerError(
                f"cached batch seq {cached.seq} column {name!r} is {col.type}, expected "
                "list<int64> of table rows"
            )
        offsets = col.offsets.to_numpy()  # accounts for the array's own slice offset
        child = col.values.to_numpy(zero_copy_only=False)
        lo, hi = int(offsets[start]), int(offsets[stop])
        vals = child[lo:hi]
        counts = np.diff(offsets[start:stop + 1])
        return (vals if vals.dtype == np.int64 else vals.astype(np.int64)), counts
    if not pa.types.is_integer(col.type):
        raise TrainerError(
            f"cached batch seq {cached.seq} column {name!r} has type {col.type}, expected "
            "int64 table rows (or list<int64>)"
        )
    vals = col.to_numpy(zero_copy_only=False)[start:stop]
    return (vals if vals.dtype == np.int64 else vals.astype(np.int64)), None


def _empty(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


class BatchBuilder:
    """Fills one training batch piece by piece, copying each piece's rows into the
    destination tensors as it is added — so a piece's Arrow memory need only stay valid
    during ``add`` (zero-copy LMDB reads die when the reader advances).

    Labels, dense features and single-valued sparse rows go straight into tensors allocated
    once for ``capacity`` rows; multi-valued rows are gathered per piece and joined at
    ``finish`` (their total length is unknown up front). Every sparse row is checked against
    its table size, so a mapping/table mismatch fails here naming the batch seq and feature
    instead of as an index error (or a device assert) later.
    """

    def __init__(self, layout: BatchLayout, capacity: int, *, pin_memory: bool = False):
        self.layout = layout
        self.capacity = capacity
        self.pin = pin_memory
        self.rows = 0
        self.mapping_version: int | None = None
        self.first_seq: int | None = None
        self.last_seq: int | None = None
        self._labels = _empty((capacity,), torch.float32, pin_memory)
        self._dense = _empty((capacity, len(layout.dense)), torch.float32, pin_memory)
        self._single: dict[str, torch.Tensor] = {}
        self._multi: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        self._event_ms: np.ndarray | None = np.empty(capacity, np.int64)

    def add(self, cached: CachedBatchLike, start: int, stop: int) -> None:
        """Copy rows ``[start, stop)`` of ``cached`` (same mapping version as earlier pieces)."""
        n = stop - start
        if n <= 0:
            return
        if self.rows + n > self.capacity:
            raise ValueError(f"piece of {n} rows overflows the batch ({self.rows}/{self.capacity})")
        version = int(cached.mapping_version)
        if self.mapping_version is None:
            self.mapping_version, self.first_seq = version, int(cached.seq)
        elif version != self.mapping_version:
            raise ValueError("a training batch must not mix mapping versions")
        self.last_seq = int(cached.seq)
        at, end = self.rows, self.rows + n
        lay = self.layout
        self._labels.numpy()[at:end] = _numeric(cached, lay.label, np.float32)[start:stop]
        dense_np = self._dense.numpy()
        for j, name in enumerate(lay.dense):
            dense_np[at:end, j] = _numeric(cached, name, np.float32)[start:stop]
        for name, table_rows in zip(lay.sparse, lay.sparse_rows):
            vals, counts = _sparse_slices(cached, name, start, stop)
            if vals.size:
                lo, hi = int(vals.min()), int(vals.max())
                if lo < 0 or hi >= table_rows:
                    raise TrainerError(
                        f"cached batch seq {cached.seq} feature {name!r} has row "
                        f"{lo if lo < 0 else hi} outside its table of {table_rows} rows; the id "
                        "mapping and schema.sparse rows disagree"
                    )
            if counts is None and name not in self._multi:
                if name not in self._single:
                    self._single[name] = _empty((self.capacity,), torch.int64, self.pin)
                self._single[name].numpy()[at:end] = vals
            else:
                if name in self._single:
                    # The column turned multi-valued mid-batch: keep earlier rows as 1-lists.
                    old = self._single.pop(name).numpy()[:at].copy()
                    self._multi[name] = ([old], [np.ones(at, np.int64)])
                parts, cnts = self._multi.setdefault(name, ([], []))
                parts.append(vals.copy())
                cnts.append(np.ones(n, np.int64) if counts is None else counts.astype(np.int64))
        if self._event_ms is not None:
            idx = cached.batch.schema.get_field_index(EVENT_TIME_COLUMN)
            col = cached.batch.column(idx) if idx >= 0 else None
            if col is None or col.null_count or not pa.types.is_integer(col.type):
                self._event_ms = None  # freshness is optional: no event times, no freshness
            else:
                self._event_ms[at:end] = col.to_numpy(zero_copy_only=False)[start:stop]
        self.rows = end

    def event_times_ms(self) -> np.ndarray | None:
        """Event times of the rows added so far (a view), or None if a piece had none."""
        return None if self._event_ms is None else self._event_ms[:self.rows]

    def finish(self) -> TrainBatch:
        """The batch of the rows added so far (views of the preallocated tensors)."""
        n = self.rows
        if n == 0:
            raise ValueError("cannot finish an empty batch")
        sparse: dict[str, Jagged] = {}
        for name in self.layout.sparse:
            if name in self._single:
                offsets = torch.arange(n + 1, dtype=torch.int64)
                sparse[name] = Jagged(self._single[name][:n],
                                      offsets.pin_memory() if self.pin else offsets)
                continue
            parts, cnts = self._multi[name]
            total = sum(p.size for p in parts)
            values = _empty((total,), torch.int64, self.pin)
            offsets = _empty((n + 1,), torch.int64, self.pin)
            if total:
                np.concatenate(parts, out=values.numpy())
            offsets_np = offsets.numpy()
            offsets_np[0] = 0
            np.cumsum(np.concatenate(cnts), out=offsets_np[1:])
            sparse[name] = Jagged(values, offsets)
        return TrainBatch(self._dense[:n], sparse, self._labels[:n], int(self.mapping_version))


def assemble(pieces: Sequence[Piece], layout: BatchLayout, *, pin_memory: bool = False) -> TrainBatch:
    """One ``TrainBatch`` from row ranges of cached batches (all of one mapping version)."""
    builder = BatchBuilder(layout, sum(p.num_rows for p in pieces), pin_memory=pin_memory)
    for p in pieces:
        builder.add(p.cached, p.start, p.stop)
    return builder.finish()


class CutLog(Protocol):
    """Where training cuts are recorded (``storage.batch_cache.BatchCache`` is one)."""

    def train_cuts(self, start_seq: int = 0) -> list[tuple[int, int]]: ...

    def record_train_cut(self, seq: int, row: int) -> None: ...


class _WaitExpired:
    def __repr__(self) -> str:
        return "WAIT_EXPIRED"


#: Yielded by a ``rebatch`` source in place of a cached batch: nothing new arrived and the
#: pending rows' wait (``TimedCuts.max_wait_ms``) is over, so cut them now.
WAIT_EXPIRED = _WaitExpired()


@dataclasses.dataclass(frozen=True)
class TimedCuts:
    """``[trainer] max_batch_wait_ms``: cut a partial batch once its first row has waited
    ``max_wait_ms`` (0: make no new cuts, only honour the recorded ones: a bounded read),
    recording each cut in ``log`` before handing the batch out. ``clock`` in seconds."""

    log: CutLog
    max_wait_ms: int
    clock: Callable[[], float] = time.monotonic

    @classmethod
    def for_trainer(cls, max_batch_wait_ms: int, log: CutLog, *, follow: bool) -> "TimedCuts | None":
        """The trainer's setting: None when off (recorded cuts are then ignored: today's
        full batches), new cuts only when following."""
        if max_batch_wait_ms <= 0:
            return None
        return cls(log, max_batch_wait_ms if follow else 0)


class _WaitTimer:
    """When the pending batch's first row arrived, and whether its wait is over."""

    def __init__(self, max_wait_ms: int, clock: Callable[[], float]):
        self.max_wait_s = max_wait_ms / 1000.0
        self.clock = clock
        self.since: float | None = None

    def expired(self) -> bool:
        return self.max_wait_s > 0 and self.since is not None and self.clock() - self.since >= self.max_wait_s


def rebatch(cached: Iterable[CachedBatchLike], layout: BatchLayout, batch_size: int, *,
            start: Cursor = Cursor(), pin_memory: bool = False,
            flush_at_end: Callable[[], bool] = lambda: True,
            cuts: Sequence[Cursor] = (), timer: _WaitTimer | None = None,
            record_cut: Callable[[Cursor], None] | None = None) -> Iterator[TrainItem]:
    """Cut ``cached`` (in seq order) into ``TrainItem``s of ``batch_size`` rows, starting at
    ``start``. Batches with ``seq < start.seq`` are skipped; batch ``start.seq`` is read from
    row ``start.row``. A mapping-version change ends the pending batch early, and so does each
    cursor of ``cuts`` (recorded cuts, in order). When ``cached`` is exhausted the pending
    partial batch is yielded if ``flush_at_end()`` is true (a bounded stream's tail) and
    dropped otherwise (a stopped follow stream; the rows stay unread).

    Timed cuts: ``timer.since`` is set when the first row of a batch is added; a
    ``WAIT_EXPIRED`` from ``cached`` cuts the pending rows, after ``record_cut(cursor)``.

    Each cached batch is fully copied out before the next one is requested, so the source
    may hand out zero-copy batches that die when it advances."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    builder = BatchBuilder(layout, batch_size, pin_memory=pin_memory)
    cursor = start
    skipped = 0
    pending_cuts = collections.deque(sorted(c for c in cuts if c > start))

    def emit() -> TrainItem:
        nonlocal builder, skipped
        item = TrainItem(builder.finish(), cursor, builder.first_seq, builder.last_seq, skipped,
                         builder.event_times_ms())
        builder = BatchBuilder(layout, batch_size, pin_memory=pin_memory)
        skipped = 0
        if timer is not None:
            timer.since = None
        return item

    def cut_here() -> bool:
        """Whether a recorded cut ends the pending batch at ``cursor`` (drops passed cuts)."""
        while pending_cuts and pending_cuts[0] < cursor:
            pending_cuts.popleft()
        if pending_cuts and pending_cuts[0] == cursor:
            pending_cuts.popleft()
            return builder.rows > 0
        return False

    last_seq: int | None = None
    for cb in cached:
        if cb is WAIT_EXPIRED:
            if builder.rows:
                if record_cut is not None:
                    record_cut(cursor)
                yield emit()
            continue
        seq = int(cb.seq)
        if last_seq is not None and seq <= last_seq:
            raise TrainerError(f"cached batches out of order: seq {seq} after {last_seq}")
        last_seq = seq
        if seq < start.seq:
            continue
        skipped += int(getattr(cb, "skipped_batches", 0))
        row = start.row if seq == start.seq else 0
        num_rows = cb.batch.num_rows
        if row > num_rows:
            raise TrainerError(
                f"cursor row {row} is past the end of cached batch seq {seq} ({num_rows} rows); "
                "the checkpoint belongs to a different cache"
            )
        if builder.rows and row < num_rows and int(cb.mapping_version) != builder.mapping_version:
            yield emit()
        while row < num_rows:
            take = min(batch_size - builder.rows, num_rows - row)
            while pending_cuts and pending_cuts[0] <= Cursor(seq, row):
                pending_cuts.popleft()
            if pending_cuts and pending_cuts[0].seq == seq:
                take = min(take, pending_cuts[0].row - row)
            if timer is not None and builder.rows == 0:
                timer.since = timer.clock()
            builder.add(cb, row, row + take)
            row += take
            cursor = Cursor(seq, row)
            if builder.rows == batch_size or cut_here():
                yield emit()
        # With nothing pending the cursor moves past this batch silently; the next item
        # reports it.
        cursor = Cursor(seq, num_rows)
        if cut_here():
            yield emit()
    if builder.rows and flush_at_end():
        yield emit()


#: ``open_batches(start_seq, stop) -> iterator of cached batches from start_seq on``; must
#: return (end the iterator) soon after ``stop()`` turns true when it waits for new batches.
OpenBatches = Callable[[int, Callable[[], bool]], Iterable[CachedBatchLike]]


@dataclasses.dataclass(frozen=True)
class _Failure:
    exc: Exception


class _CursorNode(BaseNode[TrainItem]):
    """A ``torchdata.nodes`` source node; its state is the cursor after the last item."""

    def __init__(self, open_batches: OpenBatches, layout: BatchLayout, batch_size: int,
                 start: Cursor, pin_memory: bool, stop: Callable[[], bool],
                 timed_cuts: TimedCuts | None = None):
        super().__init__()
        self._open = open_batches
        self._layout = layout
        self._batch_size = batch_size
        self._start = start
        self._pin = pin_memory
        self._stop = stop
        self._timed = timed_cuts
        self._it: Iterator[TrainItem] | None = None
        self._cursor = start

    def reset(self, initial_state: dict | None = None):
        super().reset(initial_state)
        self._cursor = Cursor.from_dict(initial_state) if initial_state else self._start
        def flush() -> bool:
            return not self._stop()

        if self._timed is None:
            source = self._open(self._cursor.seq, self._stop)
            self._it = rebatch(source, self._layout, self._batch_size, start=self._cursor,
                               pin_memory=self._pin, flush_at_end=flush)
            return
        timer = _WaitTimer(self._timed.max_wait_ms, self._timed.clock)
        cuts = [Cursor(seq, row) for seq, row in self._timed.log.train_cuts(self._cursor.seq)]
        self._it = rebatch(self._timed_source(self._cursor.seq, timer), self._layout, self._batch_size,
                           start=self._cursor, pin_memory=self._pin, flush_at_end=flush, cuts=cuts,
                           timer=timer, record_cut=lambda c: self._timed.log.record_train_cut(c.seq, c.row))

    def _timed_source(self, start_seq: int, timer: _WaitTimer) -> Iterator[Any]:
        """The cached batches from ``start_seq``, with ``WAIT_EXPIRED`` whenever the pending
        rows' wait ends first (the source is closed then and reopened after the cut)."""
        seq = start_seq
        while True:
            for cb in self._open(seq, lambda: self._stop() or timer.expired()):
                seq = int(cb.seq) + 1
                yield cb
            if self._stop() or not timer.expired():
                return  # stopped, or a bounded source ended
            yield WAIT_EXPIRED

    def next(self) -> "TrainItem | _Failure":
        try:
            item = next(self._it)  # StopIteration ends the stream
        except StopIteration:
            raise
        except Exception as exc:  # noqa: BLE001 - carried to the consumer, re-raised there
            # Hand the original exception object across the prefetch thread; torch's
            # ExceptionWrapper would rebuild it from a traceback string and lose its fields.
            return _Failure(exc)
        self._cursor = item.cursor
        return item

    def get_state(self) -> dict[str, Any]:
        return self._cursor.to_dict()


class TrainingStream:
    """Iterate ``TrainItem``s from ``start``, converted ``prefetch_batches`` ahead on a
    background thread (synchronously when 0). ``timed_cuts``: see ``TimedCuts`` (None: cut
    full batches only).

    ``state_dict()`` is the cursor after the last item handed out (not after the prefetched
    ones), so it can be checkpointed at any point between items. ``close()`` stops the
    background thread: it sets the stop flag the source polls, so a follow-mode wait ends
    within the source's poll interval. Iterate once; build a new stream to resume.
    """

    def __init__(self, open_batches: OpenBatches, layout: BatchLayout, batch_size: int, *,
                 start: Cursor = Cursor(), prefetch_batches: int = 4, pin_memory: bool = False,
                 stop: Callable[[], bool] | None = None, timed_cuts: TimedCuts | None = None):
        if prefetch_batches < 0:
            raise ValueError(f"prefetch_batches must be >= 0, got {prefetch_batches}")
        self._closed = threading.Event()
        user_stop = stop or (lambda: False)
        self._stop = lambda: self._closed.is_set() or user_stop()
        self._timed = timed_cuts
        self._node = _CursorNode(open_batches, layout, batch_size, start, pin_memory, self._stop, timed_cuts)
        root: BaseNode[TrainItem] = self._node
        if prefetch_batches:
            root = Prefetcher(root, prefetch_factor=prefetch_batches)
        self._root = root
        self._loader = Loader(root, restart_on_stop_iteration=False)
        self._cursor = start
        self._started = False

    def __iter__(self) -> Iterator[TrainItem]:
        if self._started:
            raise RuntimeError("a TrainingStream is iterated once; build a new one to resume")
        self._started = True
        try:
            for item in self._loader:
                if isinstance(item, _Failure):
                    raise item.exc
                self._cursor = item.cursor
                yield item
        finally:
            self.close()

    def state_dict(self) -> dict[str, int]:
        return self._cursor.to_dict()

    @property
    def cursor(self) -> Cursor:
        return self._cursor

    @property
    def look_ahead_ok(self) -> bool:
        """False while batches are cut on a timer: a consumer that reads one item ahead
        before training the current one would hold a cut batch until the next is cut."""
        return self._timed is None or self._timed.max_wait_ms <= 0

    def close(self) -> None:
        """Stop the background reader (idempotent)."""
        self._closed.set()
        it = getattr(self._root, "_it", None)
        if isinstance(self._root, Prefetcher) and it is not None:
            it._shutdown()
