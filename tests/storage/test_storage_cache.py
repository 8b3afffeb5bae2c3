"""BatchCache in one process: writes, reads, accounting, offsets, hooks, map growth."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pytest

from engine.config import CacheConfig
from engine.errors import CacheError
from storage.batch_cache import BatchCache, WriteStatus
from tests.storage.builders import make_pb, row_offsets
from transforms.elements import OFFSET_COLUMN, Reason


def _invariant(cache: BatchCache) -> dict[str, int]:
    c = cache.counts()
    assert c["read"] == c["cached_rows"] + c["filtered"] + c["dead_letters"]
    return c


def _cache_state(cache: BatchCache) -> dict:
    """stat() without "disk": free bytes belong to the host and move with every other test."""
    return {k: v for k, v in cache.stat().items() if k != "disk"}


def test_round_trip_preserves_schema_and_values(tmp_path):
    pb = make_pb("clicks", 0, 0, 10, dead=(3,), filtered=(5, 6), mapping_version=4)
    with BatchCache(tmp_path / "c") as cache:
        assert cache.first_seq() is None and cache.last_seq() is None
        assert cache.write(pb) is WriteStatus.WRITTEN
        cb = cache.read(0)
    assert cb.seq == 0 and cb.skipped_batches == 0
    assert (cb.topic, cb.partition, cb.start_offset, cb.end_offset, cb.mapping_version) == ("clicks", 0, 0, 10, 4)
    # headrace.* schema metadata is transient and stripped; everything else survives.
    assert cb.batch.schema.metadata == {b"owner": b"storage-tests"}
    assert cb.batch.schema.remove_metadata() == pb.batch.schema.remove_metadata()
    assert cb.batch.equals(pb.batch.replace_schema_metadata({b"owner": b"storage-tests"}))
    assert row_offsets(cb.batch) == [0, 1, 2, 4, 7, 8, 9]
    assert cb.event_time_min_ms == 1_700_000_000_000 and cb.event_time_max_ms == 1_700_000_000_090


def test_accounting_is_exact(tmp_path):
    with BatchCache(tmp_path / "c") as cache:
        cache.write(make_pb("t", 0, 0, 10, dead=(1, 2), filtered=(4,), reason=Reason.NOT_UTF8))
        cache.write(make_pb("t", 0, 10, 15, dead=(12,), filtered=(13, 14)))
        counts = _invariant(cache)
        assert counts == {"read": 15, "cached_rows": 9, "filtered": 3, "dead_letters": 3}
        dls = list(cache.dead_letters())
        assert [(d.offset, d.reason) for d in dls] == [(1, Reason.NOT_UTF8), (2, Reason.NOT_UTF8), (12, Reason.MALFORMED_JSON)]
        assert dls[0].raw == b"raw-1" and dls[0].detail == "offset 1 is bad" and dls[0].topic == "t"
        assert [d.offset for d in cache.dead_letters(reason=Reason.MALFORMED_JSON)] == [12]
        assert [d.offset for d in cache.dead_letters(reason="not_utf8", limit=1)] == [1]
        with pytest.raises(CacheError, match="unknown dead-letter reason"):
            list(cache.dead_letters(reason="nope"))


def test_duplicates_and_gaps_change_nothing(tmp_path):
    with BatchCache(tmp_path / "c") as cache:
        first = make_pb("t", 0, 0, 5)
        assert cache.write(first) is WriteStatus.WRITTEN
        before = (_cache_state(cache), cache.counts())
        assert cache.write(first) is WriteStatus.DUPLICATE
        assert cache.write(make_pb("t", 0, 2, 5)) is WriteStatus.DUPLICATE
        assert cache.write(make_pb("t", 0, 7, 9)) is WriteStatus.GAP
        assert (_cache_state(cache), cache.counts()) == before
        # The held batch goes in once its predecessor has.
        assert cache.write(make_pb("t", 0, 5, 7)) is WriteStatus.WRITTEN
        assert cache.write(make_pb("t", 0, 7, 9)) is WriteStatus.WRITTEN
        assert cache.next_offset("t", 0) == 9
        assert [row_offsets(cb.batch) for cb in cache.iter_batches()] == [[0, 1, 2, 3, 4], [5, 6], [7, 8]]


def test_new_partition_starts_at_partition_start(tmp_path):
    with BatchCache(tmp_path / "c") as cache:
        assert cache.write(make_pb("t", 0, 120, 130, partition_start=100)) is WriteStatus.GAP
        assert cache.write(make_pb("t", 0, 90, 100, partition_start=100)) is WriteStatus.DUPLICATE
        assert cache.next_offset("t", 0) is None
        assert cache.write(make_pb("t", 0, 95, 110, partition_start=100)) is WriteStatus.WRITTEN
        assert row_offsets(cache.read(0).batch) == list(range(100, 110))
        assert cache.read(0).start_offset == 100
        _invariant(cache)


def test_overlap_is_trimmed_rows_dead_letters_and_filtered(tmp_path):
    with BatchCache(tmp_path / "c") as cache:
        cache.write(make_pb("t", 0, 0, 10, dead=(2,), filtered=(3,)))
        status = cache.write(make_pb("t", 0, 5, 20, dead=(6, 12), filtered=(7, 13)))
        assert status is WriteStatus.WRITTEN
        cb = cache.read(1)
        assert (cb.start_offset, cb.end_offset) == (10, 20)
        assert row_offsets(cb.batch) == [10, 11, 14, 15, 16, 17, 18, 19]
        assert [d.offset for d in cache.dead_letters()] == [2, 12]
        assert _invariant(cache) == {"read": 20, "cached_rows": 16, "filtered": 2, "dead_letters": 2}


def test_partitions_and_topics_are_independent(tmp_path):
    with BatchCache(tmp_path / "c") as cache:
        cache.write(make_pb("a", 0, 0, 3))
        cache.write(make_pb("a", 1, 50, 52))
        cache.write(make_pb("b", 0, 7, 9))
        cache.write(make_pb("file:/x/y.jsonl", 0, 0, 4))
        assert cache.write(make_pb("a", 1, 0, 3, partition_start=0)) is WriteStatus.DUPLICATE
        assert cache.next_offsets() == {"a": {0: 3, 1: 52}, "b": {0: 9}, "file:/x/y.jsonl": {0: 4}}
        assert cache.next_offset("b", 1) is None
        assert [(cb.topic, cb.partition) for cb in cache.iter_batches()] == [
            ("a", 0), ("a", 1), ("b", 0), ("file:/x/y.jsonl", 0)]


def test_empty_batches_advance_offsets_without_a_seq(tmp_path):
    with BatchCache(tmp_path / "c") as cache:
        assert cache.write(make_pb("t", 0, 0, 4, dead=(0, 1), filtered=(2, 3))) is WriteStatus.WRITTEN
        assert cache.last_seq() is None and cache.next_offset("t", 0) == 4
        cache.write(make_pb("t", 0, 4, 6))
        assert cache.first_seq() == 0 and cache.last_seq() == 0
        # A partition's end can move past offsets that hold no records (compaction).
        cache.write(dataclasses.replace(make_pb("t", 0, 6, 6), end_offset=9))
        assert cache.next_offset("t", 0) == 9
        assert _invariant(cache) == {"read": 6, "cached_rows": 2, "filtered": 2, "dead_letters": 2}


def test_inconsistent_batches_are_rejected_and_write_nothing(tmp_path):
    with BatchCache(tmp_path / "c") as cache:
        good = make_pb("t", 0, 0, 5)
        with pytest.raises(CacheError, match="read=6"):
            cache.write(dataclasses.replace(good, read=6))
        with pytest.raises(CacheError, match="outside the batch's range"):
            cache.write(dataclasses.replace(good, end_offset=4, read=5))
        with pytest.raises(CacheError, match="more than once"):
            cache.write(dataclasses.replace(good, filtered_offsets=np.array([1]), read=6))
        with pytest.raises(CacheError, match="_offset"):
            cache.write(dataclasses.replace(good, batch=good.batch.drop_columns([OFFSET_COLUMN])))
        with pytest.raises(CacheError, match="topic"):
            cache.write(dataclasses.replace(good, topic=""))
        assert cache.next_offsets() == {} and cache.counts()["read"] == 0


def test_reopen_persists_everything(tmp_path):
    path = tmp_path / "c"
    with BatchCache(path) as cache:
        cache.write(make_pb("t", 0, 0, 5, dead=(1,)))
        cache.write(make_pb("t", 1, 0, 3, mapping_version=2))
        cache.set_reader_position("trainer", 1)
        before = _cache_state(cache)
    with BatchCache(path, readonly=True) as cache:
        assert _cache_state(cache) == before
        assert [d.offset for d in cache.dead_letters()] == [1]
        assert cache.reader_positions() == {"trainer": 1}
        with pytest.raises(CacheError, match="read-only"):
            cache.write(make_pb("t", 0, 5, 6))
    with BatchCache(path) as cache:
        assert cache.write(make_pb("t", 0, 5, 6)) is WriteStatus.WRITTEN
        assert cache.last_seq() == 2


def test_readonly_open_of_missing_cache_is_a_clear_error(tmp_path):
    with pytest.raises(CacheError, match="no LMDB cache"):
        BatchCache(tmp_path / "missing", readonly=True)


def test_stat_contents_are_json_ready(tmp_path):
    with BatchCache(tmp_path / "c", max_bytes=1 << 30) as cache:
        cache.write(make_pb("t", 3, 0, 4, dead=(0,), reason=Reason.BAD_LABEL, mapping_version=1))
        cache.write(make_pb("t", 3, 4, 8, filtered=(5,), mapping_version=2))
        cache.write(make_pb("u", 0, 0, 2, mapping_version=2))
        cache.set_reader_position("trainer", 1)
        st = json.loads(json.dumps(cache.stat()))
    assert st["batches"] == 3 and st["rows"] == 3 + 3 + 2
    assert st["bytes"] > 0 and st["bytes"] == st["written_bytes"]
    assert st["offsets"] == {"t": {"3": 8}, "u": {"0": 2}}
    assert st["dead_letters"] == {"bad_label": 1}
    assert st["event_time"] == [1_700_000_000_000, 1_700_000_000_070]
    assert (st["read"], st["filtered"], st["cached_rows"], st["dead_letters_total"]) == (10, 1, 8, 1)
    assert (st["first_seq"], st["last_seq"]) == (0, 2)
    assert st["readers"] == {"trainer": 1}
    assert st["mapping_versions"] == {"1": 1, "2": 2}
    assert (st["max_bytes"], st["over_budget_bytes"], st["blocked_by_reader"]) == (1 << 30, 0, None)


def test_zero_copy_reader_and_copying_reads_agree(tmp_path):
    with BatchCache(tmp_path / "c") as cache:
        for i in range(4):
            cache.write(make_pb("t", 0, i * 10, i * 10 + 10))
        copies = list(cache.iter_batches(1))
        with cache.reader() as r:
            assert (r.first_seq(), r.last_seq()) == (0, 3)
            zero = list(r.iter_batches(1, 3))
            assert [cb.seq for cb in zero] == [1, 2]
            assert all(a.batch.equals(b.batch) for a, b in zip(zero, copies))
            assert r.read(3).batch.equals(copies[2].batch)
            # Zero-copy: two reads of one batch in one transaction share the same memory;
            # copying reads each own theirs.
            assert _x_address(r.read(0)) == _x_address(r.read(0))
        assert _x_address(cache.read(0)) != _x_address(cache.read(0))
        seen = [cb.batch.column("x").to_pylist() for cb in cache.iter_batches(zero_copy=True)]
        assert seen == [cb.batch.column("x").to_pylist() for cb in cache.iter_batches()]
        with pytest.raises(CacheError, match="no batch at or after seq 4") as err:
            cache.read(4)
        assert err.value.retriable


def _x_address(cb) -> int:
    return cb.batch.column("x").buffers()[1].address


def test_follow_stops_on_stop_and_max_wait(tmp_path):
    with BatchCache(tmp_path / "c") as cache:
        cache.write(make_pb("t", 0, 0, 2))
        got = list(cache.iter_batches(follow=True, max_wait_s=0.02, poll_interval_s=0.005))
        assert [cb.seq for cb in got] == [0]
        calls = []

        def stop() -> bool:
            calls.append(1)
            return len(calls) > 3

        assert list(cache.iter_batches(1, follow=True, stop=stop, poll_interval_s=0.001)) == []
        assert len(calls) == 4


def test_write_hooks_run_in_the_write_transaction(tmp_path):
    with BatchCache(tmp_path / "c") as cache:
        stats_db = cache.open_db("id_stats")
        seen: list[tuple[int, int]] = []

        def hook(txn, pb, seq):
            seen.append((seq, pb.batch.num_rows))
            n = int(txn.get(b"rows", db=stats_db) or b"0")
            txn.put(b"rows", str(n + pb.batch.num_rows).encode(), db=stats_db)
            if pb.end_offset == 99:
                raise RuntimeError("hook refuses")

        cache.add_write_hook(hook)
        cache.write(make_pb("t", 0, 0, 5))
        cache.write(make_pb("t", 0, 5, 8, filtered=(5, 6, 7)))  # no rows stored: no hook
        cache.write(make_pb("t", 0, 3, 10))  # trimmed: the hook sees the stored rows only
        with pytest.raises(RuntimeError, match="hook refuses"):
            cache.write(make_pb("t", 0, 10, 99))
        assert seen == [(0, 5), (1, 2), (2, 89)]
        with cache.env.begin() as txn:
            assert txn.get(b"rows", db=stats_db) == b"7"
        assert cache.next_offset("t", 0) == 10 and cache.last_seq() == 1
        with pytest.raises(CacheError, match="reserved"):
            cache.open_db("batches")


def test_map_grows_instead_of_failing(tmp_path):
    with BatchCache(tmp_path / "c", map_size_bytes=1 << 18) as cache:
        start = cache.map_size_bytes
        for i in range(40):
            assert cache.write(make_pb("t", 0, i * 200, i * 200 + 200, width=8)) is WriteStatus.WRITTEN
        assert cache.map_size_bytes > start
        assert cache.stat()["bytes"] > start
        assert sum(cb.num_rows for cb in cache.iter_batches()) == 40 * 200
        _invariant(cache)


def test_map_growth_under_an_own_zero_copy_batch_fails_fast(tmp_path):
    with BatchCache(tmp_path / "c", map_size_bytes=1 << 18) as cache:
        cache.write(make_pb("t", 0, 0, 10))
        with cache.reader() as r:
            zero = r.read(0)
            with pytest.raises(CacheError, match="this thread holds a read transaction") as err:
                for _ in range(40):
                    nxt = cache.next_offset("t", 0)
                    cache.write(make_pb("t", 0, nxt, nxt + 200, width=8))
            assert err.value.retriable
            # The zero-copy batch is still intact: the map was not remapped under it.
            assert row_offsets(zero.batch) == list(range(10))
        # Outside the block the same write grows the map and goes through.
        nxt = cache.next_offset("t", 0)
        assert cache.write(make_pb("t", 0, nxt, nxt + 200, width=8)) is WriteStatus.WRITTEN


def test_map_growth_waits_for_other_threads_readers(tmp_path):
    import threading

    with BatchCache(tmp_path / "c", map_size_bytes=1 << 18) as cache:
        cache.write(make_pb("t", 0, 0, 10))
        cache.RESIZE_WAIT_S = 0.05
        entered, release = threading.Event(), threading.Event()

        def hold():
            with cache.reader() as r:
                r.read(0)
                entered.set()
                release.wait(60)

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert entered.wait(60)
            with pytest.raises(CacheError, match="stayed open") as err:
                for _ in range(40):
                    nxt = cache.next_offset("t", 0)
                    cache.write(make_pb("t", 0, nxt, nxt + 200, width=8))
            assert err.value.retriable
        finally:
            release.set()
            holder.join(60)
        nxt = cache.next_offset("t", 0)
        assert cache.write(make_pb("t", 0, nxt, nxt + 200, width=8)) is WriteStatus.WRITTEN


def test_same_directory_shares_one_environment(tmp_path):
    path = tmp_path / "c"
    with BatchCache(path) as writer, BatchCache(path, readonly=True) as reader:
        writer.write(make_pb("t", 0, 0, 3))
        assert reader.read(0).num_rows == 3
        assert reader.env is writer.env
    with BatchCache(path, readonly=True) as reader:
        with pytest.raises(CacheError, match="already open read-only"):
            BatchCache(path)
        assert reader.last_seq() == 0


def test_from_config(tmp_path):
    cfg = CacheConfig(path=str(tmp_path / "c"), max_bytes=123, map_size_bytes=1 << 22)
    with BatchCache.from_config(cfg) as cache:
        assert cache.max_bytes == 123 and cache.map_size_bytes == 1 << 22
        cache.write(make_pb("t", 0, 0, 1))
    with BatchCache.from_config(cfg, readonly=True) as cache:
        assert cache.readonly and cache.last_seq() == 0


def test_closed_cache_refuses_calls(tmp_path):
    cache = BatchCache(tmp_path / "c")
    cache.close()
    cache.close()
    with pytest.raises(CacheError, match="closed"):
        cache.last_seq()


def test_batch_without_event_time_has_none(tmp_path):
    pb = make_pb("t", 0, 0, 3)
    pb = dataclasses.replace(pb, batch=pb.batch.drop_columns(["_event_time_ms"]))
    with BatchCache(tmp_path / "c") as cache:
        cache.write(pb)
        cb = cache.read(0)
        assert cb.event_time_min_ms is None and cache.stat()["event_time"] is None
        assert isinstance(cb.batch, pa.RecordBatch)


def test_dead_letters_page_across_chunks(tmp_path):
    with BatchCache(tmp_path / "c") as cache:
        cache.write(make_pb("t", 0, 0, 1300, dead=tuple(range(0, 1300, 1)), reason=Reason.OVERSIZE))
        cache.write(make_pb("t", 1, 0, 10, dead=(4,), reason=Reason.BAD_LABEL))
        all_dead = list(cache.dead_letters())
        assert [(d.partition, d.offset) for d in all_dead] == [(0, o) for o in range(1300)] + [(1, 4)]
        assert [d.offset for d in cache.dead_letters(reason=Reason.BAD_LABEL)] == [4]
        assert len(list(cache.dead_letters(limit=600))) == 600
        assert list(cache.dead_letters(limit=0)) == []
        assert cache.stat()["dead_letters"] == {"oversize": 1300, "bad_label": 1}


def test_threads_share_the_cache_while_the_map_grows(tmp_path):
    import threading

    path = tmp_path / "c"
    n = 30
    errors: list[BaseException] = []
    with BatchCache(path, map_size_bytes=1 << 18) as writer, BatchCache(path, readonly=True) as reader:
        start_map = writer.map_size_bytes

        def write_all():
            try:
                for i in range(n):
                    writer.write(make_pb("t", 0, i * 200, i * 200 + 200, width=8))
            except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
                errors.append(exc)

        thread = threading.Thread(target=write_all)
        thread.start()
        seen = []
        # Zero-copy in this thread while the writer thread grows the map: each resize waits
        # for this thread to advance past its batch, never remaps under it.
        for cb in reader.iter_batches(follow=True, zero_copy=True, poll_interval_s=0.005, max_wait_s=60,
                                      stop=lambda: len(seen) == n or bool(errors)):
            assert row_offsets(cb.batch) == list(range(cb.seq * 200, cb.seq * 200 + 200))
            seen.append(cb.seq)
        thread.join(60)
        assert not errors and seen == list(range(n))
        assert writer.map_size_bytes > start_map
