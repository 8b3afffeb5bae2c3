"""The cache sink orders batches per partition and writes behind without losing any."""

from __future__ import annotations

import numpy as np
import pytest

from engine.cache_sink import OrderedCacheWriter, WriteBehind
from engine.errors import CacheError
from storage.batch_cache import BatchCache
from tests.storage.builders import make_pb


def _offsets(cache: BatchCache, topic: str) -> list[int]:
    out = []
    for b in cache.iter_batches():
        if b.topic == topic:
            out.extend(b.batch.column("_offset").to_pylist())
    return out


def test_out_of_order_batches_are_held_until_their_predecessor(tmp_path):
    with BatchCache(tmp_path / "c") as cache:
        w = OrderedCacheWriter(cache)
        batches = [make_pb("t", 0, s, s + 10, partition_start=0) for s in range(0, 50, 10)]
        for pb in (batches[2], batches[4], batches[1], batches[3]):
            w.write(pb)
        assert w.held_batches == 4
        assert cache.next_offset("t", 0) is None  # nothing stored while the first batch is missing
        w.write(batches[0])
        assert w.held_batches == 0
        assert cache.next_offset("t", 0) == 50
        assert _offsets(cache, "t") == list(range(50))
        w.write(batches[1])  # a replay is a duplicate, not a second copy
        assert w.duplicates == 1 and _offsets(cache, "t") == list(range(50))


def test_a_predecessor_that_never_comes_is_an_error_not_unbounded_memory(tmp_path):
    with BatchCache(tmp_path / "c") as cache:
        w = OrderedCacheWriter(cache, max_held=2)
        w.write(make_pb("t", 0, 10, 20, partition_start=0))
        w.write(make_pb("t", 0, 20, 30, partition_start=0))
        with pytest.raises(CacheError, match="never arrived"):
            w.write(make_pb("t", 0, 30, 40, partition_start=0))


def test_write_behind_commits_in_order_and_flush_waits(tmp_path):
    with BatchCache(tmp_path / "c") as cache:
        behind = WriteBehind(OrderedCacheWriter(cache), depth=2)
        for s in range(0, 200, 10):
            behind.submit(make_pb("t", 1, s, s + 10))
        behind.flush()
        assert cache.next_offset("t", 1) == 200
        np.testing.assert_array_equal(_offsets(cache, "t"), np.arange(200))
        behind.close()


def test_write_behind_raises_the_writer_error_and_writes_nothing_after_it(tmp_path):
    with BatchCache(tmp_path / "c") as cache:
        behind = WriteBehind(OrderedCacheWriter(cache), depth=1)
        behind.submit(make_pb("t", 0, 0, 10))
        bad = make_pb("t", 0, 10, 20)
        object.__setattr__(bad, "read", 999)  # breaks read == rows + dead + filtered
        behind.submit(bad)
        with pytest.raises(CacheError):
            behind.flush()
            behind.submit(make_pb("t", 0, 20, 30))
        with pytest.raises(CacheError):
            behind.flush()
        assert cache.next_offset("t", 0) == 10  # the good batch before the error, nothing after
        behind.close()


def test_at_the_disk_reserve_the_writer_waits_and_a_stop_drops_the_held_batches(tmp_path):
    from engine.errors import DiskReserveError
    from storage.disk_space import disk_usage

    reserve = disk_usage(tmp_path).free_bytes + (1 << 40)  # more than the disk has: always at the reserve
    polls = []

    def stop() -> bool:
        polls.append(1)
        return len(polls) > 3

    with BatchCache(tmp_path / "c", disk_reserve_bytes=reserve) as cache:
        with pytest.raises(DiskReserveError):  # no stop to wait for (backfill): the error at once
            OrderedCacheWriter(cache).write(make_pb("t", 0, 0, 10))
        behind = WriteBehind(OrderedCacheWriter(cache, stop=stop, reserve_poll_s=0.01))
        for s in range(0, 30, 10):
            behind.submit(make_pb("t", 0, s, s + 10, partition_start=0))
        behind.flush()  # no error: the stop gave up the wait
        behind.close()
        assert behind.writer.paused and len(polls) > 3
        assert behind.abandoned == 3  # the held batch and the ones after it, never written
        assert cache.next_offsets() == {} and cache.counts()["read"] == 0
