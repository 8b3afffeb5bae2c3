"""Log-structured id statistics (storage.id_stats): per-batch deltas + compaction.

The statistics must equal a plain-Python count over exactly the rows the cache stored
(duplicate and overlapping re-writes counted once, aborted writes not at all), before and
after any compaction; the Numba/numpy helpers are checked against plain Python on random
inputs.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import storage.id_stats as ids_mod
from engine.errors import CacheError
from storage.admission import WriteStatus
from storage.batch_cache import BatchCache
from storage.id_stats import META_DB, IdStatsStore
from tests.storage.test_hash_id_stats import make_cfg, make_pb, read_all


class Reference:
    """Plain-Python counts of the rows the cache stored, keyed by source offset."""

    def __init__(self):
        self.seen: set[int] = set()
        self.count = {"u": Counter(), "tags": Counter()}
        self.label = {"u": defaultdict(float), "tags": defaultdict(float)}

    def add(self, start, u_ids, tag_lists, labels):
        for k, (u, tags, y) in enumerate(zip(u_ids, tag_lists, labels)):
            if start + k in self.seen:
                continue  # stored already: the cache trims it
            self.seen.add(start + k)
            for feature, values in (("u", [u]), ("tags", tags)):
                for v in values:
                    self.count[feature][int(v)] += 1
                    self.label[feature][int(v)] += float(y)

    def check(self, stats, summary, feature):
        want_ids = sorted(self.count[feature])
        order = np.argsort(stats.ids)
        assert stats.ids[order].tolist() == want_ids
        assert stats.counts[order].tolist() == [float(self.count[feature][i]) for i in want_ids]
        assert np.allclose(stats.label_sums[order], [self.label[feature][i] for i in want_ids])
        assert summary[feature]["events"] == sum(self.count[feature].values())
        assert summary[feature]["label_sum"] == pytest.approx(sum(self.label[feature].values()))
        assert summary[feature]["head_ids"] == len(want_ids) and summary[feature]["evicted_events"] == 0


def random_rows(rng, start, n, fractional):
    u = rng.integers(-(1 << 63), (1 << 63) - 1, 40, dtype=np.int64)[rng.integers(0, 40, n)]
    u[:1] = 300  # one id repeated > 255 times in total: counts wider than a byte
    tags = [list(rng.integers(0, 60, rng.integers(0, 5))) for _ in range(n)]
    lab = (rng.integers(0, 4, n) / 4 if fractional else rng.integers(0, 2, n)).astype(np.float32)
    return u, tags, lab


@pytest.mark.parametrize("fractional", [False, True], ids=["0/1 labels", "fractional labels"])
def test_stats_equal_a_plain_count_over_stored_rows_across_compactions(tmp_path, fractional):
    cfg = make_cfg()
    rng = np.random.default_rng(3)
    ref = Reference()
    with BatchCache(tmp_path / "c") as cache:
        store = IdStatsStore.attach(cache, cfg.schema, cfg.hash, compact_after_deltas=3)
        start, pending_seen = 0, set()
        for b in range(12):
            n = int(rng.integers(1, 300))
            u, tags, lab = random_rows(rng, start, n, fractional)
            pb = make_pb(start, u, tags, lab)
            assert cache.write(pb) is WriteStatus.WRITTEN
            ref.add(start, u, tags, lab)
            assert cache.write(pb) is WriteStatus.DUPLICATE  # a retry: counted once
            if b % 4 == 3:
                # a re-delivery overlapping the stored range: only the new rows count
                u2, tags2, lab2 = random_rows(rng, start, n + 50, fractional)
                back = start + n // 2
                pb2 = make_pb(back, u2, tags2, lab2)
                assert cache.write(pb2) is WriteStatus.WRITTEN
                ref.add(back, u2, tags2, lab2)
                start = back + n + 50
            else:
                start += n
            for feature in ("u", "tags"):
                st_, summary = read_all(cache, store, feature)
                ref.check(st_, summary, feature)
                pending_seen.add(summary[feature]["pending_deltas"])
        # compaction ran (pending counts stayed bounded) and was staggered across features
        assert max(pending_seen) <= 3 + 2 - 1 and min(pending_seen) == 0
        # compacting everything changes nothing that read reports
        with cache.reader() as r:
            before = {f: store.read(r.txn, f) for f in ("u", "tags")}
        with cache.env.begin(write=True) as txn:
            for f in ("u", "tags"):
                store.compact(txn, f)
                assert store.compact(txn, f)["deltas"] == 0  # idempotent
        for f in ("u", "tags"):
            st_, summary = read_all(cache, store, f)
            assert summary[f]["pending_deltas"] == 0
            assert np.array_equal(st_.ids, before[f].ids) and np.array_equal(st_.counts, before[f].counts)
            assert np.allclose(st_.label_sums, before[f].label_sums)
            ref.check(st_, summary, f)


def test_a_write_that_aborts_counts_nothing(tmp_path):
    cfg = make_cfg()
    with BatchCache(tmp_path / "c") as cache:
        store = IdStatsStore.attach(cache, cfg.schema, cfg.hash, compact_after_deltas=1)
        cache.write(make_pb(0, [1, 2, 2], [[5], [], [6]], [1.0, 0.0, 1.0]))

        def fail_on_second(txn, pb, seq):  # runs after the statistics hook, in its txn
            if pb.start_offset == 3:
                raise CacheError("disk on fire")
        cache.add_write_hook(fail_on_second)
        with pytest.raises(CacheError, match="disk on fire"):
            cache.write(make_pb(3, [2, 9], [[5], [5]], [1.0, 1.0]))
        st_, summary = read_all(cache, store, "u")
        assert st_.ids.tolist() == [1, 2] and st_.counts.tolist() == [1.0, 2.0]
        assert st_.label_sums.tolist() == [1.0, 1.0] and summary["u"]["events"] == 3


def test_eviction_is_the_same_whether_read_merges_or_compaction_did(tmp_path):
    cfg = make_cfg(head_capacity=16)
    rng = np.random.default_rng(5)
    truth = Counter()
    with BatchCache(tmp_path / "c") as cache:
        store = IdStatsStore.attach(cache, cfg.schema, cfg.hash, compact_after_deltas=4)
        start = 0
        for b in range(10):
            u = np.concatenate([np.repeat(np.arange(5, dtype=np.int64), 6), rng.integers(100, 10_000, 30)])
            truth.update(u.tolist())
            cache.write(make_pb(start, u, [[] for _ in u], np.ones(u.size, np.float32)))
            start += u.size
            st_, summary = read_all(cache, store, "u")
            assert st_.distinct <= 16 and summary["u"]["head_ids"] == st_.distinct
            assert summary["u"]["events"] == sum(truth.values())
            # count-min never under-estimates; the heavy ids stay in the head
            for i, c in zip(st_.ids.tolist(), st_.counts.tolist()):
                assert c >= truth[i]
            assert set(range(5)) <= set(st_.ids.tolist())
        assert summary["u"]["evicted_events"] > 0 and summary["u"]["pending_deltas"] > 0
        with cache.reader() as r:
            before = store.read(r.txn, "u")
        with cache.env.begin(write=True) as txn:
            assert store.compact(txn, "u")["evicted_ids"] > 0
        after, summary2 = read_all(cache, store, "u")
        assert np.array_equal(after.ids, before.ids) and np.array_equal(after.counts, before.counts)
        assert summary2["u"]["evicted_events"] == summary["u"]["evicted_events"]


def test_corrupt_deltas_are_errors(tmp_path):
    cfg = make_cfg()
    with BatchCache(tmp_path / "c") as cache:
        store = IdStatsStore.attach(cache, cfg.schema, cfg.hash)
        cache.write(make_pb(0, [1, 2], [[3], []], [1.0, 0.0]))
        log = cache.open_db(META_DB)
        key = b"u\x00d" + (0).to_bytes(8, "big")
        with cache.env.begin(write=True) as txn:
            txn.put(key, txn.get(key, db=log)[:-1], db=log)
        with pytest.raises(CacheError, match="corrupt"):
            read_all(cache, store, "u")
        with cache.env.begin(write=True) as txn:
            txn.delete(key, db=log)
        with pytest.raises(CacheError, match="delta 0 of 'u' is missing"):
            read_all(cache, store, "u")
        with pytest.raises(CacheError, match="compact_after_deltas"):
            IdStatsStore(None, None, ["u"], "label", compact_after_deltas=0)


# ---------------------------------------------------------------- pure helpers

def plain_sum(ids, counts, sums):
    c, s = defaultdict(float), defaultdict(float)
    for i, a, b in zip(ids.tolist(), counts.tolist(), sums.tolist()):
        c[i] += a
        s[i] += b
    keys = sorted(c)
    return keys, [c[k] for k in keys], [s[k] for k in keys]


id_lists = st.lists(st.integers(-(1 << 63), (1 << 63) - 1) | st.integers(0, 20), max_size=60)


@settings(max_examples=60, deadline=None)
@given(st.lists(id_lists, min_size=1, max_size=5), st.integers(0, 2**32 - 1))
def test_segment_aggregation_matches_plain_python(segments, seed):
    rng = np.random.default_rng(seed)
    ids = np.array([i for seg in segments for i in seg], np.int64)
    labels = rng.integers(0, 3, ids.size).astype(np.float64)
    bounds = np.zeros(len(segments) + 1, np.int64)
    np.cumsum([len(seg) for seg in segments], out=bounds[1:])
    out_ids, out_c, out_s, out_b = ids_mod._hash_segments(ids, ids_mod._EMPTY_F, labels, bounds)
    for k in range(len(segments)):
        lo, hi = bounds[k], bounds[k + 1]
        want = plain_sum(ids[lo:hi], np.ones(hi - lo), labels[lo:hi])
        seg = slice(out_b[k], out_b[k + 1])
        assert out_ids[seg].tolist() == list(dict.fromkeys(ids[lo:hi].tolist()))  # first-seen order
        assert plain_sum(out_ids[seg], out_c[seg], out_s[seg]) == want
    counts = rng.integers(1, 5, ids.size).astype(np.float64)
    got = ids_mod._sum_by_id(ids, counts, labels) if ids.size else ([], [], [])
    assert tuple(np.asarray(a).tolist() for a in got) == plain_sum(ids, counts, labels)


@settings(max_examples=60, deadline=None)
@given(id_lists, id_lists, st.integers(1, 40))
def test_merge_and_evict_match_plain_python(a, b, capacity):
    a_ids, b_ids = np.unique(np.array(a, np.int64)), np.unique(np.array(b, np.int64))
    a_c, b_c = (np.arange(x.size, dtype=np.float64) % 4 + 1 for x in (a_ids, b_ids))
    a_s, b_s = a_c / 2, b_c / 4
    got = ids_mod._merge_sorted(a_ids, a_c, a_s, b_ids, b_c, b_s)
    want = plain_sum(np.concatenate([a_ids, b_ids]), np.concatenate([a_c, b_c]), np.concatenate([a_s, b_s]))
    assert tuple(x.tolist() for x in got) == want
    run = ids_mod._Run(*got, 7, 1.5)
    head, gone = ids_mod._evict(run, capacity)
    # keep the `capacity` highest counts, ties to the smaller id; ids stay sorted
    ranked = sorted(zip(run.ids.tolist(), run.counts.tolist()), key=lambda p: (-p[1], p[0]))
    assert head.ids.tolist() == sorted(i for i, _ in ranked[:capacity])
    assert (head.events, head.label_sum) == (7, 1.5)
    if gone is None:
        assert run.ids.size <= capacity
    else:
        assert gone.ids.tolist() == sorted(i for i, _ in ranked[capacity:])
        assert np.isclose(gone.sums.sum() + head.sums.sum(), run.sums.sum())


def test_delta_encoding_round_trips_narrow_and_wide_values():
    ids = np.array([-5, 0, 7, 1 << 62], np.int64)
    for counts, sums, integral in [([1, 2, 3, 255], [0, 1, 2, 3], True), ([1, 300, 70_000, 2], [0.5, 0, 1, 2], False),
                                   ([1, 2, 3, 2.0**40], [0, 1, 2, 3], True)]:
        run = ids_mod._Run(ids, np.array(counts, float), np.array(sums, float), 10, 6.5)
        back = ids_mod._decode(ids_mod._encode(b"HRIDD002", run, integral), b"HRIDD002", "test")
        assert back.ids.tolist() == ids.tolist() and back.counts.tolist() == list(map(float, counts))
        assert back.sums.tolist() == list(map(float, sums)) and (back.events, back.label_sum) == (10, 6.5)
