"""Table mappers (frequency, learned) and their Numba kernels against plain-Python references."""

from __future__ import annotations

import json
import os
import pickle
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import MappingError
from storage.mapping_store import MappingStore
from transforms.hash_kernels import (
    ABSENT,
    BUCKET_BYTES,
    EMPTY_KEY,
    NO_ROW,
    PREFETCH_MIN_BYTES,
    build_table,
    hash_rows,
    table_buckets,
    table_from_words,
    table_lookup,
)
from transforms.learned_hash import FrequencyMapper, LearnedMapper
from transforms.mappers import (
    MAPPER_MAGIC,
    SET_MAGIC,
    MappingSet,
    load_mapper,
    make_mapper,
)

DATA = os.path.join(os.path.dirname(__file__), "data")

M64 = (1 << 64) - 1
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1


def ref_mix64(x: int, seed: int) -> int:
    z = (x & M64) ^ seed
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def ref_hash_row(x: int, seed: int, base: int, n: int) -> int:
    return base + (((ref_mix64(x, seed) >> 32) * n) >> 32)


def ref_map(mapper, ids):
    """What a table mapper must return, from its stored (key, row) pairs, its bucket codes
    and a dict."""
    table = dict(zip(mapper.keys.tolist(), mapper.values.tolist()))
    codes = mapper.codes.tolist()

    def row(i):
        if i in table:
            return table[i]
        if codes and codes[ref_hash_row(i, mapper.code_seed, 0, len(codes))]:
            return mapper.code_base + codes[ref_hash_row(i, mapper.code_seed, 0, len(codes))] - 1
        return ref_hash_row(i, mapper.seed, mapper.fallback_base, mapper.fallback_rows)
    return [row(i) for i in ids]


def home_bucket(keys, buckets):
    """The documented home bucket: multiply-shift of the top 32 bits of id * FIB."""
    h = (np.asarray(keys, dtype=np.int64).view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)
    return ((h * np.uint64(buckets)) >> np.uint64(32)).astype(np.int64)


EXTREMES = np.array([I64_MIN, I64_MIN + 1, -1, 0, 1, I64_MAX - 1, I64_MAX], dtype=np.int64)


def random_mapper(rng, cls, n_keys, rows, with_extremes=True):
    keys = np.unique(rng.integers(I64_MIN, I64_MAX, size=n_keys, dtype=np.int64))
    if with_extremes:
        keys = np.unique(np.concatenate([keys, EXTREMES[[0, 3, 6]]]))
    fb = max(1, rows // 4)
    values = rng.integers(0, rows - fb, size=keys.size)
    return cls(rows, keys=rng.permutation(keys), values=values, hot=0, fallback_base=rows - fb,
               fallback_rows=fb, seed=int(rng.integers(0, 1 << 63)))


@pytest.mark.parametrize("cls", [FrequencyMapper, LearnedMapper])
def test_table_mapper_matches_reference_on_seen_unseen_and_extremes(cls):
    rng = np.random.default_rng(1)
    m = random_mapper(rng, cls, 5000, 997)
    seen = m.keys[rng.integers(0, m.entries, 3000)]
    unseen = rng.integers(I64_MIN, I64_MAX, size=3000, dtype=np.int64)
    ids = np.concatenate([seen, unseen, EXTREMES])
    got = m.map(ids)
    assert got.dtype == np.int64 and got.shape == ids.shape
    assert got.tolist() == ref_map(m, ids.tolist())
    assert got.min() >= 0 and got.max() < m.rows
    # unseen ids stay in the fallback range
    miss = ~np.isin(ids, m.keys)
    assert miss.sum() > 2500
    assert (got[miss] >= m.fallback_base).all()


@pytest.mark.parametrize("cls", [FrequencyMapper, LearnedMapper])
def test_empty_input_and_empty_table(cls):
    m = cls(10, keys=np.zeros(0, np.int64), values=np.zeros(0, np.int64), hot=0, fallback_base=0, fallback_rows=10)
    assert m.map(np.zeros(0, np.int64)).shape == (0,)
    got = m.map(EXTREMES)
    assert got.tolist() == [ref_hash_row(int(i), m.seed, 0, 10) for i in EXTREMES]


def test_sentinel_key_int64_min_is_a_normal_key():
    m = LearnedMapper(8, keys=np.array([I64_MIN, 5], np.int64), values=np.array([3, 4]), hot=0,
                      fallback_base=6, fallback_rows=2)
    assert m.map(np.array([I64_MIN, 5, 6], np.int64)).tolist()[:2] == [3, 4]
    m2 = LearnedMapper(8, keys=np.array([5], np.int64), values=np.array([4]), hot=0, fallback_base=6, fallback_rows=2)
    assert m2.map(np.array([I64_MIN], np.int64))[0] in (6, 7)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(I64_MIN, I64_MAX), unique=True, max_size=60),
       st.lists(st.integers(I64_MIN, I64_MAX), max_size=60),
       st.integers(2, 50), st.integers(0, (1 << 64) - 1), st.lists(st.integers(0, 3), max_size=9))
def test_lookup_kernel_property(keys, queries, rows, seed, codes):
    keys_a = np.array(keys, dtype=np.int64)
    fb = 1 + rows // 3
    values = (np.arange(len(keys)) % (rows - fb)).astype(np.int64)
    # codes 1..3 address rows [0, 3), clear of the fallback range [rows - fb, rows)
    codes_a = np.array(codes, dtype=np.uint8) if rows - fb >= 3 else None
    m = LearnedMapper(rows, keys=keys_a, values=values, hot=0, fallback_base=rows - fb, fallback_rows=fb, seed=seed,
                      codes=codes_a, code_seed=seed ^ 0x5555)
    ids = np.array(queries + keys, dtype=np.int64)
    assert m.map(ids).tolist() == ref_map(m, ids.tolist())


def test_hash_rows_matches_reference():
    rng = np.random.default_rng(2)
    ids = np.concatenate([rng.integers(I64_MIN, I64_MAX, 2000, dtype=np.int64), EXTREMES])
    got = hash_rows(ids, 12345, 7, 1000)
    assert got.tolist() == [ref_hash_row(int(i), 12345, 7, 1000) for i in ids]
    # the range reduction is close to uniform
    counts = np.bincount(hash_rows(np.arange(200_000, dtype=np.int64), 1, 0, 100), minlength=100)
    assert counts.min() > 1700 and counts.max() < 2300


def test_build_table_rejects_duplicates_and_bad_ranges():
    with pytest.raises(MappingError, match="duplicate id 7"):
        build_table(np.array([7, 3, 7], np.int64), np.array([0, 1, 2], np.int64))
    with pytest.raises(MappingError, match="duplicate id"):
        build_table(np.array([I64_MIN, I64_MIN], np.int64), np.array([0, 1], np.int64))
    with pytest.raises(MappingError, match="fallback range"):
        LearnedMapper(10, keys=np.array([1]), values=np.array([9]), hot=0, fallback_base=8, fallback_rows=2)
    with pytest.raises(MappingError, match="outside"):
        LearnedMapper(10, keys=np.array([1]), values=np.array([10]), hot=0, fallback_base=8, fallback_rows=2)
    with pytest.raises(MappingError, match="non-empty"):
        LearnedMapper(10, keys=np.array([1]), values=np.array([1]), hot=0, fallback_base=10, fallback_rows=0)
    m = LearnedMapper(10, keys=np.array([1]), values=np.array([1]), hot=0, fallback_base=8, fallback_rows=2)
    with pytest.raises(MappingError, match="1-d int64"):
        m.map(np.array([1, 2], dtype=np.int32))


def test_table_layout_is_deterministic_aligned_and_at_most_half_full():
    rng = np.random.default_rng(3)
    keys = np.unique(rng.integers(0, 1 << 40, 1000, dtype=np.int64))
    t1, t2 = build_table(keys, np.arange(keys.size)), build_table(keys, np.arange(keys.size))
    assert np.array_equal(t1.words, t2.words)
    assert t1.words.ctypes.data % BUCKET_BYTES == 0 and t1.buckets == table_buckets(keys.size)
    assert keys.size <= 0.5 * t1.capacity and t1.nbytes == t1.buckets * BUCKET_BYTES
    slots = t1.words.reshape(-1, 8)[:, :5]
    assert (slots != EMPTY_KEY).sum() == keys.size == t1.entries
    got_keys, got_rows = t1.items()
    assert sorted(zip(got_keys.tolist(), got_rows.tolist())) == list(zip(keys.tolist(), range(keys.size)))


def test_version_1_mappers_map_every_id_as_version_1_did(tmp_path):
    # blobs and rows written by the version-1 layout (power-of-two slot table), fitted on
    # a Zipf stream with the marker id int64 min among the keys
    data = np.load(os.path.join(DATA, "table_mappers_v1.npz"))
    blobs = {}
    for name, cls in (("learned", LearnedMapper), ("frequency", FrequencyMapper)):
        blob = blobs[name] = data[name].tobytes()
        assert b'"version": 1' in blob[:400]
        m = load_mapper(blob)
        assert type(m) is cls
        assert np.array_equal(m.map(data["queries"]), data[f"{name}_rows"])
        again = load_mapper(m.to_bytes())  # rewritten as version 2: the same rows
        assert again == m and np.array_equal(again.map(data["queries"]), data[f"{name}_rows"])
        assert again.to_bytes().startswith(MAPPER_MAGIC) and b'"version": 2' in again.to_bytes()[:600]
    # a mapping file saved before the new layout loads from the store as it mapped then
    header = json.dumps({"version": 5, "features": [[f, len(b)] for f, b in sorted(blobs.items())]}).encode()
    store = MappingStore(tmp_path)
    with open(store.path(5), "wb") as fh:
        fh.write(SET_MAGIC + struct.pack("<I", len(header)) + header + b"".join(b for _, b in sorted(blobs.items())))
    loaded = store.load()
    assert loaded.version == 5
    for name in blobs:
        assert np.array_equal(loaded[name].map(data["queries"]), data[f"{name}_rows"])


def test_spilled_keys_wrap_around_and_flag_their_home_bucket():
    # 12 keys whose home is the last of 6 buckets: 5 stay, 7 spill into buckets 0 and 1
    rng = np.random.default_rng(7)
    cand = rng.integers(I64_MIN, I64_MAX, 2000, dtype=np.int64)
    buckets = table_buckets(12)
    keys = cand[home_bucket(cand, buckets) == buckets - 1][:12]
    t = build_table(keys, np.arange(12))
    assert t.buckets == buckets
    stored = t.words.reshape(-1, 8)[:, :5]
    assert set(stored[-1]) == set(keys[:5].tolist()) and set(stored[0]) == set(keys[5:10].tolist())
    miss = t.rows32.reshape(-1, 16)[:, 15]
    assert miss[-1] == NO_ROW and (miss[:-1] == ABSENT).all()
    absent_here = cand[(home_bucket(cand, buckets) == buckets - 1) & ~np.isin(cand, keys)][:20]
    absent_elsewhere = cand[home_bucket(cand, buckets) != buckets - 1][:20]
    ids = np.concatenate([keys, absent_here, absent_elsewhere, [EMPTY_KEY]])
    got = table_lookup(t, ids, 99, 100, 7)
    assert got[:12].tolist() == list(range(12))
    assert got[12:].tolist() == [ref_hash_row(int(i), 99, 100, 7) for i in ids[12:]]


def test_codes_map_ids_absent_from_the_table_and_are_validated():
    codes = np.array([0, 1, 2, 0, 3, 3, 0, 1], dtype=np.uint8)
    m = LearnedMapper(20, keys=np.array([11, 12], np.int64), values=np.array([0, 1]), hot=2, fallback_base=17,
                      fallback_rows=3, codes=codes, code_seed=42, code_base=2)
    ids = np.concatenate([[11, 12, EMPTY_KEY], np.arange(500, dtype=np.int64) * 7919])
    got = m.map(ids)
    assert got.tolist() == ref_map(m, ids.tolist())
    assert set(got[3:].tolist()) == {2, 3, 4} | set(range(17, 20))  # code rows and fallback only
    assert m.nbytes == m.table.nbytes + codes.nbytes
    assert load_mapper(m.to_bytes()) == m
    with pytest.raises(MappingError, match="overlap the fallback"):
        LearnedMapper(20, keys=[], values=[], hot=0, fallback_base=2, fallback_rows=3, codes=codes, code_base=0)
    with pytest.raises(MappingError, match="outside"):
        LearnedMapper(20, keys=[], values=[], hot=0, fallback_base=0, fallback_rows=3, codes=codes, code_base=18)
    with pytest.raises(MappingError, match="uint8/16/32"):
        LearnedMapper(20, keys=[], values=[], hot=0, fallback_base=0, fallback_rows=3, codes=codes.astype(np.int64))


def test_stored_tables_are_checked_on_load():
    rng = np.random.default_rng(8)
    keys = rng.integers(I64_MIN, I64_MAX, 40, dtype=np.int64)
    t = build_table(keys, np.arange(40))
    assert np.array_equal(table_from_words(t.words.copy(), -1).words, t.words)
    grid = t.words.reshape(-1, 8)
    used = np.flatnonzero(grid[:, 0] != EMPTY_KEY)
    moved = t.words.copy().reshape(-1, 8)  # a key moved to a bucket a lookup never reaches
    free_b = int(np.flatnonzero(grid[:, 4] == EMPTY_KEY)[-1])
    j = int(np.argmax(moved[free_b, :5] == EMPTY_KEY))
    moved[free_b, j] = moved[used[0], 0] ^ 1
    moved.view(np.uint32)[free_b, 10 + j] = 3
    with pytest.raises(MappingError, match="not found where stored"):
        table_from_words(moved.ravel(), -1)
    bad_row = t.words.copy()
    bad_row.view(np.uint32).reshape(-1, 16)[0, 15] = 5  # miss word must be ABSENT or NO_ROW
    with pytest.raises(MappingError, match="malformed"):
        table_from_words(bad_row, -1)
    with pytest.raises(MappingError, match="whole 64-byte buckets"):
        table_from_words(t.words[:-1], -1)


def test_table_mapper_pickles_through_its_bytes_keeping_alignment():
    rng = np.random.default_rng(9)
    m = random_mapper(rng, LearnedMapper, 300, 101)
    back = pickle.loads(pickle.dumps(m))
    assert back == m and back.table.words.ctypes.data % BUCKET_BYTES == 0
    ids = rng.integers(I64_MIN, I64_MAX, 100, dtype=np.int64)
    assert np.array_equal(back.map(ids), m.map(ids))


@pytest.mark.parametrize("cls", [FrequencyMapper, LearnedMapper])
def test_round_trip_bytes_and_mapping_set(cls, tmp_path):
    rng = np.random.default_rng(4)
    m = random_mapper(rng, cls, 2000, 501)
    blob = m.to_bytes()
    back = load_mapper(blob)
    assert type(back) is cls and back == m and back.to_bytes() == blob
    ids = np.concatenate([m.keys[:500], rng.integers(I64_MIN, I64_MAX, 500, dtype=np.int64), EXTREMES])
    assert np.array_equal(back.map(ids), m.map(ids))
    ms = MappingSet(3, {"a": m, "b": make_mapper("modulo", 17)})
    MappingStore(tmp_path).save(ms)
    loaded = MappingStore(tmp_path).load()
    assert loaded.version == 3 and loaded == ms
    assert np.array_equal(loaded["a"].map(ids), m.map(ids))
    with pytest.raises(MappingError, match="checksum"):
        load_mapper(blob[:-1] + bytes([blob[-1] ^ 1]))


def test_frequency_defaults_hash_everything_else_into_the_rest():
    m = FrequencyMapper(10, keys=np.array([100, 200], np.int64), values=np.array([0, 1], np.int64))
    assert (m.hot, m.fallback_base, m.fallback_rows) == (2, 2, 8)
    got = m.map(np.arange(1000, dtype=np.int64) + 1000)
    assert got.min() >= 2 and got.max() <= 9


@pytest.mark.parametrize("with_codes", [False, True])
def test_prefetching_kernel_matches_reference_on_spill_chains_and_batch_edges(with_codes):
    # a table past PREFETCH_MIN_BYTES (the prefetching lookup), two long spill chains (one
    # wrapping past the last bucket), ids absent from chained buckets, negative ids and
    # both int64 extremes, mapped whole and in slices around the prefetch distance
    rng = np.random.default_rng(11)
    n = 12_000
    buckets = table_buckets(n)
    assert buckets * BUCKET_BYTES > PREFETCH_MIN_BYTES
    cand = rng.integers(I64_MIN, I64_MAX, 400_000, dtype=np.int64)  # distinct (seeded; no 64-bit collision)
    home = home_bucket(cand, buckets)
    chained = (home == buckets - 1) | (home == buckets // 2)
    cluster = np.concatenate([cand[home == buckets - 1][:24], cand[home == buckets // 2][:24]])
    extremes = EXTREMES[[3, 6]] if with_codes else EXTREMES[[0, 3, 6]]
    keys = np.concatenate([cluster, rng.permutation(cand[~chained])[:n - 48 - extremes.size], extremes])
    rows = 20_000
    codes = rng.integers(0, 1000, 3001).astype(np.uint16) if with_codes else None
    m = LearnedMapper(rows, keys=rng.permutation(keys), values=rng.integers(0, 15_000, keys.size), hot=0,
                      fallback_base=16_000, fallback_rows=4000, seed=int(rng.integers(0, 1 << 63)), codes=codes,
                      code_seed=77, code_base=15_000)
    miss = m.table.rows32.reshape(-1, 16)[:, 15]
    assert miss[buckets - 1] == NO_ROW and miss[buckets // 2] == NO_ROW
    assert np.isin(m.table.words.reshape(-1, 8)[0, :5], cluster).any()  # the chain wrapped
    chain_homes = (home >= buckets - 1) | (home <= 4) | ((home >= buckets // 2) & (home <= buckets // 2 + 5))
    absent = cand[chain_homes][~np.isin(cand[chain_homes], keys)][:300]
    ids = np.concatenate([keys[rng.integers(0, keys.size, 4000)], cluster, absent, -np.abs(keys[:500]),
                          rng.integers(I64_MIN, I64_MAX, 2000, dtype=np.int64), EXTREMES])
    ids = rng.permutation(ids)
    want = np.array(ref_map(m, ids.tolist()), dtype=np.int64)
    assert np.array_equal(m.map(ids), want)
    for start, length in ((0, 0), (5, 1), (17, 63), (100, 64), (300, 65), (1000, 129), (ids.size - 70, 70)):
        assert np.array_equal(m.map(ids[start:start + length]), want[start:start + length]), (start, length)
