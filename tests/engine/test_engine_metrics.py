"""Metrics plumbing: children's snapshots summed by the supervisor (restarts included), the
ingest counters against the real cache's, the exposition parsed back, the endpoint's HTTP
routes and readiness, and the [metrics] config."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pathlib
import socket
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.cache_sink import OrderedCacheWriter
from engine.config import config_from_dict
from engine.config.metrics import parse_listen
from engine.errors import ConfigError
from engine.health import address_file, open_endpoint, trainer_check
from engine.metrics import (
    HeadraceCollector,
    IngestMetrics,
    SnapshotWriter,
    merge_snapshots,
    read_snapshots,
    trainer_snapshot,
    write_snapshot,
)
from storage.batch_cache import BatchCache
from tests.engine_helpers import http_get
from tests.storage.builders import make_pb
from trainer.live_metrics import LiveMetrics
from transforms.elements import Reason


def _samples(registry) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_ingest_counters_equal_the_caches_own_including_an_overlapping_batch(tmp_path):
    metrics = IngestMetrics()
    with BatchCache(str(tmp_path / "c")) as cache:
        writer = OrderedCacheWriter(cache, on_written=metrics.record)
        writer.write(make_pb("t", 0, 0, 10, dead=(3,), filtered=(5,)))
        writer.write(make_pb("t", 1, 0, 4, dead=(0, 1), reason=Reason.NOT_UTF8))
        writer.write(make_pb("t", 0, 6, 20, dead=(12,), filtered=(7, 15)))  # overlaps [6, 10): trimmed by the cache
        writer.write(make_pb("t", 0, 0, 10))  # a duplicate: counted by neither
        counts = cache.counts()
        reasons = cache.stat()["dead_letters"]
    snap = metrics.snapshot()
    total = {name: sum(v for _, v in samples) for name, samples in snap["counters"].items()}
    assert total["headrace_events_read_total"] == counts["read"] == 24
    assert total["headrace_events_cached_total"] == counts["cached_rows"]
    assert total["headrace_events_filtered_total"] == counts["filtered"]
    assert total["headrace_dead_letters_total"] == counts["dead_letters"]
    by_reason = {}
    for labels, v in snap["counters"]["headrace_dead_letters_total"]:
        by_reason[labels[2]] = by_reason.get(labels[2], 0) + v
    assert by_reason == reasons
    read = {tuple(labels): v for labels, v in snap["counters"]["headrace_events_read_total"]}
    assert read == {("t", "0"): 20, ("t", "1"): 4}
    assert sum(snap["histograms"]["headrace_cache_write_seconds"][0][1]["counts"]) == 3


def test_file_sources_fold_into_one_series():
    metrics = IngestMetrics()
    metrics.record(make_pb("file:/logs/a.jsonl", 0, 0, 5), None, 0.001)
    metrics.record(make_pb("file:/logs/b.jsonl", 0, 0, 3), None, 0.001)
    assert metrics.snapshot()["counters"]["headrace_events_read_total"] == [[["files", "-"], 8]]


def _ingest(pid: int, unix_s: float, read: int, write_counts: list[int]) -> dict:
    bounds = [0.01, 0.1]
    return {"kind": "ingest", "pid": pid, "unix_s": unix_s,
            "counters": {"headrace_events_read_total": [[["t", "0"], read]]},
            "histograms": {"headrace_cache_write_seconds": [[[], {"bounds": bounds, "counts": write_counts,
                                                                  "sum": 0.5}]]}}


def test_snapshots_of_a_restarted_child_add_up_and_gauges_come_from_the_newest(tmp_path):
    write_snapshot(str(tmp_path / "ingest-10-0.json"), _ingest(10, 100.0, 500, [1, 2, 0]))
    write_snapshot(str(tmp_path / "ingest-11-0.json"), _ingest(11, 200.0, 30, [0, 1, 1]))  # after a restart
    (tmp_path / "torn.json").write_bytes(b"{not json")  # skipped, never fatal
    old = {"kind": "trainer", "pid": 20, "unix_s": 100.0, "gauges": {"headrace_trainer_auc": [[[], 0.6]]}}
    new = {"kind": "trainer", "pid": 21, "unix_s": 300.0, "gauges": {"headrace_trainer_auc": [[[], 0.7]]}}
    merged = merge_snapshots([*read_snapshots(str(tmp_path)), new, old])
    assert merged["counters"]["headrace_events_read_total"] == [[["t", "0"], 530]]
    hist = merged["histograms"]["headrace_cache_write_seconds"][0][1]
    assert hist["counts"] == [1, 3, 1] and hist["sum"] == 1.0
    assert merged["gauges"]["headrace_trainer_auc"] == [[[], 0.7]]
    assert merged["newest"]["ingest"]["pid"] == 11


def test_exposition_parses_back_with_prometheus_types(tmp_path):
    live = LiveMetrics(100)
    live.observe_step(0.004, [time.time() * 1000 - 2500, time.time() * 1000 - 500], time.time())
    progress = {"trained_samples": 2, "total_trained_samples": 10, "data_wait_s": 0.5, "data_wait_fraction": 0.1,
                "auc": 0.75, "window_auc": None, "mapping_version": 3, **live.summary()}
    write_snapshot(str(tmp_path / "trainer-1-0.json"), {**trainer_snapshot(progress), "pid": 1, "unix_s": 1.0})
    write_snapshot(str(tmp_path / "ingest-2-0.json"), _ingest(2, 1.0, 7, [1, 0, 0]))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HeadraceCollector(str(tmp_path)))
    types = {f.name: f.type for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert types["headrace_events_read"] == "counter" and types["headrace_freshness_seconds"] == "histogram"
    assert types["headrace_trainer_auc"] == "gauge" and "headrace_trainer_window_auc" not in types  # None: absent
    s = _samples(registry)
    assert s[("headrace_events_read_total", (("partition", "0"), ("topic", "t")))] == 7
    assert s[("headrace_trainer_samples_total", ())] == 2 and s[("headrace_trainer_batches_total", ())] == 1
    assert s[("headrace_freshness_seconds_count", ())] == 2
    assert s[("headrace_freshness_seconds_bucket", (("le", "+Inf"),))] == 2
    assert s[("headrace_freshness_seconds_bucket", (("le", "1.0"),))] == 1
    assert s[("headrace_freshness_window_seconds", (("quantile", "0.5"),))] == pytest.approx(1.5, abs=0.05)
    assert s[("headrace_trainer_mapping_version", ())] == 3


def test_trainer_check_tells_a_starved_trainer_from_a_stuck_one():
    clock = {"now": 1000.0}
    rows = {"cached": 500}
    snap = {"newest": {"trainer": {"pid": 1, "unix_s": 1000.0}},
            "gauges": {"headrace_trainer_last_report_timestamp_seconds": [[[], 1000.0]]}}
    alive = {"v": True}
    check = trainer_check(lambda: snap, alive=lambda: alive["v"], started_unix_s=900.0,
                          cached_rows=lambda: rows["cached"], batch_size=100, max_stall_s=60.0,
                          now=lambda: clock["now"])
    assert check().ok
    clock["now"] = 1100.0  # quiet for 100 s with no new rows: starved, fine
    assert check().ok and "idle" in check().detail
    rows["cached"] = 700  # two batches arrived and still no step: stuck
    assert not check().ok
    alive["v"] = False
    assert "not running" in check().detail
    late = trainer_check(lambda: snap, alive=lambda: True, started_unix_s=2000.0, cached_rows=lambda: 0,
                         batch_size=100, max_stall_s=60.0)
    assert not late().ok  # the report predates this run's trainer


def _cfg(tmp_path, listen: str):
    return config_from_dict({"schema": {"dense": [{"name": "x"}]}, "cache": {"path": str(tmp_path / "cache")},
                             "metrics": {"listen": listen, "snapshot_every_s": 0.05}})


def test_endpoint_serves_metrics_health_and_readiness_that_follows_the_child(tmp_path):
    cfg = _cfg(tmp_path, "127.0.0.1:0")
    snap_dir = str(tmp_path / "snaps")
    child = mp.get_context("spawn").Process(target=time.sleep, args=(60,), daemon=True)
    child.start()
    try:
        with BatchCache(cfg.cache.path) as cache:
            cache.write(make_pb("t", 0, 0, 10))
            with open_endpoint(cfg, "serve", cache=cache, snapshot_dir=snap_dir, pipeline=child) as ep:
                address = json.loads(pathlib.Path(address_file(cfg, "serve")).read_text())["address"]
                assert address == ep.address
                status, body = http_get(address, "/healthz")
                assert status == 200 and json.loads(body)["children"] == {"pipeline": child.pid}
                status, body = http_get(address, "/readyz")
                assert status == 503 and not json.loads(body)["checks"]["pipeline"]["ok"]
                writer = SnapshotWriter(snap_dir, "ingest", IngestMetrics().snapshot)  # what the child would write
                assert http_get(address, "/readyz")[0] == 200
                s = _samples(ep.registry)
                assert s[("headrace_cache_rows", ())] == cache.sizes()["rows"] == 10
                assert s[("headrace_ready", ())] == 1 and s[("headrace_child_up", (("child", "pipeline"),))] == 1
                assert ("headrace_pipeline_process_cpu_seconds_total", ()) in s
                assert http_get(address, "/nope")[0] == 404
                child.kill()
                child.join()
                status, body = http_get(address, "/readyz")
                assert status == 503 and "not running" in json.loads(body)["checks"]["pipeline"]["detail"]
                writer.close()
        assert not os.path.exists(address_file(cfg, "serve"))
    finally:
        if child.is_alive():
            child.kill()


def test_a_taken_port_is_a_warning_not_a_failure(tmp_path, caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = _cfg(tmp_path, f"127.0.0.1:{taken.getsockname()[1]}")
        with BatchCache(cfg.cache.path) as cache, open_endpoint(cfg, "train", cache=cache) as ep:
            assert ep.address is None
    assert "metrics endpoint not started" in caplog.text
    off = _cfg(tmp_path, "")
    with BatchCache(off.cache.path) as cache, open_endpoint(off, "train", cache=cache) as ep:
        assert ep.address is None


def test_listen_is_validated():
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("  ") is None
    for bad, fragment in (("9464", "HOST:PORT"), ("h:port", "not a number"), ("h:70000", "outside")):
        with pytest.raises(ConfigError, match=fragment) as err:
            config_from_dict({"schema": {"dense": [{"name": "x"}]}, "metrics": {"listen": bad}})
        assert "[metrics.listen]" in str(err.value) or "[metrics]" in str(err.value)
    with pytest.raises(ConfigError, match="ready_max_lag"):
        config_from_dict({"schema": {"dense": [{"name": "x"}]}, "metrics": {"ready_max_lag": -1}})


def test_the_grafana_dashboard_uses_only_metrics_that_exist():
    import re

    from engine.metrics import METRICS

    text = (pathlib.Path(__file__).resolve().parents[2] / "examples" / "grafana-headrace.json").read_text()
    json.loads(text)
    for name in set(re.findall(r"\b(headrace_[a-z_]+)", text)):
        if re.match(r"headrace_(pipeline|trainer)_process_", name):
            continue
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        assert base in METRICS, name


def test_metrics_listen_flag_overrides_the_config(tmp_path):
    from engine.cli import _config, build_parser

    path = tmp_path / "c.toml"
    path.write_text('[schema]\ndense = [{ name = "x" }]\n')
    for command in ("serve", "backfill", "train"):
        extra = ["--from", "x.jsonl"] if command == "backfill" else []
        args = build_parser().parse_args([command, "-c", str(path), "--metrics-listen", "127.0.0.1:0", *extra])
        assert _config(args).metrics.address == ("127.0.0.1", 0)
    args = build_parser().parse_args(["train", "-c", str(path), "--metrics-listen", "nope"])
    with pytest.raises(ConfigError, match="--metrics-listen"):
        _config(args)
