"""serve's periodic re-fit of learned id mappings, in a background thread.

Every ``[hash] refit_every_s`` seconds it fits a new mapping version from the cache's id
statistics and the latest checkpoint's embeddings (``engine.fit_hash``). The pipeline
picks the new version up on its next reload and stamps it on the batches it writes; the
trainer migrates embedding rows when it reaches the first batch of the new version.
A fit runs off the supervisor's loop so a slow fit never stalls progress or stopping.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from engine.config import HeadraceConfig
from engine.errors import HEADRACE_ERRORS
from engine.fit_hash import RefitScheduler
from storage.batch_cache import BatchCache

__all__ = ["RefitThread"]

log = logging.getLogger(__name__)


class RefitThread(threading.Thread):
    """``reports`` collects each fit's report (or ``{"skipped": reason}``)."""

    def __init__(self, cfg: HeadraceConfig, cache: BatchCache, tick_s: float = 1.0):
        super().__init__(name="hash-refit", daemon=True)
        self.scheduler = RefitScheduler(cfg, cache=cache)
        self.tick_s = tick_s
        self.reports: list[dict[str, Any]] = []
        self.error: Exception | None = None
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        while not self._stop_event.wait(self.tick_s):
            try:
                report = self.scheduler.maybe_refit()
            except HEADRACE_ERRORS as exc:
                # A failed fit keeps the current mapping; the service goes on, the error is kept.
                if exc.retriable:  # e.g. no statistics written yet: the next period tries again
                    log.warning("hash re-fit postponed: %s", exc)
                else:
                    log.error("hash re-fit failed: %s", exc)
                    self.error = exc
                continue
            if report is not None:
                self.reports.append(report)
                if "skipped" in report:
                    log.info("hash re-fit skipped: %s", report["skipped"])
                else:
                    log.info("hash re-fit: mapping version %s in %.1f s", report.get("version"), report.get("fit_s", 0.0))
