"""The service endpoint: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz`` over HTTP,
served by the supervisor (``serve``, ``backfill``) or the process itself (``train``).

- ``/healthz``: 200 while the process answers, with ``{"status": "ok", "pid", "command",
  "uptime_s", "children": {name: pid}}``.
- ``/readyz``: 200 when every check passes, else 503; the body names each check, whether it
  passed and why: ``pipeline`` (the child runs and its cache writer reports), ``trainer``
  (the child runs, has trained a batch in this run, and has not gone ``ready_max_stall_s``
  without a report while the cache holds a batch it has not trained), ``lag`` (measured,
  and at most ``[metrics] ready_max_lag`` events).

One ``CollectorRegistry`` per endpoint (so in-process callers can start several in turn):
the ``headrace_*`` families of ``engine.metrics.HeadraceCollector`` plus process metrics of
this process (``process_*``) and of each child (``headrace_pipeline_process_*``, ...).

The endpoint binds ``[metrics] listen`` (loopback by default). A port in use is logged as a
warning and the service runs without the endpoint: losing metrics must not stop training.
The bound address goes to stderr, into the command's JSON summary (``metrics_address``) and
into ``<cache.path>.<command>.metrics.json`` (removed on exit) for scripts and tests.
"""

from __future__ import annotations

import dataclasses
import http.server
import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Callable
from urllib.parse import urlparse

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector

from engine.config import HeadraceConfig
from engine.lag import LagMonitor
from engine.metrics import HeadraceCollector, Snapshot, TrainerReporter, partition_labels
from engine.workers import WorkerGroup
from storage.atomic import atomic_write_bytes
from storage.batch_cache import BatchCache

__all__ = ["CheckResult", "Readiness", "ServiceEndpoint", "address_file", "pipeline_check", "lag_check",
           "trainer_check", "open_endpoint", "CacheSource"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str


class Readiness:
    """Named checks, each a function returning ``CheckResult``; ready when all pass."""

    def __init__(self):
        self.checks: dict[str, Callable[[], CheckResult]] = {}

    def add(self, name: str, check: Callable[[], CheckResult]) -> None:
        self.checks[name] = check

    def evaluate(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        results: dict[str, dict[str, Any]] = {}
        for name, check in self.checks.items():
            try:
                r = check()
            except Exception as exc:  # noqa: BLE001 - a broken check reports not-ready, never 500
                r = CheckResult(False, f"check failed: {exc!r}")
            results[name] = {"ok": r.ok, "detail": r.detail}
        return bool(results) and all(r["ok"] for r in results.values()), results


def _reported_since(snap: Snapshot, kind: str, since_unix_s: float) -> bool:
    newest = snap.get("newest", {}).get(kind)
    return newest is not None and (newest.get("unix_s") or 0.0) >= since_unix_s


def pipeline_check(merged: Callable[[], Snapshot], *, alive: Callable[[], bool],
                   started_unix_s: float, workers: int = 1) -> Callable[[], CheckResult]:
    """The ``pipeline`` check: the child (every one of ``workers`` pipeline processes) runs
    and its cache writer has reported since it started."""

    def check() -> CheckResult:
        if not alive():
            what = "the pipeline process is" if workers == 1 else "a pipeline worker process is"
            return CheckResult(False, f"{what} not running")
        ingest = merged().get("reported", {}).get("ingest", {})
        ready = sum(1 for unix_s in ingest.values() if unix_s >= started_unix_s)
        if ready < workers:
            return CheckResult(False, "the pipeline is starting (its cache writer has not reported yet)"
                               if workers == 1 else f"the pipeline is starting ({ready} of {workers} workers' "
                                                    "cache writers have reported)")
        return CheckResult(True, "reading" if workers == 1 else f"reading ({workers} workers)")

    return check


def lag_check(lag: Callable[[], int | None], max_lag: int) -> Callable[[], CheckResult]:
    def check() -> CheckResult:
        value = lag()
        if value is None:
            return CheckResult(False, "consumer lag not measured yet")
        if value > max_lag:
            return CheckResult(False, f"consumer lag {value:,} events > [metrics] ready_max_lag {max_lag:,}")
        return CheckResult(True, f"consumer lag {value:,} events")

    return check


def trainer_check(merged: Callable[[], Snapshot], *, alive: Callable[[], bool], started_unix_s: float,
                  cached_rows: Callable[[], int], batch_size: int, max_stall_s: float,
                  now: Callable[[], float] = time.time) -> Callable[[], CheckResult]:
    """The ``trainer`` check over the merged snapshots (see the module docstring).

    Stalled: no report for ``max_stall_s`` although the cache gained two training batches
    of rows since that report was first seen. (The trainer reports after steps only, so a
    quiet trainer is either starved — fine — or stuck; new rows tell them apart: with two
    more batches cached it must have stepped, since it trains a batch once the next one is
    there.)"""
    seen: dict[float, int] = {}  # report time -> cached rows when this check first saw it

    def check() -> CheckResult:
        if not alive():
            return CheckResult(False, "the trainer process is not running")
        snap = merged()
        if not _reported_since(snap, "trainer", started_unix_s):
            return CheckResult(False, "the trainer has not trained a batch yet")
        last = snap.get("gauges", {}).get("headrace_trainer_last_report_timestamp_seconds", [[[], 0.0]])[0][1]
        if last not in seen:
            seen.clear()
            seen[last] = cached_rows()
        idle_s = now() - last
        if idle_s > max_stall_s:
            arrived = cached_rows() - seen[last]
            if arrived >= 2 * batch_size:
                return CheckResult(False, f"no training step for {idle_s:.0f} s (> [metrics] ready_max_stall_s) "
                                          f"while {arrived:,} rows were cached")
            return CheckResult(True, f"idle: waiting for data (last step {idle_s:.0f} s ago)")
        return CheckResult(True, f"stepping (last report {idle_s:.1f} s ago)")

    return check


def address_file(cfg: HeadraceConfig, command: str) -> str:
    """Where a command writes its bound metrics address: beside the cache directory."""
    return f"{os.path.abspath(cfg.cache.path).rstrip(os.sep)}.{command}.metrics.json"


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    endpoint: "ServiceEndpoint"


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # http.server's naming
        ep = self.server.endpoint
        path = urlparse(self.path).path
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            try:
                body = encoder(ep.registry)
            except Exception as exc:  # noqa: BLE001 - answered, and logged, instead of a reset connection
                log.warning("metrics scrape failed: %r", exc)
                self._send(500, f"metrics scrape failed: {exc!r}\n".encode(), "text/plain")
                return
            self._send(200, body, content_type)
        elif path == "/healthz":
            self._send(200, orjson.dumps(ep.health()), "application/json")
        elif path == "/readyz":
            ready, checks = ep.readiness.evaluate()
            self._send(200 if ready else 503, orjson.dumps({"ready": ready, "checks": checks}), "application/json")
        else:
            self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

    def log_message(self, format: str, *args: Any) -> None:  # the base class's signature
        pass  # scrapes every few seconds would flood stderr


class ServiceEndpoint:
    """Registry, readiness and HTTP server of one command run. ``start()`` binds (or logs why
    not) and returns the address; ``close()`` stops serving and removes the address file.

    ``snapshot_dir``: the per-run directory children write snapshot files into (see
    ``engine.metrics``); the caller creates and removes it.
    """

    def __init__(self, cfg: HeadraceConfig, command: str, snapshot_dir: str | None = None):
        self.cfg = cfg
        self.command = command
        self.collector = HeadraceCollector(snapshot_dir)
        self.readiness = Readiness()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        self.children: dict[str, Any] = {}
        self.address: str | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()
        self._address_path = address_file(cfg, command)
        self.collector.service = self._service_gauges

    # -- what it reports ------------------------------------------------------------------

    def add_child(self, name: str, proc: Any) -> None:
        """Report ``proc`` (a ``multiprocessing.Process``): up gauge, pid, process metrics."""
        self.children[name] = proc
        ProcessCollector(namespace=f"headrace_{name}", pid=lambda: proc.pid or 0, registry=self.registry)

    def add_provider(self, provider: Callable[[], Snapshot | None]) -> None:
        self.collector.add_provider(provider)

    def _service_gauges(self) -> Snapshot:
        ready, _ = self.readiness.evaluate()
        return {"kind": "service", "unix_s": time.time(), "gauges": {
            "headrace_ready": [[[], 1.0 if ready else 0.0]],
            "headrace_child_up": [[[name], 1.0 if p.is_alive() else 0.0] for name, p in self.children.items()],
        }}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "pid": os.getpid(), "command": self.command,
                "uptime_s": time.monotonic() - self._t0,
                "children": {name: p.pid for name, p in self.children.items()}}

    # -- serving --------------------------------------------------------------------------

    def start(self) -> str | None:
        bind = self.cfg.metrics.address
        if bind is None:
            return None
        try:
            server = (_Server6 if ":" in bind[0] else _Server)(bind, _Handler)
        except OSError as exc:
            log.warning("metrics endpoint not started: cannot listen on %s (%s); set [metrics] listen to "
                        "another port, port 0 for any free port, or \"\" to turn it off",
                        self.cfg.metrics.listen, exc.strerror or exc)
            return None
        server.endpoint = self
        self._server = server
        host, port = server.server_address[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="metrics-http", daemon=True)
        self._thread.start()
        try:
            atomic_write_bytes(self._address_path, orjson.dumps({
                "address": self.address, "url": f"http://{self.address}", "pid": os.getpid(),
                "command": self.command}), durable=False)
        except OSError as exc:
            log.warning("could not write the metrics address to %s: %s", self._address_path, exc)
        sys.stderr.write(f"headrace {self.command}: metrics on http://{self.address}/metrics "
                         f"(/healthz, /readyz)\n")
        sys.stderr.flush()
        return self.address

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        try:
            os.unlink(self._address_path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "ServiceEndpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


CacheSource = BatchCache | Callable[[], BatchCache | None]


def _cache_of(cache: CacheSource) -> BatchCache | None:
    return cache() if callable(cache) else cache


def _cache_provider(cache: CacheSource, lag: LagMonitor | None) -> Callable[[], Snapshot | None]:
    def provide() -> Snapshot | None:
        c = _cache_of(cache)
        if c is None:
            return None
        z = c.sizes()
        gauges = {"headrace_cache_bytes": [[[], z["bytes"]]], "headrace_cache_batches": [[[], z["batches"]]],
                  "headrace_cache_rows": [[[], z["rows"]]]}
        if lag is not None and lag.partition_lag:
            gauges["headrace_consumer_lag_events"] = [[list(partition_labels(t, p)), v]
                                                      for (t, p), v in sorted(lag.partition_lag.items())]
        return {"kind": "cache", "unix_s": time.time(), "gauges": gauges, "counters": {
            "headrace_cache_written_bytes_total": [[[], z["written_bytes"]]],
            "headrace_cache_retention_deleted_batches_total": [[[], z["written_batches"] - z["batches"]]],
            "headrace_cache_retention_deleted_bytes_total": [[[], z["written_bytes"] - z["bytes"]]],
            "headrace_dead_letters_expired_total": [[[], z["dead_letters_expired"]]],
        }}

    return provide


def open_endpoint(cfg: HeadraceConfig, command: str, *, cache: CacheSource, snapshot_dir: str | None = None,
                  pipeline: Any = None, trainer: Any = None, trainer_reporter: TrainerReporter | None = None,
                  lag: LagMonitor | None = None, since_unix_s: float | None = None) -> ServiceEndpoint:
    """The endpoint of one command run, started: cache gauges from ``cache`` (open for the
    endpoint's life, or a function returning it, None while not open yet), children's snapshots from ``snapshot_dir``, readiness checks for what
    is given (``pipeline``/``trainer`` processes, the pipeline a process or an
    ``engine.workers.WorkerGroup``; ``trainer_reporter`` for a trainer in this process; ``lag``). ``since_unix_s``: when the children were started (default: now); a
    child is ready once it has reported after that."""
    ep = ServiceEndpoint(cfg, command, snapshot_dir)
    ep.add_provider(_cache_provider(cache, lag))
    merged = ep.collector.merged
    now = time.time() if since_unix_s is None else since_unix_s
    if pipeline is not None:
        children = pipeline.children() if isinstance(pipeline, WorkerGroup) else [("pipeline", pipeline)]
        for name, proc in children:
            ep.add_child(name, proc)
        ep.readiness.add("pipeline", pipeline_check(merged, alive=pipeline.is_alive, started_unix_s=now,
                                                    workers=len(children)))
    if trainer is not None or trainer_reporter is not None:
        if trainer is not None:
            ep.add_child("trainer", trainer)
        else:
            ep.add_provider(lambda: trainer_reporter.latest)

        def cached_rows() -> int:
            c = _cache_of(cache)
            return 0 if c is None else c.counts()["cached_rows"]

        ep.readiness.add("trainer", trainer_check(
            merged, alive=trainer.is_alive if trainer is not None else (lambda: True), started_unix_s=now,
            cached_rows=cached_rows, batch_size=cfg.trainer.batch_size, max_stall_s=cfg.metrics.ready_max_stall_s))
    if lag is not None:
        ep.readiness.add("lag", lag_check(lambda: lag.lag, cfg.metrics.ready_max_lag))
    ep.start()
    return ep
