"""CachedEmbeddingBagCollection contracts: errors, binding, checkpoint hooks, config wiring."""

from __future__ import annotations

import pytest
import torch

from engine.config import RowCachePolicy, RowOptimizerKind, config_from_dict
from engine.errors import CheckpointError, ConfigError, TrainerError
from trainer.batch import Jagged
from trainer.cached_embedding import CachedEmbeddingBagCollection, build_cached_embeddings, open_row_store
from trainer.embedding import EmbeddingBagCollection, TableSpec

TABLES = [TableSpec("f", 100, 4)]


def single(values) -> dict[str, Jagged]:
    values = torch.tensor(values)
    return {"f": Jagged(values, torch.arange(len(values) + 1))}


@pytest.fixture
def ebc(tmp_path):
    store = open_row_store(str(tmp_path / "rows"), TABLES, RowOptimizerKind.ROWWISE_ADAGRAD, seed=0, sync=False)
    module = CachedEmbeddingBagCollection(TABLES, store, cache_rows=4, learning_rate=0.5)
    yield module
    module.close()


def test_forward_matches_the_plain_collection_and_reports_hits(ebc):
    plain = EmbeddingBagCollection(TABLES, seed=0)
    batch = single([3, 9, 3])
    torch.testing.assert_close(ebc(batch), plain(batch), rtol=0, atol=0)
    ebc(single([9]))
    assert (ebc.last_step.lookups, ebc.last_step.hits) == (1, 1)
    assert ebc.stats.lookups == 3 and ebc.stats.hit_rate == pytest.approx(1 / 3)


def test_misuse_is_reported(ebc):
    with pytest.raises(TrainerError, match="row 100 is outside its table of 100 rows"):
        ebc(single([100]))
    with pytest.raises(TrainerError, match="uses 5 distinct rows but the row cache holds 4"):
        ebc(single([1, 2, 3, 4, 5]))
    ebc(single([1])).sum().backward()
    with pytest.raises(TrainerError, match="call embeddings.sparse_step"):
        ebc(single([1]))
    ebc.sparse_step()
    with pytest.raises(TrainerError, match="call embeddings.flush"):
        ebc.checkpoint_state()
    ebc.flush()
    state = ebc.checkpoint_state()
    with pytest.raises(CheckpointError, match="written with row store"):
        ebc.load_checkpoint_state({**state, "store_id": "elsewhere"})


def test_restoring_a_checkpoint_drops_later_updates(ebc):
    before = ebc(single([1, 2]))
    ebc.flush()
    state = ebc.checkpoint_state()
    for _ in range(3):
        ebc(single([1, 2])).sum().backward()
        ebc.sparse_step()
        ebc(single([5, 6, 7, 8]))  # evicts 1 and 2: their updates reach the store
    ebc.load_checkpoint_state(state)
    torch.testing.assert_close(ebc(single([1, 2])), before, rtol=0, atol=0)


def test_a_fresh_collection_ignores_rows_left_by_an_earlier_run(tmp_path):
    path = str(tmp_path / "rows")
    first = CachedEmbeddingBagCollection(
        TABLES, open_row_store(path, TABLES, RowOptimizerKind.SGD, seed=0, sync=False),
        cache_rows=4, optimizer=RowOptimizerKind.SGD)
    initial = first(single([1])).detach()
    first(single([1])).sum().backward()
    first.sparse_step()
    first.flush()
    first.close()
    second = CachedEmbeddingBagCollection(
        TABLES, open_row_store(path, TABLES, RowOptimizerKind.SGD, seed=0, sync=False),
        cache_rows=4, optimizer=RowOptimizerKind.SGD)
    torch.testing.assert_close(second(single([1])), initial, rtol=0, atol=0)
    second.close()


def test_config_builds_the_cached_collection(tmp_path):
    cfg = config_from_dict({
        "schema": {"sparse": [{"name": "a", "rows": 1000}, {"name": "b", "rows": 50}]},
        "trainer": {"embedding_dim": 4, "bottom_mlp": [4], "device": "cpu"},
        "row_cache": {"enabled": True, "path": str(tmp_path / "rows"), "cache_bytes": 400,
                      "policy": "lfu", "tables": ["a"]},
    })
    ebc = build_cached_embeddings(cfg)
    try:
        assert ebc.feature_names == ("a",)
        assert ebc.cache_capacity("a") == 400 // (4 * (4 + 1))  # weights + one Adagrad float per row
        assert ebc.store.tables["a"].state_dim == 1
    finally:
        ebc.close()
    with pytest.raises(ConfigError, match=r"\[row_cache.policy\] value 'mru' is not one of 'lru', 'lfu'"):
        config_from_dict({"schema": {"sparse": [{"name": "a"}]}, "row_cache": {"policy": "mru"}})
    with pytest.raises(ConfigError, match="set cache_rows or cache_bytes"):
        config_from_dict({"schema": {"sparse": [{"name": "a"}]},
                          "row_cache": {"enabled": True, "cache_bytes": 0}})
    assert RowCachePolicy("lru") is RowCachePolicy.LRU
