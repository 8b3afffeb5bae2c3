"""Prometheus metrics of a running service: what is measured, how child processes hand their
numbers to the supervisor, and the collector that serves them (``engine.health`` serves HTTP).

How children report (``serve``: a pipeline child and a trainer child; ``backfill``: a
pipeline child). Each child process keeps its own cumulative numbers in plain Python and
writes them, about once a second, as a small JSON *snapshot file* into a per-run directory
the supervisor creates (and removes) — one file per process (per writer inside it), named
``<kind>-<pid>-<n>.json``, replaced atomically, never appended. At every scrape the
supervisor reads the directory and **sums counters and histograms over all files**, the
files of dead processes included; gauges come from the newest file of each kind. So:

- restarts are free: a restarted child writes a new file from zero and the sum stays
  monotone, with no bookkeeping in the supervisor (the scheme of prometheus_client's
  multiprocess mode, one file per pid, without its mmap files);
- the cost in a child is a dict update per cached batch or training step and one small file
  write per second (the pipeline) or per progress report (the trainer);
- the trainer needs no Prometheus import (it must not import ``engine``): it reports plain
  numbers through its ``on_progress`` dict and ``trainer_snapshot`` converts them;
- a child killed mid-second loses at most its last second of observations in the metrics
  (never in the cache; ``headrace cache stat`` stays the source of truth).

prometheus_client's multiprocess mode was the alternative; it was not chosen because it
needs ``PROMETHEUS_MULTIPROC_DIR`` set before the library is imported in each process
(global, and leaks into in-process callers), has no public way to add a whole array of
observations to a histogram (freshness is per row, thousands per step), and would need
the trainer to import it.

Every metric is declared once in ``METRICS`` (name, type, help, labels); README's
"Running in production" lists them. Label values are bounded: topic, partition, reason,
child, quantile (file sources, one "partition" per file, are folded into ``topic="files"``).
"""

from __future__ import annotations

import dataclasses
import enum
import glob
import itertools
import logging
import os
import sys
import threading
import time
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from storage.admission import admit, check
from storage.atomic import atomic_write_bytes
from trainer.live_metrics import BucketHistogram
from transforms.elements import ProcessedBatch

__all__ = [
    "MetricKind", "MetricDef", "METRICS", "WRITE_BUCKETS_S", "Snapshot", "IngestMetrics",
    "SnapshotWriter", "TrainerReporter", "trainer_snapshot", "write_snapshot", "read_snapshots", "merge_snapshots",
    "HeadraceCollector", "partition_labels", "device_memory",
]

log = logging.getLogger(__name__)

#: Upper bounds (seconds) of the cache write latency histogram (one LMDB commit per batch).
WRITE_BUCKETS_S: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                      1.0, 2.5, 5.0, 10.0)


class MetricKind(enum.Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclasses.dataclass(frozen=True)
class MetricDef:
    name: str  # as exposed; counters end in _total
    kind: MetricKind
    help: str
    labels: tuple[str, ...] = ()


_C, _G, _H = MetricKind.COUNTER, MetricKind.GAUGE, MetricKind.HISTOGRAM
_TP = ("topic", "partition")

METRICS: dict[str, MetricDef] = {d.name: d for d in (
    # ingest: counted by the pipeline when a batch commits, so read == cached + filtered + dead
    # at every scrape (per partition too); duplicates of stored ranges are not counted.
    MetricDef("headrace_events_read_total", _C, "Events read and committed to the cache (kept, filtered or dead).", _TP),
    MetricDef("headrace_events_cached_total", _C, "Events cached as training rows.", _TP),
    MetricDef("headrace_events_filtered_total", _C, "Events dropped by [filter] or by plugins.", _TP),
    MetricDef("headrace_dead_letters_total", _C, "Events stored as dead letters, by reason code.", _TP + ("reason",)),
    MetricDef("headrace_cache_write_seconds", _H, "Time to commit one batch (rows, dead letters, offsets) to the cache."),
    # ingest, read from the cache by the supervisor
    MetricDef("headrace_consumer_lag_events", _G, "High watermark minus the cache's next offset.", _TP),
    MetricDef("headrace_cache_bytes", _G, "Bytes of batches stored in the cache now."),
    MetricDef("headrace_cache_batches", _G, "Batches stored in the cache now."),
    MetricDef("headrace_cache_rows", _G, "Rows stored in the cache now."),
    MetricDef("headrace_cache_written_bytes_total", _C, "Bytes of batches ever written to the cache."),
    MetricDef("headrace_cache_retention_deleted_batches_total", _C, "Batches deleted by retention ([cache] max_bytes)."),
    MetricDef("headrace_cache_retention_deleted_bytes_total", _C, "Bytes deleted by retention ([cache] max_bytes)."),
    MetricDef("headrace_dead_letters_expired_total", _C, "Dead letters deleted by [cache] dead_letter_max_bytes."),
    # trainer
    MetricDef("headrace_trainer_samples_total", _C, "Samples trained by this service's trainer processes."),
    MetricDef("headrace_trainer_batches_total", _C, "Training steps taken by this service's trainer processes."),
    MetricDef("headrace_trainer_step_seconds", _H, "Host time of one training step (forward, backward, optimizers)."),
    MetricDef("headrace_trainer_data_wait_seconds_total", _C, "Time the trainer waited for training batches."),
    MetricDef("headrace_trainer_data_wait_ratio", _G, "Fraction of the trainer's run spent waiting for data."),
    MetricDef("headrace_trainer_auc", _G, "Progressive AUC since the model's first sample."),
    MetricDef("headrace_trainer_logloss", _G, "Progressive logloss since the model's first sample."),
    MetricDef("headrace_trainer_calibration", _G, "Mean prediction / mean label since the model's first sample."),
    MetricDef("headrace_trainer_window_auc", _G, "Progressive AUC over the last [trainer] metrics_window samples."),
    MetricDef("headrace_trainer_window_logloss", _G, "Progressive logloss over the last metrics_window samples."),
    MetricDef("headrace_trainer_window_calibration", _G, "Calibration over the last metrics_window samples."),
    MetricDef("headrace_trainer_mapping_version", _G, "Id-mapping version of the batches being trained."),
    MetricDef("headrace_model_trained_samples", _G, "Samples the model has trained on since its first checkpoint."),
    MetricDef("headrace_trainer_last_report_timestamp_seconds", _G, "Unix time of the trainer's last progress report."),
    MetricDef("headrace_trainer_device_memory_bytes", _G, "CUDA memory of the trainer's device.", ("device", "kind")),
    MetricDef("headrace_trainer_row_cache_lookups_total", _C, "Distinct rows looked up in the SSD row cache (per table per batch)."),
    MetricDef("headrace_trainer_row_cache_hits_total", _C, "Row-cache lookups served by the device cache."),
    MetricDef("headrace_trainer_row_cache_read_bytes_total", _C, "Bytes of rows read from the SSD row store (misses)."),
    MetricDef("headrace_trainer_row_cache_written_bytes_total", _C, "Bytes of rows written back to the SSD row store."),
    MetricDef("headrace_trainer_row_cache_hit_ratio", _G, "Row-cache hits / lookups over the trainer's run."),
    # freshness
    MetricDef("headrace_freshness_seconds", _H, "Per trained row: time it was trained minus its event time."),
    MetricDef("headrace_freshness_window_seconds", _G,
              "Exact quantiles of freshness over the last metrics_window trained rows.", ("quantile",)),
    # the service
    MetricDef("headrace_ready", _G, "1 when /readyz answers 200."),
    MetricDef("headrace_child_up", _G, "1 while the child process runs.", ("child",)),
)}


def partition_labels(topic: str, partition: int) -> tuple[str, str]:
    """Bounded label values: a backfill's files (each its own "partition") become one series."""
    if topic.startswith("file:"):
        return "files", "-"
    return topic, str(partition)


# --------------------------------------------------------------------------- snapshots

#: A snapshot: ``{"kind", "pid", "unix_s", "counters": {name: [[labels, value]]},
#: "gauges": {...}, "histograms": {name: [[labels, BucketHistogram.to_dict()]]}}``, labels
#: being the label values in ``METRICS[name].labels`` order.
Snapshot = dict


def write_snapshot(path: str, snap: Snapshot) -> None:
    """Replace ``path`` with ``snap`` (atomic rename, no fsync: losing one costs nothing)."""
    atomic_write_bytes(path, orjson.dumps(snap, option=orjson.OPT_SERIALIZE_NUMPY), durable=False)


def read_snapshots(directory: str) -> list[Snapshot]:
    """Every snapshot file in ``directory`` (unreadable ones skipped: a file is whole or absent)."""
    out = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        try:
            with open(path, "rb") as fh:
                out.append(orjson.loads(fh.read()))
        except (OSError, orjson.JSONDecodeError):
            continue
    return out


def merge_snapshots(snaps: Iterable[Snapshot]) -> Snapshot:
    """Sum counters and histograms over all snapshots; gauges from the newest of each kind.
    ``reported``: per kind, each reporting pid's newest ``unix_s`` (several pipeline
    workers report ``ingest`` each; ``engine.health`` waits for all of them)."""
    counters: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
    hists: dict[str, dict[tuple, BucketHistogram]] = defaultdict(dict)
    newest: dict[str, Snapshot] = {}
    reported: dict[str, dict[int, float]] = defaultdict(dict)
    for snap in snaps:
        for name, samples in snap.get("counters", {}).items():
            for labels, value in samples:
                counters[name][tuple(labels)] += value
        for name, samples in snap.get("histograms", {}).items():
            for labels, value in samples:
                key = tuple(labels)
                h = BucketHistogram.from_dict(value)
                have = hists[name].get(key)
                if have is None:
                    hists[name][key] = h
                elif have.bounds.shape == h.bounds.shape and (have.bounds == h.bounds).all():
                    have.counts += h.counts
                    have.sum += h.sum
        kind = snap.get("kind", "")
        pid, unix_s = snap.get("pid"), snap.get("unix_s", 0)
        if pid is not None:
            reported[kind][pid] = max(unix_s, reported[kind].get(pid, unix_s))
        if kind not in newest or snap.get("unix_s", 0) >= newest[kind].get("unix_s", 0):
            newest[kind] = snap
    gauges: dict[str, list] = {}
    for snap in newest.values():
        gauges.update(snap.get("gauges", {}))
    return {
        "counters": {n: [[list(k), v] for k, v in s.items()] for n, s in counters.items()},
        "histograms": {n: [[list(k), h.to_dict()] for k, h in s.items()] for n, s in hists.items()},
        "gauges": gauges,
        "newest": {k: {"pid": s.get("pid"), "unix_s": s.get("unix_s")} for k, s in newest.items()},
        "reported": {k: dict(v) for k, v in reported.items()},
    }


class IngestMetrics:
    """The pipeline's counters (per topic/partition, dead letters per reason) and the cache
    write latency histogram. ``record`` is called by the cache writer for every batch it
    commits (``OrderedCacheWriter(on_written=...)``); ``snapshot`` from any thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[str, dict[tuple, int]] = {
            n: defaultdict(int) for n in ("headrace_events_read_total", "headrace_events_cached_total",
                                          "headrace_events_filtered_total", "headrace_dead_letters_total")}
        self._write = BucketHistogram(WRITE_BUCKETS_S)
        self.version = 0  # bumps on every record, so a writer can skip unchanged snapshots

    def record(self, pb: ProcessedBatch, stored_next: int | None, write_s: float) -> None:
        """Count the part of ``pb`` the cache stored: from ``stored_next`` (the partition's
        next offset before the write; None for a new partition) on, as ``BatchCache.write``."""
        nxt = pb.partition_start if stored_next is None else stored_next
        if pb.start_offset < nxt:  # overlaps what is stored: the cache kept only the rest
            pb = admit(check(pb), stored_next).pb
        labels = partition_labels(pb.topic, pb.partition)
        dead: dict[str, int] = {}
        for d in pb.dead_letters:
            dead[d.reason.value] = dead.get(d.reason.value, 0) + 1
        c = self._counts
        with self._lock:
            c["headrace_events_read_total"][labels] += pb.batch.num_rows + len(pb.dead_letters) + len(pb.filtered_offsets)
            c["headrace_events_cached_total"][labels] += pb.batch.num_rows
            c["headrace_events_filtered_total"][labels] += len(pb.filtered_offsets)
            for reason, n in dead.items():
                c["headrace_dead_letters_total"][labels + (reason,)] += n
            self._write.observe(write_s)
            self.version += 1

    def snapshot(self) -> Snapshot:
        with self._lock:
            return {
                "kind": "ingest",
                "counters": {n: [[list(k), v] for k, v in s.items()] for n, s in self._counts.items()},
                "histograms": {"headrace_cache_write_seconds": [[[], self._write.to_dict()]]},
            }


_writer_ids = itertools.count()


class SnapshotWriter:
    """Writes ``source()`` to ``<directory>/<kind>-<pid>-<n>.json`` at start, then every
    ``every_s`` seconds while ``version()`` changes, and once more on ``close()``. One
    daemon thread; ``source`` must be safe to call from it."""

    def __init__(self, directory: str, kind: str, source: Callable[[], Snapshot], *, every_s: float = 1.0,
                 version: Callable[[], int] | None = None):
        self.path = os.path.join(directory, f"{kind}-{os.getpid()}-{next(_writer_ids)}.json")
        self.source = source
        self.every_s = every_s
        self.version = version or (lambda: 0)
        self._stop = threading.Event()
        self._written_version: int | None = None
        os.makedirs(directory, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="metrics-snapshot", daemon=True)
        self._write(force=True)
        self._thread.start()

    def _write(self, force: bool = False) -> None:
        v = self.version()
        if not force and v == self._written_version:
            return
        snap = {**self.source(), "pid": os.getpid(), "unix_s": time.time()}
        try:
            write_snapshot(self.path, snap)
            self._written_version = v
        except OSError as exc:  # metrics must never stop ingest (a full disk is reported elsewhere)
            log.debug("metrics snapshot %s not written: %s", self.path, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._write()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._write(force=True)


def device_memory() -> list[list]:
    """``[[device, kind], bytes]`` samples of the current CUDA device (empty without CUDA in
    use; never imports torch itself)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    dev = torch.cuda.current_device()
    name = f"cuda:{dev}"
    return [[[name, "allocated"], torch.cuda.memory_allocated(dev)],
            [[name, "reserved"], torch.cuda.memory_reserved(dev)],
            [[name, "max_allocated"], torch.cuda.max_memory_allocated(dev)]]


def trainer_snapshot(progress: dict[str, Any]) -> Snapshot:
    """A snapshot from one ``ContinuousTrainer`` progress report (this run's cumulative
    numbers: ``trained_samples``, ``data_wait_s``, ``histograms`` ... see ``trainer.loop``)."""
    hist = progress.get("histograms") or {}
    steps = hist.get("step_seconds")
    counters = {
        "headrace_trainer_samples_total": [[[], progress.get("trained_samples", 0)]],
        "headrace_trainer_data_wait_seconds_total": [[[], progress.get("data_wait_s", 0.0)]],
    }
    if steps is not None:
        counters["headrace_trainer_batches_total"] = [[[], sum(steps["counts"])]]
    row_cache = progress.get("row_cache")
    if row_cache is not None:
        for name, key in (("headrace_trainer_row_cache_lookups_total", "lookups"),
                          ("headrace_trainer_row_cache_hits_total", "hits"),
                          ("headrace_trainer_row_cache_read_bytes_total", "bytes_read"),
                          ("headrace_trainer_row_cache_written_bytes_total", "bytes_written")):
            counters[name] = [[[], row_cache[key]]]
    gauges: dict[str, list] = {}
    for name, key in (("headrace_trainer_data_wait_ratio", "data_wait_fraction"),
                      ("headrace_trainer_auc", "auc"), ("headrace_trainer_logloss", "logloss"),
                      ("headrace_trainer_calibration", "calibration"),
                      ("headrace_trainer_window_auc", "window_auc"),
                      ("headrace_trainer_window_logloss", "window_logloss"),
                      ("headrace_trainer_window_calibration", "window_calibration"),
                      ("headrace_trainer_mapping_version", "mapping_version"),
                      ("headrace_model_trained_samples", "total_trained_samples")):
        if progress.get(key) is not None:
            gauges[name] = [[[], float(progress[key])]]
    gauges["headrace_trainer_last_report_timestamp_seconds"] = [[[], time.time()]]
    quantiles = [[[q], progress[k]] for q, k in (("0.5", "freshness_p50_s"), ("0.99", "freshness_p99_s"))
                 if progress.get(k) is not None]
    if quantiles:
        gauges["headrace_freshness_window_seconds"] = quantiles
    if row_cache is not None:
        gauges["headrace_trainer_row_cache_hit_ratio"] = [[[], float(row_cache["hit_rate"])]]
    memory = device_memory()
    if memory:
        gauges["headrace_trainer_device_memory_bytes"] = memory
    histograms = {}
    if steps is not None:
        histograms["headrace_trainer_step_seconds"] = [[[], steps]]
    if hist.get("freshness_seconds") is not None:
        histograms["headrace_freshness_seconds"] = [[[], hist["freshness_seconds"]]]
    return {"kind": "trainer", "counters": counters, "gauges": gauges, "histograms": histograms}


class TrainerReporter:
    """Turns the trainer's progress reports into snapshots: written to
    ``<directory>/trainer-<pid>-0.json`` (a trainer child), or only kept as ``latest`` when
    ``directory`` is None (``train`` serving its own endpoint)."""

    def __init__(self, directory: str | None):
        self.directory = directory
        self.latest: Snapshot | None = None
        if directory is not None:
            os.makedirs(directory, exist_ok=True)

    def report(self, progress: dict[str, Any]) -> None:
        snap = {**trainer_snapshot(progress), "pid": os.getpid(), "unix_s": time.time()}
        self.latest = snap
        if self.directory is not None:
            try:
                write_snapshot(os.path.join(self.directory, f"trainer-{os.getpid()}-0.json"), snap)
            except OSError as exc:  # metrics must never stop training
                log.debug("trainer metrics snapshot not written: %s", exc)


# --------------------------------------------------------------------------- the collector

def _families(merged: Snapshot) -> Iterator[Any]:
    for section, family in (("counters", CounterMetricFamily), ("gauges", GaugeMetricFamily)):
        for name, samples in merged.get(section, {}).items():
            d = METRICS.get(name)
            if d is None or not samples:
                continue
            fam = family(name.removesuffix("_total"), d.help, labels=d.labels)  # counters add _total back
            for labels, value in samples:
                fam.add_metric(labels, value)
            yield fam
    for name, samples in merged.get("histograms", {}).items():
        d = METRICS.get(name)
        if d is None or not samples:
            continue
        fam = HistogramMetricFamily(name, d.help, labels=d.labels)
        for labels, h in samples:
            cumulative = list(itertools.accumulate(h["counts"]))
            buckets = [(repr(float(b)), c) for b, c in zip(h["bounds"], cumulative)] + [("+Inf", cumulative[-1])]
            fam.add_metric(labels, buckets, sum_value=h["sum"])
        yield fam


class HeadraceCollector(Collector):
    """Builds every ``headrace_*`` family at scrape time from: the snapshot files in
    ``snapshot_dir`` (children), in-process snapshot providers (``train``'s own trainer), and
    the supervisor's own numbers (cache sizes, lag) as providers of snapshots. ``service``, a
    last provider read by ``collect`` only, may itself use ``merged()`` (readiness does)."""

    def __init__(self, snapshot_dir: str | None = None):
        self.snapshot_dir = snapshot_dir
        self._providers: list[Callable[[], Snapshot | None]] = []
        self.service: Callable[[], Snapshot | None] | None = None

    def add_provider(self, provider: Callable[[], Snapshot | None]) -> None:
        self._providers.append(provider)

    def merged(self, *, with_service: bool = False) -> Snapshot:
        snaps = read_snapshots(self.snapshot_dir) if self.snapshot_dir else []
        providers = self._providers + ([self.service] if with_service and self.service else [])
        for provider in providers:
            try:
                snap = provider()
            except Exception as exc:  # noqa: BLE001 - a failing source must not break the scrape
                log.debug("metrics provider failed: %s", exc)
                continue
            if snap:
                snaps.append(snap)
        return merge_snapshots(snaps)

    def collect(self) -> Iterator[Any]:
        yield from _families(self.merged(with_service=True))
