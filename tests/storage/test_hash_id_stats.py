"""Id statistics kept with the batch cache (storage.id_stats) through its write hook."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from engine.config import config_from_dict
from engine.errors import CacheError
from storage.batch_cache import BatchCache
from storage.id_stats import HEAD_DB, META_DB, IdStatsStore
from transforms.elements import EVENT_TIME_COLUMN, OFFSET_COLUMN, ProcessedBatch, id_column


def make_cfg(head_capacity: int = 1000):
    return config_from_dict({
        "schema": {"dense": [{"name": "x"}],
                   "sparse": [{"name": "u", "rows": 50}, {"name": "tags", "rows": 50, "multi": True}]},
        "hash": {"stats_head_capacity": head_capacity, "sketch_width": 512},
    })


def make_pb(start: int, u_ids, tag_lists, labels) -> ProcessedBatch:
    n = len(labels)
    batch = pa.record_batch({
        "label": pa.array(labels, pa.float32()),
        "x": pa.array(np.zeros(n, np.float32)),
        "u": pa.array(np.asarray(u_ids, np.int64) % 50),
        id_column("u"): pa.array(np.asarray(u_ids, np.int64)),
        "tags": pa.array([[t % 50 for t in ts] for ts in tag_lists], pa.list_(pa.int64())),
        id_column("tags"): pa.array(tag_lists, pa.list_(pa.int64())),
        OFFSET_COLUMN: pa.array(np.arange(start, start + n, dtype=np.int64)),
        EVENT_TIME_COLUMN: pa.array(np.zeros(n, np.int64)),
    })
    return ProcessedBatch("t", 0, start, start + n, 0, batch, (), np.zeros(0, np.int64), read=n)


def read_all(cache, store, feature):
    with cache.reader() as r:
        return store.read(r.txn, feature), store.summary(r.txn)


def test_counts_are_exact_once_per_written_batch(tmp_path):
    cfg = make_cfg()
    rng = np.random.default_rng(0)
    with BatchCache(tmp_path / "c") as cache:
        store = IdStatsStore.attach(cache, cfg.schema, cfg.hash)
        all_u, all_lab, all_tags, tag_lab = [], [], [], []
        start = 0
        for _ in range(4):
            n = 200
            u = rng.integers(-(1 << 63), (1 << 63) - 1, 20, dtype=np.int64)[rng.integers(0, 20, n)]
            u[:2] = [-(1 << 63), (1 << 63) - 1]  # int64 extremes are ids like any other
            tags = [list(rng.integers(0, 30, rng.integers(0, 4))) for _ in range(n)]
            lab = rng.integers(0, 2, n).astype(np.float32)
            pb = make_pb(start, u, tags, lab)
            cache.write(pb)
            cache.write(pb)  # a duplicate write stores nothing and counts nothing
            start += n
            all_u.append(u)
            all_lab.append(lab)
            for ts, y in zip(tags, lab):
                all_tags += ts
                tag_lab += [y] * len(ts)
        st, summary = read_all(cache, store, "u")
        u, lab = np.concatenate(all_u), np.concatenate(all_lab)
        uniq, inv = np.unique(u, return_inverse=True)
        order = np.argsort(st.ids)
        assert np.array_equal(st.ids[order], uniq)
        assert np.array_equal(st.counts[order], np.bincount(inv).astype(float))
        assert np.allclose(st.label_sums[order], np.bincount(inv, weights=lab))
        assert summary["u"]["events"] == 800 and summary["u"]["evicted_events"] == 0
        assert summary["u"]["label_sum"] == pytest.approx(float(lab.sum()))
        tags_st, _ = read_all(cache, store, "tags")
        t_uniq, t_inv = np.unique(np.array(all_tags, np.int64), return_inverse=True)
        o = np.argsort(tags_st.ids)
        assert np.array_equal(tags_st.ids[o], t_uniq)
        assert np.array_equal(tags_st.counts[o], np.bincount(t_inv).astype(float))
        assert np.allclose(tags_st.label_sums[o], np.bincount(t_inv, weights=np.array(tag_lab)))


def test_head_stays_bounded_and_keeps_the_heavy_ids(tmp_path):
    cfg = make_cfg(head_capacity=64)
    rng = np.random.default_rng(1)
    with BatchCache(tmp_path / "c") as cache:
        store = IdStatsStore.attach(cache, cfg.schema, cfg.hash)
        heavy = np.arange(10, dtype=np.int64) + 1_000_000
        start = 0
        for b in range(10):
            light = rng.integers(0, 1 << 40, 100, dtype=np.int64)  # 100 new ids per batch
            u = np.concatenate([np.repeat(heavy, 20), light])
            cache.write(make_pb(start, u, [[] for _ in u], np.ones(u.size, np.float32)))
            start += u.size
        st, summary = read_all(cache, store, "u")
        assert st.distinct <= 64
        assert summary["u"]["head_ids"] == st.distinct
        assert summary["u"]["events"] == 10 * 300
        assert summary["u"]["evicted_events"] > 0
        pos = {int(i): k for k, i in enumerate(st.ids)}
        for h in heavy:  # heavy ids are never evicted: exact (plus sketch noise >= 0)
            assert int(h) in pos
            assert st.counts[pos[int(h)]] >= 200
            assert st.counts[pos[int(h)]] < 200 + 40


def test_missing_columns_are_errors_and_nothing_is_committed(tmp_path):
    cfg = make_cfg()
    with BatchCache(tmp_path / "c") as cache:
        IdStatsStore.attach(cache, cfg.schema, cfg.hash)
        pb = make_pb(0, [1, 2], [[1], []], [0.0, 1.0])
        bad = ProcessedBatch("t", 0, 0, 2, 0, pb.batch.drop_columns([id_column("u")]), (),
                             np.zeros(0, np.int64), read=2)
        with pytest.raises(CacheError, match="u.id"):
            cache.write(bad)
        assert cache.next_offsets() == {}
    with pytest.raises(CacheError, match="head_capacity"):
        IdStatsStore(None, None, ["u"], "label", head_capacity=1)


def test_store_opens_named_sub_databases(tmp_path):
    cfg = make_cfg()
    # a reader (the trainer, fit-hash) opens the sub-databases by name, read-only
    with BatchCache(tmp_path / "c") as cache:
        IdStatsStore.attach(cache, cfg.schema, cfg.hash)
        cache.write(make_pb(0, [5], [[7]], [1.0]))
    with BatchCache(tmp_path / "c", readonly=True) as ro:
        store = IdStatsStore(ro.open_db(HEAD_DB), ro.open_db(META_DB), ["u", "tags"], "label")
        st, _ = read_all(ro, store, "u")
        assert st.ids.tolist() == [5] and st.counts.tolist() == [1.0] and st.label_sums.tolist() == [1.0]
