"""Eviction policies of the embedding row cache: which cached slots make room for misses.

A policy tracks one score per cache slot and never sees row numbers or row values, so it
is pure bookkeeping over CPU tensors, O(capacity) per eviction (one ``topk``). (``index_*``
ops, not ``t[idx]``: advanced indexing is 10-100x slower on the CPU build used here.) Slots that
hold nothing yet are always chosen first. Pinned slots (rows the current batch uses) are
never chosen.

Example:
    >>> import torch
    >>> p = make_policy(RowCachePolicy.LRU, capacity=3)
    >>> p.on_access(torch.tensor([0, 1, 2]), tick=1)
    >>> p.on_access(torch.tensor([0]), tick=2)
    >>> p.victims(1, pinned=torch.zeros(3, dtype=torch.bool)).tolist()
    [1]
"""

from __future__ import annotations

import abc

import torch

from trainer.config import RowCachePolicy

__all__ = ["EvictionPolicy", "LRUPolicy", "LFUPolicy", "make_policy", "RowCachePolicy"]

_NEVER = -1  # tick of a slot that has never held a row
_PINNED = torch.iinfo(torch.int64).max
_TICK_BITS = 40  # ticks (steps) stay below 2**40; LFU packs (count, tick) into one int64


class EvictionPolicy(abc.ABC):
    """Scores for ``capacity`` slots; the lowest-scoring unpinned slots are evicted first."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1 rows, got {capacity}")
        self.capacity = capacity
        self.last_used = torch.full((capacity,), _NEVER, dtype=torch.int64)

    def on_access(self, slots: torch.Tensor, tick: int) -> None:
        """Record that ``slots`` (unique) were used at step ``tick`` (non-decreasing)."""
        self.last_used.index_fill_(0, slots, tick)

    def on_insert(self, slots: torch.Tensor) -> None:
        """``slots`` now hold newly fetched rows (their history is forgotten)."""

    def reset(self) -> None:
        """Forget every slot, as if the cache were empty."""
        self.last_used.fill_(_NEVER)

    def victims(self, count: int, pinned: torch.Tensor) -> torch.Tensor:
        """The ``count`` unpinned slots to evict, lowest score first. ValueError when fewer
        than ``count`` slots are unpinned."""
        free = self.capacity - int(pinned.sum())
        if count > free:
            raise ValueError(f"need {count} slots but only {free} of {self.capacity} are unpinned")
        score = self._scores().masked_fill(pinned, _PINNED)
        return torch.topk(score, count, largest=False, sorted=True).indices

    @abc.abstractmethod
    def _scores(self) -> torch.Tensor:
        """int64 score per slot; empty slots must score below any used slot."""


class LRUPolicy(EvictionPolicy):
    """Evict the least recently used row."""

    def _scores(self) -> torch.Tensor:
        return self.last_used.clone()


class LFUPolicy(EvictionPolicy):
    """Evict the row used in the fewest steps since it entered the cache; among equals the
    least recently used one (so a burst of one-off rows evicts itself, not the hot set)."""

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.count = torch.zeros(capacity, dtype=torch.int64)

    def on_access(self, slots: torch.Tensor, tick: int) -> None:
        super().on_access(slots, tick)
        self.count.index_add_(0, slots, torch.ones_like(slots))

    def on_insert(self, slots: torch.Tensor) -> None:
        self.count.index_fill_(0, slots, 0)

    def reset(self) -> None:
        super().reset()
        self.count.zero_()

    def _scores(self) -> torch.Tensor:
        # Empty slots have count 0 and tick -1: (0 << 40) - 1 is below every used slot.
        return (self.count << _TICK_BITS) + self.last_used


def make_policy(kind: RowCachePolicy, capacity: int) -> EvictionPolicy:
    if kind is RowCachePolicy.LRU:
        return LRUPolicy(capacity)
    if kind is RowCachePolicy.LFU:
        return LFUPolicy(capacity)
    raise ValueError(f"unknown row cache policy {kind!r}; "
                     f"expected one of {[p.value for p in RowCachePolicy]}")
