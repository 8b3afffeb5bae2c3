"""The ingest window of a run: events cached per second from the first batch cached to the
last. It leaves out start-up (process spawn, imports, pipeline construction, connecting,
the first fetch) and shutdown, which a long-lived service pays once; benches report it
beside the whole-run figure.

* ``CacheWatcher(cfg)``: the pipeline runs in child processes; a thread polls the cache's
  ``read`` count every ``every_s``.
* ``CacheWrites()``: the pipeline runs in this process (LMDB must not be opened twice in
  one process); records the time of every cache write the pipeline makes.

    with CacheWatcher(cfg) as window:
        run_the_pipeline(cfg)
    window.events_per_s(fallback=events / wall)
"""

from __future__ import annotations

import os
import threading
import time

__all__ = ["CacheWatcher", "CacheWrites"]


class _Window:
    def __init__(self) -> None:
        self.seen: list[tuple[float, int]] = []  # (monotonic time, events read so far)

    def events_per_s(self, fallback: float) -> float:
        """Events per second between the first and the last point seen, or ``fallback``
        when the run was too short to see two."""
        if len(self.seen) < 2 or self.seen[-1][0] <= self.seen[0][0]:
            return fallback
        (t_first, n_first), (t_last, n_last) = self.seen[0], self.seen[-1]
        return (n_last - n_first) / (t_last - t_first)


class CacheWatcher(_Window):
    """Polls ``cfg.cache``'s read count every ``every_s`` while open (the cache may not
    exist yet when it starts)."""

    def __init__(self, cfg, every_s: float = 0.1):
        super().__init__()
        self._cfg = cfg
        self._every_s = every_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watch-cache", daemon=True)

    def __enter__(self) -> "CacheWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        from storage.batch_cache import BatchCache

        while not os.path.exists(os.path.join(self._cfg.cache.path, "data.mdb")):
            if self._done.wait(self._every_s):
                return
        with BatchCache.from_config(self._cfg.cache, readonly=True) as cache:
            while not self._done.wait(self._every_s):
                read = cache.counts()["read"]
                if read and (not self.seen or read > self.seen[-1][1]):
                    self.seen.append((time.monotonic(), read))


class CacheWrites(_Window):
    """Records ``(time, events read so far)`` after each batch the pipeline in this process
    writes to its cache (``engine.cache_sink.OrderedCacheWriter``), while open."""

    def __enter__(self) -> "CacheWrites":
        from engine.cache_sink import OrderedCacheWriter

        self._cls = OrderedCacheWriter
        self._real = OrderedCacheWriter._cache_write
        real, seen = self._real, self.seen

        def recorded(writer, pb):
            status = real(writer, pb)
            seen.append((time.monotonic(), (seen[-1][1] if seen else 0) + pb.read))
            return status

        OrderedCacheWriter._cache_write = recorded
        return self

    def __exit__(self, *exc_info) -> None:
        self._cls._cache_write = self._real
