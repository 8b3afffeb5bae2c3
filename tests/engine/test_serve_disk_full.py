"""``serve`` with its cache on a small real file system (a tmpfs): at the disk reserve ingest
pauses while the trainer goes on, and resumes by itself once space is freed; with no reserve
a full disk stops ``serve`` with a clear, non-retriable error (exit 8), and after space is
freed the next run completes every event exactly once."""

from __future__ import annotations

import signal

import numpy as np
import orjson
import pytest

from storage.batch_cache import BatchCache
from storage.disk_space import disk_usage
from streams.producer import produce_values
from streams.synthetic import generate_payloads
from tests.engine_helpers import (
    SMALL_SPEC,
    cache_counts,
    last_json,
    small_config_doc,
    start_headrace,
    stop,
    wait_until,
    write_config,
)
from tests.small_fs import fill_to, grow, mounted_tmpfs

EVENTS = 60_000
RESERVE = 8 << 20


def _offsets_once(cache_path, topic: str, partitions: int, total: int) -> None:
    seen: dict[int, list[int]] = {p: [] for p in range(partitions)}
    with BatchCache(str(cache_path), readonly=True) as cache:
        for cb in cache.iter_batches():
            seen[cb.partition].extend(cb.batch.column("_offset").to_pylist())
        counts = cache.counts()
        offsets = cache.next_offsets()[topic]
    assert sum(len(v) for v in seen.values()) == total
    for p, got in seen.items():
        np.testing.assert_array_equal(np.sort(got), np.arange(offsets[p]))  # each offset once
    assert counts["read"] == counts["cached_rows"] == total


@pytest.mark.slow
def test_ingest_pauses_at_the_reserve_trainer_goes_on_and_ingest_resumes_when_space_is_freed(
        broker, new_topic, tmp_path):
    topic = new_topic(partitions=2)
    with mounted_tmpfs(tmp_path / "fs", 48 << 20) as fs:
        doc = small_config_doc(tmp_path, bootstrap=broker.bootstrap, topic=topic, cache="fs/cache")
        doc["cache"]["disk_reserve_bytes"] = RESERVE
        # small training batches: the trainer reports progress every 50 batches (1,600 rows)
        doc["trainer"].update({"threads": 1, "batch_size": 32})
        cfg = write_config(tmp_path, doc)
        filler = fill_to(fs, RESERVE + (4 << 20))  # room for about 4 MiB of cache above the reserve
        produce_values(broker.bootstrap, topic, generate_payloads(SMALL_SPEC, EVENTS))
        cache_path, log, status_file = fs / "cache", tmp_path / "serve.log", tmp_path / "status.json"
        proc = start_headrace("serve", "-c", str(cfg), "--json", "--status-file", str(status_file), log_path=log)
        try:
            def status() -> dict:
                try:
                    return orjson.loads(status_file.read_bytes())
                except (FileNotFoundError, orjson.JSONDecodeError):
                    return {}

            wait_until(lambda: (status().get("disk") or {}).get("paused"), 180, "ingest paused at the reserve",
                       proc, log)
            paused_at = cache_counts(cache_path)["read"]
            assert 0 < paused_at < EVENTS
            # stopped before the disk was full: the reserve is left for checkpoints (on this file system too)
            assert disk_usage(fs).free_bytes > 1 << 20
            # the trainer goes on with what is cached while ingest waits
            wait_until(lambda: status()["trained_samples"] >= paused_at - 50 * 32 - 32, 120,
                       "training what is cached while paused", proc, log)
            assert cache_counts(cache_path)["read"] == paused_at
            assert "ingest paused" in log.read_text()

            filler.unlink()  # an operator frees space: ingest resumes by itself
            wait_until(lambda: cache_counts(cache_path)["read"] >= EVENTS, 180, "all events after space freed",
                       proc, log)
            assert stop(proc, signal.SIGTERM) == 0, log.read_text()[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        text = log.read_text()
        assert "ingest resumed" in text
        assert last_json(text)["events"] == EVENTS
        _offsets_once(cache_path, topic, 2, EVENTS)


@pytest.mark.slow
def test_full_disk_stops_serve_with_a_clear_error_and_the_next_run_completes(broker, new_topic, tmp_path):
    topic = new_topic(partitions=2)
    with mounted_tmpfs(tmp_path / "fs", 6 << 20) as fs:
        doc = small_config_doc(tmp_path, bootstrap=broker.bootstrap, topic=topic, cache="fs/cache")
        doc["cache"]["disk_reserve_bytes"] = 0  # no reserve: the disk really fills up
        cfg = write_config(tmp_path, doc)
        produce_values(broker.bootstrap, topic, generate_payloads(SMALL_SPEC, EVENTS))
        cache_path, log = fs / "cache", tmp_path / "serve.log"
        proc = start_headrace("serve", "-c", str(cfg), "--no-train", log_path=log)
        try:
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        text = log.read_text()
        assert rc == 8, text[-4000:]
        last = text.strip().splitlines()[-1]
        assert last.startswith("headrace: error: the pipeline process: cache write"), last  # not "retriable"
        assert f"the file system holding {cache_path} is full" in last and "free" in last and "needed" in last
        assert "max_bytes" in last and "move" in last
        stored = cache_counts(cache_path)["read"]
        assert 0 < stored < EVENTS

        grow(fs, 64 << 20)  # space freed
        proc = start_headrace("serve", "-c", str(cfg), "--no-train", log_path=log)
        try:
            wait_until(lambda: cache_counts(cache_path)["read"] >= EVENTS, 180, "all events", proc, log)
            assert stop(proc, signal.SIGTERM) == 0, log.read_text()[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        _offsets_once(cache_path, topic, 2, EVENTS)
