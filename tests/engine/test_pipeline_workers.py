"""``[pipeline] workers`` and ``[source] member``: several pipeline processes (and hosts)
split a topic's partitions statically; every event is cached exactly once, each partition
by the worker the logged assignment names, across a SIGTERM and a restart."""

from __future__ import annotations

import re
import signal
import threading
from collections import Counter

import pytest

from engine.config import load_config
from engine.errors import ConfigError
from engine.health import pipeline_check
from engine.lag import LagMonitor
from engine.metrics import merge_snapshots
from engine.processes import StopFile
from engine.serve import pipeline_main
from engine.workers import plan_file_workers, plan_kafka_workers
from storage.batch_cache import BatchCache
from streams.assignment import Share, parse_member
from tests.engine_helpers import (
    cache_counts,
    last_json,
    produce_numbered,
    small_config,
    small_config_doc,
    start_headrace,
    stop,
    wait_until,
    write_config,
)

PARTITIONS = 4
BASE_TS = 1_767_225_600_000  # produce_numbered's event i has ts BASE_TS + i


def _events_by_partition(cache_path) -> tuple[Counter, dict[int, set[int]]]:
    """How often each event (by its unique event time) is cached, and each partition's events."""
    seen: Counter = Counter()
    by_partition: dict[int, set[int]] = {}
    with BatchCache(str(cache_path), readonly=True) as cache:
        for cached in cache.iter_batches():
            events = [t - BASE_TS for t in cached.batch.column("_event_time_ms").to_pylist()]
            seen.update(events)
            by_partition.setdefault(cached.partition, set()).update(events)
    return seen, by_partition


def _worker_lines(log_text: str) -> list[tuple[str, str]]:
    """What each worker's Kafka source logged it reads (``-v``): ``[("0/2", "topic[0,2]")]``."""
    return sorted(re.findall(r"kafka source, worker (\d+/\d+) of member \d+/\d+: reads (\S+)", log_text))


def _run_until(cfg, shares, stop_path, events: int) -> None:
    """``serve``'s pipeline workers (``pipeline_main``), one thread per share, until the cache
    has read ``events``; then their stop file, as ``serve`` stops them."""
    stop_file = StopFile(stop_path)
    threads = [threading.Thread(target=pipeline_main, args=(cfg, stop_file.path, None, share)) for share in shares]
    # Workers and the poller below share this process's LMDB environment, which must be
    # opened writable first (storage.lmdb_env): a poll that opened it read-only before a
    # worker thread did would make that worker fail.
    with BatchCache.from_config(cfg.cache):
        for t in threads:
            t.start()
        try:
            wait_until(lambda: cache_counts(cfg.cache.path)["read"] >= events, 120, f"{events} events cached")
        finally:
            stop_file.request()
            for t in threads:
                t.join(timeout=60)


# ----------------------------------------------------------------------------- pure


def test_share_splits_members_then_workers():
    shares = [Share.for_member(f"{i}/2", worker=w, workers=3) for i in range(2) for w in range(3)]
    owners = [[s for s in shares if s.owns(p)] for p in range(24)]
    assert all(len(o) == 1 for o in owners)  # each partition exactly one process of one host
    assert [p for p in range(12) if shares[1].owns(p)] == [2, 8]  # member 0, worker 1: (p div 2) mod 3 == 1
    one_host = Share(worker=1, workers=2)
    assert [p for p in range(6) if one_host.owns(p)] == [1, 3, 5]  # p mod N with one member
    assert one_host.pick(["a", "b", "c", "d"]) == ["b", "d"]
    assert parse_member("1/3") == (1, 3)


def test_backfill_files_split_like_partitions(tmp_path):
    files = [f"f{i}.jsonl" for i in range(6)]
    two_workers = small_config(tmp_path, pipeline={"workers": 2})
    assert plan_file_workers(two_workers, files) == [files[0::2], files[1::2]]
    member = small_config(tmp_path, source={"member": "1/2"}, pipeline={"workers": 2})
    assert plan_file_workers(member, files) == [["f1.jsonl", "f5.jsonl"], ["f3.jsonl"]]
    assert plan_file_workers(small_config(tmp_path, pipeline={"workers": 8}), files[:2]) == [["f0.jsonl"], ["f1.jsonl"]]


@pytest.mark.parametrize("section, body, key", [
    ("pipeline", "workers = 0", "workers must be >= 1"),
    ("pipeline", 'workers = 2\nrunner = "DaskRunner"', "Dask cluster's workers do the scaling"),
    ("source", 'member = "2/2"', 'member "2/2"'),
    ("source", 'member = "1"', 'member must be "i/n"'),
    ("source", 'member = "a/b"', 'member must be "i/n"'),
    ("source", 'member = "0/0"', 'member "0/0"'),
])
def test_bad_workers_or_member_is_a_config_error_naming_the_key(tmp_path, section, body, key):
    path = tmp_path / "bad.toml"
    path.write_text(f'[schema]\ndense = [{{ name = "x" }}]\n\n[{section}]\n{body}\n')
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert f"[{section}]" in str(err.value) and key in str(err.value) and "bad.toml" in str(err.value)


def test_pipeline_ready_only_when_every_worker_reported():
    snaps = [{"kind": "ingest", "pid": 11, "unix_s": 100.0}, {"kind": "ingest", "pid": 12, "unix_s": 50.0}]
    check = pipeline_check(lambda: merge_snapshots(snaps), alive=lambda: True, started_unix_s=90.0, workers=2)
    assert not check().ok and "1 of 2" in check().detail  # worker 12's snapshot predates this run
    snaps.append({"kind": "ingest", "pid": 12, "unix_s": 101.0})
    assert check().ok


# ----------------------------------------------------------------------------- broker, processes


@pytest.mark.slow
def test_two_workers_cache_every_event_once_each_partition_by_its_worker(broker, new_topic, tmp_path):
    topic = new_topic(partitions=PARTITIONS)
    doc = small_config_doc(tmp_path, bootstrap=broker.bootstrap, topic=topic, pipeline={"workers": 2},
                           metrics={"listen": ""})
    cfg_path = write_config(tmp_path, doc)
    cache_path, log = tmp_path / "cache", tmp_path / "serve.log"
    produce_numbered(broker.bootstrap, topic, 0, 2000, PARTITIONS)
    expected = {"pipeline_0": {topic: [0, 2]}, "pipeline_1": {topic: [1, 3]}}  # p mod 2

    # The CLI (-v: the workers' own log lines too), stopped by SIGTERM.
    proc = start_headrace("-v", "serve", "--no-train", "--json", "-c", str(cfg_path), log_path=log)
    wait_until(lambda: cache_counts(cache_path)["read"] >= 2000, 120, "2000 events cached", proc, log)
    assert stop(proc, signal.SIGTERM) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert last_json(text)["assignment"] == expected
    # the assignment is logged at start, and each worker's source read exactly its partitions
    assert f"assignment: pipeline_1 (worker 1/2 of member 0/1) reads {topic}[1,3]" in text
    assert _worker_lines(text) == [("0/2", f"{topic}[0,2]"), ("1/2", f"{topic}[1,3]")]
    seen, by_partition = _events_by_partition(cache_path)
    assert sorted(seen) == list(range(2000)) and set(seen.values()) == {1}  # each event exactly once
    assert by_partition == {p: set(range(p, 2000, PARTITIONS)) for p in range(PARTITIONS)}

    # A restart resumes every partition from the cache's offsets: the workers' entry point,
    # with the plan's shares, in threads here (one pipeline process start costs ~20 s here).
    produce_numbered(broker.bootstrap, topic, 2000, 1000, PARTITIONS)
    cfg = load_config(str(cfg_path))
    plan = plan_kafka_workers(cfg)
    assert {name: topics for name, (_, topics) in plan.items()} == expected
    _run_until(cfg, [share for share, _ in plan.values()], tmp_path / "stop", 3000)
    seen, by_partition = _events_by_partition(cache_path)
    assert sorted(seen) == list(range(3000)) and set(seen.values()) == {1}
    assert by_partition == {p: set(range(p, 3000, PARTITIONS)) for p in range(PARTITIONS)}
    with BatchCache(str(cache_path), readonly=True) as cache:
        assert cache.next_offsets()[topic] == {p: 3000 // PARTITIONS for p in range(PARTITIONS)}
        assert cache.counts()["read"] == 3000


@pytest.mark.slow
def test_members_split_partitions_between_two_caches(broker, new_topic, tmp_path):
    """Two hosts' configs (member 0/2, 1/2), each host's pipeline run as serve runs it (in a
    thread here, to spare two process starts): two caches whose union is every event once."""
    topic = new_topic(partitions=PARTITIONS)
    produce_numbered(broker.bootstrap, topic, 0, 2000, PARTITIONS)
    union: Counter = Counter()
    for i in range(2):
        cfg = small_config(tmp_path, bootstrap=broker.bootstrap, topic=topic, cache=f"cache{i}",
                           source={"member": f"{i}/2"})
        plan = plan_kafka_workers(cfg)
        assert {name: topics for name, (_, topics) in plan.items()} == {"pipeline": {topic: [i, i + 2]}}
        _run_until(cfg, [plan["pipeline"][0]], tmp_path / f"stop{i}", 1000)
        seen, by_partition = _events_by_partition(cfg.cache.path)
        assert sorted(by_partition) == [i, i + 2]  # member i: partitions p with p mod 2 == i
        union.update(seen)
        with BatchCache.from_config(cfg.cache, readonly=True) as cache:
            lag = LagMonitor(cfg, cache, commit_group=False)  # this host's partitions only
            assert lag.measure() == 0 and sorted(lag.partition_lag) == [(topic, i), (topic, i + 2)]
    assert sorted(union) == list(range(2000)) and set(union.values()) == {1}  # the union: each event once
    two_workers = small_config(tmp_path, bootstrap=broker.bootstrap, topic=topic, source={"member": "1/2"},
                               pipeline={"workers": 2})
    assert {n: t for n, (_, t) in plan_kafka_workers(two_workers).items()} == {
        "pipeline_0": {topic: [1]}, "pipeline_1": {topic: [3]}}  # member 1's partitions, (p div 2) mod 2
