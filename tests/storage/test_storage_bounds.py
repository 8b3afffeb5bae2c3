"""Every store kept with the cache has a bound that holds however long the stream runs:
dead letters (``[cache] dead_letter_max_bytes``, oldest first, counts kept), id statistics
(``[hash] stats_head_capacity`` + the sketch + bounded pending deltas) and training cuts
(at most one per stored batch, deleted with the batches retention deletes)."""

from __future__ import annotations

import numpy as np

from storage.batch_cache import BatchCache
from storage.id_stats import HEAD_DB, META_DB, IdStatsStore
from tests.storage.builders import make_pb
from tests.storage.test_hash_id_stats import make_cfg
from tests.storage.test_hash_id_stats import make_pb as make_ids_pb
from transforms.elements import Reason


def _reconciles(stat: dict) -> bool:
    return stat["read"] == stat["cached_rows"] + stat["filtered"] + stat["dead_letters_total"]


def test_dead_letter_retention_holds_its_budget_oldest_first_and_counts_stay(tmp_path):
    budget = 4000
    with BatchCache(tmp_path / "c", dead_letter_max_bytes=budget) as cache:
        written = []
        for k in range(60):  # two partitions, interleaved, so write order != key order
            part, off = k % 2, (k // 2) * 20
            dead = tuple(range(off, off + 5))
            reason = Reason.MALFORMED_JSON if k % 3 else Reason.MISSING_LABEL
            cache.write(make_pb("t", part, off, off + 20, dead=dead, filtered=(off + 19,), reason=reason,
                                partition_start=0))
            written += [(part, o) for o in dead]
            stat = cache.stat()
            assert stat["dead_letter_bytes"] <= budget  # after every write
            assert _reconciles(stat)
        kept = list(cache.dead_letters())
        stat = cache.stat()
    assert stat["dead_letters_total"] == 300 and sum(stat["dead_letters"].values()) == 300
    assert stat["dead_letters_stored"] == len(kept) > 0
    assert stat["dead_letters_expired"] == 300 - len(kept)
    assert stat["dead_letter_max_bytes"] == budget
    # the newest survive: the kept ones are the last written, whatever their partition
    assert sorted((dl.partition, dl.offset) for dl in kept) == sorted(written[-len(kept):])


def test_dead_letters_stored_before_the_index_are_indexed_once(tmp_path):
    with BatchCache(tmp_path / "c", dead_letter_max_bytes=0) as cache:
        cache.write(make_pb("t", 0, 0, 10, dead=(1, 2, 3)))
        # what an earlier version left: records and counters, but no write-order index
        d = cache._db
        with cache.env.begin(write=True) as txn:
            txn.drop(cache._dead_order, delete=False)
            for key in (b"dead_stored", b"dead_stored_bytes", b"dead_next_seq"):
                txn.delete(key, db=d[next(s for s in d if s.value == "counters")])
            txn.delete(b"dead_order_indexed", db=d[next(s for s in d if s.value == "state")])
    with BatchCache(tmp_path / "c", dead_letter_max_bytes=1) as cache:  # opening indexes them
        assert cache.stat()["dead_letters_stored"] == 3
        cache.write(make_pb("t", 0, 10, 20, dead=(15,)))  # a 1-byte budget expires every record
        assert [dl.offset for dl in cache.dead_letters()] == []
        stat = cache.stat()
        assert stat["dead_letters_expired"] == 4 and stat["dead_letters_total"] == 4 and _reconciles(stat)


def _sub_db_bytes(cache: BatchCache, name: str) -> int:
    db = cache.open_db(name)
    with cache.reader() as r:
        return sum(len(k) + len(v) for k, v in r.txn.cursor(db=db))


def test_id_statistics_stay_within_head_capacity_sketch_and_pending_deltas(tmp_path):
    """Id statistics are already bounded: per feature at most ``stats_head_capacity`` exact
    ids (24 bytes each at most), one count-min sketch, and at most
    ``compact_after_deltas + #features`` pending deltas. Ever new ids do not grow them."""
    capacity, compact_after, rows = 500, 8, 200
    cfg = make_cfg(head_capacity=capacity)
    rng = np.random.default_rng(0)
    features = len(cfg.schema.sparse)
    sketch_bytes = cfg.hash.sketch_width * cfg.hash.sketch_depth * 8 * 2 + 64  # counts + label sums
    delta_bytes = 64 + rows * 4 * 24  # header + per distinct id (a batch has at most 4 ids per row)
    bound = features * (capacity * 24 + 64 + sketch_bytes + (compact_after + features) * (delta_bytes + 32))
    sizes = []
    with BatchCache(tmp_path / "c") as cache:
        IdStatsStore.attach(cache, cfg.schema, cfg.hash, compact_after_deltas=compact_after)
        for b in range(120):  # 200 fresh ids per feature per batch: 24,000 distinct ids in all
            u = rng.integers(0, 1 << 40, rows, dtype=np.int64)
            tags = [list(rng.integers(0, 1 << 40, 3)) for _ in range(rows)]
            cache.write(make_ids_pb(b * rows, u, tags, rng.integers(0, 2, rows).astype(np.float32)))
            sizes.append(_sub_db_bytes(cache, HEAD_DB) + _sub_db_bytes(cache, META_DB))
    assert max(sizes) <= bound, (max(sizes), bound)
    # it plateaus: the second half of the run is no bigger than the first
    assert max(sizes[60:]) <= max(sizes[:60]) * 1.05


def test_training_cuts_go_with_the_batches_retention_deletes(tmp_path):
    with BatchCache(tmp_path / "c", max_bytes=1) as cache:  # keeps only the newest batch
        for k in range(10):
            cache.write(make_pb("t", 0, k * 10, k * 10 + 10))
            cache.record_train_cut(cache.last_seq(), 10)
        assert cache.train_cuts() == [(9, 10)]
        assert cache.stat()["train_cuts"] == 1
