"""BatchCache across processes: a writer killed with SIGKILL, a reader following a writer."""

from __future__ import annotations

import multiprocessing
import random
import time

import pytest

from engine.errors import CacheError
from storage.batch_cache import BatchCache, WriteStatus
from tests.storage.builders import make_pb, row_offsets

pytestmark = pytest.mark.slow

_SPAWN = multiprocessing.get_context("spawn")
_PARTITIONS = (0, 1)
_DEADLINE_S = 60.0


def _dead(o: int) -> bool:
    return o % 11 == 3


def _filtered(o: int) -> bool:
    return o % 13 == 5 and not _dead(o)


def _batch(partition: int, start: int, size: int):
    rng = range(start, start + size)
    return make_pb("events", partition, start, start + size,
                   dead=tuple(o for o in rng if _dead(o)), filtered=tuple(o for o in rng if _filtered(o)), width=4)


def _write_forever(path: str, seed: int) -> None:
    """Resume every partition from the cache's offsets, like a real source, and write
    until killed."""
    rnd = random.Random(seed)
    with BatchCache(path, map_size_bytes=1 << 20) as cache:
        nxt = {p: cache.next_offset("events", p) or 0 for p in _PARTITIONS}
        while True:
            p = rnd.choice(_PARTITIONS)
            size = rnd.randint(20, 300)
            if cache.write(_batch(p, nxt[p], size)) is not WriteStatus.WRITTEN:
                raise SystemExit(f"unexpected status at {p}@{nxt[p]}")
            nxt[p] += size


def _wait_for(pred, what: str) -> None:
    deadline = time.monotonic() + _DEADLINE_S
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _check_consistent(cache: BatchCache) -> int:
    """Every stored batch is whole, and rows + dead letters + counters agree exactly with
    the next offsets; returns the number of stored batches."""
    offsets = cache.next_offsets().get("events", {})
    rows: dict[int, list[int]] = {p: [] for p in _PARTITIONS}
    n = 0
    for cb in cache.iter_batches():
        expect = [o for o in range(cb.start_offset, cb.end_offset) if not _dead(o) and not _filtered(o)]
        assert row_offsets(cb.batch) == expect, f"batch {cb.seq} is not whole"
        assert cb.batch.column("x").to_pylist() == [o * 0.5 for o in expect]
        rows[cb.partition].extend(expect)
        n += 1
    read = filtered = 0
    for p in _PARTITIONS:
        end = offsets.get(p, 0)
        assert rows[p] == [o for o in range(end) if not _dead(o) and not _filtered(o)]
        read += end
        filtered += sum(1 for o in range(end) if _filtered(o))
    dead = [(d.partition, d.offset) for d in cache.dead_letters()]
    assert dead == [(p, o) for p in _PARTITIONS for o in range(offsets.get(p, 0)) if _dead(o)]
    counts = cache.counts()
    assert counts == {"read": read, "cached_rows": sum(map(len, rows.values())), "filtered": filtered,
                      "dead_letters": len(dead)}
    return n


def test_writer_killed_with_sigkill_leaves_whole_batches(tmp_path):
    path = str(tmp_path / "cache")
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    stored = 0
    for round_ in range(3):
        proc = _SPAWN.Process(target=_write_forever, args=(path, seed + round_), daemon=True)
        proc.start()
        probe: list[BatchCache] = []
        try:
            target = stored + rnd.randint(3, 15)

            def enough() -> bool:
                assert proc.exitcode is None, f"writer died: exit code {proc.exitcode}"
                if not probe:
                    try:
                        probe.append(BatchCache(path, readonly=True))
                    except CacheError as exc:  # the writer has not initialised the cache yet
                        assert exc.retriable, exc
                        return False
                last = probe[0].last_seq()
                return last is not None and last + 1 >= target

            _wait_for(enough, f"{target} batches (seed {seed})")
            time.sleep(rnd.random() * 0.03)  # land the kill at a random point of a write
        finally:
            proc.kill()
            proc.join(_DEADLINE_S)
            for p in probe:
                p.close()
        assert proc.exitcode == -9
        with BatchCache(path) as cache:
            stored = _check_consistent(cache)
        assert stored >= target, f"seed {seed}"


def _write_n(path: str, n: int, max_bytes: int) -> None:
    with BatchCache(path, map_size_bytes=1 << 18, max_bytes=max_bytes) as cache:
        for i in range(n):
            assert cache.write(_batch(0, i * 100, 100)) is WriteStatus.WRITTEN


def test_reader_process_follows_writer_process(tmp_path):
    path = str(tmp_path / "cache")
    n = 40
    with BatchCache(path, map_size_bytes=1 << 18) as cache:
        start_map = cache.map_size_bytes
        # Registered before the writer starts, so retention keeps what we have not read.
        cache.set_reader_position("follower", 0)
        proc = _SPAWN.Process(target=_write_n, args=(path, n, 64 << 10), daemon=True)
        proc.start()
        try:
            seen = []
            for cb in cache.iter_batches(follow=True, stop=lambda: len(seen) == n or proc.exitcode not in (None, 0),
                                         max_wait_s=_DEADLINE_S, poll_interval_s=0.01):
                assert cb.skipped_batches == 0 and cb.seq == len(seen)
                assert row_offsets(cb.batch) == [o for o in range(cb.seq * 100, cb.seq * 100 + 100)
                                                 if not _dead(o) and not _filtered(o)]
                seen.append(cb.seq)
                cache.set_reader_position("follower", cb.seq + 1)
            proc.join(_DEADLINE_S)
        finally:
            if proc.is_alive():
                proc.kill()
        assert proc.exitcode == 0
        assert seen == list(range(n))
        # The writer grew the map; this process adopted the new size to read on.
        assert cache.map_size_bytes > start_map
        st = cache.stat()
        # Once the follower consumed everything, retention meets the budget again.
        assert st["over_budget_bytes"] == 0 and st["blocked_by_reader"] is None
        assert st["bytes"] <= 64 << 10 or st["batches"] == 1
        assert st["first_seq"] > 0 and st["last_seq"] == n - 1


def test_readonly_reader_process_adopts_a_map_grown_by_the_writer(tmp_path):
    path = str(tmp_path / "cache")
    n = 30
    BatchCache(path, map_size_bytes=1 << 18).close()
    with BatchCache(path, readonly=True, map_size_bytes=1 << 18) as cache:
        start_map = cache.map_size_bytes
        proc = _SPAWN.Process(target=_write_n, args=(path, n, 0), daemon=True)
        proc.start()
        seqs: list[int] = []
        try:
            for cb in cache.iter_batches(follow=True, stop=lambda: len(seqs) == n or proc.exitcode not in (None, 0),
                                         max_wait_s=_DEADLINE_S, poll_interval_s=0.01):
                seqs.append(cb.seq)
        finally:
            proc.join(_DEADLINE_S)
            if proc.is_alive():
                proc.kill()
        assert proc.exitcode == 0
        assert seqs == list(range(n))
        assert cache.map_size_bytes > start_map
