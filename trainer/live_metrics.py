"""Numbers a running service exports: fixed-bucket histograms and data freshness.

Pure numpy, no Prometheus import: the trainer puts ``to_dict()`` of these into its progress
reports and the engine turns them into Prometheus metrics (``engine.metrics``). Histograms
are cumulative over the life of the object (one process), like Prometheus counters.

- ``BucketHistogram``: counts per bucket of fixed upper bounds (``le``), plus sum and count.
  ``observe_many`` takes a whole array at once (one ``searchsorted`` + ``bincount``), so a
  per-row metric costs a few microseconds per training batch.
- ``FreshnessMetrics``: for each trained row, (time it was trained) - (its event time) in
  seconds, into a histogram and a ring buffer of the last ``window_rows`` rows, whose exact
  50th and 99th percentiles are ``freshness_p50_s`` / ``freshness_p99_s``.
- ``LiveMetrics``: what the training loop keeps (step time, freshness); ``LiveMetrics(None)``
  keeps nothing (for measuring what keeping them costs).

Example:
    >>> h = BucketHistogram((0.1, 1.0))
    >>> h.observe_many(np.array([0.05, 0.5, 2.0, 3.0]))
    >>> h.to_dict()["counts"], h.count
    ([1, 1, 2], 4)
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["BucketHistogram", "FreshnessMetrics", "LiveMetrics", "STEP_BUCKETS_S", "FRESHNESS_BUCKETS_S"]

#: Upper bounds (seconds) of the training-step histogram: 100 us .. 10 s.
STEP_BUCKETS_S: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                     0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Upper bounds (seconds) of the freshness histogram: 50 ms (a live stream) .. 1 week (a backfill).
FRESHNESS_BUCKETS_S: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                                          300.0, 600.0, 1800.0, 3600.0, 21600.0, 86400.0, 604800.0)


class BucketHistogram:
    """Observations counted per bucket ``(bounds[i-1], bounds[i]]``, plus ``(bounds[-1], +Inf)``.

    ``to_dict()``: ``{"bounds": [...], "counts": [...], "sum": s}`` with ``len(bounds) + 1``
    per-bucket (not cumulative) counts; ``from_dict`` reverses it. Not thread-safe: one
    writer, and readers take ``to_dict()`` from the same thread (or accept a torn read).
    """

    def __init__(self, bounds: Sequence[float]):
        b = np.asarray(bounds, dtype=np.float64)
        if b.ndim != 1 or b.size == 0 or np.any(np.diff(b) <= 0) or not np.all(np.isfinite(b)):
            raise ValueError(f"bounds must be finite and strictly increasing, got {list(bounds)}")
        self.bounds = b
        self.counts = np.zeros(b.size + 1, dtype=np.int64)
        self.sum = 0.0

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def observe(self, value: float) -> None:
        self.counts[int(np.searchsorted(self.bounds, value, side="left"))] += 1
        self.sum += float(value)

    def observe_many(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.size == 0:
            return
        idx = np.searchsorted(self.bounds, values, side="left")  # value == bound counts in that bucket (le)
        self.counts += np.bincount(idx, minlength=self.counts.size)
        self.sum += float(values.sum())

    def to_dict(self) -> dict[str, Any]:
        return {"bounds": self.bounds.tolist(), "counts": self.counts.tolist(), "sum": self.sum}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BucketHistogram":
        h = cls(d["bounds"])
        counts = np.asarray(d["counts"], dtype=np.int64)
        if counts.shape != h.counts.shape:
            raise ValueError(f"{counts.size} counts for {h.bounds.size} bounds (need bounds + 1)")
        h.counts = counts.copy()
        h.sum = float(d["sum"])
        return h


class FreshnessMetrics:
    """Freshness of trained rows: histogram over the life of the object, exact quantiles over
    the last ``window_rows`` rows."""

    def __init__(self, window_rows: int = 50_000, bounds: Sequence[float] = FRESHNESS_BUCKETS_S):
        if window_rows < 1:
            raise ValueError(f"window_rows must be >= 1, got {window_rows}")
        self.histogram = BucketHistogram(bounds)
        self._window = np.zeros(window_rows, dtype=np.float64)
        self._filled = 0
        self._at = 0

    def observe(self, event_time_ms: np.ndarray, trained_unix_s: float) -> None:
        """Rows with these event times (ms since the epoch) were trained at ``trained_unix_s``."""
        fresh = trained_unix_s - np.asarray(event_time_ms, dtype=np.float64) / 1000.0
        self.histogram.observe_many(fresh)
        n, cap = fresh.size, self._window.size
        if n >= cap:
            self._window[:] = fresh[-cap:]
            self._at, self._filled = 0, cap
            return
        first = min(n, cap - self._at)
        self._window[self._at:self._at + first] = fresh[:first]
        self._window[:n - first] = fresh[first:]
        self._at = (self._at + n) % cap
        self._filled = min(cap, self._filled + n)

    def quantiles(self, qs: Sequence[float] = (0.5, 0.99)) -> list[float | None]:
        if not self._filled:
            return [None for _ in qs]
        return [float(v) for v in np.quantile(self._window[:self._filled], qs)]

    def summary(self) -> dict[str, Any]:
        p50, p99 = self.quantiles((0.5, 0.99))
        return {"freshness_p50_s": p50, "freshness_p99_s": p99}


class LiveMetrics:
    """The training loop's live numbers: ``observe_step`` once per trained batch, ``summary``
    for the progress report (``freshness_p50_s``, ``freshness_p99_s`` and ``histograms``:
    ``step_seconds`` and ``freshness_seconds`` as ``BucketHistogram.to_dict()``).
    ``window_rows`` None keeps nothing (every call is a no-op)."""

    def __init__(self, window_rows: int | None):
        self.enabled = window_rows is not None
        self.step = BucketHistogram(STEP_BUCKETS_S)
        self.freshness = FreshnessMetrics(window_rows or 1)

    def observe_step(self, step_s: float, event_time_ms: np.ndarray | None, trained_unix_s: float) -> None:
        if not self.enabled:
            return
        self.step.observe(step_s)
        if event_time_ms is not None:
            self.freshness.observe(event_time_ms, trained_unix_s)

    def summary(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        return {**self.freshness.summary(),
                "histograms": {"step_seconds": self.step.to_dict(),
                               "freshness_seconds": self.freshness.histogram.to_dict()}}
