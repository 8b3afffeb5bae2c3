"""``CacheReader.offsets_before``: how far into each source partition a reader at a cursor
has read (an export's ``source_offsets``)."""

from __future__ import annotations

from storage.batch_cache import BatchCache
from tests.storage.builders import make_pb


def test_offsets_before_a_cursor(tmp_path):
    with BatchCache(tmp_path / "c") as cache:
        cache.write(make_pb("a", 0, 0, 10))                 # seq 0
        cache.write(make_pb("a", 1, 0, 5))                  # seq 1
        cache.write(make_pb("a", 0, 10, 20, dead=(19,)))    # seq 2: rows are offsets 10..18
        cache.write(make_pb("b", 0, 0, 4))                  # seq 3
        with cache.reader() as r:
            assert r.offsets_before(0) == {}
            assert r.offsets_before(2) == {"a": {0: 10, 1: 5}}
            # 3 rows of seq 2 read: up to offset 12; the whole batch: up to its end (a dead letter too)
            assert r.offsets_before(2, 3) == {"a": {0: 13, 1: 5}}
            assert r.offsets_before(2, 9) == {"a": {0: 20, 1: 5}}
            assert r.offsets_before(4) == {"a": {0: 20, 1: 5}, "b": {0: 4}}
            # early stop once the partitions asked for are seen
            assert r.offsets_before(4, partitions={("b", 0)}) == {"b": {0: 4}}
