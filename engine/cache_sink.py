"""The last step of the graph: write ProcessedBatches into the LMDB cache, exactly once.

``BatchCache.write`` is atomic per batch (rows, dead letters, counters and the partition's
next offset in one transaction) and idempotent (a replayed range is a DUPLICATE). What this
step adds is ordering: a runner may deliver a partition's batches out of order, and the
cache only accepts the batch that continues the stored offset (GAP otherwise). Such a batch
is held here until its predecessor has been written. Holding is safe across crashes: a held
batch's offsets were never stored, so after a restart the source reads it again. Holding in
the DoFn is correct only where one instance sees every batch of a partition: the in-process
Direct runner (``serve``, and ``backfill`` on it). A bounded run on any other runner stages
batches on the workers and imports them here, in the driver (``engine.staged_sink``).

Disk reserve: when a write would dip into ``[cache] disk_reserve_bytes`` (the cache raises
``DiskReserveError`` and stores nothing), a streaming writer (``serve``: it has a stop
file) holds the batch and retries every ``RESERVE_POLL_S`` until space is back; the
pipeline stalls behind it (nothing more is read from Kafka) while the trainer goes on. A
stop requested meanwhile drops the held and later batches unwritten: their offsets were
never stored, so the next run reads them again. A bounded run (``backfill``, no stop file)
fails at once with the error (exit code 8).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

import apache_beam as beam

from engine.config import HeadraceConfig
from engine.errors import CacheError, DiskReserveError
from engine.metrics import IngestMetrics, SnapshotWriter
from engine.processes import StopFile
from storage.batch_cache import BatchCache, WriteStatus
from storage.id_stats import IdStatsStore
from transforms.elements import ProcessedBatch

__all__ = ["WriteToCache", "CacheSession", "OrderedCacheWriter", "WriteBehind", "IngestAbandoned", "RESERVE_POLL_S"]

log = logging.getLogger(__name__)

#: Seconds between retries of a write held at the disk reserve.
RESERVE_POLL_S = 1.0


class IngestAbandoned(Exception):
    """A write held at the disk reserve was given up because a stop was requested; it and
    every later batch stay unwritten (re-read from the source on the next run)."""


class OrderedCacheWriter:
    """Writes batches to a cache in per-partition offset order (pure bookkeeping + I/O).

    ``max_held`` bounds memory: holding more batches than that for one partition means a
    predecessor is lost, which is a bug upstream; we fail loudly rather than grow forever.
    ``on_written(pb, stored_next, write_s)`` is called for every batch the cache stored, with
    the partition's next offset before the write (None: a new partition) and the commit time
    (``engine.metrics.IngestMetrics.record``).
    """

    def __init__(self, cache: BatchCache, max_held: int = 1024, *, stop: Callable[[], bool] | None = None,
                 reserve_poll_s: float = RESERVE_POLL_S,
                 on_written: Callable[[ProcessedBatch, int | None, float], None] | None = None):
        self.cache = cache
        self.on_written = on_written
        self._stored_next: dict[tuple[str, int], int | None] = {}
        self.max_held = max_held
        self.stop = stop
        self.reserve_poll_s = reserve_poll_s
        self._held: dict[tuple[str, int], dict[int, ProcessedBatch]] = {}
        self.written = 0
        self.duplicates = 0
        self.paused = False

    def _cache_write(self, pb: ProcessedBatch) -> WriteStatus:
        """``cache.write``, waiting at the disk reserve while ``stop`` is given and false."""
        while True:
            try:
                status = self._write_once(pb)
            except DiskReserveError as exc:
                if self.stop is None:
                    raise
                if not self.paused:
                    self.paused = True
                    log.warning("ingest paused: %s Retrying every %.0f s; the trainer goes on with what is cached.",
                                exc, self.reserve_poll_s)
                deadline = time.monotonic() + self.reserve_poll_s
                while time.monotonic() < deadline:
                    if self.stop():
                        raise IngestAbandoned(str(exc)) from exc
                    time.sleep(min(0.1, self.reserve_poll_s))
                continue
            if self.paused:
                self.paused = False
                log.warning("ingest resumed: the cache's file system has room above the disk reserve again")
            return status

    def _write_once(self, pb: ProcessedBatch) -> WriteStatus:
        if self.on_written is None:
            return self.cache.write(pb)
        key = (pb.topic, pb.partition)
        if key not in self._stored_next:
            self._stored_next[key] = self.cache.next_offset(*key)
        t0 = time.perf_counter()
        status = self.cache.write(pb)
        if status is WriteStatus.WRITTEN:
            self.on_written(pb, self._stored_next[key], time.perf_counter() - t0)
            self._stored_next[key] = pb.end_offset
        return status

    def write(self, pb: ProcessedBatch) -> None:
        status = self._cache_write(pb)
        key = (pb.topic, pb.partition)
        if status is WriteStatus.GAP:
            held = self._held.setdefault(key, {})
            held[pb.start_offset] = pb
            if len(held) > self.max_held:
                raise CacheError(
                    f"{pb.topic}[{pb.partition}]: {len(held)} batches wait for offset "
                    f"{self.cache.next_offset(pb.topic, pb.partition)}, which never arrived"
                )
            return
        if status is WriteStatus.DUPLICATE:
            self.duplicates += 1
        else:
            self.written += 1
        self._drain(key)

    def _drain(self, key: tuple[str, int]) -> None:
        held = self._held.get(key)
        while held:
            nxt = self.cache.next_offset(*key)
            ready = [s for s in held if s <= nxt]
            if not ready:
                return
            for start in sorted(ready):
                status = self._cache_write(held.pop(start))
                if status is WriteStatus.WRITTEN:
                    self.written += 1
                elif status is WriteStatus.DUPLICATE:
                    self.duplicates += 1

    @property
    def held_batches(self) -> int:
        return sum(len(h) for h in self._held.values())


class WriteBehind:
    """Runs ``OrderedCacheWriter.write`` in one background thread, so LMDB's commit (an
    fsync that releases the GIL) overlaps decoding the next batch (measured below in
    bench/ingest.py). At most ``depth`` batches wait; ``submit`` blocks beyond that.

    Safe for exactly-once: a batch still queued when the process dies was never committed,
    so its offsets were not stored and the source reads it again on restart. A write error
    is re-raised by the next ``submit``/``flush``, and batches queued after it are not
    written (they too are re-read on restart), so nothing is skipped silently.
    """

    def __init__(self, writer: OrderedCacheWriter, depth: int = 2):
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self.abandoned = 0  # batches dropped unwritten after IngestAbandoned
        self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            pb = self._queue.get()
            try:
                if pb is None:
                    return
                if self.abandoned:
                    self.abandoned += 1
                elif self._error is None:
                    self.writer.write(pb)
            except IngestAbandoned:
                self.abandoned += 1
            except BaseException as exc:  # handed to the pipeline thread, which raises it
                self._error = exc
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, pb: ProcessedBatch) -> None:
        self._raise()
        self._queue.put(pb)

    def flush(self) -> None:
        """Block until every submitted batch is committed (or raise its error)."""
        self._queue.join()
        self._raise()

    def close(self) -> None:
        self._queue.join()
        self._queue.put(None)
        self._thread.join()


class CacheSession:
    """One process's cache writer: the cache (with its id statistics when enabled), the
    ``OrderedCacheWriter`` on it and, with ``metrics_dir``, the ingest metrics and their
    snapshots. Shared by the in-graph writer (``WriteToCache``) and the driver-side import
    of staged batches (``engine.staged_sink``). ``stop``: see ``OrderedCacheWriter``."""

    def __init__(self, cfg: HeadraceConfig, *, stop: Callable[[], bool] | None = None,
                 metrics_dir: str | None = None):
        self.cache = BatchCache.from_config(cfg.cache)
        self.metrics = self._snapshots = None
        try:
            if cfg.hash.stats_enabled:
                # Id frequencies for fitting learned hashes, updated in each batch's write txn.
                IdStatsStore.attach(self.cache, cfg.schema, cfg.hash)
            if metrics_dir:
                metrics = self.metrics = IngestMetrics()
                self._snapshots = SnapshotWriter(metrics_dir, "ingest", metrics.snapshot,
                                                 every_s=cfg.metrics.snapshot_every_s,
                                                 version=lambda: metrics.version)
        except BaseException:
            self.cache.close()
            raise
        self.writer = OrderedCacheWriter(self.cache, stop=stop,
                                         on_written=self.metrics.record if self.metrics else None)

    def close(self) -> None:
        if self._snapshots is not None:
            self._snapshots.close()
        if self.writer.held_batches:
            log.error("cache writer stopped with %d batches waiting for a predecessor; they "
                      "will be read again from the source on the next run", self.writer.held_batches)
        self.cache.close()

    def __enter__(self) -> "CacheSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _WriteDoFn(beam.DoFn):
    def __init__(self, cfg: HeadraceConfig, progress_every_s: float, stop_file: str | None,
                 metrics_dir: str | None = None):
        self.cfg = cfg
        self.progress_every_s = progress_every_s
        self.stop_file = stop_file
        self.metrics_dir = metrics_dir

    def setup(self):
        stop = StopFile(self.stop_file).requested if self.stop_file else None
        self._session = CacheSession(self.cfg, stop=stop, metrics_dir=self.metrics_dir)
        self._writer = self._session.writer
        self._behind = WriteBehind(self._writer)
        self._last_log = time.monotonic()

    def process(self, pb: ProcessedBatch):
        self._behind.submit(pb)
        now = time.monotonic()
        if self.progress_every_s and now - self._last_log >= self.progress_every_s:
            self._last_log = now
            log.info("cache: %d batches written, %d held", self._writer.written, self._writer.held_batches)
        yield pb.read

    def finish_bundle(self):
        # A finished bundle is a durable one: every batch it carried is committed.
        self._behind.flush()

    def teardown(self):
        behind = getattr(self, "_behind", None)
        if behind is not None:
            behind.close()
            if behind.abandoned:
                log.warning("stopped while ingest was paused at the disk reserve: %d batches were not written; "
                            "the next run reads them again from the source", behind.abandoned)
        session = getattr(self, "_session", None)
        if session is not None:
            session.close()


class WriteToCache(beam.PTransform):
    """PCollection[ProcessedBatch] -> PCollection[int] (records read per written element).

    Uses ``cfg.cache`` and, for the id statistics kept with the cache, ``cfg.schema`` and
    ``cfg.hash``. ``stop_file``: the streaming pipeline's stop file; with it a write waits at
    the disk reserve (until space is back or the stop), without it the reserve is an error.
    ``metrics_dir``: where the writer leaves its metrics snapshots for the supervisor
    (``engine.metrics``; None: keep no metrics)."""

    def __init__(self, cfg: HeadraceConfig, progress_every_s: float = 0.0, stop_file: str | None = None,
                 metrics_dir: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.progress_every_s = progress_every_s
        self.stop_file = stop_file
        self.metrics_dir = metrics_dir

    def expand(self, pcoll):
        return pcoll | "WriteBatches" >> beam.ParDo(
            _WriteDoFn(self.cfg, self.progress_every_s, self.stop_file, self.metrics_dir))
