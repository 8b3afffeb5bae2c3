"""Config section [row_cache]: SSD-backed embedding rows with a device/DRAM cache.

When ``enabled``, the tables named in ``tables`` (all sparse features when empty) keep every
row and its row-wise optimizer state in ``storage.row_store.RowStore`` files under ``path``
and train through ``trainer.cached_embedding.CachedEmbeddingBagCollection``, which holds at
most ``cache_rows`` rows of each table (or as many as fit in ``cache_bytes``) on the
trainer's device.

Example:
    >>> RowCacheConfig(enabled=True, cache_rows=4096).policy
    <RowCachePolicy.LRU: 'lru'>
"""

from __future__ import annotations

import dataclasses
import enum

__all__ = ["RowCacheConfig", "RowCachePolicy", "RowOptimizerKind"]


class RowCachePolicy(enum.Enum):
    """Which cached row is evicted when a miss needs a slot."""

    LRU = "lru"  # least recently used
    LFU = "lfu"  # least frequently used while cached; ties broken by recency


class RowOptimizerKind(enum.Enum):
    """Update applied to cached rows; its state lives beside each row on SSD."""

    ROWWISE_ADAGRAD = "rowwise_adagrad"  # one accumulator per row: mean of squared grads
    SGD = "sgd"


@dataclasses.dataclass(frozen=True)
class RowCacheConfig:
    enabled: bool = False
    # Directory of the row store (one memory-mapped file per table, a manifest, undo logs).
    path: str = "./headrace-data/rows"
    # Cached rows per table on the device; 0 = derive from cache_bytes.
    cache_rows: int = 0
    # Device bytes per table for rows and their optimizer state, used when cache_rows = 0.
    cache_bytes: int = 64 << 20
    policy: RowCachePolicy = RowCachePolicy.LRU
    optimizer: RowOptimizerKind = RowOptimizerKind.ROWWISE_ADAGRAD
    # Added to sqrt(accumulator) in the row-wise Adagrad denominator.
    adagrad_eps: float = 1e-8
    # Read the next batch's missing rows in a background thread during the current step.
    prefetch: bool = True
    # fdatasync undo records before the rows they protect are overwritten, and the rows at
    # each checkpoint: survives power loss, not just a killed process (about 0.3 ms a step).
    fsync: bool = True
    # Features whose tables are cached; empty = every [[schema.sparse]] feature.
    tables: tuple[str, ...] = ()

    def __post_init__(self):
        if self.cache_rows < 0:
            raise ValueError(f"cache_rows must be >= 0 (0 = use cache_bytes), got {self.cache_rows}")
        if self.cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {self.cache_bytes}")
        if self.enabled and self.cache_rows == 0 and self.cache_bytes == 0:
            raise ValueError("set cache_rows or cache_bytes to a positive size (both are 0)")
        if not self.adagrad_eps > 0:
            raise ValueError(f"adagrad_eps must be > 0, got {self.adagrad_eps}")
        if not self.path:
            raise ValueError("path must name the row store directory")
        if len(set(self.tables)) != len(self.tables):
            raise ValueError(f"tables lists a feature twice: {list(self.tables)}")

    def cache_rows_for(self, row_bytes: int) -> int:
        """Rows of one table the cache holds, given the device bytes of one cached row
        (weights plus optimizer state)."""
        if self.cache_rows:
            return self.cache_rows
        return max(1, self.cache_bytes // max(1, row_bytes))
