"""The last step of the graph: write ProcessedBatches into the LMDB cache, exactly once.

``BatchCache.write`` is atomic per batch (rows, dead letters, counters and the partition's
next offset in one transaction) and idempotent (a replayed range is a DUPLICATE). What this
step adds is ordering: a runner may deliver a partition's batches out of order, and the
cache only accepts the batch that continues the stored offset (GAP otherwise). Such a batch
is held here until its predecessor has been written. Holding is safe across crashes: a held
batch's offsets were never stored, so after a restart the source reads it again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import apache_beam as beam

from engine.config import HeadraceConfig
from engine.errors import CacheError
from storage.batch_cache import BatchCache, WriteStatus
from storage.id_stats import IdStatsStore
from transforms.elements import ProcessedBatch

__all__ = ["WriteToCache", "OrderedCacheWriter", "WriteBehind"]

log = logging.getLogger(__name__)


class OrderedCacheWriter:
    """Writes batches to a cache in per-partition offset order (pure bookkeeping + I/O).

    ``max_held`` bounds memory: holding more batches than that for one partition means a
    predecessor is lost, which is a bug upstream; we fail loudly rather than grow forever.
    """

    def __init__(self, cache: BatchCache, max_held: int = 1024):
        self.cache = cache
        self.max_held = max_held
        self._held: dict[tuple[str, int], dict[int, ProcessedBatch]] = {}
        self.written = 0
        self.duplicates = 0

    def write(self, pb: ProcessedBatch) -> None:
        status = self.cache.write(pb)
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
                status = self.cache.write(held.pop(start))
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
        self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            pb = self._queue.get()
            try:
                if pb is None:
                    return
                if self._error is None:
                    self.writer.write(pb)
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


class _WriteDoFn(beam.DoFn):
    def __init__(self, cfg: HeadraceConfig, progress_every_s: float):
        self.cfg = cfg
        self.progress_every_s = progress_every_s

    def setup(self):
        self._cache = BatchCache.from_config(self.cfg.cache)
        if self.cfg.hash.stats_enabled:
            # Id frequencies for fitting learned hashes, updated in each batch's write txn.
            IdStatsStore.attach(self._cache, self.cfg.schema, self.cfg.hash)
        self._writer = OrderedCacheWriter(self._cache)
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
        writer = getattr(self, "_writer", None)
        if writer is not None and writer.held_batches:
            log.error("cache writer stopped with %d batches waiting for a predecessor; they "
                      "will be read again from the source on the next run", writer.held_batches)
        cache = getattr(self, "_cache", None)
        if cache is not None:
            cache.close()


class WriteToCache(beam.PTransform):
    """PCollection[ProcessedBatch] -> PCollection[int] (records read per written element).

    Uses ``cfg.cache`` and, for the id statistics kept with the cache, ``cfg.schema`` and
    ``cfg.hash``."""

    def __init__(self, cfg: HeadraceConfig, progress_every_s: float = 0.0):
        super().__init__()
        self.cfg = cfg
        self.progress_every_s = progress_every_s

    def expand(self, pcoll):
        return pcoll | "WriteBatches" >> beam.ParDo(_WriteDoFn(self.cfg, self.progress_every_s))
