"""storage.migration_stats: the id counts a mapping version was fitted on, pinned beside it."""

from __future__ import annotations

import numpy as np
import pytest

from storage.errors import CacheError
from storage.mapping_store import MappingStore
from storage.migration_stats import (
    load_migration_stats,
    migration_stats_path,
    save_migration_stats,
)
from transforms.mappers import MappingSet, make_mapper


def test_saved_counts_load_back_and_follow_pruned_versions(tmp_path):
    store = MappingStore(tmp_path / "mappings")
    assert load_migration_stats(store, 1) is None
    stats = {"user": (np.array([5, -3, 9], np.int64), np.array([2.0, 0.0, 7.5])),
             "item id": (np.zeros(0, np.int64), np.zeros(0))}
    for v in (1, 2, 3):
        save_migration_stats(store, v, stats)
        store.save(MappingSet(v, {"user": make_mapper("modulo", 8), "item id": make_mapper("modulo", 4)}))
    got = load_migration_stats(store, 2)
    assert list(got) == ["user", "item id"]
    assert got["user"][0].dtype == np.int64 and got["user"][0].tolist() == [5, -3, 9]
    assert got["user"][1].tolist() == [2.0, 0.0, 7.5] and got["item id"][0].size == 0
    # a version the store pruned loses its counts with the next save
    assert store.prune(1) == [1, 2]
    save_migration_stats(store, 4, stats)
    assert load_migration_stats(store, 1) is None and load_migration_stats(store, 2) is None
    assert load_migration_stats(store, 3) is not None and load_migration_stats(store, 4) is not None


def test_unreadable_counts_name_the_file(tmp_path):
    store = MappingStore(tmp_path)
    save_migration_stats(store, 1, {"u": (np.arange(3), np.ones(3))})
    with open(migration_stats_path(store, 1), "wb") as fh:
        fh.write(b"not an npz")
    with pytest.raises(CacheError, match="stats-000000000001.npz"):
        load_migration_stats(store, 1)
