"""A real ``headrace serve`` on the bundled broker, watched the way Prometheus and a load
balancer would: ``/metrics`` scraped over HTTP and parsed with ``prometheus_client.parser``,
``/healthz`` and ``/readyz`` polled; and freshness checked against the producer's clock."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
from pathlib import Path

import numpy as np
import orjson
import pytest
from kafka import KafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from storage.batch_cache import BatchCache
from streams.producer import produce_values
from streams.synthetic import generate_payloads
from tests.engine_helpers import (
    SMALL_SPEC,
    cache_counts,
    headrace,
    http_get,
    last_json,
    small_config_doc,
    start_headrace,
    stop,
    wait_until,
    write_config,
)


def _address(cache_path: Path) -> str | None:
    path = Path(f"{cache_path}.serve.metrics.json")
    try:
        return json.loads(path.read_text())["address"]
    except (FileNotFoundError, ValueError):
        return None


def _scrape(address: str) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` of one /metrics scrape."""
    status, body = http_get(address, "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _series(scrape: dict, name: str) -> dict[tuple, float]:
    return {labels: v for (n, labels), v in scrape.items() if n == name}


def _per_partition(scrape: dict, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, v in _series(scrape, name).items():
        part = dict(labels)["partition"]
        out[part] = out.get(part, 0.0) + v
    return out


def _start(tmp_path: Path, doc: dict) -> tuple:
    cfg = write_config(tmp_path, doc)
    log = tmp_path / "serve.log"
    proc = start_headrace("serve", "-c", str(cfg), "--json", log_path=log)
    cache = tmp_path / "cache"
    wait_until(lambda: _address(cache) is not None, 60, "the metrics address file", proc, log)
    return cfg, log, proc, cache, _address(cache)


@pytest.mark.slow
def test_serve_metrics_reconcile_with_the_cache_and_readiness_follows_the_children(broker, new_topic, tmp_path):
    topic = new_topic(partitions=2)
    total = 4000
    payloads = generate_payloads(SMALL_SPEC, total, bad_fraction=0.02)  # some dead letters
    produce_values(broker.bootstrap, topic, payloads[: total // 2])
    doc = small_config_doc(tmp_path, bootstrap=broker.bootstrap, topic=topic,
                           metrics={"listen": "127.0.0.1:0", "snapshot_every_s": 0.2},
                           filter={"negative_keep_rate": 0.5})  # some filtered
    cfg, log, proc, cache, address = _start(tmp_path, doc)
    try:
        status, body = http_get(address, "/healthz")
        assert status == 200 and orjson.loads(body)["status"] == "ok"

        # Not ready until the pipeline reads, the trainer has stepped and the lag is known.
        readiness = []
        scrapes = []

        def ready() -> bool:
            code, _ = http_get(address, "/readyz")
            readiness.append(code)
            scrapes.append(_scrape(address))
            return code == 200

        wait_until(ready, 180, "/readyz to answer 200", proc, log)
        assert readiness[0] == 503, "ready before the trainer had trained anything"
        produce_values(broker.bootstrap, topic, payloads[total // 2:])
        wait_until(lambda: cache_counts(cache)["read"] >= total, 120, "every event cached", proc, log)

        def caught_up() -> bool:
            scrapes.append(_scrape(address))
            read = sum(_series(scrapes[-1], "headrace_events_read_total").values())
            lag = _series(scrapes[-1], "headrace_consumer_lag_events")
            return read == total and len(lag) == 2 and not any(lag.values())

        wait_until(caught_up, 60, "the metrics to count every event and the lag to reach 0", proc, log)
        last = scrapes[-1]

        # Counters never go down between scrapes.
        for before, after in zip(scrapes, scrapes[1:]):
            for key, value in before.items():
                if key[0].endswith(("_total", "_count", "_sum", "_bucket")) and key[0].startswith("headrace_"):
                    assert after.get(key, value) >= value, f"{key} went from {value} to {after.get(key)}"

        # read == cached + filtered + dead, per partition, and equal to the cache's own counters.
        read = _per_partition(last, "headrace_events_read_total")
        cached = _per_partition(last, "headrace_events_cached_total")
        filtered = _per_partition(last, "headrace_events_filtered_total")
        dead = _per_partition(last, "headrace_dead_letters_total")
        assert sorted(read) == ["0", "1"]
        for p in read:
            assert read[p] == cached[p] + filtered[p] + dead.get(p, 0.0), p
        res = headrace("cache", "stat", "-c", str(cfg), "--json")
        assert res.returncode == 0, res.stderr[-2000:]
        stat = last_json(res.stdout)
        assert sum(read.values()) == stat["read"] == total
        assert sum(cached.values()) == stat["cached_rows"]
        assert sum(filtered.values()) == stat["filtered"] > 0
        by_reason: dict[str, float] = {}
        for labels, v in _series(last, "headrace_dead_letters_total").items():
            by_reason[dict(labels)["reason"]] = by_reason.get(dict(labels)["reason"], 0.0) + v
        assert by_reason == {k: float(v) for k, v in stat["dead_letters"].items()} and by_reason
        assert last[("headrace_cache_rows", ())] == stat["rows"]
        assert last[("headrace_cache_bytes", ())] == stat["bytes"]
        assert last[("headrace_cache_write_seconds_count", ())] >= 2
        assert last[("headrace_trainer_samples_total", ())] > 0
        assert last[("headrace_trainer_step_seconds_count", ())] == last[("headrace_trainer_batches_total", ())] > 0
        assert last[("headrace_freshness_seconds_count", ())] == last[("headrace_trainer_samples_total", ())]
        assert last[("headrace_ready", ())] == 1.0
        assert last[("headrace_child_up", (("child", "pipeline"),))] == 1.0

        # SIGKILL the pipeline child: /readyz turns 503 (and serve then fails, exit 3).
        pipeline_pid = orjson.loads(http_get(address, "/healthz")[1])["children"]["pipeline"]
        os.kill(pipeline_pid, signal.SIGKILL)
        seen: list[dict] = []

        def not_ready() -> bool:
            try:
                code, body = http_get(address, "/readyz")
            except (urllib.error.URLError, ConnectionError):
                return False
            if code == 503:
                seen.append(orjson.loads(body))
            return code == 503

        wait_until(not_ready, 30, "/readyz to answer 503 after the pipeline died")
        assert seen[0]["checks"]["pipeline"]["ok"] is False
        assert proc.wait(timeout=120) == 3, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _address(cache) is None, "the address file outlived the service"


RATE_EVENTS_PER_S = 200
PRODUCE_S = 30.0


def _steady_producer(bootstrap: str, topic: str, sent_ms: list[int], stop_event: threading.Event) -> None:
    """An outside client (plain kafka-python): a fixed rate, event time = now."""
    events = [orjson.loads(p) for p in generate_payloads(SMALL_SPEC, int(RATE_EVENTS_PER_S * PRODUCE_S))]
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks=1, max_in_flight_requests_per_connection=1)
    t0 = time.monotonic()
    for i, ev in enumerate(events):
        if stop_event.is_set():
            break
        ahead = i / RATE_EVENTS_PER_S - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)
        ev["ts"] = int(time.time() * 1000)
        sent_ms.append(ev["ts"])
        producer.send(topic, orjson.dumps(ev), partition=0)
    producer.flush()
    producer.close()


@pytest.mark.slow
def test_freshness_in_the_summary_agrees_with_the_producers_clock(broker, new_topic, tmp_path):
    topic = new_topic(partitions=1)
    batch, window = 512, 2560  # a batch fills in ~2.6 s: freshness p50 is well above zero
    doc = small_config_doc(tmp_path, bootstrap=broker.bootstrap, topic=topic, metrics={"listen": "127.0.0.1:0"})
    doc["trainer"].update({"batch_size": batch, "metrics_window": window, "checkpoint_every_batches": 1000,
                           # whole batches from the start: the batch ramp's ~2,000 small steps would
                           # leave the trainer behind the stream for its first 28k samples (this
                           # test's whole run), and the last ones past the 4 s allowance below
                           "batch_ramp_samples": 0})
    _, log, proc, cache, address = _start(tmp_path, doc)
    sent_ms: list[int] = []
    done = threading.Event()
    producer = threading.Thread(target=_steady_producer, args=(broker.bootstrap, topic, sent_ms, done), daemon=True)
    producer.start()
    reports: dict[float, float] = {}  # trainer report time -> samples trained by then
    end_t: float | None = None
    try:
        while end_t is None or time.monotonic() < end_t:
            if end_t is None and not producer.is_alive():
                end_t = time.monotonic() + 4.0  # the last full batch trains within a step
            assert proc.poll() is None, log.read_text()[-4000:]
            scrape = _scrape(address)
            at = scrape.get(("headrace_trainer_last_report_timestamp_seconds", ()))
            if at is not None:
                reports[at] = scrape[("headrace_trainer_samples_total", ())]
            time.sleep(0.1)
        assert stop(proc, signal.SIGTERM) == 0, log.read_text()[-4000:]
    finally:
        done.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    summary = last_json(log.read_text())
    trained = summary["trained_samples"]
    assert trained >= window + batch, summary

    # The rows in training order with their event times (what the producer stamped).
    with BatchCache(str(cache), readonly=True) as c:
        event_ms = np.concatenate([b.batch.column("_event_time_ms").to_numpy() for b in c.iter_batches()])
    assert sorted(event_ms.tolist()) == sorted(sent_ms[: event_ms.size])
    # Row i was trained at the first trainer report whose sample count passed i. Rows trained
    # after the last report the test scraped have no known time: the window compared ends at
    # that report, at most a couple of batches before the summary's (a steady stream: the
    # two windows' medians agree well within the tolerance below).
    times = np.array(sorted(reports))
    counts = np.array([reports[t] for t in times])
    covered = int(min(counts[-1], trained))
    assert trained - covered <= 2 * batch, (trained, covered)
    rows = np.arange(covered - window, covered)
    trained_at = times[np.searchsorted(counts, rows, side="right")]
    ours = float(np.median(trained_at - event_ms[rows] / 1000.0))
    assert ours > 0.5, f"freshness p50 {ours:.2f} s: the test's batches should make it larger"
    assert abs(summary["freshness_p50_s"] - ours) < 1.0, (summary["freshness_p50_s"], ours)
    assert summary["freshness_p99_s"] >= summary["freshness_p50_s"]
