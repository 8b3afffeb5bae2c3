"""Consumer lag for ``serve``'s progress line, and informational consumer-group commits.

Runs in a background thread of the supervisor: every ``every_s`` it reads the cache's next
offsets, asks the brokers for each partition's high watermark, and commits the cache's
offsets to the consumer group so standard lag monitors (kafka-consumer-groups, Burrow)
see headrace's progress. The group commit is never read back: the cache's offsets are
the source of truth for resuming. With ``[source] member = "i/n"`` only this host's
partitions are measured and committed (the others are another host's). On the embedded
broker (Tansu) high watermarks can be under-reported, so lag there is approximate; real
Kafka is exact.
"""

from __future__ import annotations

import logging
import threading

from engine.config import HeadraceConfig
from engine.errors import HEADRACE_ERRORS
from storage.batch_cache import BatchCache
from streams.assignment import Share

__all__ = ["LagMonitor"]

log = logging.getLogger(__name__)


class LagMonitor(threading.Thread):
    """``lag`` (all partitions) is None until the first successful measurement;
    ``partition_lag`` maps ``(topic, partition)`` to the lag of the last measurement."""

    def __init__(self, cfg: HeadraceConfig, cache: BatchCache, every_s: float = 2.0, commit_group: bool = True):
        super().__init__(name="lag-monitor", daemon=True)
        self.cfg = cfg
        self.cache = cache
        self.every_s = every_s
        self.commit_group = commit_group
        self.lag: int | None = None
        self.partition_lag: dict[tuple[str, int], int] = {}
        self._stop_event = threading.Event()
        self._warned = False

    def stop(self) -> None:
        self._stop_event.set()

    def measure(self) -> int:
        from streams.admin import list_partitions
        from streams.kafka_client import watermark_offsets

        offsets = self.cache.next_offsets()
        per_partition: dict[tuple[str, int], int] = {}
        source = self.cfg.source
        member = Share.for_member(source.member)
        for topic in source.topics:
            parts = [p for p in list_partitions(source.bootstrap, topic, client_options=source.client_options)
                     if member.owns(p)]
            cached = offsets.get(topic, {})
            for p, (low, high) in watermark_offsets(source, topic, parts).items():
                per_partition[(topic, int(p))] = max(int(high) - int(cached.get(p, low)), 0)
        self.partition_lag = per_partition
        total = sum(per_partition.values())
        if self.commit_group:
            from streams.group_offsets import commit_group_offsets

            commit_group_offsets(source, {(t, int(p)): o for t, parts_ in offsets.items()
                                          if t in source.topics for p, o in parts_.items() if member.owns(int(p))})
        return total

    def run(self) -> None:
        while not self._stop_event.wait(self.lag is None and 0.5 or self.every_s):
            try:
                self.lag = self.measure()
            except HEADRACE_ERRORS as exc:
                # Lag is for display only: a broker hiccup must not stop the service.
                if not self._warned:
                    log.warning("lag monitor: %s (will keep trying)", exc)
                    self._warned = True
