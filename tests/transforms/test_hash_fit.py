"""Fitting frequency and learned mappings (transforms.hash_fit) and the sketch behind the stats."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import MappingError
from transforms.config import HashConfig
from transforms.hash_fit import (
    IdStats,
    LearnedFitParams,
    balanced_clusters,
    embedding_vectors,
    fit_frequency,
    fit_learned,
    fit_within_memory,
    mapping_report,
)
from transforms.hash_kernels import table_entries_within, table_nbytes
from transforms.mappers import ModuloMapper, load_mapper
from transforms.sketch import CountMinSketch


def zipf_stats(n: int, seed: int = 0, ctr_of=None) -> IdStats:
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(n, dtype=np.int64) * 1_000_003 - 5 * n)
    counts = np.floor(5e4 / np.arange(1, n + 1) ** 1.1) + 1
    ctr = 0.3 if ctr_of is None else ctr_of(ids)
    sums = rng.binomial(counts.astype(np.int64), ctr).astype(np.float64)
    return IdStats(ids, counts, sums)


def test_frequency_fit_gives_the_hottest_ids_own_rows():
    st = zipf_stats(5000)
    m = fit_frequency(st, 1000, hot_fraction=0.3)
    assert m.hot == 300 and m.fallback_base == 300 and m.fallback_rows == 700
    top = st.ids[np.argsort(-st.counts, kind="stable")[:300]]
    rows = m.map(top)
    assert sorted(rows.tolist()) == list(range(300))
    rest = m.map(np.setdiff1d(st.ids, top))
    assert rest.min() >= 300 and rest.max() < 1000


def test_learned_fit_structure_unseen_and_determinism():
    st = zipf_stats(20_000)
    p = LearnedFitParams(hot_fraction=0.25, reserve_fraction=0.05)
    m = fit_learned(st, 2000, p)
    assert m.hot == 500 and m.fallback_base == 1900 and m.fallback_rows == 100
    assert m.entries == 20_000  # every seen id is in the table
    hot_ids = st.ids[np.lexsort((st.ids, -st.counts))[:500]]
    assert sorted(m.map(hot_ids).tolist()) == list(range(500))
    shared = m.map(np.setdiff1d(st.ids, hot_ids))
    assert shared.min() >= 500 and shared.max() < 1900
    unseen = np.arange(10_000, dtype=np.int64) * 7 + 3  # none of these are multiples of 1_000_003 - offset
    unseen = unseen[~np.isin(unseen, st.ids)]
    got = m.map(unseen)
    assert got.min() >= 1900 and got.max() < 2000
    again = fit_learned(st, 2000, p)
    assert again.to_bytes() == m.to_bytes()
    assert load_mapper(m.to_bytes()) == m


def test_learned_fit_balances_access_mass_across_shared_rows():
    st = zipf_stats(50_000, seed=1)
    m = fit_learned(st, 4000, LearnedFitParams(hot_fraction=0.1, reserve_fraction=0.01))
    rep = mapping_report(m, st)
    freq = mapping_report(fit_frequency(st, 4000, hot_fraction=0.1), st)
    # bisection by mass keeps shared rows close to the mean mass (up to single heavy ids:
    # here the heaviest shared id alone carries ~2x the mean); hashing does not
    assert rep["mass_max_over_mean"] < 2.5 and rep["mass_max_over_mean"] < freq["mass_max_over_mean"]
    assert rep["mass_cv"] < 0.5 * freq["mass_cv"]


def population(ids):
    """Two planted populations, by a hash of the id."""
    return ((ids.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(63)).astype(bool)


def ctr_of(ids):
    return np.where(population(ids), 0.05, 0.6)


def mass_purity(rows, ids, counts, nrows):
    """Access-weighted share of each row's mass that comes from its majority population."""
    even = population(ids).astype(np.float64)
    mass = np.bincount(rows, weights=counts, minlength=nrows)
    share = np.bincount(rows, weights=even * counts, minlength=nrows)[mass > 0] / mass[mass > 0]
    return float((np.maximum(share, 1 - share) * mass[mass > 0]).sum() / mass.sum())


def test_learned_fit_groups_ids_with_similar_click_rates():
    # two planted populations: click rates 0.05 and 0.6; clusters should not mix them
    st = zipf_stats(40_000, seed=2, ctr_of=ctr_of)
    st = IdStats(st.ids, st.counts * 50, st.label_sums * 50)  # enough events per id to tell
    m = fit_learned(st, 1000, LearnedFitParams(hot_fraction=0.0, reserve_fraction=0.01))
    rows = m.map(st.ids)
    even = population(st.ids).astype(np.float64)
    share = np.bincount(rows, weights=even, minlength=1000) / np.maximum(np.bincount(rows, minlength=1000), 1)
    used = np.bincount(rows, minlength=1000) > 0
    purity = np.maximum(share[used], 1 - share[used])
    assert purity.mean() > 0.95
    # versus the hashing trick, which mixes them half and half
    mod = ModuloMapper(1000).map(st.ids)
    share_mod = np.bincount(mod, weights=even, minlength=1000) / np.bincount(mod, minlength=1000)
    assert np.maximum(share_mod, 1 - share_mod).mean() < 0.7


def test_learned_fit_within_mapper_bytes_codes_the_tail():
    st = zipf_stats(20_000, seed=2, ctr_of=ctr_of)
    st = IdStats(st.ids, st.counts * 50, st.label_sums * 50)
    p = LearnedFitParams(reserve_fraction=0.01, mapper_bytes=20_000)
    m = fit_learned(st, 1000, p)
    assert m.nbytes <= 20_000 < table_nbytes(st.distinct)  # the exact fit would not fit
    assert m.hot == m.entries == 250 and m.codes.dtype == np.uint16 and m.codes.size > 6000
    hot_ids = st.ids[np.lexsort((st.ids, -st.counts))[:250]]
    assert sorted(m.map(hot_ids).tolist()) == list(range(250))
    tail = ~np.isin(st.ids, hot_ids)
    rows = m.map(st.ids[tail])  # every seen tail id's code bucket has a cluster
    assert rows.min() >= 250 and rows.max() < m.fallback_base == 990
    # the heaviest id of a bucket steers its cluster: rows stay far purer than hashing's
    assert mass_purity(rows, st.ids[tail], st.counts[tail], 1000) > 0.75
    mod = ModuloMapper(1000).map(st.ids[tail])
    assert mass_purity(mod, st.ids[tail], st.counts[tail], 1000) < 0.7
    assert fit_learned(st, 1000, p).to_bytes() == m.to_bytes() and load_mapper(m.to_bytes()) == m
    assert mapping_report(m, st)["mapper_bytes"] == m.nbytes
    # no room for codes: the tail is hashed over every row the hot ids leave
    small = fit_learned(st, 1000, LearnedFitParams(mapper_bytes=640))
    assert small.codes.size == 0 and small.hot == table_entries_within(640)
    assert (small.fallback_base, small.fallback_rows) == (small.hot, 1000 - small.hot)


def test_fit_within_memory_takes_the_most_rows_that_fit():
    st = zipf_stats(5000)

    def fit(rows):
        return fit_frequency(st, rows, hot_fraction=0.5)
    m = fit_within_memory(40_000, 64, fit)
    assert m.rows * 64 + m.nbytes <= 40_000 < (m.rows + 1) * 64 + fit(m.rows + 1).nbytes
    assert m.rows < 40_000 // 64  # the id table took rows away
    with pytest.raises(MappingError, match="fits in 100 bytes"):
        fit_within_memory(100, 64, fit)


def test_mapper_bytes_cap_frequency_fits_and_come_from_config():
    st = zipf_stats(5000)
    m = fit_frequency(st, 1000, hot_fraction=0.5, mapper_bytes=640)
    assert m.hot == table_entries_within(640) and m.nbytes <= 640
    with pytest.raises(MappingError, match="cannot hold even an empty id table"):
        fit_frequency(st, 1000, mapper_bytes=10)
    assert LearnedFitParams.from_config(HashConfig(max_mapper_bytes=4096)).mapper_bytes == 4096
    with pytest.raises(ValueError, match="max_mapper_bytes"):
        HashConfig(max_mapper_bytes=10)
    with pytest.raises(MappingError, match="mapper_bytes"):
        LearnedFitParams(mapper_bytes=-1)


def test_learned_fit_small_vocabulary_gets_own_rows():
    st = zipf_stats(50)
    m = fit_learned(st, 100)
    rows = m.map(st.ids)
    assert len(set(rows.tolist())) == 50 and rows.max() < m.fallback_base


def test_balanced_clusters_edge_cases():
    assert balanced_clusters(np.zeros((0, 2)), np.zeros(0), 5).shape == (0,)
    out = balanced_clusters(np.arange(10, dtype=np.float32)[:, None], np.ones(10), 5)
    assert out.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    with pytest.raises(MappingError):
        balanced_clusters(np.zeros((3, 1)), np.ones(3), 0)


def test_embedding_vectors_use_the_current_rows():
    table = np.zeros((10, 3), np.float32)
    table[:, 0] = np.arange(10)
    ids = np.array([3, 13, 7], np.int64)
    vec = embedding_vectors(ids, ModuloMapper(10), table, 2)
    assert vec.shape == (3, 2)
    assert vec[0, 0] == pytest.approx(vec[1, 0]) and abs(vec[2, 0] - vec[0, 0]) == pytest.approx(4.0)
    with pytest.raises(MappingError, match="shape"):
        embedding_vectors(ids, ModuloMapper(11), table, 2)


def test_fit_rejects_bad_params():
    with pytest.raises(MappingError):
        LearnedFitParams(hot_fraction=0.9, reserve_fraction=0.2)
    with pytest.raises(MappingError, match="rows >= 2"):
        fit_learned(zipf_stats(10), 1)
    with pytest.raises(MappingError, match="equal-length"):
        IdStats(np.zeros(2, np.int64), np.zeros(3), np.zeros(2))


def test_count_min_sketch_bounds_and_round_trip():
    rng = np.random.default_rng(5)
    ids = rng.integers(-(1 << 63), (1 << 63) - 1, 3000, dtype=np.int64)
    counts = rng.integers(1, 50, ids.size).astype(np.float64)
    sk = CountMinSketch(width=4096, depth=4)
    sk.add(ids, counts, counts * 0.5)
    est, est_sum = sk.query(ids)
    assert (est >= counts).all()  # never under-estimates
    assert np.mean(est - counts) < np.e * counts.sum() / 4096
    assert (est_sum <= est).all()
    assert sk.total() == pytest.approx(counts.sum())
    back = CountMinSketch.from_bytes(sk.to_bytes())
    assert np.array_equal(back.cells, sk.cells)
    back.merge(sk)
    assert back.total() == pytest.approx(2 * counts.sum())
    with pytest.raises(MappingError):
        CountMinSketch.from_bytes(b"nope")
