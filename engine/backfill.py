"""``headrace backfill``: replay historical logs through the same graph, as a bounded pipeline.

Sources: files (``.jsonl``, ``.tsv``, ``.csv``, each optionally ``.gz``; one event per line,
or per CSV record) or a
Kafka topic between two offsets or two timestamps. A backfill is resumable and idempotent:
each file is a partition of its own in the cache's offsets, so running the same backfill
again (or after a crash) reads only what is not cached yet. Files are split between
``[pipeline] workers`` processes (and ``[source] member`` hosts): file i of the sorted list
goes where partition i would (``streams.assignment``); a Kafka range runs in one process.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import glob
import logging
import os
import shutil
import tempfile
import time

from engine.config import HeadraceConfig
from engine.errors import ConfigError, SourceError
from engine.health import open_endpoint
from engine.pipeline import make_pipeline, resume_offsets, run_bounded
from engine.plugins import load_plugins
from engine.progress import ProgressLine, format_rate
from engine.workers import WorkerGroup, plan_file_workers
from storage.batch_cache import BatchCache

__all__ = ["KafkaRange", "parse_time_ms", "expand_paths", "backfill", "backfill_pipeline_main"]

log = logging.getLogger(__name__)

_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".tsv", ".tsv.gz", ".csv", ".csv.gz", ".txt", ".txt.gz")


@dataclasses.dataclass(frozen=True)
class KafkaRange:
    """A bounded slice of a topic: offsets ``[start_offset, end_offset)`` of every partition,
    or the records whose own timestamps fall in ``[start_time_ms, end_time_ms)``."""

    topic: str
    start_offset: int | None = None
    end_offset: int | None = None
    start_time_ms: int | None = None
    end_time_ms: int | None = None

    def __post_init__(self):
        by_offset = self.start_offset is not None or self.end_offset is not None
        by_time = self.start_time_ms is not None or self.end_time_ms is not None
        if by_offset == by_time:
            raise ConfigError(
                f"kafka:{self.topic}: give either --start-offset/--end-offset or "
                f"--start-time/--end-time (exactly one kind)"
            )
        if by_offset and (self.end_offset is None or (self.start_offset or 0) > self.end_offset):
            raise ConfigError(f"kafka:{self.topic}: need --end-offset >= --start-offset")
        if by_time and (self.end_time_ms is None or (self.start_time_ms or 0) > self.end_time_ms):
            raise ConfigError(f"kafka:{self.topic}: need --end-time >= --start-time")


def parse_time_ms(text: str) -> int:
    """Epoch milliseconds from an integer or an ISO-8601 timestamp (UTC if no zone)."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"time {text!r}: expected epoch milliseconds or ISO-8601 like 2026-01-31T12:00:00Z") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return int(when.timestamp() * 1000)


def expand_paths(patterns: list[str]) -> list[str]:
    """Files named directly, by glob, or as directories (their log files, sorted)."""
    out: list[str] = []
    for pat in patterns:
        if os.path.isdir(pat):
            found = sorted(os.path.join(pat, f) for f in os.listdir(pat) if f.endswith(_SUFFIXES))
        else:
            found = sorted(glob.glob(pat)) or ([pat] if os.path.exists(pat) else [])
        if not found:
            raise ConfigError(f"backfill: {pat!r} matches no file")
        out.extend(os.path.abspath(p) for p in found)
    return list(dict.fromkeys(out))


def backfill_pipeline_main(cfg: HeadraceConfig, paths: list[str] | None, kafka_range: KafkaRange | None,
                           metrics_dir: str | None = None) -> None:
    """Child process (or inline): the bounded pipeline over files or a Kafka range. Its cache
    writer leaves metrics snapshots in ``metrics_dir`` (``engine.metrics``; None: none)."""
    offsets = resume_offsets(cfg)
    pipeline = make_pipeline(cfg, streaming=False, parallelism=len(paths) if paths else None)
    if paths:
        from streams.replay import ReadLogFiles

        source = pipeline | "Files" >> ReadLogFiles(paths, cfg.source.max_batch_records, offsets,
                                                   csv_header=cfg.schema.csv_header)
    else:
        from streams.replay import ReadKafkaRange

        r = kafka_range
        source = pipeline | "KafkaRange" >> ReadKafkaRange(
            cfg.source, r.topic, from_offsets=r.start_offset, to_offsets=r.end_offset,
            from_time_ms=r.start_time_ms, to_time_ms=r.end_time_ms, start_offsets=offsets,
        )
    run_bounded(pipeline, source, cfg, metrics_dir=metrics_dir)


def backfill(
    cfg: HeadraceConfig,
    *,
    paths: list[str] | None = None,
    kafka_range: KafkaRange | None = None,
    progress: ProgressLine | None = None,
    tick_s: float = 0.25,
) -> dict:
    """Run a bounded replay into the cache; returns ``{"read", "cached_rows", "filtered",
    "dead_letters", "events_per_s"}`` for this run (deltas, so reruns report what they added)."""
    if bool(paths) == (kafka_range is not None):
        raise ConfigError("backfill: give files or one kafka range")
    if paths:
        paths = expand_paths(paths)
    os.makedirs(cfg.cache.path, exist_ok=True)
    load_plugins(cfg.pipeline.plugins)  # fail fast, before the pipeline process starts
    resume_offsets(cfg)  # creates the cache if needed; fails fast if it is unusable
    progress = progress or ProgressLine()
    total = _known_total(paths) if paths else None
    with BatchCache.from_config(cfg.cache, readonly=True) as cache:
        before = cache.counts()
    t0 = time.monotonic()
    metrics_dir = tempfile.mkdtemp(prefix="headrace-backfill-metrics-")
    started_unix_s = time.time()
    # One worker per share that owns files (errors reported into metrics_dir), or one for a range.
    proc = WorkerGroup.spawn("pipeline", backfill_pipeline_main, [(cfg, part, kafka_range, metrics_dir) for part in
                                                                  (plan_file_workers(cfg, paths) if paths else [None])],
                             error_dir=metrics_dir)
    failure: Exception | None = None
    try:
        with BatchCache.from_config(cfg.cache, readonly=True) as cache, open_endpoint(
                cfg, "backfill", cache=cache, snapshot_dir=metrics_dir, pipeline=proc,
                since_unix_s=started_unix_s) as endpoint:
            while proc.running():
                _show(progress, cache.counts(), before, t0, total)
                proc.join(tick_s)
            after = cache.counts()
            _show(progress, after, before, t0, total, force=True)
    finally:
        proc.kill()  # the workers still running: none after a clean finish
        failure = proc.failure("the backfill pipeline", SourceError)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    progress.close()
    if failure is not None:
        raise failure
    elapsed = max(time.monotonic() - t0, 1e-9)
    delta = {k: after[k] - before[k] for k in ("read", "cached_rows", "filtered", "dead_letters")}
    return {**delta, "events_per_s": delta["read"] / elapsed, "elapsed_s": elapsed,
            "metrics_address": endpoint.address}


def _known_total(paths: list[str]) -> int | None:
    """Line count of uncompressed files (cheap, bytes only); None when any is compressed."""
    if any(p.endswith(".gz") for p in paths):
        return None
    total = 0
    for p in paths:
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                total += chunk.count(b"\n")
    return total


def _show(progress: ProgressLine, now: dict, before: dict, t0: float, total: int | None, force: bool = False) -> None:
    read = now["read"] - before["read"]
    rate = read / max(time.monotonic() - t0, 1e-9)
    pct = f" {100.0 * read / total:5.1f}%" if total else ""
    delta = {k: now[k] - before[k] for k in ("read", "cached_rows", "filtered", "dead_letters")}
    progress.update(
        f"backfill:{pct} read {read:,} ({format_rate(rate)} ev/s) cached {delta['cached_rows']:,} "
        f"filtered {delta['filtered']:,} dead {delta['dead_letters']:,}",
        force=force, fields={**delta, "events_per_s": rate, "total": total},
    )
