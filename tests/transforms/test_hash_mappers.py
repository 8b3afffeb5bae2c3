"""Table mappers (frequency, learned) and their Numba kernels against plain-Python references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import MappingError
from storage.mapping_store import MappingStore
from transforms.hash_kernels import EMPTY_KEY, build_table, hash_rows
from transforms.learned_hash import FrequencyMapper, LearnedMapper
from transforms.mappers import MappingSet, load_mapper, make_mapper

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
    """What a table mapper must return, from its stored (key, row) pairs and a dict."""
    table = dict(zip(mapper.keys.tolist(), mapper.values.tolist()))
    return [table[i] if i in table else ref_hash_row(i, mapper.seed, mapper.fallback_base, mapper.fallback_rows)
            for i in ids]


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
       st.integers(2, 50), st.integers(0, (1 << 64) - 1))
def test_lookup_kernel_property(keys, queries, rows, seed):
    keys_a = np.array(keys, dtype=np.int64)
    fb = 1 + rows // 3
    values = (np.arange(len(keys)) % (rows - fb)).astype(np.int64)
    m = LearnedMapper(rows, keys=keys_a, values=values, hot=0, fallback_base=rows - fb, fallback_rows=fb, seed=seed)
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


def test_table_is_deterministic_and_half_full():
    rng = np.random.default_rng(3)
    keys = np.unique(rng.integers(0, 1 << 40, 1000, dtype=np.int64))
    t1, t2 = build_table(keys, np.arange(keys.size)), build_table(keys, np.arange(keys.size))
    assert np.array_equal(t1.slots, t2.slots)
    assert t1.capacity >= 2 * keys.size and t1.capacity & (t1.capacity - 1) == 0
    assert (t1.slots[0::2] != EMPTY_KEY).sum() == keys.size


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
