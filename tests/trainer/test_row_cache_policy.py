"""Eviction policies (LRU, LFU) and the row-wise optimizer math."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.config import RowCachePolicy, RowOptimizerKind
from trainer.row_cache_policy import make_policy
from trainer.row_optim import RowWiseOptimizer, apply_row_update_

NONE_PINNED = torch.zeros(4, dtype=torch.bool)


def test_empty_slots_are_used_before_any_eviction():
    for kind in RowCachePolicy:
        p = make_policy(kind, 4)
        p.on_insert(torch.tensor([0, 2]))
        p.on_access(torch.tensor([0, 2]), tick=1)
        assert sorted(p.victims(2, NONE_PINNED).tolist()) == [1, 3]


def test_lru_evicts_the_least_recently_used_and_never_a_pinned_slot():
    p = make_policy(RowCachePolicy.LRU, 4)
    for tick, slot in enumerate([0, 1, 2, 3, 0], start=1):
        p.on_access(torch.tensor([slot]), tick)
    assert p.victims(2, NONE_PINNED).tolist() == [1, 2]
    assert p.victims(2, torch.tensor([False, True, False, False])).tolist() == [2, 3]


def test_lfu_keeps_frequent_rows_and_breaks_ties_by_recency():
    p = make_policy(RowCachePolicy.LFU, 4)
    p.on_insert(torch.arange(4))
    for tick in range(1, 6):
        p.on_access(torch.tensor([0]), tick)  # slot 0 is hot
    p.on_access(torch.tensor([1, 2]), 6)
    p.on_access(torch.tensor([3, 1]), 7)  # uses: 0 -> 5, 1 -> 2, 2 -> 1 (older), 3 -> 1
    assert p.victims(1, NONE_PINNED).tolist() == [2]
    p.on_insert(torch.tensor([2]))  # a new row in slot 2 starts from zero uses
    p.on_access(torch.tensor([2]), 8)
    assert p.victims(3, NONE_PINNED).tolist() == [3, 2, 1]


def test_asking_for_more_victims_than_unpinned_slots_is_an_error():
    p = make_policy(RowCachePolicy.LRU, 4)
    with pytest.raises(ValueError, match="need 2 slots but only 1 of 4 are unpinned"):
        p.victims(2, torch.tensor([True, True, True, False]))


def test_rowwise_adagrad_matches_the_formula():
    w, s = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5]])
    g = torch.tensor([[3.0, 1.0]])
    apply_row_update_(RowOptimizerKind.ROWWISE_ADAGRAD, w, s, g, lr=0.1, eps=1e-8)
    acc = 0.5 + (9.0 + 1.0) / 2
    torch.testing.assert_close(s, torch.tensor([[acc]]))
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0]]) - 0.1 * g / (acc ** 0.5 + 1e-8))


@pytest.mark.parametrize("kind", list(RowOptimizerKind))
def test_reference_optimizer_gives_the_same_rows_for_dense_and_sparse_gradients(kind):
    bags = []
    for sparse in (False, True):
        torch.manual_seed(0)
        bags.append(nn.EmbeddingBag(10, 3, mode="sum", sparse=sparse))
    opts = [RowWiseOptimizer([b], kind, lr=0.2) for b in bags]
    ids, offsets = torch.tensor([1, 4, 4, 7]), torch.tensor([0, 2])
    for _ in range(3):
        for bag, opt in zip(bags, opts):
            opt.zero_grad()
            (bag(ids, offsets) ** 2).sum().backward()
            opt.step()
    torch.testing.assert_close(bags[0].weight, bags[1].weight)
    torch.testing.assert_close(opts[0].state[0], opts[1].state[0])
    untouched = [0, 2, 3, 5, 6, 8, 9]
    torch.manual_seed(0)
    fresh = nn.EmbeddingBag(10, 3, mode="sum")
    torch.testing.assert_close(bags[1].weight[untouched], fresh.weight[untouched])
