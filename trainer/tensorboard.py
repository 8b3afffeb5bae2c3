"""TensorBoard events of the trainer's history records (``[trainer] tensorboard_dir``).

Each record of ``trainer.history`` becomes one scalar per number it holds, at step = the
model's trained samples (so curves of a restarted model continue where they stopped) and
wall time = the record's time. ``torch.utils.tensorboard`` needs the ``tensorboard``
package, an optional extra (``pip install 'headrace[report]'``); without it, asking for
``tensorboard_dir`` is a ``TrainerConfigError`` that says so.

Bounded like the history (``[trainer] history_max_bytes``): an event file is closed and a
new one started once it holds a quarter of the budget, and the oldest event files in the
directory (earlier runs' included) are deleted while all of them together exceed it, so
TensorBoard keeps the most recent stretch of the curves.

Example (needs tensorboard):
    >>> import tempfile
    >>> sink = TensorBoardSink(tempfile.mkdtemp(), max_bytes=1 << 20)
    >>> sink.write({"samples": 512, "unix_s": 1.7e9, "auc": 0.74, "logloss": None})
    1
    >>> sink.close()
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Any

from trainer.errors import TrainerConfigError

log = logging.getLogger(__name__)

#: TensorBoard's event file names (``SummaryWriter`` writes one per writer).
_EVENT_GLOB = "events.out.tfevents.*"

__all__ = ["TensorBoardSink", "SCALARS"]

#: (TensorBoard tag, history record key), grouped as TensorBoard shows them.
SCALARS: tuple[tuple[str, str], ...] = (
    ("quality/auc", "auc"), ("quality/window_auc", "window_auc"),
    ("quality/logloss", "logloss"), ("quality/window_logloss", "window_logloss"),
    ("quality/calibration", "calibration"), ("quality/window_calibration", "window_calibration"),
    ("freshness/p50_s", "freshness_p50_s"), ("freshness/p99_s", "freshness_p99_s"),
    ("throughput/samples_per_s", "samples_per_s"), ("throughput/data_wait_fraction", "data_wait_fraction"),
    ("ingest/events_per_s", "ingest_events_per_s"), ("ingest/lag_events", "lag"),
    ("ingest/dead_letters", "dead_letters"),
    ("row_cache/hit_rate", "row_cache_hit_rate"),
)


class TensorBoardSink:
    """Writes history records as scalars under ``log_dir`` (created if missing), its event
    files together at most ``max_bytes`` (see the module docstring)."""

    def __init__(self, log_dir: str, max_bytes: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise TrainerConfigError(
                f"[trainer] tensorboard_dir = {log_dir!r} needs the tensorboard package, which is not "
                f"installed ({exc}): pip install 'headrace[report]' (or pip install tensorboard), or "
                "leave tensorboard_dir empty") from None
        self.log_dir = log_dir
        self.max_bytes = max_bytes
        self.rotations = 0
        self._new_writer = lambda: SummaryWriter(log_dir=log_dir)
        self._writer = self._new_writer()

    def write(self, record: dict[str, Any]) -> int:
        """Add the record's numbers; returns how many scalars were written. Flushed at once:
        records come seconds apart, and a crash should not lose what TensorBoard showed."""
        step = int(record.get("samples") or 0)
        written = 0
        for tag, key in SCALARS:
            value = record.get(key)
            if value is None:
                continue
            self._writer.add_scalar(tag, float(value), global_step=step, walltime=record.get("unix_s"))
            written += 1
        self._writer.flush()
        self._bound()
        return written

    def _event_files(self) -> list[tuple[str, int]]:
        """(path, bytes) of the directory's event files, oldest first (the newest is this writer's)."""
        files = sorted(glob.glob(os.path.join(self.log_dir, _EVENT_GLOB)), key=os.path.getmtime)
        return [(f, os.path.getsize(f)) for f in files]

    def _bound(self) -> None:
        files = self._event_files()
        if files and files[-1][1] > self.max_bytes // 4:
            self._writer.close()
            self._writer = self._new_writer()
            self.rotations += 1
            files = self._event_files()
        total = sum(size for _, size in files)
        for path, size in files[:-1]:
            if total <= self.max_bytes:
                break
            os.unlink(path)
            total -= size
            log.debug("tensorboard: deleted %s to stay under %d bytes", path, self.max_bytes)

    def close(self) -> None:
        self._writer.close()
