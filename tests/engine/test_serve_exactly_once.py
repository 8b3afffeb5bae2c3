"""Events produced by an outside Kafka client land in the cache exactly once, however
often the serving process is killed with SIGKILL mid-stream."""

from __future__ import annotations

import random
import signal

import numpy as np
import pytest

from storage.batch_cache import BatchCache
from tests.engine_helpers import (
    cache_counts,
    produce_numbered,
    small_config_doc,
    start_headrace,
    stop,
    wait_until,
    write_config,
)

PARTITIONS = 2
TOTAL = 12_000


def _produce(bootstrap: str, topic: str, start: int, n: int) -> None:
    produce_numbered(bootstrap, topic, start, n, PARTITIONS)


@pytest.mark.slow
def test_sigkill_at_several_points_keeps_every_offset_exactly_once(broker, new_topic, tmp_path):
    topic = new_topic(partitions=PARTITIONS)
    cfg_path = write_config(tmp_path, small_config_doc(tmp_path, bootstrap=broker.bootstrap, topic=topic))
    cache_path = tmp_path / "cache"
    log = tmp_path / "serve.log"
    rng = random.Random(7)

    produced = 0
    _produce(broker.bootstrap, topic, 0, 3000)
    produced = 3000
    # Kill at several points: early, mid-stream while more events arrive, and again later.
    for kill_after in (300, 2500, 6000):
        proc = start_headrace("serve", "--no-train", "-c", str(cfg_path), log_path=log)
        wait_until(lambda: cache_counts(cache_path)["read"] >= kill_after, 120, f"{kill_after} events read", proc, log)
        if produced < TOTAL:
            n = min(3000, TOTAL - produced)
            _produce(broker.bootstrap, topic, produced, n)
            produced += n
        # land the kill at a random instant of an active write stream
        wait_until(lambda: cache_counts(cache_path)["read"] >= kill_after + rng.randint(0, 200), 120, "more reads", proc, log)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert produced == TOTAL

    proc = start_headrace("serve", "--no-train", "-c", str(cfg_path), log_path=log)
    wait_until(lambda: cache_counts(cache_path)["read"] >= TOTAL, 180, "all events read", proc, log)
    assert stop(proc, signal.SIGTERM) == 0, log.read_text()[-4000:]

    seen: dict[int, list[int]] = {p: [] for p in range(PARTITIONS)}
    with BatchCache(str(cache_path), readonly=True) as cache:
        for cached in cache.iter_batches():
            assert cached.topic == topic
            seen[cached.partition].extend(cached.batch.column("_offset").to_pylist())
        counts = cache.counts()
        offsets = cache.next_offsets()[topic]
    per_partition = TOTAL // PARTITIONS
    for p in range(PARTITIONS):
        got = np.sort(np.array(seen[p]))
        assert len(got) == per_partition, f"partition {p}: {len(got)} rows for {per_partition} events"
        np.testing.assert_array_equal(got, np.arange(per_partition))  # each offset exactly once
        assert offsets[p] == per_partition
    assert (counts["read"], counts["cached_rows"], counts["filtered"], counts["dead_letters"]) == (TOTAL, TOTAL, 0, 0)
