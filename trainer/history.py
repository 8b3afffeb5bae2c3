"""What the trainer keeps of its metrics over its whole life: one history record every
``[trainer] history_every_s`` seconds, appended to ``storage.metrics_history`` beside the
checkpoints (``<checkpoint_dir>/metrics-history.jsonl``) and, with ``[trainer]
tensorboard_dir``, written as TensorBoard scalars (``trainer.tensorboard``).

``MetricsRecorder.observe(progress)`` takes the loop's progress reports (``trainer.loop``)
and records the first of a run, then one at least ``history_every_s`` after the previous
(every report when 0); ``record(summary, final=True)`` records the run's last numbers.

A record (``HISTORY_FIELDS`` plus where it came from):

- ``unix_s``, ``run`` (an id of this trainer process's run), ``run_started_unix_s``, ``final``;
- the model's numbers: ``samples`` and ``batches`` (since the model's first checkpoint, so a
  resumed run continues them), ``run_samples``, ``auc``, ``logloss``, ``calibration`` and
  their ``window_*`` versions, ``freshness_p50_s``/``_p99_s``, ``samples_per_s`` (since the
  previous progress report), ``data_wait_fraction``, ``mapping_version``, ``elapsed_s``;
  ``row_cache_hit_rate``, ``row_cache_bytes_read``/``_written`` with ``[row_cache]``;
- the service's numbers, when the caller's ``service()`` knows them: ``cache_read`` and
  ``dead_letters`` (the cache's lifetime counters), ``ingest_events_per_s`` (``cache_read``
  over the time since the previous record of this run) and ``lag`` (consumer lag, events).

Recording never stops training: a failed append (a full disk) is logged as a warning and
the next record is tried again. The recorder belongs to one process (rank 0 of a job).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

from storage.errors import StorageError
from storage.metrics_history import MetricsHistory
from trainer.config import TrainSpec

__all__ = ["MetricsRecorder", "HISTORY_FILE", "HISTORY_FIELDS", "history_path"]

log = logging.getLogger(__name__)

#: File name of the history in ``[trainer] checkpoint_dir``.
HISTORY_FILE = "metrics-history.jsonl"

#: (record key, progress-report key) of the trainer's numbers kept in every record.
HISTORY_FIELDS: tuple[tuple[str, str], ...] = (
    ("samples", "total_trained_samples"), ("batches", "total_trained_batches"),
    ("run_samples", "trained_samples"),
    ("auc", "auc"), ("logloss", "logloss"), ("calibration", "calibration"),
    ("window_auc", "window_auc"), ("window_logloss", "window_logloss"),
    ("window_calibration", "window_calibration"),
    ("freshness_p50_s", "freshness_p50_s"), ("freshness_p99_s", "freshness_p99_s"),
    ("samples_per_s", "samples_per_s"), ("data_wait_fraction", "data_wait_fraction"),
    ("mapping_version", "mapping_version"), ("elapsed_s", "elapsed_s"),
)

#: ``service()`` returns any of these: the cache's lifetime counters and the consumer lag.
SERVICE_KEYS = ("cache_read", "dead_letters", "lag")


def history_path(spec: TrainSpec) -> str:
    """Where the history of the model checkpointed in ``spec.trainer.checkpoint_dir`` lives."""
    return os.path.join(spec.trainer.checkpoint_dir, HISTORY_FILE)


class MetricsRecorder:
    """Records a trainer run's metrics into its model's history (see the module docstring).

    ``service()`` (optional) returns ``{"cache_read", "dead_letters", "lag"}`` or any part of
    it (None values allowed); it is called once per record, from the training thread.
    ``tensorboard_dir`` set without the tensorboard package raises ``TrainerConfigError``
    here, before training starts."""

    def __init__(self, spec: TrainSpec, *, service: Callable[[], dict[str, Any]] | None = None,
                 clock: Callable[[], float] = time.time):
        t = spec.trainer
        self.every_s = t.history_every_s
        self.service = service
        self.clock = clock
        self.store = MetricsHistory(history_path(spec), t.history_max_bytes)
        self.tensorboard = None
        if t.tensorboard_dir:
            from trainer.tensorboard import TensorBoardSink

            self.tensorboard = TensorBoardSink(t.tensorboard_dir, t.history_max_bytes)
        self.started_unix_s = clock()
        self.run = f"{int(self.started_unix_s * 1000)}-{os.getpid()}"
        self.records = 0
        self.failed = 0
        self._last_unix_s: float | None = None
        self._last_read: tuple[float, int] | None = None  # (unix_s, cache_read) of the previous record

    def observe(self, progress: dict[str, Any]) -> dict[str, Any] | None:
        """A progress report: recorded (and returned) when it is due, else None."""
        now = self.clock()
        if self._last_unix_s is not None and 0 <= now - self._last_unix_s < self.every_s:
            return None  # (a clock stepped back makes a record due, not a long silence)
        return self.record(progress, now=now)

    def record(self, progress: dict[str, Any], *, final: bool = False, now: float | None = None) -> dict[str, Any]:
        """Record ``progress`` now, whatever the interval; returns the record."""
        now = self.clock() if now is None else now
        rec: dict[str, Any] = {"unix_s": now, "run": self.run, "run_started_unix_s": self.started_unix_s,
                               "final": final}
        for key, source in HISTORY_FIELDS:
            rec[key] = progress.get(source)
        row_cache = progress.get("row_cache")
        if row_cache is not None:
            rec["row_cache_hit_rate"] = row_cache.get("hit_rate")
            rec["row_cache_bytes_read"] = row_cache.get("bytes_read")
            rec["row_cache_bytes_written"] = row_cache.get("bytes_written")
        rec.update(self._service_numbers(now))
        self._last_unix_s = now
        self._write(rec)
        return rec

    def _service_numbers(self, now: float) -> dict[str, Any]:
        if self.service is None:
            return {}
        numbers = {k: v for k, v in (self.service() or {}).items() if k in SERVICE_KEYS}
        read = numbers.get("cache_read")
        if read is not None:
            if self._last_read is not None and now > self._last_read[0]:
                numbers["ingest_events_per_s"] = (read - self._last_read[1]) / (now - self._last_read[0])
            else:
                numbers["ingest_events_per_s"] = None
            self._last_read = (now, int(read))
        return numbers

    def _write(self, rec: dict[str, Any]) -> None:
        try:
            self.store.append(rec)
        except (StorageError, OSError) as exc:  # history must never stop training
            self.failed += 1
            log.warning("metrics history: record not written (%d so far), training goes on: %s", self.failed, exc)
        else:
            self.records += 1
        if self.tensorboard is not None:
            try:
                self.tensorboard.write(rec)
            except OSError as exc:
                log.warning("tensorboard: record not written, training goes on: %s", exc)

    def close(self) -> None:
        self.store.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
