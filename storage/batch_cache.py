"""The LMDB batch cache: Arrow batches, their source offsets, dead letters and counters,
committed together so that a crash at any instant leaves every event stored exactly once.

One directory holds one LMDB environment with these sub-databases:

=============  =========================================  ==================================
name           key                                        value
=============  =========================================  ==================================
batches        ``>Q seq`` (cursor order = write order)    Arrow IPC stream bytes
batch_meta     ``>Q seq``                                 ``cache_keys.BatchMeta``
offsets        topic, partition                           ``>Q`` next offset to read
dead_letters   topic, partition, ``>Q`` offset            ``dead_letters`` layout
counters       ``cache_keys.Counter`` / ``dead:<reason>``  ``>q``
readers        reader name                                ``>Q`` seq it consumed up to
state          ``cache_keys.StateKey``                    retention budget and outcome
dead_letter_   ``>Q n`` (write order)                     dead-letter key (retention index)
order
train_cuts     ``>Q seq >Q row``                          empty: a recorded training-batch cut
=============  =========================================  ==================================

``dead_letter_order`` and ``train_cuts`` are newer than the rest: a read-only open of a cache
no writer of this version opened yet reads them as empty.

Disk space (``storage.disk_space``): a batch write that would leave less than the reserve
(``[cache] disk_reserve_bytes``) free on the cache's file system raises ``DiskReserveError``
and writes nothing; one that fails because the file system is full raises ``DiskFullError``.
Either way the batch and its offsets are not stored, so exactly-once holds.

Processes: one writer process (the pipeline) and any number of reader processes (the
trainer, ``cache stat``). Readers never block the writer or each other (LMDB MVCC). A
reader that registers a cursor (``set_reader_position``) opens the cache writable but
does not call ``write``; its tiny cursor commits serialise with the writer's.

Durability: see ``storage.lmdb_env.Durability``; by default a ``write`` that returned
survives SIGKILL of any process and a machine crash.

Example:
    >>> import tempfile, numpy as np, pyarrow as pa
    >>> from transforms.elements import ProcessedBatch
    >>> rows = pa.record_batch({"_offset": pa.array([0, 1], pa.int64())})
    >>> pb = ProcessedBatch("t", 0, 0, 2, 0, rows, (), np.empty(0, np.int64), read=2)
    >>> with BatchCache(tempfile.mkdtemp()) as cache:
    ...     cache.write(pb), cache.write(pb), cache.next_offsets(), cache.read(0).num_rows
    (<WriteStatus.WRITTEN: 'written'>, <WriteStatus.DUPLICATE: 'duplicate'>, {'t': {0: 2}}, 2)
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import lmdb

from storage import cache_stats
from storage.admission import WriteStatus, admit, check, classify, encode_batch
from storage.cache_keys import (
    BatchMeta,
    Counter,
    StateKey,
    SubDb,
    add_i64,
    cut_key,
    dead_reason_key,
    decode_u64,
    encode_i64,
    encode_u64,
    get_i64,
    parse_cut_key,
    parse_partition_key,
    partition_key,
    seq_key,
    validate_partition,
    validate_topic,
)
from storage.cache_reader import CachedBatch, CacheReader, follow_batches
from storage.dead_letters import (
    DeadLetterDbs,
    expire_dead_letters,
    index_stored_dead_letters,
    iter_dead_letters,
    store_dead_letters,
)
from storage.disk_space import check_free, disk_full_error, disk_usage, effective_reserve_bytes
from storage.errors import CacheError, StorageError
from storage.lmdb_env import MAX_DBS, MAX_READERS, Durability, EnvHandle, acquire, release
from storage.retention import RetentionPlan, apply_retention
from transforms.elements import DeadLetter, ProcessedBatch, Reason

__all__ = ["BatchCache", "CachedBatch", "CacheReader", "WriteStatus", "Durability", "WriteHook", "SubDb"]

_log = logging.getLogger(__name__)

#: ``fn(txn, pb, seq)``: runs inside the write transaction of every write that stores
#: rows (``pb`` is the trimmed batch actually stored, ``seq`` its seq). It may read and
#: write sub-databases from ``BatchCache.open_db`` through ``txn``; if it raises, nothing
#: of the write is committed. It may run more than once for one write (the transaction is
#: retried after growing a full map), so it must not have effects outside ``txn``.
WriteHook = Callable[[Any, ProcessedBatch, int], None]

_MAX_GROW_ATTEMPTS = 16
#: A failed commit with less than this much more than the write needed free on the cache's
#: file system is reported as disk full (LMDB says "Input/output error" after a short write).
_DISK_FULL_SLACK_BYTES = 64 << 20
_DEAD_ORDER_DB = "dead_letter_order"
_TRAIN_CUTS_DB = "train_cuts"


def _write_estimate_bytes(pb: ProcessedBatch) -> int:
    """About what one write adds to the file: the batch, its dead letters, and LMDB's
    copy-on-write pages (branch pages, counters, offsets), doubled to be safe."""
    dead = sum(len(dl.raw) + len(dl.detail) + 64 for dl in pb.dead_letters)
    return 2 * (pb.batch.nbytes + dead) + (64 << 10)


class BatchCache:
    """Batches + offsets + dead letters + counters in one LMDB environment (a directory).

    ``map_size_bytes`` is virtual address space, not disk: the file grows as data is
    written, and the map grows by itself when full. ``max_bytes > 0`` bounds stored batch
    bytes (see ``storage.retention``). ``readonly=True`` opens for reading only (no
    cursor registration); the directory must exist.

    Thread-safe: any thread may call any method; writes from one process are serialised.
    """

    #: Seconds a map resize waits for this process's open read transactions to end.
    RESIZE_WAIT_S = 60.0
    #: Grow the map ahead of time when the used part exceeds this fraction of it.
    GROW_AT_FILL = 0.75

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        map_size_bytes: int = 1 << 36,
        max_bytes: int = 0,
        readonly: bool = False,
        durability: Durability = Durability.FULL,
        disk_reserve_bytes: int | None = None,
        dead_letter_max_bytes: int = 256 << 20,
    ):
        if map_size_bytes < 1 << 16:
            raise CacheError(f"map_size_bytes must be >= 65536, got {map_size_bytes}")
        if max_bytes < 0:
            raise CacheError(f"max_bytes must be >= 0 (0 = keep everything), got {max_bytes}")
        if disk_reserve_bytes is not None and disk_reserve_bytes < 0:
            raise CacheError(f"disk_reserve_bytes must be >= 0 or None, got {disk_reserve_bytes}")
        if dead_letter_max_bytes < 0:
            raise CacheError(f"dead_letter_max_bytes must be >= 0 (0 = keep all), got {dead_letter_max_bytes}")
        self._path = os.fspath(path)
        self._readonly = readonly
        self._max_bytes = max_bytes
        self._disk_reserve_bytes = disk_reserve_bytes
        self._dead_letter_max_bytes = dead_letter_max_bytes
        self._hooks: list[WriteHook] = []
        self._warned_blocked = False
        self._handle: EnvHandle | None = acquire(
            self._path, map_size_bytes=map_size_bytes, readonly=readonly, durability=durability
        )
        try:
            self._db = dict(zip(SubDb, self._open_named(*(sub.value for sub in SubDb))))
            self._dead_order = self._open_optional(_DEAD_ORDER_DB)
            self._cuts = self._open_optional(_TRAIN_CUTS_DB)
            if not readonly:
                self._index_legacy_dead_letters()
        except BaseException:
            release(self._handle)
            self._handle = None
            raise

    @classmethod
    def from_config(cls, cache_cfg, readonly: bool = False) -> "BatchCache":
        """Open the cache described by a ``storage.config.CacheConfig``."""
        return cls(
            cache_cfg.path, map_size_bytes=cache_cfg.map_size_bytes, max_bytes=cache_cfg.max_bytes, readonly=readonly,
            durability=Durability(cache_cfg.durability.value), disk_reserve_bytes=cache_cfg.disk_reserve_bytes,
            dead_letter_max_bytes=cache_cfg.dead_letter_max_bytes,
        )

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Release the environment (idempotent). Zero-copy batches die with it."""
        handle, self._handle = self._handle, None
        if handle is not None:
            release(handle)

    def __enter__(self) -> "BatchCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def path(self) -> str:
        return self._path

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def env(self) -> lmdb.Environment:
        return self._live().env

    @property
    def map_size_bytes(self) -> int:
        return self._live().map_size_bytes

    def _live(self) -> EnvHandle:
        if self._handle is None:
            raise CacheError(f"cache {self._path} is closed")
        return self._handle

    def _require_writable(self, what: str) -> None:
        if self._readonly:
            raise CacheError(f"cache {self._path} is open read-only; {what} needs BatchCache(..., readonly=False)")

    def _open_named(self, *names: str) -> list[Any]:
        """Handles of sub-databases ``names``, created (in one transaction) if missing on
        a writable environment. Handles are shared by every cache on the environment."""
        handle = self._live()
        with handle.dbs_lock:
            missing = [n for n in names if n not in handle.dbs]
            try:
                if missing and handle.readonly:
                    # py-lmdb keeps a handle opened in its own internal read txn; one opened in
                    # a caller's read txn is closed when that txn ends.
                    with handle.gate.shared():
                        for n in missing:
                            handle.dbs[n] = handle.env.open_db(n.encode(), create=False)
                elif missing:
                    with handle.gate.shared(), handle.write_lock, handle.env.begin(write=True) as txn:
                        opened = {n: handle.env.open_db(n.encode(), txn=txn, create=True) for n in missing}
                    handle.dbs.update(opened)
            except lmdb.NotFoundError:
                raise CacheError(
                    f"cache {self._path} lacks sub-database(s) {missing}; it is not initialised yet (open it "
                    "writable once) or they belong to a feature that never wrote",
                    retriable=True,
                ) from None
            except lmdb.DbsFullError:
                raise CacheError(
                    f"cache {self._path}: too many sub-databases (max {MAX_DBS}); open fewer with open_db"
                ) from None
            return [handle.dbs[n] for n in names]

    def _open_optional(self, name: str):
        """A sub-database newer than the cache format's first version: created on a writable
        open; None on a read-only open of a cache that lacks it (read as empty)."""
        try:
            return self._open_named(name)[0]
        except CacheError:
            if self._readonly:
                return None
            raise

    def _dead_dbs(self) -> DeadLetterDbs:
        return DeadLetterDbs(self._db[SubDb.DEAD_LETTERS], self._dead_order, self._db[SubDb.COUNTERS])

    def _index_legacy_dead_letters(self) -> None:
        def body(txn) -> None:
            state = self._db[SubDb.STATE]
            if txn.get(StateKey.DEAD_ORDER_INDEXED.key, db=state) is None:
                n = index_stored_dead_letters(txn, self._dead_dbs())
                if n:
                    _log.info("cache %s: indexed %d dead letters stored by an earlier version for retention",
                              self._path, n)
                txn.put(StateKey.DEAD_ORDER_INDEXED.key, b"1", db=state)

        with self._txn() as txn:
            done = txn.get(StateKey.DEAD_ORDER_INDEXED.key, db=self._db[SubDb.STATE]) is not None
        if not done:
            self._write_txn(body)

    def open_db(self, name: str):
        """A named sub-database for cache extensions (e.g. id statistics kept by a write
        hook), created if missing on a writable cache. Call it before writing, never from
        inside a hook (it needs its own write transaction)."""
        if not name or name in {s.value for s in SubDb} or name in (_DEAD_ORDER_DB, _TRAIN_CUTS_DB):
            raise CacheError(f"sub-database name {name!r} is empty or reserved by the batch cache; pick another")
        return self._open_named(name)[0]

    def add_write_hook(self, fn: WriteHook) -> None:
        """Run ``fn`` inside every write that stores rows (see ``WriteHook``)."""
        self._require_writable("add_write_hook")
        self._hooks.append(fn)

    # --------------------------------------------------------------- transactions

    @contextlib.contextmanager
    def _txn(self, *, write: bool = False) -> Iterator[Any]:
        """A transaction under this process's gate; commits a write transaction when the
        block succeeds, aborts otherwise. Adopts a map grown by another process. LMDB
        errors become CacheError, except MapFullError (``_write_txn`` grows the map)."""
        handle = self._live()
        while True:
            with handle.gate.shared(), (handle.write_lock if write else contextlib.nullcontext()):
                try:
                    txn = handle.env.begin(write=write, buffers=not write)
                except lmdb.MapResizedError:
                    txn = None
                except lmdb.Error as exc:
                    raise self._cache_error(exc) from exc
                if txn is not None:
                    committed = False
                    try:
                        yield txn
                        if write:
                            txn.commit()
                            committed = True
                    except lmdb.MapFullError:
                        raise
                    except lmdb.Error as exc:
                        raise self._cache_error(exc) from exc
                    finally:
                        if not committed:
                            txn.abort()
                    return
            handle.adopt_map_size(self.RESIZE_WAIT_S)

    def _cache_error(self, exc: lmdb.Error) -> CacheError:
        if isinstance(exc, lmdb.ReadersFullError):
            return CacheError(
                f"cache {self._path}: all {MAX_READERS} LMDB reader slots are taken; close idle readers or "
                "reader() blocks (a crashed process's slots are freed when a writer opens the cache)",
                retriable=True,
            )
        # ENOSPC and friends may clear up; corruption does not.
        retriable = isinstance(exc, (lmdb.DiskError, lmdb.MemoryError))
        return CacheError(f"cache {self._path}: LMDB error: {exc}", retriable=retriable)

    def _write_txn(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(txn)`` in a write transaction, growing the map and retrying (from
        scratch) when it is full."""
        handle = self._live()
        for _ in range(_MAX_GROW_ATTEMPTS):
            try:
                with self._txn(write=True) as txn:
                    result = fn(txn)
            except lmdb.MapFullError:
                new_size = handle.map_size_bytes * 2
                _log.info("cache %s: LMDB map full, growing it to %d bytes", self._path, new_size)
                handle.grow(new_size, self.RESIZE_WAIT_S)
                continue
            if handle.used_bytes() > self.GROW_AT_FILL * handle.map_size_bytes:
                handle.try_grow(handle.map_size_bytes * 2)
            return result
        raise CacheError(f"cache {self._path}: the write does not fit even after growing the map to "
                         f"{handle.map_size_bytes} bytes")

    # ---------------------------------------------------------------------- write

    def write(self, pb: ProcessedBatch) -> WriteStatus:
        """Store ``pb`` per ``storage.admission``'s rule, in ONE write transaction with its
        dead letters, counters and the partition's next offset (``pb.end_offset``).

        Blocks while another process commits. Idempotent: re-writing a stored range is a
        DUPLICATE and changes nothing. A batch whose kept rows are all trimmed or filtered
        stores no batch (no seq) but still advances the offset and the counters. Raises
        CacheError for a batch that breaks its own accounting, ``DiskReserveError`` when the
        write would dip into the disk reserve and ``DiskFullError`` when the file system is
        full (nothing is written in any of these cases).
        """
        self._require_writable("write")
        checked = check(pb)
        d = self._db
        needed = _write_estimate_bytes(pb)

        def body(txn) -> tuple[WriteStatus, RetentionPlan | None]:
            pkey = partition_key(pb.topic, pb.partition)
            raw = txn.get(pkey, db=d[SubDb.OFFSETS])
            stored_next = None if raw is None else decode_u64(raw)
            status = classify(pb, stored_next)
            if status is not WriteStatus.WRITTEN:
                return status, None
            check_free(self._path, what=f"cache write ({pb.topic}[{pb.partition}] offsets "
                       f"{pb.start_offset}..{pb.end_offset})", needed_bytes=needed,
                       configured_reserve=self._disk_reserve_bytes)
            adm = admit(checked, stored_next)
            kept = adm.pb
            counters = d[SubDb.COUNTERS]
            if kept.batch.num_rows:
                data = encode_batch(kept.batch)
                seq = get_i64(txn, counters, Counter.NEXT_SEQ.key)
                key = seq_key(seq)
                txn.put(key, data, db=d[SubDb.BATCHES], append=True)
                meta = BatchMeta(
                    topic=pb.topic, partition=pb.partition, start_offset=adm.start_offset,
                    end_offset=pb.end_offset, rows=kept.batch.num_rows, nbytes=len(data),
                    mapping_version=pb.mapping_version,
                    event_time_min_ms=adm.event_time_min_ms, event_time_max_ms=adm.event_time_max_ms,
                )
                txn.put(key, meta.encode(), db=d[SubDb.META], append=True)
                add_i64(txn, counters, Counter.NEXT_SEQ.key, 1)
                add_i64(txn, counters, Counter.STORED_BATCHES.key, 1)
                add_i64(txn, counters, Counter.STORED_ROWS.key, kept.batch.num_rows)
                add_i64(txn, counters, Counter.STORED_BYTES.key, len(data))
                add_i64(txn, counters, Counter.WRITTEN_BYTES.key, len(data))
                add_i64(txn, counters, Counter.CACHED_ROWS.key, kept.batch.num_rows)
                for hook in self._hooks:
                    hook(txn, kept, seq)
            by_reason: dict[str, int] = {}
            store_dead_letters(txn, self._dead_dbs(), kept.dead_letters)
            for dl in kept.dead_letters:
                by_reason[dl.reason.value] = by_reason.get(dl.reason.value, 0) + 1
            for reason, n in by_reason.items():
                add_i64(txn, counters, dead_reason_key(reason), n)
            add_i64(txn, counters, Counter.DEAD_LETTERS.key, len(kept.dead_letters))
            add_i64(txn, counters, Counter.FILTERED.key, int(kept.filtered_offsets.size))
            add_i64(txn, counters, Counter.READ.key, adm.read)
            txn.put(pkey, encode_u64(pb.end_offset), db=d[SubDb.OFFSETS])
            state = d[SubDb.STATE]
            for key, value in ((StateKey.MAX_BYTES, self._max_bytes),
                               (StateKey.DEAD_LETTER_MAX_BYTES, self._dead_letter_max_bytes)):
                if txn.get(key.key, db=state) != encode_i64(value):
                    txn.put(key.key, encode_i64(value), db=state)
            expire_dead_letters(txn, self._dead_dbs(), self._dead_letter_max_bytes)
            return status, apply_retention(txn, self._db, self._cuts, self._max_bytes)

        try:
            status, plan = self._write_txn(body)
        except CacheError as exc:
            raise self._disk_full_or(exc, needed) from exc.__cause__
        if plan is not None:
            self._note_retention(plan)
        return status

    def _disk_full_or(self, exc: CacheError, needed_bytes: int) -> StorageError:
        """``exc``, or a ``DiskFullError`` when an LMDB failure came with a full file system
        (LMDB reports a short write as an I/O error, not as ENOSPC)."""
        if not isinstance(exc.__cause__, lmdb.Error) or isinstance(exc.__cause__, lmdb.ReadersFullError):
            return exc
        usage = disk_usage(self._path)
        if usage.free_bytes >= 2 * needed_bytes + _DISK_FULL_SLACK_BYTES:
            return exc
        err = disk_full_error(self._path, what=f"cache write ({exc.__cause__})", needed_bytes=needed_bytes,
                              usage=usage)
        err.__cause__ = exc.__cause__
        return err

    def disk(self) -> dict[str, Any]:
        """The cache's file system now: ``free_bytes``, ``total_bytes``, the ``reserve_bytes``
        in force and whether ingest is ``paused`` by it (free below the reserve)."""
        usage = disk_usage(self._path)
        reserve = effective_reserve_bytes(self._disk_reserve_bytes, total_bytes=usage.total_bytes)
        return {"free_bytes": usage.free_bytes, "total_bytes": usage.total_bytes, "reserve_bytes": reserve,
                "paused": usage.free_bytes < reserve}

    # ------------------------------------------------------------------ retention

    def _note_retention(self, plan: RetentionPlan) -> None:
        if plan.blocked_by_reader and not self._warned_blocked:
            _log.warning(
                "cache %s: %d bytes over the retention budget because reader %r has not consumed the oldest "
                "batches; they are kept. Advance or remove_reader(%r) if that reader is gone.",
                self._path, plan.over_budget_bytes, plan.blocked_by_reader, plan.blocked_by_reader,
            )
        self._warned_blocked = bool(plan.blocked_by_reader)

    def set_reader_position(self, name: str, seq: int) -> None:
        """Record that reader ``name`` consumed every batch below ``seq`` (so retention
        may delete them), and apply retention with the writer's budget. Durable like a
        write; idempotent. Moving a cursor backwards is allowed (batches already deleted
        stay deleted)."""
        self._require_writable("set_reader_position")
        if not isinstance(name, str) or not name:
            raise CacheError(f"reader name must be a non-empty str, got {name!r}")
        if not isinstance(seq, int) or seq < 0:
            raise CacheError(f"reader {name!r}: seq must be an int >= 0, got {seq!r}")
        d = self._db

        def body(txn) -> RetentionPlan:
            txn.put(name.encode(), encode_u64(seq), db=d[SubDb.READERS])
            return apply_retention(txn, d, self._cuts, get_i64(txn, d[SubDb.STATE], StateKey.MAX_BYTES.key))

        self._note_retention(self._write_txn(body))

    def remove_reader(self, name: str) -> bool:
        """Forget reader ``name`` (it no longer holds batches back). True if it existed."""
        self._require_writable("remove_reader")
        return bool(self._write_txn(lambda txn: txn.delete(name.encode(), db=self._db[SubDb.READERS])))

    def reader_positions(self) -> dict[str, int]:
        with self._txn() as txn:
            return {bytes(k).decode(): decode_u64(v) for k, v in txn.cursor(db=self._db[SubDb.READERS])}

    # ------------------------------------------------------------ training cuts

    def record_train_cut(self, seq: int, row: int) -> None:
        """Record, durably, that a training batch ends at cursor ``(seq, row)`` although it
        is not full (``[trainer] max_batch_wait_ms``), so every later reading of the cache
        cuts there too. Idempotent. Retention deletes the cuts of the batches it deletes."""
        self._require_writable("record_train_cut")
        if not (isinstance(seq, int) and isinstance(row, int) and seq >= 0 and row >= 0):
            raise CacheError(f"a training cut needs int seq, row >= 0, got {seq!r}, {row!r}")
        self._write_txn(lambda txn: txn.put(cut_key(seq, row), b"", db=self._cuts))

    def train_cuts(self, start_seq: int = 0) -> list[tuple[int, int]]:
        """Recorded training cuts ``(seq, row)`` with ``seq >= start_seq``, in order."""
        if self._cuts is None:
            return []
        with self._txn() as txn:
            cur = txn.cursor(db=self._cuts)
            if not cur.set_range(cut_key(start_seq, 0)):
                return []
            return [parse_cut_key(k) for k in cur.iternext(keys=True, values=False)]

    # -------------------------------------------------------------------- offsets

    def next_offsets(self) -> dict[str, dict[int, int]]:
        """topic -> partition -> next offset to read (where a source resumes)."""
        out: dict[str, dict[int, int]] = {}
        with self._txn() as txn:
            for key, raw in txn.cursor(db=self._db[SubDb.OFFSETS]):
                topic, partition = parse_partition_key(key)
                out.setdefault(topic, {})[partition] = decode_u64(raw)
        return out

    def next_offset(self, topic: str, partition: int) -> int | None:
        validate_topic(topic)
        validate_partition(partition)
        with self._txn() as txn:
            raw = txn.get(partition_key(topic, partition), db=self._db[SubDb.OFFSETS])
            return None if raw is None else decode_u64(raw)

    # ---------------------------------------------------------------------- reads

    @contextlib.contextmanager
    def reader(self) -> Iterator[CacheReader]:
        """One read transaction: zero-copy batches valid only inside the block (see
        ``storage.cache_reader``). Keep it short."""
        with self._txn() as txn:
            yield CacheReader(txn, self._db[SubDb.BATCHES], self._db[SubDb.META])

    def first_seq(self) -> int | None:
        with self.reader() as r:
            return r.first_seq()

    def last_seq(self) -> int | None:
        with self.reader() as r:
            return r.last_seq()

    def oldest_mapping_version(self) -> int | None:
        """The mapping version of the oldest stored batch (None when none is stored): the
        oldest id mapping a reader of this cache can still meet."""
        with self._txn() as txn:
            cur = txn.cursor(db=self._db[SubDb.META])
            return BatchMeta.decode(cur.value()).mapping_version if cur.first() else None

    def read(self, seq: int) -> CachedBatch:
        """Batch ``seq`` (copied: the caller may keep it), or the next stored one if
        retention deleted it (``skipped_batches`` > 0). Raises a retriable CacheError if
        nothing at or after ``seq`` is stored yet."""
        with self.reader() as r:
            cb = r.read_at_or_after(seq, copy=True)
            if cb is None:
                raise CacheError(f"cache {self._path}: no batch at or after seq {seq} yet (last seq {r.last_seq()})",
                                 retriable=True)
            return cb

    def iter_batches(
        self,
        start_seq: int = 0,
        *,
        follow: bool = False,
        stop: Callable[[], bool] | None = None,
        poll_interval_s: float = 0.05,
        max_wait_s: float | None = None,
        zero_copy: bool = False,
    ) -> Iterator[CachedBatch]:
        """Batches with seq >= ``start_seq`` in seq order, each read in its own short
        transaction (so the iterator never pins old pages or blocks map growth between
        batches).

        - ``follow=False``: ends at the last batch stored when it gets there.
        - ``follow=True``: then waits for new batches: sleeps (1 ms doubling up to
          ``poll_interval_s``) between cheap ``last_seq`` checks, never spins. Ends when
          ``stop()`` returns True (checked before each batch and each sleep) or, if
          ``max_wait_s`` is set, when no batch arrived for that long.
        - ``zero_copy=False`` (default): every batch owns its memory; keep it as long as
          you like. ``zero_copy=True``: each batch is valid only until the iterator
          advances (or is closed); its transaction stays open while you hold it.

        A batch with ``skipped_batches > 0`` follows batches that retention deleted
        before this iterator reached them.
        """
        return follow_batches(self.reader, start_seq, follow, stop, poll_interval_s, max_wait_s, zero_copy)

    # ---------------------------------------------------------------- accounting

    def counts(self) -> dict[str, int]:
        """Totals over the cache's life: read == cached_rows + filtered + dead_letters."""
        with self._txn() as txn:
            return cache_stats.counts(txn, self._db)

    def sizes(self) -> dict[str, int]:
        """What the cache holds now and has written, from counters (constant time, unlike
        ``stat``): ``batches``, ``rows``, ``bytes`` (stored now), ``written_bytes`` and
        ``written_batches`` (ever), ``dead_letters_expired``."""
        with self._txn() as txn:
            return cache_stats.sizes(txn, self._db)

    def dead_letters(self, *, reason: Reason | str | None = None, limit: int | None = None) -> Iterator[DeadLetter]:
        """Stored dead letters in (topic, partition, offset) order, optionally of one
        reason code, at most ``limit``. Reads in chunks of short transactions, so a
        concurrent writer's new dead letters may or may not appear."""
        return iter_dead_letters(self._txn, self._db[SubDb.DEAD_LETTERS], reason=reason, limit=limit)

    def stat(self) -> dict[str, Any]:
        """A JSON-ready summary (string keys throughout; partitions as strings): see
        ``storage.cache_stats.summary``, plus ``path``, ``map_size_bytes`` and ``disk``."""
        with self._txn() as txn:
            out = cache_stats.summary(txn, self._db, self._cuts)
        return {"path": self._path, **out, "map_size_bytes": self._live().map_size_bytes, "disk": self.disk()}
