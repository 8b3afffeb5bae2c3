"""``headrace serve``: the long-lived service — streaming pipeline into the cache, plus the
continuous trainer, each in its own child process, supervised from here.

Stop (SIGINT/SIGTERM, or ``until`` returning True): the pipeline stops reading and flushes
(its source sees a stop file and finishes its restriction, so every batch already read is
written), then the trainer stops, checkpoints and exits; ``serve`` returns the summary.
The signal may hit the supervisor alone or the whole process group (Ctrl-C, systemd's
``KillMode=control-group``): children ignore SIGINT/SIGTERM (``engine.processes``), so
either way the stop is this ordered one and ends in exit 0. A second signal stops fast:
the children are killed (SIGKILL) without the final flush and checkpoint, and ``serve``
raises KeyboardInterrupt (exit 130).

A SIGKILL at any instant loses nothing: the cache commits batches and offsets together
and the next run resumes from the cache's offsets.

Workers (``[pipeline] workers = N``, ``[source] member = "i/n"``): the pipeline runs as N
child processes, each reading the partitions its share owns (``streams.assignment``), all
writing to the one cache (``engine.workers``). The assignment is logged at start and is
the summary's ``assignment``; any worker failing stops the service as one pipeline would.

Disk space: while the cache's file system is below ``[cache] disk_reserve_bytes`` the
pipeline holds its next batch and waits (``engine.cache_sink``), the trainer goes on with
what is cached, and the progress line says "ingest paused". A child that fails (e.g. a
full disk: ``DiskFullError``) reports its error to the supervisor, which stops the other
child in order and raises the same error (so the CLI exits with its code, 8 for a full disk).
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
from engine.export import ExportThread
from engine.health import open_endpoint
from engine.lag import LagMonitor
from engine.malloc_tuning import tune_malloc
from engine.pipeline import apply_graph, make_pipeline, resume_offsets
from engine.plugins import load_plugins
from engine.processes import StopFile, child_failure, install_stop_signals, spawn_child
from engine.progress import ProgressLine, format_rate
from engine.refit_loop import RefitThread
from engine.workers import WorkerGroup, plan_kafka_workers
from storage.atomic import atomic_write_bytes
from storage.batch_cache import BatchCache
from streams.assignment import Share

__all__ = ["ServeStatus", "serve", "pipeline_main", "pipeline_process", "trainer_main"]

log = logging.getLogger(__name__)


def pipeline_main(cfg: HeadraceConfig, stop_path: str, metrics_dir: str | None = None,
                  share: Share | None = None) -> None:
    """Child process: the streaming Beam pipeline, Kafka -> cache, until the stop file
    (which also ends a wait at the disk reserve: see ``engine.cache_sink``). Its cache
    writer leaves metrics snapshots in ``metrics_dir`` (``engine.metrics``). ``share``: the
    ``streams.assignment.Share`` of partitions this worker reads (None: all)."""
    from streams.kafka_source import ReadKafkaBatches

    offsets = resume_offsets(cfg)
    pipeline = make_pipeline(cfg, streaming=True)
    source = pipeline | "Kafka" >> ReadKafkaBatches(cfg.source, offsets, stop_file=stop_path, share=share)
    apply_graph(source, cfg, progress_every_s=10.0, stop_file=stop_path, metrics_dir=metrics_dir)
    pipeline.run().wait_until_finish()


def pipeline_process(*args: Any) -> None:
    """The pipeline worker as ``serve`` starts it: its own process, with glibc malloc tuned
    for a run of weeks (``engine.malloc_tuning``; the trainer keeps glibc's defaults), then
    ``pipeline_main(*args)``."""
    tune_malloc()
    pipeline_main(*args)


def trainer_main(cfg: HeadraceConfig, stop_path: str, progress_path: str, follow: bool = True,
                 metrics_dir: str | None = None, lag_path: str | None = None) -> None:
    """Child process: the continuous trainer on the cache, until the stop file. Goes through
    ``engine.train.train`` so a ``[sharding] enabled`` serve writes the same (sharded)
    checkpoints a later ``torchrun ... train`` resumes from. Each progress report is also a
    metrics snapshot in ``metrics_dir`` (``engine.metrics``); the consumer lag the supervisor
    writes to ``lag_path`` goes into the metrics history."""
    from engine.fit_hash import migration_hook
    from engine.metrics import TrainerReporter
    from engine.train import train

    metrics = TrainerReporter(metrics_dir) if metrics_dir else None

    def report(status: dict) -> None:
        atomic_write_bytes(progress_path, orjson.dumps(status, option=orjson.OPT_SERIALIZE_NUMPY))
        if metrics is not None:
            metrics.report(status)

    summary = train(cfg, follow=follow, stop=StopFile(stop_path), on_progress=report,
                    on_mapping_change=migration_hook(cfg), handle_signals=False, endpoint=False,
                    lag=(lambda: _read_json(lag_path).get("lag")) if lag_path else None)
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
    disk: dict[str, Any] | None = None  # BatchCache.disk(): free, reserve, paused

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "trained_samples": self.trained_samples}

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


def _status(cache: BatchCache, t0: float, progress_path: str | None, lag: int | None = None,
            disk: dict | None = None) -> ServeStatus:
    c = cache.counts()
    trainer = _read_json(progress_path) if progress_path else {}
    return ServeStatus(time.monotonic() - t0, c["read"], c["cached_rows"], c["filtered"],
                       c["dead_letters"], trainer, lag, disk)


def _describe(s: ServeStatus, rate: float) -> str:
    parts = [f"read {s.read:,}", f"{format_rate(rate)} ev/s", f"lag {'?' if s.lag is None else f'{s.lag:,}'}",
             f"cached {s.cached_rows:,}", f"dead {s.dead_letters:,}"]
    if s.disk and s.disk.get("paused"):
        parts.append(f"INGEST PAUSED: {s.disk['free_bytes'] / (1 << 20):,.0f} MiB free < reserve "
                     f"{s.disk['reserve_bytes'] / (1 << 20):,.0f} MiB")
    if s.trainer:
        parts.append(f"trained {s.trained_samples:,}")
        if s.trainer.get("auc") is not None:
            parts.append(f"AUC {s.trainer['auc']:.3f}")
        if s.trainer.get("logloss") is not None:
            parts.append(f"logloss {s.trainer['logloss']:.4f}")
        if s.trainer.get("mapping_version"):
            parts.append(f"mapping v{s.trainer['mapping_version']}")
        if s.trainer.get("freshness_p50_s") is not None:
            parts.append(f"fresh p50 {s.trainer['freshness_p50_s']:.1f}s p99 {s.trainer['freshness_p99_s']:.1f}s")
    return "serve: " + " | ".join(parts)


def _progress_fields(s: ServeStatus, rate: float) -> dict[str, Any]:
    """The numbers of the progress line, for JSON log lines (``--log-format json``)."""
    t = s.trainer
    return {"read": s.read, "events_per_s": rate, "lag": s.lag, "cached_rows": s.cached_rows,
            "filtered": s.filtered, "dead_letters": s.dead_letters,
            "ingest_paused": bool(s.disk and s.disk.get("paused")),
            "trained_samples": s.trained_samples, "auc": t.get("auc"), "logloss": t.get("logloss"),
            "mapping_version": t.get("mapping_version"), "freshness_p50_s": t.get("freshness_p50_s"),
            "freshness_p99_s": t.get("freshness_p99_s")}


def serve(
    cfg: HeadraceConfig,
    *,
    train: bool = True,
    until: Callable[[ServeStatus], bool] | None = None,
    max_seconds: float | None = None,
    progress: ProgressLine | None = None,
    handle_signals: bool = True,
    tick_s: float = 0.25,
    status_path: str | None = None,
) -> dict:
    """Run the service until a signal, ``until(status)`` or ``max_seconds``; return the summary.
    ``status_path``: rewrite this JSON file (atomically, about every second) with the
    ``ServeStatus`` and the children's pids, for watchdogs and ``bench/soak.py``."""
    os.makedirs(cfg.cache.path, exist_ok=True)
    run_dir = tempfile.mkdtemp(prefix="headrace-run-")
    pipe_stop, train_stop = StopFile(os.path.join(run_dir, "stop-pipeline")), StopFile(os.path.join(run_dir, "stop-trainer"))
    train_error = os.path.join(run_dir, "trainer.error")
    progress_path = os.path.join(run_dir, "trainer.json") if train else None
    metrics_dir = os.path.join(run_dir, "metrics")  # children's snapshots (engine.metrics)
    lag_path = os.path.join(run_dir, "lag.json")  # the consumer lag, for the trainer's history
    stop_requested, forced = threading.Event(), threading.Event()
    if handle_signals and threading.current_thread() is threading.main_thread():
        install_stop_signals(stop_requested.set, forced.set)

    # Fail fast, before any child starts: a broken cache or an unloadable plugin.
    resume_offsets(cfg)
    load_plugins(cfg.pipeline.plugins)
    plan = plan_kafka_workers(cfg)  # which worker reads which partitions (logged)
    started_unix_s = time.time()
    pipe = WorkerGroup.spawn("pipeline", pipeline_process, [(cfg, pipe_stop.path, metrics_dir, share)
                                                         for share, _ in plan.values()],
                             error_dir=run_dir, names=list(plan))
    trainer = spawn_child("trainer", trainer_main, cfg, train_stop.path, progress_path, True, metrics_dir,
                          lag_path, error_path=train_error) if train else None
    endpoint = None
    progress = progress or ProgressLine()
    t0 = time.monotonic()
    failure: Exception | None = None

    def join(proc, alive=None) -> None:
        # Interruptible: a second signal (``forced``) must not wait for a slow flush.
        while (alive or proc.is_alive)():
            if forced.is_set():
                raise KeyboardInterrupt("stopped fast on a second signal: children killed without a final "
                                        "flush or checkpoint; the next run resumes from the last checkpoint "
                                        "and the cache's offsets")
            proc.join(timeout=0.1)

    try:
        with BatchCache.from_config(cfg.cache, readonly=True) as cache:
            lag = LagMonitor(cfg, cache)
            lag.start()
            endpoint = open_endpoint(cfg, "serve", cache=cache, snapshot_dir=metrics_dir, pipeline=pipe,
                                     trainer=trainer, lag=lag, since_unix_s=started_unix_s)
            refit = RefitThread(cfg, cache) if cfg.hash.refit_every_s > 0 else None
            if refit is not None:
                refit.start()
            exporter = ExportThread(cfg, cache) if train and cfg.export.every_s > 0 else None
            if exporter is not None:  # model packages from the newest checkpoints ([export])
                exporter.start()
            start = _status(cache, t0, progress_path)
            last_read, last_t = start.read, t0
            rate = 0.0
            # Ingest rate over the span in which events were arriving (not startup or idling).
            first_read_t: float | None = None
            read_seen, last_change_t = start.read, t0
            disk, disk_t, status_t = cache.disk(), t0, 0.0
            lag_t, lag_written = 0.0, None
            pids = {"supervisor": os.getpid(), "pipeline": pipe.pid, "pipelines": dict(zip(plan, pipe.pids)),
                    "trainer": trainer.pid if trainer else None}
            while True:
                now = time.monotonic()
                if now - disk_t >= 2.0:
                    disk, disk_t = cache.disk(), now
                status = _status(cache, t0, progress_path, lag.lag, disk)
                if status.read > read_seen:
                    if first_read_t is None:
                        first_read_t = last_change_t
                    read_seen, last_change_t = status.read, now
                if now - last_t >= 1.0:
                    rate = (status.read - last_read) / (now - last_t)
                    last_read, last_t = status.read, now
                progress.update(_describe(status, rate), fields=_progress_fields(status, rate))
                if now - lag_t >= 1.0 and status.lag != lag_written:
                    lag_t, lag_written = now, status.lag
                    atomic_write_bytes(lag_path, orjson.dumps({"lag": status.lag}), durable=False)
                if status_path and now - status_t >= 1.0:
                    status_t = now
                    atomic_write_bytes(status_path, orjson.dumps({**status.to_dict(), "events_per_s": rate,
                                                                  "pids": pids}), durable=False)
                if stop_requested.is_set() or (until and until(status)) or (max_seconds and status.elapsed_s >= max_seconds):
                    break
                if not pipe.is_alive():
                    failure = pipe.exited("the pipeline process", SourceError)
                    break
                if trainer is not None and not trainer.is_alive():
                    failure = child_failure(trainer, train_error, "the trainer process", TrainerError, "")
                    break
                time.sleep(tick_s)
            # Stop order matters: the pipeline flushes what it read, then the trainer checkpoints.
            lag.stop()
            if refit is not None:
                refit.stop()
                refit.join()
            if exporter is not None:
                exporter.stop()
                exporter.join()
            pipe_stop.request()
            join(pipe, pipe.any_alive)
            if trainer is not None:
                train_stop.request()
                join(trainer)
            lag.join(timeout=10)
            status = _status(cache, t0, progress_path, lag.lag, cache.disk())
            final_rate = status.read / max(status.elapsed_s, 1e-9)
            progress.update(_describe(status, final_rate), force=True, fields=_progress_fields(status, final_rate))
            progress.close()
            cache_stat = cache.stat()
        if failure is None:
            failure = pipe.failure("the pipeline process", SourceError, " while stopping")
        if failure is None and trainer is not None and trainer.exitcode != 0:
            failure = child_failure(trainer, train_error, "the trainer process", TrainerError, " while stopping")
    finally:
        pipe.kill()
        if trainer is not None and trainer.is_alive():
            trainer.kill()
            trainer.join()
        if endpoint is not None:
            endpoint.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    if failure is not None:
        raise failure
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
        "total_trained_samples": status.trained_samples,
        "checkpoint": status.trainer.get("checkpoint"),
        "auc": status.trainer.get("auc"),
        "logloss": status.trainer.get("logloss"),
        "events_per_s": events / ingest_s if ingest_s > 0 else 0.0,
        "lag": status.lag,
        "mapping_version": status.trainer.get("mapping_version"),
        "mapping_refits": [r.get("version") for r in (refit.reports if refit else []) if "version" in r],
        "exports": [r["package"] for r in (exporter.reports if exporter else [])],
        "elapsed_s": elapsed,
        "freshness_p50_s": status.trainer.get("freshness_p50_s"),
        "freshness_p99_s": status.trainer.get("freshness_p99_s"),
        "metrics_address": endpoint.address if endpoint is not None else None,
        "assignment": {name: topics for name, (_, topics) in plan.items()},
    }
