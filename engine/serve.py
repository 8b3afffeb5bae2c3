"""``headrace serve``: the long-lived service — streaming pipeline into the cache, plus the
continuous trainer, each in its own child process, supervised from here.

Stop (SIGINT/SIGTERM, or ``until`` returning True): the pipeline stops reading and flushes
(its source sees a stop file and finishes its restriction, so every batch already read is
written), then the trainer stops, checkpoints and exits; ``serve`` returns the summary.
A SIGKILL at any instant loses nothing: the cache commits batches and offsets together
and the next run resumes from the cache's offsets.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Callable

import orjson

from engine.config import HeadraceConfig
from engine.errors import SourceError, TrainerError
from engine.lag import LagMonitor
from engine.pipeline import apply_graph, make_pipeline, resume_offsets
from engine.plugins import load_plugins
from engine.processes import StopFile, install_stop_signals, spawn_child
from engine.progress import ProgressLine, format_rate
from engine.refit_loop import RefitThread
from storage.atomic import atomic_write_bytes
from storage.batch_cache import BatchCache

__all__ = ["ServeStatus", "serve", "pipeline_main", "trainer_main"]

log = logging.getLogger(__name__)


def pipeline_main(cfg: HeadraceConfig, stop_path: str) -> None:
    """Child process: the streaming Beam pipeline, Kafka -> cache, until the stop file."""
    from streams.kafka_source import ReadKafkaBatches

    offsets = resume_offsets(cfg)
    pipeline = make_pipeline(cfg, streaming=True)
    source = pipeline | "Kafka" >> ReadKafkaBatches(cfg.source, offsets, stop_file=stop_path)
    apply_graph(source, cfg, progress_every_s=10.0)
    pipeline.run().wait_until_finish()


def trainer_main(cfg: HeadraceConfig, stop_path: str, progress_path: str, follow: bool = True) -> None:
    """Child process: the continuous trainer on the cache, until the stop file. Goes through
    ``engine.train.train`` so a ``[sharding] enabled`` serve writes the same (sharded)
    checkpoints a later ``torchrun ... train`` resumes from."""
    from engine.fit_hash import migration_hook
    from engine.train import train

    def report(status: dict) -> None:
        atomic_write_bytes(progress_path, orjson.dumps(status, option=orjson.OPT_SERIALIZE_NUMPY))

    summary = train(cfg, follow=follow, stop=StopFile(stop_path), on_progress=report,
                    on_mapping_change=migration_hook(cfg), handle_signals=False)
    report({**summary, "final": True})


@dataclasses.dataclass
class ServeStatus:
    """What the supervisor sees each tick; ``until`` callbacks decide on it."""

    elapsed_s: float
    read: int
    cached_rows: int
    filtered: int
    dead_letters: int
    trainer: dict[str, Any]
    lag: int | None = None

    @property
    def trained_samples(self) -> int:
        """Samples trained since the cache began (across restarts of the trainer)."""
        return int(self.trainer.get("total_trained_samples", self.trainer.get("trained_samples", 0)))


def _read_json(path: str) -> dict:
    try:
        with open(path, "rb") as fh:
            return orjson.loads(fh.read())
    except FileNotFoundError:
        return {}


def _status(cache: BatchCache, t0: float, progress_path: str | None, lag: int | None = None) -> ServeStatus:
    c = cache.counts()
    return ServeStatus(time.monotonic() - t0, c["read"], c["cached_rows"], c["filtered"],
                       c["dead_letters"], _read_json(progress_path) if progress_path else {}, lag)


def _describe(s: ServeStatus, rate: float) -> str:
    parts = [f"read {s.read:,}", f"{format_rate(rate)} ev/s", f"lag {'?' if s.lag is None else f'{s.lag:,}'}",
             f"cached {s.cached_rows:,}", f"dead {s.dead_letters:,}"]
    if s.trainer:
        parts.append(f"trained {s.trained_samples:,}")
        if s.trainer.get("auc") is not None:
            parts.append(f"AUC {s.trainer['auc']:.3f}")
        if s.trainer.get("logloss") is not None:
            parts.append(f"logloss {s.trainer['logloss']:.4f}")
        if s.trainer.get("mapping_version"):
            parts.append(f"mapping v{s.trainer['mapping_version']}")
    return "serve: " + " | ".join(parts)


def serve(
    cfg: HeadraceConfig,
    *,
    train: bool = True,
    until: Callable[[ServeStatus], bool] | None = None,
    max_seconds: float | None = None,
    progress: ProgressLine | None = None,
    handle_signals: bool = True,
    tick_s: float = 0.25,
) -> dict:
    """Run the service until a signal, ``until(status)`` or ``max_seconds``; return the summary."""
    os.makedirs(cfg.cache.path, exist_ok=True)
    run_dir = tempfile.mkdtemp(prefix="headrace-run-")
    pipe_stop, train_stop = StopFile(os.path.join(run_dir, "stop-pipeline")), StopFile(os.path.join(run_dir, "stop-trainer"))
    progress_path = os.path.join(run_dir, "trainer.json") if train else None
    stop_requested = threading.Event()
    if handle_signals and threading.current_thread() is threading.main_thread():
        install_stop_signals(stop_requested.set)

    # Fail fast, before any child starts: a broken cache or an unloadable plugin.
    resume_offsets(cfg)
    load_plugins(cfg.pipeline.plugins)
    pipe = spawn_child("pipeline", pipeline_main, cfg, pipe_stop.path)
    trainer = spawn_child("trainer", trainer_main, cfg, train_stop.path, progress_path) if train else None
    progress = progress or ProgressLine()
    t0 = time.monotonic()
    failure: Exception | None = None
    try:
        with BatchCache.from_config(cfg.cache, readonly=True) as cache:
            lag = LagMonitor(cfg, cache)
            lag.start()
            refit = RefitThread(cfg, cache) if cfg.hash.refit_every_s > 0 else None
            if refit is not None:
                refit.start()
            start = _status(cache, t0, progress_path)
            last_read, last_t = start.read, t0
            rate = 0.0
            # Ingest rate over the span in which events were arriving (not startup or idling).
            first_read_t: float | None = None
            read_seen, last_change_t = start.read, t0
            while True:
                status = _status(cache, t0, progress_path, lag.lag)
                now = time.monotonic()
                if status.read > read_seen:
                    if first_read_t is None:
                        first_read_t = last_change_t
                    read_seen, last_change_t = status.read, now
                if now - last_t >= 1.0:
                    rate = (status.read - last_read) / (now - last_t)
                    last_read, last_t = status.read, now
                progress.update(_describe(status, rate))
                if stop_requested.is_set() or (until and until(status)) or (max_seconds and status.elapsed_s >= max_seconds):
                    break
                if not pipe.is_alive():
                    failure = SourceError(f"the pipeline process exited with code {pipe.exitcode}; see its log above")
                    break
                if trainer is not None and not trainer.is_alive():
                    failure = TrainerError(f"the trainer process exited with code {trainer.exitcode}; see its log above")
                    break
                time.sleep(tick_s)
            # Stop order matters: the pipeline flushes what it read, then the trainer checkpoints.
            lag.stop()
            if refit is not None:
                refit.stop()
                refit.join()
            pipe_stop.request()
            pipe.join()
            if trainer is not None:
                train_stop.request()
                trainer.join()
            lag.join(timeout=10)
            status = _status(cache, t0, progress_path, lag.lag)
            progress.update(_describe(status, status.read / max(status.elapsed_s, 1e-9)), force=True)
            progress.close()
            cache_stat = cache.stat()
    finally:
        for proc in (pipe, trainer):
            if proc is not None and proc.is_alive():
                proc.kill()
                proc.join()
        shutil.rmtree(run_dir, ignore_errors=True)
    if failure is not None:
        raise failure
    if pipe.exitcode != 0:
        raise SourceError(f"the pipeline process exited with code {pipe.exitcode} while stopping")
    if trainer is not None and trainer.exitcode != 0:
        raise TrainerError(f"the trainer process exited with code {trainer.exitcode} while stopping")
    elapsed = max(status.elapsed_s, 1e-9)
    events = status.read - start.read
    ingest_s = (last_change_t - first_read_t) if first_read_t is not None else 0.0
    return {  # this run's figures (the cache may hold earlier runs' too: see cache stat)
        "events": events,
        "cached_rows": status.cached_rows - start.cached_rows,
        "filtered": status.filtered - start.filtered,
        "dead_letters": status.dead_letters - start.dead_letters,
        "cache_dead_letters_by_reason": cache_stat.get("dead_letters", {}),
        "trained_samples": int(status.trainer.get("trained_samples", 0)),
        "auc": status.trainer.get("auc"),
        "logloss": status.trainer.get("logloss"),
        "events_per_s": events / ingest_s if ingest_s > 0 else 0.0,
        "lag": status.lag,
        "mapping_version": status.trainer.get("mapping_version"),
        "mapping_refits": [r.get("version") for r in (refit.reports if refit else []) if "version" in r],
        "elapsed_s": elapsed,
    }
