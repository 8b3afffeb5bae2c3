"""Retention: the pure plan and the cache's behaviour with and without readers behind."""

from __future__ import annotations

import logging

from storage.batch_cache import BatchCache
from storage.retention import plan_retention
from tests.storage.builders import make_pb, row_offsets


def _plan(sizes, max_bytes, newest, reader=None):
    return plan_retention(list(enumerate(sizes)), stored_bytes=sum(sizes), max_bytes=max_bytes,
                          newest_seq=newest, lowest_reader=reader)


def test_plan_deletes_oldest_until_within_budget():
    p = _plan([10, 10, 10, 10], 25, 3)
    assert (p.delete_seqs, p.freed_bytes, p.over_budget_bytes, p.blocked_by_reader) == ([0, 1], 20, 0, None)


def test_plan_without_budget_or_within_it_is_a_noop():
    assert _plan([10, 10], 0, 1).delete_seqs == []
    assert _plan([10, 10], 20, 1).delete_seqs == []


def test_plan_stops_at_lowest_reader_and_reports_it():
    p = _plan([10, 10, 10, 10], 15, 3, ("slow", 1))
    assert (p.delete_seqs, p.over_budget_bytes, p.blocked_by_reader) == ([0], 15, "slow")
    # A reader at seq 0 holds everything.
    assert _plan([10, 10], 5, 1, ("slow", 0)).delete_seqs == []


def test_plan_keeps_the_newest_batch_even_over_budget():
    p = _plan([10, 50], 20, 1)
    assert (p.delete_seqs, p.over_budget_bytes, p.blocked_by_reader) == ([0], 30, None)


def test_plan_consumes_only_what_it_needs():
    consumed = []

    def oldest_first():
        for seq in range(1000):
            consumed.append(seq)
            yield seq, 10

    plan_retention(oldest_first(), stored_bytes=10_000, max_bytes=9_975, newest_seq=999, lowest_reader=None)
    assert consumed == [0, 1, 2, 3]


def _fill(cache: BatchCache, n: int) -> int:
    for i in range(n):
        cache.write(make_pb("t", 0, i * 50, i * 50 + 50))
    return cache.stat()["bytes"] // n


def test_retention_without_readers_keeps_budget(tmp_path):
    with BatchCache(tmp_path / "a") as probe:
        per_batch = _fill(probe, 1)
    budget = per_batch * 3 + per_batch // 2
    with BatchCache(tmp_path / "c", max_bytes=budget) as cache:
        _fill(cache, 10)
        st = cache.stat()
        assert st["batches"] == 3 and st["bytes"] <= budget
        assert (st["first_seq"], st["last_seq"]) == (7, 9)
        assert st["rows"] == 150 and st["over_budget_bytes"] == 0
        # Totals keep counting what was deleted; offsets are untouched by retention.
        assert cache.counts()["cached_rows"] == 500 and cache.next_offset("t", 0) == 500
        # A reader asking for deleted batches gets the next one, and is told so.
        cb = cache.read(2)
        assert (cb.seq, cb.skipped_batches) == (7, 5)
        got = list(cache.iter_batches(0))
        assert [(b.seq, b.skipped_batches) for b in got] == [(7, 7), (8, 0), (9, 0)]
        assert row_offsets(got[0].batch)[0] == 350


def test_retention_never_deletes_what_a_reader_has_not_consumed(tmp_path, caplog):
    with BatchCache(tmp_path / "a") as probe:
        per_batch = _fill(probe, 1)
    budget = per_batch * 2
    with BatchCache(tmp_path / "c", max_bytes=budget) as cache:
        cache.set_reader_position("trainer", 0)
        cache.set_reader_position("metrics", 3)
        with caplog.at_level(logging.WARNING, logger="storage.batch_cache"):
            _fill(cache, 6)
        warnings = [r for r in caplog.records if "over the retention budget" in r.getMessage()]
        assert len(warnings) == 1 and "'trainer'" in warnings[0].getMessage()
        st = cache.stat()
        assert st["batches"] == 6 and st["first_seq"] == 0
        assert st["over_budget_bytes"] == st["bytes"] - budget > 0
        assert st["blocked_by_reader"] == "trainer"
        assert cache.reader_positions() == {"trainer": 0, "metrics": 3}
        # The slow reader advances: retention runs at once, up to the next cursor.
        cache.set_reader_position("trainer", 5)
        st = cache.stat()
        assert (st["first_seq"], st["blocked_by_reader"]) == (3, "metrics")
        assert cache.remove_reader("metrics") and not cache.remove_reader("metrics")
        cache.set_reader_position("trainer", 6)
        st = cache.stat()
        assert st["bytes"] <= budget and st["over_budget_bytes"] == 0 and st["blocked_by_reader"] is None
        assert (st["first_seq"], st["last_seq"]) == (4, 5)


def test_seqs_are_never_reused_after_retention(tmp_path):
    with BatchCache(tmp_path / "c", max_bytes=1) as cache:
        _fill(cache, 3)
        assert (cache.first_seq(), cache.last_seq()) == (2, 2)
        st = cache.stat()
        assert st["batches"] == 1 and st["over_budget_bytes"] == st["bytes"] - 1
        assert st["blocked_by_reader"] is None
    with BatchCache(tmp_path / "c", max_bytes=1) as cache:
        cache.write(make_pb("t", 0, 150, 160))
        assert (cache.first_seq(), cache.last_seq()) == (3, 3)
